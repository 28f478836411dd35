"""A bf16 run's checkpoints average (bf16 stays bf16), evaluate through inference and export to
Hugging Face with the same logits."""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import train_workers as workers  # noqa: E402

pytestmark = pytest.mark.slow  # ~35 s: a training run, an average, inference and an export


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from megatron_btm.data.tokenizer import train_bpe
    work = tmp_path_factory.mktemp("chain")
    text = work / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"count one two three {i}"}) + "\n" for i in range(50)))
    train_bpe([text], workers.CHAIN_VOCAB, work / "tokenizer.json")
    result = work / "result.json"
    workers.mp_workers.spawn(workers.chain_worker, 1, str(work), str(work / "tokenizer.json"),
                             str(result))
    return json.loads(result.read_text())


def test_average_keeps_bf16(chain):
    from megatron_btm.export.dcp_reader import list_tensors, read_tensors
    stored = {p: list_tensors(p) for p in (*chain["checkpoints"], chain["averaged"])}
    key = next(k for k in stored[chain["averaged"]] if k.endswith("linear_fc1.weight"))
    assert all(s[key][1] == torch.bfloat16 for s in stored.values())
    a, b = (read_tensors(p, [key])[key].float() for p in chain["checkpoints"])
    avg = read_tensors(chain["averaged"], [key])[key]
    assert not torch.equal(a, b)
    torch.testing.assert_close(avg.float(), ((a + b) / 2).bfloat16().float(), atol=0, rtol=0)


def test_inference_and_export_agree_on_the_averaged_bf16_checkpoint(chain):
    from transformers import GPT2LMHeadModel
    assert chain["avg"]["param_dtype"] == "torch.float32"  # inference upcasts the bf16 weights
    blocks = torch.tensor(chain["blocks"])
    model = GPT2LMHeadModel.from_pretrained(chain["hf"]).eval()
    with torch.no_grad():
        hf_logits = model(blocks[:, :-1]).logits
    ours = torch.tensor(chain["avg"]["logits"])
    torch.testing.assert_close(hf_logits, ours[..., :hf_logits.shape[-1]], atol=1e-4, rtol=0)
    hf_nll = -torch.log_softmax(hf_logits.double(), -1).gather(-1, blocks[:, 1:, None]).mean()
    assert chain["avg"]["nll"] == pytest.approx(float(hf_nll), abs=1e-4)


def test_bf16_training_evaluates_below_chance(chain):
    chance = torch.log(torch.tensor(float(workers.CHAIN_VOCAB))).item()
    assert chain["last"]["nll"] < chance - 0.1
    assert math.isfinite(chain["train_valid"])
