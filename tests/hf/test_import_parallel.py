"""An imported (TP=1-layout) checkpoint loads at TP=2 and at PP=2 with transformers' logits."""
import pytest
import torch
from hf_helpers import FAMILIES, hf_logits, save_hf_model, tokens

from megatron_btm.hf.importer import import_hf

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_imported_checkpoint_loads_at_tp2_and_pp2(tmp_path):
    import hf_workers
    refs, cases = {}, []
    # every family: GPT-2 (learned positions, Conv1D), Llama/Mistral (GQA: one KV head per TP
    # rank), Qwen2 (QKV bias, tied embeddings across stages), Qwen3 (QK-norm)
    for family in FAMILIES:
        model = save_hf_model(family, tmp_path / family)
        refs[family] = hf_logits(model, tokens())
        cases.append([family, str(import_hf(tmp_path / family, tmp_path / f"{family}-ckpt", tp=2, pp=2))])
    hf_workers.spawn(hf_workers.load_worker, 2, cases, str(tmp_path))
    for family, ref in refs.items():
        got = torch.load(tmp_path / f"{family}.pt")
        for layout in ("tp2", "pp2"):
            torch.testing.assert_close(got[layout], ref, atol=1e-4, rtol=0, msg=f"{family} {layout}")
