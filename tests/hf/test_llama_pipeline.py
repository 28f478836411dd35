"""The whole pipeline on a Llama-style model: a tiny random Llama (transformers, with a Llama-style
tokenizer: `<s>`/`</s>`, no `<|endoftext|>`) -> `btm import-hf` -> `btm preprocess --tokenizer`
-> a run plan seeded with the checkpoint (one cycle of 2 experts, in-process) -> `btm eval`,
`btm average`, `btm generate`, `btm export-hf` (transformers loads it and generates the same ids).
Greedy generation of the imported model equals transformers' on the original."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_helpers import save_tiny_llama

REPO = Path(__file__).resolve().parents[2]
DOMAINS = ("bible", "legal")
PROMPT = "And God said unto"
pytestmark = pytest.mark.slow


def btm(*args):
    proc = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def greedy_hf(model, ids, n=16):
    model.generation_config.eos_token_id = None  # ours does not stop at eos either (no --stop-at-eod)
    model.generation_config.pad_token_id = 0
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def greedy_btm(ckpt, tokenizer, out):
    btm("generate", "--checkpoint", ckpt, "--tokenizer", tokenizer, "--prompt", PROMPT,
        "--temperature", 0, "--max-new-tokens", 16, "--output", out)
    return json.loads(Path(out).read_text())["tokens"]


def test_llama_seed_cycle_eval_average_generate_export(corpora, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_btm.data.tokenizer import load_tokenizer
    corpus = tmp_path / "corpus"
    texts = []
    for d in DOMAINS:
        (corpus / d).mkdir(parents=True)
        for split, n in (("train", 30), ("valid", 6), ("test", 4)):
            lines = (corpora / d / f"{split}.jsonl").read_text().splitlines()[:n]
            (corpus / d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
            texts += [json.loads(x)["text"] for x in lines] if split == "train" else []
    hf_dir = tmp_path / "hf"
    model, fast = save_tiny_llama(hf_dir, texts)

    btm("preprocess", "--corpus", corpus, "--output", tmp_path / "data", "--tokenizer", hf_dir,
        "--workers", 1, "--no-progress")
    report = json.loads((tmp_path / "data" / "report.json").read_text())["tokenizer"]
    assert (report["eod_token"], report["eod"], report["model_vocab_size"]) == \
        ("</s>", fast.eos_token_id, len(fast))
    btm("import-hf", hf_dir, "--output", tmp_path / "ckpt", "--seq-length", 32)

    # single-model generation of the imported model == transformers on the original
    tok = load_tokenizer(hf_dir)
    prompt_ids = tok.encode(PROMPT)
    assert prompt_ids == fast(PROMPT, add_special_tokens=False).input_ids
    got = greedy_btm(tmp_path / "ckpt", hf_dir, tmp_path / "gen-seed.json")
    assert len(set(got)) > 2 and got == greedy_hf(model, prompt_ids)

    model_config = json.loads((tmp_path / "ckpt" / "iter_0000000" / "meta.json").read_text())["model_config"]
    train = {"model": model_config, "optim": {"lr": 0.003, "min_lr": 0.0003, "warmup_steps": 1},
             "steps": 2, "micro_batch_size": 2, "global_batch_size": 2, "eval_interval": 0,
             "eval_iters": 1, "save_interval": 2, "keep_checkpoints": 1, "tensorboard": False,
             "progress": False, "num_threads": 1}
    plan = {"name": "llama", "run_dir": str(tmp_path / "run"), "data_dir": str(tmp_path / "data"),
            "train": train, "seed": {"checkpoint": str(tmp_path / "ckpt" / "iter_0000000")},
            "cycles": [{"domains": list(DOMAINS), "steps": 2}],
            "branch": {"policy": "topk", "k": 1, "num_sequences": 2},  # no evaluation: btm eval below
            "executor": {"kind": "inprocess"}}
    (tmp_path / "plan.yaml").write_text(json.dumps(plan))  # JSON is YAML
    btm("run", tmp_path / "plan.yaml", "--executor", "inprocess")
    forest = tmp_path / "run" / "forest"
    assert json.loads((forest / "forest.json").read_text())["seed"]["extra"]["meta"]["source"] == \
        str(tmp_path / "ckpt" / "iter_0000000")
    assert sorted(json.loads((forest / "forest.json").read_text())["experts"]) == sorted(DOMAINS)

    btm("eval", "--forest", forest, "--data", tmp_path / "data", "--domains", ",".join(DOMAINS),
        "--topk", 1, "--max-blocks", 2, "--output", tmp_path / "eval.json")
    rows = json.dumps(json.loads((tmp_path / "eval.json").read_text()))
    assert "ensemble/uniform" in rows and "NaN" not in rows

    btm("average", "--forest", forest, "--method", "uniform", "--output", tmp_path / "avg", "--no-progress")
    averaged = greedy_btm(tmp_path / "avg", tmp_path / "data", tmp_path / "gen-avg.json")
    assert averaged != got  # the experts were trained: the average is another model

    btm("export-hf", "--checkpoint", tmp_path / "avg", "--tokenizer", hf_dir, "--output", tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert greedy_hf(exported, prompt_ids) == averaged
