"""Plan validation (errors name the key) and the compute-matched schedule."""
from pathlib import Path

import pytest
import yaml

from megatron_btm.experiment.plan import ExperimentPlan, check_corpus, load_plan

REPO = Path(__file__).resolve().parents[2]
CORPORA = REPO.parent / "shared" / "corpora"


def make_corpus(root: Path, domains=("a", "b", "c", "n")) -> Path:
    for d in domains:
        (root / d).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            (root / d / f"{split}.jsonl").write_text('{"text": "hello"}\n')
    return root


def base(**over):
    cfg = {"name": "t", "corpus": "unused", "train_domains": ["a", "b", "c"], "novel_domains": ["n"],
           "total_tokens": 64 * 8 * 30, "model": {"num_layers": 2, "hidden_size": 32,
                                                   "num_attention_heads": 4, "seq_length": 64},
           "seed_fractions": [0.0, 0.5], "topk": [1, 2]}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("over, words", [
    ({"novel_domains": ["b"]}, ["novel_domains", "'b'", "also in train_domains"]),
    ({"seed_fractions": [0.5, 1.0]}, ["seed_fractions", "1.0", "outside [0, 1)"]),
    ({"seed_fractions": [-0.1, 0.5]}, ["seed_fractions", "-0.1"]),
    ({"main_seed_fraction": 0.25}, ["main_seed_fraction=0.25", "seed_fractions"]),
    ({"topk": [1, 4]}, ["topk", "k=4", "3 train_domains"]),
    ({"branch_k": 5}, ["branch_k=5", "number of experts"]),
    ({"train_domains": ["a"]}, ["train_domains", "at least 2"]),
    ({"train_domains": ["a", "a", "b"]}, ["train_domains", "duplicate", "'a'"]),
    ({"train_domains": ["a", "x/y"]}, ["domain 'x/y'"]),
    ({"removal_domain": "n"}, ["removal_domain='n'", "train_domains"]),
    ({"total_tokens": 64 * 8}, ["total_tokens=512", "< 1 step"]),
    ({"global_batch_size": 12}, ["global_batch_size=12", "micro_batch_size=8"]),
    ({"dense_seeds": [1, 1]}, ["dense_seeds", "distinct"]),
    ({"model": {"hidden_size": 30, "num_attention_heads": 4}}, ["model.hidden_size=30", "divisible"]),
    ({"crossover_fractions": [1.0]}, ["crossover_fractions", "!= 1"]),
    ({"eval_blocks": 0}, ["eval_blocks=0", ">= 1"]),
    ({"forest_seed": 0}, ["forest_seed=0", ">= 1"]),
    ({"crossover_dense_seeds": 3}, ["crossover_dense_seeds=3", "2 dense_seeds"]),
    ({"crossover_dense_seeds": 0}, ["crossover_dense_seeds=0", ">= 1"]),
    ({"seed_corpora": ["a"]}, ["seed_corpora=['a']", "mapping"]),
    ({"seed_corpora": {"x": ["n"]}}, ["seed_corpora.x", "['n'] not in train_domains"]),
    ({"seed_corpora": {"x": []}}, ["seed_corpora.x", "empty"]),
    ({"seed_corpora": {"x/y": ["a"]}}, ["seed_corpora label 'x/y'"]),
    ({"expert_global_batch_size": 0}, ["expert_global_batch_size=0", ">= 1"]),
    ({"expert_global_batch_size": 3}, ["expert_global_batch_size=3", "divide global_batch_size=8"]),
    ({"expert_global_batch_size": 16}, ["expert_global_batch_size=16", "divide"]),
    ({"micro_batch_size": 4, "global_batch_size": 24, "expert_global_batch_size": 6},
     ["expert_global_batch_size=6", "multiple of micro_batch_size=4"]),
])
def test_bad_plans_name_the_key(over, words):
    with pytest.raises(ValueError) as e:
        ExperimentPlan(**base(**over))
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75])
def test_schedule_is_compute_matched(fraction):
    plan = ExperimentPlan(**base(seed_fractions=[fraction], main_seed_fraction=fraction))
    s = plan.schedule(fraction)
    total = plan.total_tokens // plan.tokens_per_step()
    assert s["seed_steps"] == round(total * fraction)
    assert s["dense_steps"] == s["seed_steps"] + 3 * s["expert_steps"] <= total
    assert total - s["dense_steps"] < 3  # only the remainder of the division by n experts is lost
    assert plan.schedule(fraction, 0.5)["dense_steps"] <= total // 2


@pytest.mark.parametrize("fraction, scale", [(0.0, 1.0), (0.5, 1.0), (0.5, 0.5), (0.75, 1.0)])
@pytest.mark.parametrize("batch", [1, 2, 4, 8])
def test_expert_batch_keeps_the_tokens_in_more_steps(batch, fraction, scale):
    """Seed and dense keep their steps; an expert's tokens are those of the full-batch plan,
    in 8 / batch times the steps."""
    full = ExperimentPlan(**base(seed_fractions=[fraction], main_seed_fraction=fraction))
    split = ExperimentPlan(**base(seed_fractions=[fraction], main_seed_fraction=fraction,
                                  expert_global_batch_size=batch))
    a, b = full.schedule(fraction, scale), split.schedule(fraction, scale)
    assert (b["seed_steps"], b["dense_steps"]) == (a["seed_steps"], a["dense_steps"])
    assert b["expert_steps"] == a["expert_steps"] * 8 // batch
    assert b["expert_steps"] * split.expert_tokens_per_step() == a["expert_steps"] * full.tokens_per_step()
    assert split.expert_micro_batch_size() == min(8, batch)


def test_expert_batch_defaults_to_the_global_batch_and_sizes_novel_steps():
    plan = ExperimentPlan(**base())
    assert plan.expert_global_batch_size is None and plan.to_dict()["expert_global_batch_size"] is None
    assert (plan.expert_batch_size(), plan.expert_micro_batch_size()) == (8, 8)
    two = ExperimentPlan(**base(micro_batch_size=4, expert_global_batch_size=2, novel_tokens=512 * 3))
    assert (two.expert_batch_size(), two.expert_micro_batch_size()) == (2, 2)
    assert two.novel_steps() == 12   # the same novel tokens in steps of 2 x 64
    assert two.to_dict()["expert_global_batch_size"] == 2


def test_novel_steps_default_to_one_training_expert():
    plan = ExperimentPlan(**base())
    assert plan.novel_steps() == plan.schedule(0.5)["expert_steps"]
    assert ExperimentPlan(**base(novel_tokens=512 * 3)).novel_steps() == 3


def test_load_plan_resolves_corpus_against_the_plan_file_and_checks_it(tmp_path):
    make_corpus(tmp_path / "corpus")
    (tmp_path / "plans").mkdir()
    path = tmp_path / "plans" / "p.yaml"
    path.write_text(yaml.safe_dump(base(corpus="../corpus")))
    plan = load_plan(path, overrides=["total_tokens=30720", "model.seq_length=32"])
    assert Path(plan.corpus) == (tmp_path / "corpus").resolve()
    assert plan.total_tokens == 30720 and plan.model.seq_length == 32
    path.write_text(yaml.safe_dump(base(corpus="../nowhere")))
    with pytest.raises(FileNotFoundError, match="corpus: .*nowhere is not a folder"):
        load_plan(path)
    path.write_text(yaml.safe_dump(base(corpus="../corpus", novel_domains=["zzz"])))
    with pytest.raises(ValueError, match=r"novel_domains: domain 'zzz' not found in corpus .*available: a, b, c, n"):
        load_plan(path)
    (tmp_path / "corpus" / "c" / "test.jsonl").unlink()
    path.write_text(yaml.safe_dump(base(corpus="../corpus")))
    with pytest.raises(FileNotFoundError, match=r"train_domains: .*c/test.jsonl is missing"):
        load_plan(path)


def test_unknown_and_missing_keys(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(dict(base(), sead_fraction=0.5)))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sead_fraction'\]; valid keys: .*seed_fractions"):
        load_plan(path, check_files=False)
    data = base()
    del data["total_tokens"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['total_tokens'\]"):
        load_plan(path, check_files=False)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping at the top level"):
        load_plan(path)


@pytest.mark.parametrize("name", ["paper-mini.yaml", "paper-ci.yaml", "paper-mini-sweep.yaml",
                                  "paper-mini-sweep2.yaml", "paper-mini-batch.yaml"])
def test_example_plans_are_valid(name):
    plan = load_plan(REPO / "examples" / name, check_files=False)
    assert Path(plan.corpus) == CORPORA.resolve()
    if CORPORA.is_dir():
        check_corpus(plan)


def test_resume_refuses_another_plan(tmp_path):
    from megatron_btm.experiment.runner import Runner
    plan = ExperimentPlan(**base(corpus=str(make_corpus(tmp_path / "corpus"))))
    (tmp_path / "out").mkdir()
    import json
    (tmp_path / "out" / "plan.json").write_text(json.dumps(dict(plan.to_dict(), total_tokens=1, threads=7)))
    with pytest.raises(ValueError, match=r"keys \['total_tokens'\] differ .*total_tokens: 1 there, 15360 now"):
        Runner(plan, tmp_path / "out")._check_same_plan()
    (tmp_path / "out" / "plan.json").write_text(json.dumps(dict(plan.to_dict(), threads=7)))
    Runner(plan, tmp_path / "out")._check_same_plan()  # threads do not change results


def test_resume_may_add_units_but_not_drop_or_change_them(tmp_path):
    import json

    from megatron_btm.experiment.runner import Runner
    plan = ExperimentPlan(**base(corpus=str(make_corpus(tmp_path / "corpus")), crossover_fractions=[0.5, 2.0]))
    (tmp_path / "out").mkdir()
    old = plan.to_dict()
    (tmp_path / "out" / "plan.json").write_text(json.dumps(dict(old, crossover_fractions=[0.5])))
    Runner(plan, tmp_path / "out")._check_same_plan()  # 2.0 added: only new units run
    for key, value in [("crossover_fractions", [0.5, 3.0]), ("crossover_fractions", [0.25]),
                       ("seed_fractions", old["seed_fractions"] + [0.9])]:
        (tmp_path / "out" / "plan.json").write_text(json.dumps(dict(old, **{key: value})))
        with pytest.raises(ValueError, match=rf"keys \['{key}'\] differ.*may gain entries"):
            Runner(plan, tmp_path / "out")._check_same_plan()


def test_crossover_seeds_and_seed_corpora():
    plan = ExperimentPlan(**base(dense_seeds=[1, 2, 3], crossover_fractions=[0.5]))
    assert plan.crossover_seeds() == [1]   # the default: one dense seed per extra budget
    plan = ExperimentPlan(**base(dense_seeds=[1, 2, 3], crossover_fractions=[0.5],
                                 crossover_dense_seeds=None,
                                 seed_corpora={"mix": ["c", "b", "a"], "one": ["a"]}))
    assert plan.crossover_seeds() == [1, 2, 3]
    assert plan.seed_corpora == {"mix": "all", "one": ["a"]}   # every training domain = "all"
    assert plan.seed_domains("mix") == ["a", "b", "c"] and plan.seed_domains("one") == ["a"]


def test_resume_of_an_older_plan_json_without_the_newer_keys(tmp_path):
    import json

    from megatron_btm.experiment.runner import Runner
    corpus = str(make_corpus(tmp_path / "corpus"))
    old = ExperimentPlan(**base(corpus=corpus)).to_dict()
    for key in ("seed_corpora", "crossover_dense_seeds"):
        del old[key]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "plan.json").write_text(json.dumps(old))
    Runner(ExperimentPlan(**base(corpus=corpus)), tmp_path / "out")._check_same_plan()
    # new seed corpora and more dense seeds per budget only add units
    Runner(ExperimentPlan(**base(corpus=corpus, seed_corpora={"one": ["a"]}, crossover_dense_seeds=2)),
           tmp_path / "out")._check_same_plan()
    (tmp_path / "out" / "plan.json").write_text(json.dumps(dict(old, seed_corpora={"one": ["b"]})))
    with pytest.raises(ValueError, match=r"keys \['seed_corpora'\] differ"):
        Runner(ExperimentPlan(**base(corpus=corpus, seed_corpora={"one": ["a"]})),
               tmp_path / "out")._check_same_plan()


def test_resume_of_a_plan_json_from_before_a_model_field_existed(tmp_path):
    """A model field added to GPTConfig since the output was made counts as its default; a
    changed model field is still refused."""
    import json

    from megatron_btm.experiment.runner import Runner
    plan = ExperimentPlan(**base(corpus=str(make_corpus(tmp_path / "corpus"))))
    old = plan.to_dict()
    del old["model"]["moe_router_score_function"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "plan.json").write_text(json.dumps(old))
    Runner(plan, tmp_path / "out")._check_same_plan()
    old["model"]["hidden_size"] += 8
    (tmp_path / "out" / "plan.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"keys \['model'\] differ"):
        Runner(plan, tmp_path / "out")._check_same_plan()


def test_only_runs_the_matching_units(tmp_path):
    from megatron_btm.experiment.runner import Runner
    plan = ExperimentPlan(**base(corpus=str(make_corpus(tmp_path / "corpus"))))
    ran, logs = [], []
    runner = Runner(plan, tmp_path / "out", only=["dense-s*"], log=logs.append)
    for unit in ("dense-s1", "btm-f0.50", "dense-x0.5-s1"):
        runner._unit(unit, lambda w, u=unit: ran.append(u) or {"kind": u})
    assert ran == ["dense-s1"] and runner.ran == ["dense-s1"]
    assert (tmp_path / "out" / "runs" / "dense-s1.json").is_file()
    assert not (tmp_path / "out" / "runs" / "btm-f0.50.json").exists()
    assert "== btm-f0.50: not in --only dense-s*, not run" in logs
    # a finished unit is reported as done even when it does not match
    again = Runner(plan, tmp_path / "out", only=["btm-*"], log=logs.append)
    assert again._unit("dense-s1", lambda w: ran.append("twice"))["kind"] == "dense-s1"
    assert ran == ["dense-s1"]


def test_forest_seed_is_the_training_seed_of_the_forest(tmp_path, monkeypatch):
    """The forest's run plan (seed LM and experts) trains with forest_seed, not the default."""
    from megatron_btm.experiment import units
    from megatron_btm.pipeline import executors

    seen = {}
    monkeypatch.setattr(executors, "run_inprocess", lambda run, graph, log: seen.update(run=run))
    for seed in (1234, 77):
        plan = ExperimentPlan(**base(forest_seed=seed))
        units.build_forest(plan, tmp_path / "data", tmp_path / f"w{seed}", seed_steps=3,
                           expert_steps=2, vocab=64, log=lambda s: None)
        assert seen["run"].train_dict()["seed"] == seed


def test_forest_experts_train_with_the_expert_batch_and_the_seed_with_the_dense_batch(
        tmp_path, monkeypatch):
    from megatron_btm.experiment import units
    from megatron_btm.pipeline import executors

    seen = {}
    monkeypatch.setattr(executors, "run_inprocess", lambda run, graph, log: seen.update(run=run))
    for batch in (None, 8, 2):
        plan = ExperimentPlan(**base(micro_batch_size=4, expert_global_batch_size=batch))
        units.build_forest(plan, tmp_path / "data", tmp_path / f"w{batch}", seed_steps=3,
                           expert_steps=8, vocab=64, log=lambda s: None)
        run = seen["run"]
        seed, expert = run.train_config_for("seed"), run.train_config_for("cycle1")
        assert (seed.global_batch_size, seed.micro_batch_size, seed.steps) == (8, 4, 3)
        assert (expert.global_batch_size, expert.micro_batch_size, expert.steps) == \
            ((batch or 8), min(4, batch or 8), 8)
        # a plan whose experts keep the dense batch freezes the same run plan as before the key
        assert (run.seed.overrides == {}) == (batch in (None, 8))
    # the novel-domain experts (units.train_config) and the dense runs
    assert units.train_config(plan, 5, 64, expert=True).global_batch_size == 2
    assert units.train_config(plan, 5, 64).global_batch_size == 8


def test_a_relative_seed_checkpoint_becomes_absolute(tmp_path, monkeypatch):
    """The random-split unit passes the main forest's seed under a relative --output."""
    from megatron_btm.experiment import units
    from megatron_btm.pipeline import executors

    seen = {}
    monkeypatch.setattr(executors, "run_inprocess", lambda run, graph, log: seen.update(run=run))
    monkeypatch.chdir(tmp_path)
    units.build_forest(ExperimentPlan(**base()), Path("data"), Path("w"), seed_steps=0,
                       expert_steps=2, vocab=64, log=lambda s: None,
                       seed_checkpoint=Path("out/forest/seed/checkpoint"))
    assert seen["run"].seed.checkpoint == str(tmp_path / "out/forest/seed/checkpoint")
