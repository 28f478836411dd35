"""TP=2 x PP=2 training of a llama-preset model equals TP=1/PP=1 (real gloo groups)."""
import json

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_llama_tp2_pp2_matches_single_process_over_3_steps(tmp_path):
    import hf_workers
    hf_workers.spawn(hf_workers.llama_layout_worker, 1, str(tmp_path), 1, 1, str(tmp_path / "ref.json"))
    hf_workers.spawn(hf_workers.llama_layout_worker, 4, str(tmp_path), 2, 2, str(tmp_path / "tp2pp2.json"))
    ref = json.loads((tmp_path / "ref.json").read_text())
    got = json.loads((tmp_path / "tp2pp2.json").read_text())
    assert len(ref) == len(got) == 3
    assert ref[-1] < ref[0]  # it trains
    assert got == pytest.approx(ref, abs=1e-5), f"TP2xPP2 {got} vs TP1 {ref}"
