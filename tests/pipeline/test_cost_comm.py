"""The communication model of `btm plan cost`: ring all-reduce arithmetic and the CLI option."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_btm.pipeline import cost as C

REPO = Path(__file__).resolve().parents[2]


def test_ring_allreduce_on_hand_computed_numbers():
    # 4 ranks, 100 MB of gradients: each rank sends 2·3/4·100 MB = 150 MB
    assert C.allreduce_bytes(100e6, 4) == pytest.approx(150e6)
    assert C.allreduce_bytes(100e6, 1) == 0
    link = C.parse_interconnect("custom:8,10")          # 8 Gbit/s = 1e9 B/s, 10 µs per hop
    assert link.bandwidth_bytes_s == pytest.approx(1e9) and link.latency_s == pytest.approx(1e-5)
    # 150 MB / 1e9 B/s = 0.15 s, plus 2·3 hops × 10 µs = 60 µs
    assert C.allreduce_seconds(100e6, 4, link) == pytest.approx(0.15006)
    # compute 0.3 s per step: dense takes 0.45006 s, an expert 0.3 s
    assert C.updates_ratio(compute_s=0.3, grad_bytes=100e6, n=4, link=link) == pytest.approx(1.5002)
    assert C.updates_ratio(compute_s=0.3, grad_bytes=100e6, n=1, link=link) == 1.0


def test_paper_predictions_grow_with_slower_links():
    fast = C.paper_predictions(C.parse_interconnect("nvlink"))
    slow = C.paper_predictions(C.parse_interconnect("10gbe"))
    assert [r["model"] for r in fast] == ["125M", "350M", "750M", "1.3B"]
    for f, s in zip(fast, slow):
        assert 1 < f["ratio_experts_over_dense"] < s["ratio_experts_over_dense"]
        assert f["compute_s"] == pytest.approx(6 * f["params"] * 8192 / (125e12 * 0.3))


@pytest.mark.parametrize("spec", ["infiniband", "custom:", "custom:1", "custom:a,b", "custom:-1,5",
                                  "custom:10,-1", "custom:0,1", "custom:nan,1"])
def test_bad_interconnect_is_refused(spec):
    with pytest.raises(ValueError, match="interconnect"):
        C.parse_interconnect(spec)


def _btm(*args):
    return subprocess.run([sys.executable, "-m", "megatron_btm.cli", "plan", "cost", *args],
                          cwd=REPO, capture_output=True, text=True)


def test_cli_option(tmp_path):
    plan = str(REPO / "examples" / "btm-64-domains.yaml")
    out = tmp_path / "c.json"
    r = _btm(plan, "--interconnect", "custom:8,10", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "experts/dense updates/s" in r.stdout
    data = json.loads(out.read_text())["communication"]
    assert data["interconnect"]["bandwidth_bytes_s"] == pytest.approx(1e9)
    assert len(data["paper"]) == 4
    bad = _btm(plan, "--interconnect", "custom:oops")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "custom:oops" in bad.stderr
