"""bench/updates_per_second.py's helpers at n=2, 2 steps, loopback (no network namespaces)."""
import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PICO = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=128)


@pytest.fixture(scope="module")
def ups():
    sys.path.insert(0, str(REPO / "bench"))
    import updates_per_second
    return updates_per_second


@pytest.mark.slow
def test_experts_and_dense_at_n2(ups):
    args = argparse.Namespace(n=2, steps=2, warmup=1, shape=PICO, micro=2, timeout=300)
    experts = ups.run_ranks("expert", 2, args)
    dense = ups.run_ranks("dense", 2, args)
    for r in experts + dense:
        assert len(r["step_s"]) == 2 and r["updates_per_s"] > 0
    assert [r["world"] for r in dense] == [2, 2]
    # the gradient buffer Megatron DDP all-reduces: fp32, one value per parameter
    assert dense[0]["grad_bytes"] == 4 * dense[0]["params"]
    # each expert sees its own data, so their losses differ; dense ranks share one model
    assert experts[0]["first_loss"] != experts[1]["first_loss"]
    s = ups.summarise(dense)
    assert s["updates_per_s"] == pytest.approx(1 / s["median_step_s"])
    assert s["tokens_per_s_per_rank"] == pytest.approx(2 * 16 / s["median_step_s"])


def test_link_spec(ups):
    assert ups.parse_link("1gbit:0.2") == ("1gbit", 0.2)
    assert ups._rate_bytes("100mbit") == pytest.approx(12.5e6)
    with pytest.raises(ValueError, match="RATE:DELAY_MS"):
        ups.parse_link("1gbit")
    with pytest.raises(ValueError, match="gbit, mbit or kbit"):
        ups._rate_bytes("fast")
