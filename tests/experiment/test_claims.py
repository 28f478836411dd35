"""Claims and report numbers from synthetic run records, against hand-derived references."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from experiment_helpers import TRAIN, plan_dict, table, units  # noqa: E402

from megatron_btm.experiment import claims as C  # noqa: E402


def by_claim(summary, prefix):
    found = [c for c in summary["claims"] if c["claim"].startswith(prefix)]
    assert len(found) == 1, [c["claim"] for c in summary["claims"]]
    return found[0]


def test_mean_ppl_is_token_weighted():
    nll, tok = {"a": 2.0, "b": 4.0, "c": 3.0}, {"a": 10, "b": 30, "c": 60}
    t = table({"m": nll}, tokens=tok)
    want = math.exp(np.average(list(nll.values()), weights=list(tok.values())))
    assert C.mean_ppl(t, "m", ["a", "b", "c"]) == pytest.approx(want)
    assert math.isnan(C.mean_ppl(t, "m", ["a", "missing"]))
    assert math.isnan(C.mean_ppl(t, "other", ["a"]))


def test_noise_and_dense_reference_are_from_the_seeds():
    s = C.compute_claims(units(dense=(3.0, 3.05)), plan_dict())
    assert s["noise"] == pytest.approx(math.exp(0.05) - 1)
    assert s["dense_ppl_train"] == pytest.approx(math.exp(3.025))  # mean NLL of the seeds
    one = plan_dict(dense_seeds=[1])
    s1 = C.compute_claims(units(), one)
    assert math.isnan(s1["noise"])
    assert "noise unknown" in by_claim(s1, "ELMForest")["verdict"]


@pytest.mark.parametrize("ens, verdict", [(2.9, "held"), (3.0, "within noise"), (3.1, "did not hold")])
def test_ensemble_vs_dense_verdict_follows_the_numbers(ens, verdict):
    s = C.compute_claims(units(dense=(3.0, 3.02), ens=ens), plan_dict())
    c = by_claim(s, "ELMForest")
    assert c["gain"] == pytest.approx(math.exp(3.01 - ens) - 1)
    assert c["gain_over_noise"] == pytest.approx(c["gain"] / (math.exp(0.02) - 1))
    assert c["verdict"] == verdict


def test_averaging_topk_random_split_and_branching():
    s = C.compute_claims(units(post=3.1, uni_avg=3.3, top1=2.91, random=3.0, novel=(3.2, 3.4)),
                         plan_dict())
    assert by_claim(s, "posterior-weighted")["gain"] == pytest.approx(math.exp(0.2) - 1)
    assert by_claim(s, "posterior-weighted")["verdict"] == "held"
    top1 = by_claim(s, "top-1")
    assert top1["gain"] == pytest.approx(-(math.exp(0.01) - 1)) and top1["verdict"] == "held"
    assert by_claim(s, "domain experts")["gain"] == pytest.approx(math.exp(0.1) - 1)
    assert by_claim(s, "branching")["gain"] == pytest.approx(math.exp(0.2) - 1)
    worse = C.compute_claims(units(top1=2.95, random=2.85, novel=(3.4, 3.2)), plan_dict())
    assert by_claim(worse, "top-1")["verdict"] == "did not hold"
    assert by_claim(worse, "domain experts")["verdict"] == "did not hold"
    assert by_claim(worse, "branching")["verdict"] == "did not hold"


def test_interior_optimum_of_the_seed_fraction():
    held = C.compute_claims(units(sweep={0.0: 3.2, 0.5: 2.9, 0.75: 3.05}), plan_dict())
    c = by_claim(held, "the seed compute fraction")
    assert c["gain"] == pytest.approx(math.exp(0.15) - 1) and c["verdict"] == "held"
    edge = C.compute_claims(units(ens=3.0, sweep={0.0: 3.2, 0.5: 3.0, 0.75: 2.9}), plan_dict())
    c = by_claim(edge, "the seed compute fraction")
    assert c["gain"] == pytest.approx(math.exp(-0.1) - 1) and c["verdict"] == "did not hold"
    two = plan_dict(seed_fractions=[0.0, 0.5])
    assert not [c for c in C.compute_claims(units(), two)["claims"] if "seed compute" in c["claim"]]


def test_removal_compares_the_removed_domain_with_the_others():
    s = C.compute_claims(units(ens=2.9, removal={"alpha": 3.4, "beta": 2.92, "gamma": 2.9}), plan_dict())
    up_r, up_o = math.exp(0.5) - 1, math.exp(0.01) - 1  # others: mean NLL +0.01 over 2 equal domains
    assert s["removal"]["removed_increase"] == pytest.approx(up_r)
    assert s["removal"]["others_increase"] == pytest.approx(up_o)
    assert by_claim(s, "removing")["verdict"] == "held"
    flat = C.compute_claims(units(ens=2.9, removal={"alpha": 2.9, "beta": 2.9, "gamma": 2.9}), plan_dict())
    assert by_claim(flat, "removing")["verdict"] == "within noise"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_num_params_matches_the_megatron_model(arch):
    import torch
    from megatron_btm.megatron import parallel
    from megatron_btm.megatron.model import GPTConfig, build_model
    if not torch.distributed.is_initialized():
        parallel.init_distributed()
    parallel.setup_model_parallel(parallel.ParallelConfig())
    model = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
             "arch": arch}
    built = build_model(GPTConfig(**model, vocab_size=300))
    unique = {id(p): p.numel() for p in built.parameters()}
    assert C.num_params(model, 300) == sum(unique.values())
