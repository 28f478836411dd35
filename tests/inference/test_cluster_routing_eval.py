"""Cluster routing (c-BTM) in `btm eval`: rows whose weights are ClusterRouter's on the same text."""
import math

import numpy as np
import pytest
import torch

from cluster_world import make_clusters, two_expert_forest
from inference_helpers import SEQ, forward_logprobs


@pytest.fixture(scope="module")
def cworld(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster_eval")
    # artefact order (cb, ca) differs from the forest's (ca, cb): the mapping is by name
    clusters = make_clusters(world, tmp / "clusters", ["cb", "ca"])
    return two_expert_forest(world, tmp / "forest"), clusters


def test_token_prefix_embedding_equals_from_scratch_at_every_token(world, cworld):
    from megatron_btm.data.tokenizer import load_tokenizer
    from megatron_btm.inference.blocks import read_eval_blocks
    from megatron_btm.routing.cluster import ClusterRouter
    from megatron_btm.routing.cluster_tokens import TokenPrefix
    router, tok = ClusterRouter.load(cworld[1]), load_tokenizer(world.tokenizer)
    ids = read_eval_blocks(world.data, "dom0", "test", SEQ)[:3].flatten().tolist()
    ids.insert(20, tok.eod)
    prefix, seen = TokenPrefix(router, tok, keep_text=True), 0
    for i in ids:
        prefix.append(i)
        assert np.array_equal(prefix.embedding(), router.embed(prefix.text))
        seen += bool(prefix.text)
    assert seen > 0 and "\n" in prefix.text  # the eod id became a word boundary
    # what it released is the from-scratch decoding of the ids (up to an unfinished character)
    assert tok.decode(ids[:20]) + "\n" + tok.decode(ids[21:]).rstrip("\ufffd") == prefix.text


def _reference_nll(world, clusters_dir, topk):
    """Slow reference on dom0's test blocks, forest order (ca, cb) = models 0 and 1: weights
    of ClusterRouter.weights on the text of ids 0..t (from scratch), explicit mixture."""
    from megatron_btm.data.tokenizer import load_tokenizer
    from megatron_btm.inference.blocks import read_eval_blocks
    from megatron_btm.routing.cluster import ClusterRouter
    from megatron_btm.routing.cluster_tokens import TokenPrefix
    router = ClusterRouter.load(clusters_dir)
    tok = load_tokenizer(world.tokenizer)
    order = [router.names.index(e) for e in ("ca", "cb")]
    blocks = read_eval_blocks(world.data, "dom0", "test", SEQ)
    total, count, weights = 0.0, 0, []
    for b in range(blocks.shape[0]):
        ids = blocks[b]
        lp_KTV = torch.stack([forward_logprobs(world.models[j], ids[None, :-1].clamp(min=0),
                                               world.vocab)[0] for j in (0, 1)])
        text = TokenPrefix(router, tok, keep_text=True)
        for t in range(SEQ):
            y = int(ids[t + 1])
            if int(ids[t]) >= 0:
                text.append(int(ids[t]))
            if y < 0:
                continue
            w = router.weights(text.text, topk=topk)[order]  # from scratch, then forest order
            weights.append(w)
            p = sum(float(w[j]) * math.exp(float(lp_KTV[j, t, y])) for j in range(2))
            total, count = total - math.log(p), count + 1
    return total / count, count, torch.stack(weights).mean(0)


def test_eval_cluster_rows_match_the_router_on_the_same_text(world, cworld):
    from megatron_btm.inference import evaluate_forest
    from megatron_btm.routing.cluster import ClusterRouter
    forest, clusters = cworld
    table = evaluate_forest(forest, world.data, ["dom0"], topk=[1, 2],
                            clusters=ClusterRouter.load(clusters))
    rows = table["results"]["dom0"]
    assert {"ensemble/cluster", "top1/cluster", "top2/cluster", "ensemble/uniform"} <= set(rows)
    for row, k in (("ensemble/cluster", None), ("top1/cluster", 1), ("top2/cluster", 2)):
        ref, count, mean_w = _reference_nll(world, clusters, k)
        assert rows[row]["tokens"] == count
        assert rows[row]["nll"] == pytest.approx(ref, abs=2e-5), row
    assert rows["top2/cluster"]["nll"] == pytest.approx(rows["ensemble/cluster"]["nll"], abs=1e-9)
    _, _, mean_w = _reference_nll(world, clusters, None)
    assert table["cluster"]["mean_weights"]["dom0"] == pytest.approx(mean_w.tolist(), abs=1e-9)
    # the weights depend on the text: dom0 is nearer its own centroid ("cb" is dom0's here)
    assert table["cluster"]["mean_weights"]["dom0"][1] > 0.5


def test_cluster_expert_mismatch_is_one_line(world, cworld, tmp_path):
    from megatron_btm.inference import evaluate_forest
    from megatron_btm.routing.cluster import ClusterRouter
    forest, _ = cworld
    other = ClusterRouter.load(make_clusters(world, tmp_path / "c3", ["ca", "cb", "cc"]))
    with pytest.raises(ValueError, match=r"cluster\(s\) \['cc'\] have no expert") as e:
        evaluate_forest(forest, world.data, ["dom0"], topk=[1], clusters=other)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"forest expert\(s\) \['e2'\] have no cluster") as e:
        evaluate_forest(world.forest, world.data, ["dom0"], topk=[1],
                        clusters=ClusterRouter.load(make_clusters(world, tmp_path / "c4",
                                                                  ["e0", "e1"])))
    assert "\n" not in str(e.value)
