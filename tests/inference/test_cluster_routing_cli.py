"""Cluster routing in generate (incremental prefix embedding) and branch, and the CLIs' errors."""
import json

import numpy as np
import pytest
import torch

from cluster_world import decoded_docs, make_clusters, two_expert_forest
from inference_helpers import SEQ, forward_logprobs, run_cli


@pytest.fixture(scope="module")
def cworld(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster_cli")
    return two_expert_forest(world, tmp / "forest"), make_clusters(world, tmp / "clusters", ["cb", "ca"])


@pytest.mark.parametrize("topk", [None, 1])
def test_generate_routes_each_token_by_the_incremental_prefix(world, cworld, topk, monkeypatch):
    from megatron_btm.cluster.features import Featurizer
    from megatron_btm.data.tokenizer import load_tokenizer
    from megatron_btm.inference.forest_eval import forest_checkpoints
    from megatron_btm.inference.generate import SamplingConfig, generate
    from megatron_btm.inference.scoring import load_experts
    from megatron_btm.routing.cluster import ClusterRouter, cluster_log_weights
    from megatron_btm.routing.cluster_tokens import ClusterRouting, TokenPrefix
    forest, clusters = cworld
    tok = load_tokenizer(world.tokenizer)
    checkpoints = forest_checkpoints(forest)
    router = ClusterRouter.load(clusters).for_experts([i for i, _ in checkpoints])
    experts = load_experts(checkpoints)
    prompt = tok.encode(decoded_docs(world, "dom0")[0][:40])
    calls = []
    real_embed = Featurizer.embed
    monkeypatch.setattr(Featurizer, "embed", lambda self, texts: calls.append(1) or real_embed(self, texts))
    res = generate(experts, prompt, SamplingConfig(max_new_tokens=12, temperature=0.0),
                   cluster=ClusterRouting(router, tok, topk))
    assert calls == []   # never re-vectorised from scratch while generating
    monkeypatch.undo()
    assert len(res.tokens) == 12
    ids = list(prompt)
    for s, tokn in enumerate(res.tokens):
        text = TokenPrefix(router, tok, keep_text=True).extend(ids).text
        d = torch.from_numpy(router.model.distances(router.embed(text)[None]))[0]
        want = cluster_log_weights(d, router.temperature, topk)
        assert res.log_posterior[s] == want.tolist()   # from scratch, at every step: equal
        ids.append(tokn)
    # greedy: each token is the argmax of the mixture under those weights (the models read the
    # last SEQ ids, as generate's sliding window does)
    for s, tokn in enumerate(res.tokens):
        t = len(prompt) + s
        ctx = torch.tensor([ids[max(0, t - SEQ):t]])
        lp_KV = torch.stack([forward_logprobs(m, ctx, world.vocab)[0, -1] for m in world.models[:2]])
        mixed = torch.logsumexp(torch.tensor(res.log_posterior[s])[:, None] + lp_KV, dim=0)
        assert int(mixed.argmax()) == tokn


def test_branch_with_cluster_weights_uses_domain_branch_weights(world, cworld, tmp_path):
    from megatron_btm.routing.cluster import ClusterRouter, domain_branch_weights
    from megatron_btm.stages.branch import BranchConfig, branch
    forest, _ = cworld
    # a third cluster ("cx", not trained yet) is left out of the parents' weights
    clusters = make_clusters(world, tmp_path / "c3", ["cb", "cx", "ca"])
    cfg = BranchConfig(policy="topk", k=1, weights="cluster", clusters=str(clusters), num_sequences=5)
    rec = branch(forest, domains=["dom1"], data_dir=world.data, output_dir=tmp_path / "br", cfg=cfg)["dom1"]
    want = domain_branch_weights(ClusterRouter.load(clusters).subset(["ca", "cb"]),
                                 decoded_docs(world, "dom1", "valid")[:5])
    assert rec["prior"] == pytest.approx(want.tolist(), abs=1e-12)
    assert rec["weights"] == "cluster" and sum(rec["prior"]) == pytest.approx(1.0)
    assert rec["parents"] == [{"id": ["ca", "cb"][int(want.argmax())], "weight": 1.0}]
    assert json.loads((tmp_path / "br" / "dom1" / "branch.json").read_text())["prior"] == rec["prior"]
    bad = make_clusters(world, tmp_path / "c4", ["ca", "cx"])
    with pytest.raises(ValueError, match=r"forest expert\(s\) \['cb'\] have no cluster") as e:
        branch(forest, domains=["dom1"], data_dir=world.data, output_dir=tmp_path / "br2",
               cfg=BranchConfig(policy="topk", k=1, weights="cluster", clusters=str(bad)))
    assert "\n" not in str(e.value)


def test_eval_cli_cluster_rows(world, cworld, tmp_path, capsys):
    forest, clusters = cworld
    out = tmp_path / "t.json"
    rc, stdout, _ = run_cli(["eval", "--forest", str(forest), "--data", str(world.data), "--domains",
                             "dom0", "--topk", "1", "--clusters", str(clusters),
                             "--cluster-temperature", "0.5", "--no-progress", "--max-blocks", "2",
                             "--output", str(out)], capsys)
    table = json.loads(out.read_text())
    assert rc == 0 and {"ensemble/cluster", "top1/cluster"} <= set(table["rows"])
    assert table["cluster"]["temperature"] == 0.5 and "top1/cluster" in stdout


def _one_line_error(argv, capsys, match):
    rc, _, err = run_cli(argv, capsys)
    assert rc != 0 and match in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_cli_bad_cluster_input_is_one_line(world, cworld, tmp_path, capsys):
    forest, clusters = cworld
    base = ["eval", "--forest", str(forest), "--data", str(world.data), "--domains", "dom0",
            "--no-progress", "--output", str(tmp_path / "o.json")]
    _one_line_error(base + ["--clusters", str(tmp_path / "none")], capsys,
                    f"--clusters {tmp_path / 'none'}: not a clusters folder")
    old = make_clusters(world, tmp_path / "old", ["ca", "cb"])
    meta = json.loads((old / "clusters.json").read_text())
    (old / "clusters.json").write_text(json.dumps({**meta, "version": 0}))
    _one_line_error(base + ["--clusters", str(old)], capsys, "format version 0, this code reads version 1")
    _one_line_error(base + ["--clusters", str(make_clusters(world, tmp_path / "c3", ["ca", "cb", "cc"]))],
                    capsys, "cluster(s) ['cc'] have no expert")
    _one_line_error(base + ["--clusters", str(clusters), "--route", "prior", "--topk", "1"], capsys,
                    "the serving view has no cluster route")
    gen = ["generate", "--forest", str(forest), "--tokenizer", str(world.tokenizer), "--prompt", "x",
           "--clusters", str(clusters)]
    _one_line_error(gen + ["--prior", str(tmp_path / "p.json")], capsys, "--clusters with --prior")
    _one_line_error(gen + ["--cluster-topk", "3"], capsys, "cluster top-k=3: must be in [1, 2]")
    _one_line_error(["branch", "--forest", str(forest), "--data", str(world.data), "--domains", "dom1",
                     "--output", str(tmp_path / "b"), "--weights", "cluster"], capsys,
                    "weights='cluster': needs clusters")


def test_serving_generate_routes_the_prompt_by_clusters(world, tmp_path, capsys):
    from megatron_btm.data.tokenizer import load_tokenizer
    from megatron_btm.inference.forest_eval import forest_checkpoints
    from megatron_btm.inference.generate import SamplingConfig
    from megatron_btm.routing.cluster import ClusterRouter
    from megatron_btm.routing.cluster_tokens import ClusterRouting, TokenPrefix
    from megatron_btm.serving.pool import ExpertPool
    from megatron_btm.serving.route import Route
    from megatron_btm.serving.routed import generate_routed
    tok = load_tokenizer(world.tokenizer)
    clusters = make_clusters(world, tmp_path / "c", ["e2", "e0", "e1"])
    checkpoints = forest_checkpoints(world.forest)
    router = ClusterRouter.load(clusters).for_experts([i for i, _ in checkpoints])
    pool = ExpertPool(checkpoints, capacity=2)
    prompts = [tok.encode(decoded_docs(world, d)[0][:30]) for d in ("dom0", "dom1")]
    out = generate_routed(pool, prompts, SamplingConfig(max_new_tokens=6, temperature=0.0),
                          Route.parse("cluster", 2), cluster=ClusterRouting(router, tok))
    for b, prompt in enumerate(prompts):
        w = router.weights(TokenPrefix(router, tok, keep_text=True).extend(prompt).text)
        assert out["chosen"][b] == [pool.ids[j] for j in w.topk(2).indices.tolist()]
        sub = router.subset(out["chosen"][b])   # each step: the cluster weights among the 2
        ids = list(prompt)
        for s, tokn in enumerate(out["results"][b].tokens):
            text = TokenPrefix(router, tok, keep_text=True).extend(ids).text
            assert out["results"][b].log_posterior[s] == pytest.approx(sub.weights(text).log().tolist(),
                                                                        abs=1e-12)
            ids.append(tokn)
    assert out["max_models_in_memory"] <= 2
    rc, stdout, _ = run_cli(["generate", "--forest", str(world.forest), "--tokenizer", str(world.tokenizer),
                             "--prompt", decoded_docs(world, "dom1")[0][:30], "--clusters", str(clusters),
                             "--topk", "1", "--max-new-tokens", "3", "--temperature", "0"], capsys)
    assert rc == 0 and "route cluster top-1" in stdout


def test_plan_eval_node_writes_the_cluster_rows(world, cworld, tmp_path):
    """A plan's `evaluation: {clusters: DIR}` reaches the eval node (every executor runs it)."""
    from megatron_btm.pipeline import graph as G
    from megatron_btm.pipeline.nodes import BODIES
    from megatron_btm.pipeline.plan import check_training, plan_from_dict
    forest, clusters = cworld
    (tmp_path / "train.yaml").write_text("steps: 5\nmodel: {num_layers: 2, hidden_size: 32}\n")
    plan = plan_from_dict({
        "name": "c", "run_dir": str(tmp_path / "run"), "data_dir": str(world.data), "forest": str(forest),
        "first_cycle": 2, "train_config": str(tmp_path / "train.yaml"),
        "cycles": [{"domains": ["dom2"], "steps": 1}],
        "branch": {"policy": "topk", "k": 1, "weights": "cluster", "clusters": str(clusters)},
        "evaluation": {"domains": ["dom0"], "topk": [1], "max_blocks": 2, "clusters": str(clusters)}})
    check_training(plan)
    node = G.build_graph(plan)[G.EVAL]
    info = BODIES[G.EVAL](plan, node)
    table = json.loads(open(info["table"]).read())
    assert {"ensemble/cluster", "top1/cluster"} <= set(table["results"]["dom0"])
    branch_node = G.build_graph(plan)[G.node_id(G.BRANCH, 2, "dom2")]
    assert BODIES[G.BRANCH](plan, branch_node)["parents"][0]["weight"] == 1.0
