"""Claims by budget, the measured crossover, domain-kind averaging and seed corpora, from
synthetic run records with hand-derived references."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from experiment_helpers import NOVEL, TRAIN, plan_dict, table, units  # noqa: E402

from megatron_btm.experiment import report  # noqa: E402
from megatron_btm.experiment import sweep as S  # noqa: E402


def budget(u, scale, dense, ens, post=None, seeds=(1, 2)):
    """Add dense units (one NLL per seed, all domains) and a forest at budget `scale`."""
    for s, nll in zip(seeds, dense):
        u[f"dense-x{scale:g}-s{s}"] = {"compute": {"tokens": int(4096 * scale)},
                                      "test": table({"model/dense": {d: nll for d in TRAIN + NOVEL}})}
    rows = {"ensemble/cached": {d: ens for d in TRAIN}}
    if post is not None:
        rows["model/posterior-average"] = {d: post for d in TRAIN}
    u[f"btm-x{scale:g}-f0.50"] = {"test": table(rows)}


def sweep_units():
    u = units(dense=(3.0, 3.01), ens=2.9, post=2.95)        # main budget: ensemble ahead
    budget(u, 0.25, (3.5, 3.52), 3.6, post=3.7)               # behind beyond the noise
    budget(u, 0.5, (3.2, 3.21), 3.202, post=3.1)              # within the noise
    return u, plan_dict(crossover_fractions=[0.25, 0.5])


def test_budget_rows_judge_each_budget_against_its_own_noise():
    u, plan = sweep_units()
    rows = S.budget_rows(u, plan, params=1024)
    assert [r["scale"] for r in rows] == [0.25, 0.5, 1.0]
    assert [r["tokens_per_param"] for r in rows] == [1.0, 2.0, 4.0]
    small, mid, main = rows
    assert small["noise_train"] == pytest.approx(math.exp(0.02) - 1)
    assert mid["noise_train"] == pytest.approx(math.exp(0.01) - 1)
    assert small["ensemble"]["gain"] == pytest.approx(math.exp(3.51 - 3.6) - 1)
    assert [r["ensemble"]["verdict"] for r in rows] == ["did not hold", "within noise", "held"]
    assert [r["posterior"]["verdict"] for r in rows] == ["did not hold", "held", "held"]
    # novel noise comes from the dense seeds on the novel domains (the same spread here)
    assert main["noise_novel"] == pytest.approx(math.exp(0.01) - 1)
    assert math.isnan(small["argmax_train"]["gain"])  # the forest has no argmax row: not run


def test_crossover_is_bracketed_by_run_budgets_not_fitted():
    u, plan = sweep_units()
    cross = S.measured_crossover(S.budget_rows(u, plan, params=1024))
    assert cross["sign_between"] == [1.0, 2.0]   # 3.51 vs 3.6 behind, then 3.205 vs 3.202 ahead
    assert cross["held_between"] == [2.0, 4.0]   # within noise at 2, held at 4
    del u["btm-f0.50"]                            # the largest budget not run (yet)
    cross = S.measured_crossover(S.budget_rows(u, plan, params=1024))
    assert cross["held_between"] is None and not cross["held_at_all_run_budgets"]
    assert len(cross["budgets"]) == 2


def test_domain_kind_and_posterior_claims():
    u, plan = sweep_units()
    # argmax = 2.95 on train (dense 3.005): ahead; on novel 3.2 vs dense 3.005: behind
    for d in TRAIN:
        u["btm-f0.50"]["test"][d]["model/argmax-average"]["nll"] = 2.95
    for d in NOVEL:
        u["btm-f0.50"]["test"][d]["model/argmax-average"] = {"nll": 3.2, "ppl": math.exp(3.2), "tokens": 100}
    claims = S.sweep_claims(u, plan, S.budget_rows(u, plan, params=1024))
    got = {c["claim"].split(" (")[0]: c for c in claims}
    arg = got["argmax parameter averaging"]
    assert arg["verdict"] == "held" and arg["gain"] == pytest.approx(math.exp(3.005 - 2.95) - 1)
    nov = got["argmax parameter averaging loses to the dense model on novel domains"]
    assert nov["verdict"] == "held" and nov["gain"] == pytest.approx(math.exp(3.2 - 3.005) - 1)
    post = got["posterior-weighted averaging beats dense at every budget but the smallest"]
    assert post["verdict"] == "held"   # loses at 0.25, wins at 0.5 and 1
    assert post["gain"] == pytest.approx(math.exp(3.005 - 2.95) - 1)  # the worse of the two wins


def test_seed_compute_helps_novel_domains_most():
    u, plan = sweep_units()
    for f, (tr, nv) in {0.0: (3.2, 3.9), 0.75: (3.05, 3.4)}.items():
        u[f"btm-f{f:.2f}"]["test"] = table({"ensemble/cached": {**{d: tr for d in TRAIN},
                                                                **{d: nv for d in NOVEL}}})
    claims = S.sweep_claims(u, plan, S.budget_rows(u, plan, params=1024))
    c = next(c for c in claims if c["claim"].startswith("more seed compute (0% → 75%)"))
    assert c["gain"] == pytest.approx((math.exp(0.5) - 1) - (math.exp(0.15) - 1))
    assert c["verdict"] == "held"


def test_seed_corpus_rows_and_section():
    u, plan = sweep_units()
    plan["seed_corpora"] = {"mixture": "all", "one": ["alpha"], "two": ["alpha", "beta"]}
    u["btm-seed-one"] = {"test": table({"ensemble/cached": {d: 3.1 for d in TRAIN}})}
    u["removal-alpha-seed-one"] = {"test": table({"ensemble/cached": {"alpha": 3.6, "beta": 3.1,
                                                                      "gamma": 3.1}})}
    claims = S.seed_corpus_claims(u, plan, S.budget_rows(u, plan, 1024)[-1])
    by = {c["claim"]: c for c in claims}
    assert len(claims) == 6
    one = by["seed on alpha (one): the ensemble beats dense on training domains"]
    assert one["verdict"] == "did not hold" and one["gain"] == pytest.approx(math.exp(3.005 - 3.1) - 1)
    rem = by["seed on alpha (one): removing the alpha expert degrades alpha much more than the other domains"]
    assert rem["gain"] == pytest.approx(math.exp(0.5) - 1) and rem["verdict"] == "held"
    mix = by["seed on all training domains (mixture): the ensemble beats dense on training domains"]
    assert mix["verdict"] == "held"   # the main forest
    assert by["seed on alpha+beta (two): the ensemble beats dense on training domains"]["verdict"] \
        == "not measured"             # not run yet
    text, summary = report.render(u, plan, {}, vocab_size=256)
    assert "## Seed corpus" in text and "| two | alpha, beta | not run |" in text
    assert "## Budget sweep" in text and "not extrapolated" in text
    assert summary["crossover"]["sign_between"] is not None


def test_planned_units_and_the_not_run_list():
    plan = plan_dict(crossover_fractions=[0.5, 0.25], crossover_dense_seeds=None,
                     seed_corpora={"mix": "all", "one": ["alpha"]})
    assert S.planned_units(plan) == [
        "dense-x0.25-s1", "dense-x0.25-s2", "btm-x0.25-f0.50", "dense-x0.5-s1", "dense-x0.5-s2",
        "btm-x0.5-f0.50", "dense-s1", "dense-s2", "btm-f0.50", "btm-f0.75", "btm-f0.00",
        "removal-alpha", "btm-seed-one", "removal-alpha-seed-one", "novel-delta", "random-split"]
    assert S.planned_units(dict(plan, crossover_dense_seeds=1))[:2] == ["dense-x0.25-s1", "btm-x0.25-f0.50"]
    text, _ = report.render(units(), plan, {})
    line = next(x for x in text.splitlines() if x.startswith("**Not run**"))
    assert "dense-x0.25-s1" in line and "btm-seed-one" in line and "dense-s1," not in line
    assert "fewer than two budgets have both dense runs and a forest (1 so far)" in text


def test_report_of_an_output_with_only_seed_corpus_units(tmp_path):
    import json
    plan = plan_dict(seed_corpora={"one": ["alpha"]})
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "btm-seed-one.json").write_text(json.dumps(
        {"test": table({"ensemble/cached": {d: 3.1 for d in TRAIN}})}))
    summary = report.write_report(tmp_path, plan=plan, environment={})  # no dense, no main forest
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "seed_fraction.png").exists()
    assert "| one | alpha | 22.20 |" in (tmp_path / "report.md").read_text()
    assert summary["budgets"] == []
