"""Serving: route first, run only the chosen experts (serving/), against the evaluation path."""
import pytest
import torch

from megatron_btm.inference.generate import SamplingConfig, generate_batch
from megatron_btm.serving.pool import ExpertPool
from megatron_btm.serving.route import Route

PRIOR = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)


@pytest.fixture()
def pool(world):
    return ExpertPool([(f"e{j}", c) for j, c in enumerate(world.checkpoints)], capacity=2)


@pytest.fixture(scope="module")
def blocks(world):
    from megatron_btm.inference.blocks import read_eval_blocks
    return read_eval_blocks(world.data, "dom1", "test", 16, max_blocks=6)


def test_prefix_routing_picks_the_evaluation_paths_posterior_top_k(world, pool, blocks):
    from megatron_btm.inference.scoring import score_checkpoints
    from megatron_btm.routing.posterior import prefix_log_posterior
    from megatron_btm.serving.route import route_prefix
    P, k = 6, 2
    ll_NTK = score_checkpoints([(f"e{j}", c) for j, c in enumerate(world.checkpoints)],
                               {"d": blocks})["d"]
    post_NK = prefix_log_posterior(ll_NTK, PRIOR.log())[:, P - 1]  # after the first P ids
    want = [set(torch.topk(row, k).indices.tolist()) for row in post_NK]
    chosen, _ = route_prefix(pool, blocks[:, :P], k, PRIOR.log())
    assert [set(r) for r in chosen.tolist()] == want
    assert pool.peak <= 2


@pytest.mark.parametrize("route", ["prior", "prefix:5"])
def test_top_k_with_k_equal_n_is_the_full_ensemble(world, pool, route):
    from megatron_btm.inference.forest_eval import evaluate_forest
    from megatron_btm.serving.routed import evaluate_routed
    from megatron_btm.inference.blocks import read_eval_blocks
    table = evaluate_forest(world.forest, world.data, ["dom1"], priors={"dom1": PRIOR},
                            topk=(), max_blocks=4, single_experts=False)
    full = table["results"]["dom1"]["ensemble/cached"]
    big = ExpertPool(pool.paths.items(), capacity=3)
    b = read_eval_blocks(world.data, "dom1", "test", 16, max_blocks=4)
    got = evaluate_routed(big, {"dom1": b}, Route.parse(route, 3), {"dom1": PRIOR})["results"]["dom1"]
    assert got["tokens"] == full["tokens"]
    assert got["nll"] == pytest.approx(full["nll"], abs=1e-5)
    # top-1 by the prior runs one expert: it is that expert's own perplexity, at 1 forward a token
    one = evaluate_routed(big, {"dom1": b}, Route.parse("prior", 1), {"dom1": PRIOR})["results"]["dom1"]
    solo = evaluate_forest(world.forest, world.data, ["dom1"], topk=(), modes=(), max_blocks=4)
    assert one["nll"] == pytest.approx(solo["results"]["dom1"]["expert/e1"]["nll"], abs=1e-5)
    assert one["expert_forwards_per_token"] == pytest.approx(16 * 4 / one["tokens"])


def test_routed_generation_runs_only_the_chosen_experts(world, pool):
    from megatron_btm.inference.scoring import load_experts
    from megatron_btm.serving.routed import generate_routed
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    prompts = [[5, 17, 42, 8], [3, 1, 4, 1, 5]]
    out = generate_routed(pool, prompts, cfg, Route.parse("prefix:4", 1), PRIOR)
    assert out["max_models_in_memory"] <= 2
    for prompt, ids, res in zip(prompts, out["chosen"], out["results"]):
        j = int(ids[0][1:])
        ref = generate_batch(load_experts([(ids[0], world.checkpoints[j])]), [prompt], cfg)[0]
        assert res.tokens == ref.tokens
    both = generate_routed(pool, prompts, cfg, Route.parse("prior", 2), PRIOR)
    assert all(c == ["e1", "e2"] for c in both["chosen"])
    ref = generate_batch(load_experts([("e1", world.checkpoints[1]), ("e2", world.checkpoints[2])]),
                         prompts, cfg, log_prior=PRIOR[[1, 2]].log())
    assert [r.tokens for r in both["results"]] == [r.tokens for r in ref]


def test_the_pool_never_holds_more_than_its_bound(world):
    pool = ExpertPool([(f"e{j}", c) for j, c in enumerate(world.checkpoints)], capacity=2)
    for ids in (["e0"], ["e1", "e2"], ["e0"], ["e2", "e0"], ["e1"], ["e0", "e1"]):
        got = pool.get(ids)
        assert [e.name for e in got] == ids and len(pool.held) <= 2
    assert pool.peak == 2 and pool.held == ["e0", "e1"]
    with pytest.raises(ValueError, match="at most 2 models"):
        pool.get(["e0", "e1", "e2"])


def test_bad_input_is_one_line(world, pool, blocks):
    from megatron_btm.serving.routed import evaluate_block_set, generate_routed
    cfg = SamplingConfig(max_new_tokens=2, temperature=0.0)
    cases = [
        (lambda: evaluate_block_set(pool, blocks, Route.parse("prior", 4), PRIOR), "larger than the forest"),
        (lambda: generate_routed(pool, [[1, 2, 3]], cfg, Route.parse("prefix:5", 1)), "longer than the prompt"),
        (lambda: evaluate_block_set(pool, blocks, Route.parse("prefix:99", 1), None), "longer than a block"),
        (lambda: generate_routed(pool, [[1, 2]], cfg, Route.parse("prior", 1), torch.ones(4) / 4),
         "another forest"),
        (lambda: generate_routed(pool, [[1, world.vocab + 7]], cfg, Route.parse("prior", 3)),
         "outside the vocabulary"),
        (lambda: Route.parse("prefix:x", 1), "prefix:P"),
        (lambda: Route.parse("nearest", 1), "valid routes"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)
