"""An expert run of a plan with expert_global_batch_size really trains with the smaller batch:
more steps, the same tokens as the full-batch schedule; the seed keeps the dense batch."""
import json

import pytest

from megatron_btm.experiment import units
from megatron_btm.experiment.plan import ExperimentPlan


def batch_of(run) -> tuple[int, int]:
    cfg = json.loads((run / "run.json").read_text())["train_config"]
    return cfg["global_batch_size"], cfg["micro_batch_size"]


@pytest.mark.slow   # ~35 s on a loaded 2-core machine (8 short training runs)
def test_experts_train_with_the_expert_batch(corpora, tmp_path):
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess
    from megatron_btm.megatron import parallel
    domains = ["bible", "legal"]
    plan = ExperimentPlan(name="b", corpus=str(corpora), train_domains=domains, vocab_size=320,
                          max_docs=6, model={"num_layers": 1, "hidden_size": 16,
                                             "num_attention_heads": 2, "seq_length": 32},
                          micro_batch_size=2, global_batch_size=4, expert_global_batch_size=1,
                          total_tokens=4 * 32 * 6, seed_fractions=[0.5], topk=[1], threads=1)
    sched = plan.schedule(0.5)
    assert sched == {"seed_steps": 3, "expert_steps": 4, "dense_steps": 5}  # 1 dense step each
    data = tmp_path / "data"
    preprocess(PreprocessConfig(corpus_dir=plan.corpus, output_dir=str(data), domains=domains,
                                vocab_size=plan.vocab_size, max_docs=plan.max_docs, progress=False))
    parallel.init_distributed()
    units.build_forest(plan, data, tmp_path / "w", seed_steps=sched["seed_steps"],
                       expert_steps=sched["expert_steps"], vocab=plan.vocab_size, log=lambda s: None)
    seed = units.finished(tmp_path / "w" / "seed")
    assert (seed["steps"], seed["tokens"]) == (3, 3 * 4 * 32)
    assert batch_of(tmp_path / "w" / "seed") == (4, 2)
    for d in domains:
        run = units.expert_run(tmp_path / "w", d)
        stage = units.finished(run)
        assert (stage["steps"], stage["tokens"]) == (4, 4 * 1 * 32)   # = 1 step of the dense batch
        assert batch_of(run) == (1, 1)
