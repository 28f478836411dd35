"""The run plan accepts cluster routing: evaluation.clusters and branch weights: cluster."""
from pathlib import Path

import numpy as np
import pytest

from megatron_btm.pipeline.plan import check_training, plan_from_dict


def _clusters(path: Path, names=("a", "b")) -> Path:
    from megatron_btm.cluster.artefact import ClusterModel, save_clusters
    from megatron_btm.cluster.features import Featurizer
    from megatron_btm.cluster.text import Analyzer
    feat = Featurizer(analyzer=Analyzer(), vocabulary=["apple", "pear"], idf=np.ones(2),
                      components=np.eye(2, dtype=np.float32))
    save_clusters(path, ClusterModel(featurizer=feat, centroids=np.eye(2), names=list(names)))
    return path


def _plan(tmp: Path, **sections) -> dict:
    (tmp / "data").mkdir(exist_ok=True)
    (tmp / "data" / "tokenizer.json").write_text("{}")
    (tmp / "train.yaml").write_text("steps: 5\nmodel: {num_layers: 2, hidden_size: 32}\n")
    return {"name": "c", "run_dir": str(tmp / "run"), "data_dir": str(tmp / "data"),
            "train_config": str(tmp / "train.yaml"), "seed": {"domains": ["a", "b"], "steps": 2},
            "cycles": [{"domains": ["a", "b"], "steps": 3}], **sections}


def test_plan_takes_the_cluster_router_for_evaluation_and_branch(tmp_path):
    _clusters(tmp_path / "clusters")
    raw = _plan(tmp_path, evaluation={"domains": ["a"], "clusters": "clusters",
                                      "cluster_temperature": 0.2},
                branch={"policy": "topk", "k": 1, "weights": "cluster", "clusters": "clusters"})
    plan = plan_from_dict(raw, base_dir=tmp_path)
    want = str((tmp_path / "clusters").resolve())   # relative to the plan's folder
    assert (plan.evaluation.clusters, plan.evaluation.cluster_temperature) == (want, 0.2)
    assert (plan.branch.weights, plan.branch.clusters) == ("cluster", want)
    check_training(plan)   # loads both artefacts
    assert plan.to_dict()["branch"]["weights"] == "cluster"
    # the default stays the cached prior, no clusters
    plain = plan_from_dict(_plan(tmp_path), base_dir=tmp_path)
    assert (plain.branch.weights, plain.branch.clusters, plain.evaluation.clusters) == ("prior", None, None)


@pytest.mark.parametrize("sections, match", [
    ({"branch": {"weights": "nearest"}}, "branch weights='nearest': valid weights are ('prior', 'cluster')"),
    ({"branch": {"weights": "cluster"}}, "weights='cluster': needs clusters"),
    ({"branch": {"clusters": "clusters"}}, "only used with weights 'cluster'"),
    ({"evaluation": {"domains": ["a"], "cluster_temperature": 0}}, "evaluation.cluster_temperature"),
])
def test_bad_cluster_plan_keys_are_one_line(tmp_path, sections, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")) as e:
        plan_from_dict(_plan(tmp_path, **sections), base_dir=tmp_path)
    assert "\n" not in str(e.value)


def test_plan_check_finds_a_missing_or_foreign_clusters_folder(tmp_path):
    import json
    plan = plan_from_dict(_plan(tmp_path, evaluation={"domains": ["a"], "clusters": "nowhere"}),
                          base_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="plan key 'evaluation.clusters' = .*nowhere: not a "
                       "clusters folder") as e:
        check_training(plan)
    assert "\n" not in str(e.value)
    meta = _clusters(tmp_path / "c2") / "clusters.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 99}))
    plan = plan_from_dict(_plan(tmp_path, branch={"weights": "cluster", "clusters": "c2"}),
                          base_dir=tmp_path)
    with pytest.raises(ValueError, match="branch.clusters.*version 99, this code reads version 1"):
        check_training(plan)


def test_a_run_frozen_before_the_cluster_keys_still_resumes(tmp_path):
    """A plan.json written without branch.weights/clusters (older code) is the same run."""
    import json

    from megatron_btm.pipeline.nodes import freeze
    plan = plan_from_dict(_plan(tmp_path), base_dir=tmp_path)
    path = freeze(plan)
    frozen = json.loads(path.read_text())
    for key in ("weights", "clusters", "cluster_temperature"):
        frozen["branch"].pop(key)
    for key in ("clusters", "cluster_temperature"):
        frozen["evaluation"].pop(key)
    path.write_text(json.dumps(frozen))
    freeze(plan)   # not refused
    changed = plan_from_dict(_plan(tmp_path, branch={"k": 1}), base_dir=tmp_path)
    with pytest.raises(ValueError, match="changed keys: branch"):
        freeze(changed)
