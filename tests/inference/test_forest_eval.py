"""Scoring real (pico) Megatron experts and whole forests against independent references."""
import math

import pytest
import torch

from inference_helpers import SEQ, build_pico, forward_logprobs, pico_config, slow_ensemble_nll


def test_token_ll_matches_the_model_forward(world):
    from megatron_btm.inference.scoring import IGNORE, load_expert
    expert = load_expert(world.checkpoints[1])
    assert expert.vocab_size == world.vocab and expert.seq_length == SEQ
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, world.vocab, (3, SEQ + 1), generator=g)
    blocks[2, 9:] = IGNORE
    ll = expert.token_ll(blocks)
    ref = forward_logprobs(world.models[1], blocks[:, :-1].clamp(min=0), world.vocab)
    ref = ref.gather(-1, blocks[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref[2, 8:] = 0.0
    torch.testing.assert_close(ll, ref, rtol=1e-5, atol=1e-5)
    # padding ids (vocab .. padded vocab) never get probability: logits there are -inf
    logits = expert.logits(blocks[:, :-1].clamp(min=0))
    assert logits.shape[-1] == expert.config.padded_vocab_size() > world.vocab
    assert torch.isneginf(logits[..., world.vocab:]).all()
    with pytest.raises(ValueError, match="token ids must be in"):
        expert.token_ll(torch.full((1, 5), world.vocab))


def _reference_rows(world, domain, prior):
    """Slow reference of ensemble/uniform and ensemble/cached on a domain's test blocks."""
    from megatron_btm.inference.blocks import read_eval_blocks
    blocks = read_eval_blocks(world.data, domain, "test", SEQ)
    totals = {"uniform": 0.0, "cached": 0.0}
    count = 0
    for b in range(blocks.shape[0]):
        ids = blocks[b]
        targets = [int(t) for t in ids[1:]]
        lp_KTV = torch.stack([forward_logprobs(m, ids[None, :-1].clamp(min=0), world.vocab)[0]
                              for m in world.models])
        totals["uniform"] += sum(slow_ensemble_nll(lp_KTV, targets, [1 / 3] * 3))
        totals["cached"] += sum(slow_ensemble_nll(lp_KTV, targets, prior))
        count += sum(t >= 0 for t in targets)
    return {k: v / count for k, v in totals.items()}, count


def test_evaluate_forest_matches_slow_reference(world):
    from megatron_btm.inference import evaluate_forest
    prior = [0.2, 0.5, 0.3]
    table = evaluate_forest(world.forest, world.data, ["dom1"], priors={"dom1": prior}, topk=[1, 3])
    rows = table["results"]["dom1"]
    ref, count = _reference_rows(world, "dom1", prior)
    assert rows["ensemble/uniform"]["tokens"] == count
    assert rows["ensemble/uniform"]["nll"] == pytest.approx(ref["uniform"], abs=2e-5)
    assert rows["ensemble/cached"]["nll"] == pytest.approx(ref["cached"], abs=2e-5)
    assert rows["ensemble/cached"]["ppl"] == pytest.approx(math.exp(ref["cached"]), rel=1e-4)
    # k = n equals the full ensemble; top-1 by prior is the prior's argmax expert (e1)
    assert rows["top3/doc"]["nll"] == pytest.approx(rows["ensemble/cached"]["nll"], abs=1e-9)
    assert rows["top3/token"]["nll"] == pytest.approx(rows["ensemble/cached"]["nll"], abs=1e-9)
    assert rows["top1/doc"]["nll"] == pytest.approx(rows["expert/e1"]["nll"], abs=1e-9)
    # the data was sampled from e1: it beats the other experts, and the ensemble is close to it
    assert rows["expert/e1"]["nll"] < min(rows["expert/e0"]["nll"], rows["expert/e2"]["nll"])
    assert table["experts"] == ["e0", "e1", "e2"] and table["blocks"]["dom1"] > 0
    assert table["rows"][0] == "expert/e0"


def test_single_expert_forest_ensemble_is_that_expert(world, tmp_path):
    from megatron_btm.forest import Forest
    from megatron_btm.inference import evaluate_forest
    forest = Forest.create(tmp_path / "f1", seed_checkpoint=world.checkpoints[0],
                           seed_meta={"model_config": {}})
    forest.add_expert("only", domain="dom2", checkpoint_dir=world.checkpoints[2],
                      parents=[("seed", 1.0)], cycle=1, steps=0, tokens=0, config={})
    table = evaluate_forest(tmp_path / "f1", world.data, ["dom2", "dom0"], topk=[1],
                            priors={"dom2": [1.0]}, max_blocks=3)
    for d in ("dom2", "dom0"):
        rows = table["results"][d]
        for row in rows:
            assert rows[row]["nll"] == pytest.approx(rows["expert/only"]["nll"], abs=1e-9), (d, row)
    assert table["blocks"] == {"dom2": 3, "dom0": 3}


def test_averaged_checkpoint_row_equals_direct_model(world, tmp_path):
    from megatron_btm.averaging.apply import average_checkpoints
    from megatron_btm.inference import evaluate_forest
    from megatron_btm.inference.blocks import read_eval_blocks
    out = tmp_path / "avg"
    average_checkpoints([world.checkpoints[0], world.checkpoints[2]], [0.25, 0.75], out, progress=False)
    table = evaluate_forest(world.forest, world.data, ["dom0"], topk=[], modes=["uniform"],
                            extra_models={"avg": out}, max_blocks=2, single_experts=False)
    assert set(table["results"]["dom0"]) == {"ensemble/uniform", "model/avg"}
    # reference: average the two models' parameters in memory and run the result directly
    model = build_pico(pico_config(world.vocab, seed=999))
    a, c = (dict(m.named_parameters()) for m in (world.models[0], world.models[2]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.25 * a[name].double() + 0.75 * c[name].double())
    blocks = read_eval_blocks(world.data, "dom0", "test", SEQ, max_blocks=2)
    lp = forward_logprobs(model, blocks[:, :-1], world.vocab)
    nll = -float(lp.gather(-1, blocks[:, 1:].unsqueeze(-1)).mean())
    assert table["results"]["dom0"]["model/avg"]["nll"] == pytest.approx(nll, abs=2e-5)


def test_cached_prior_concentrates_on_the_domains_expert(world):
    from megatron_btm.inference import estimate_priors
    priors = estimate_priors(world.forest, world.data, ["dom0", "dom1", "dom2"], num_sequences=24)
    for j in range(3):
        p = priors[f"dom{j}"]
        assert p.shape == (3,) and float(p.sum()) == pytest.approx(1.0, abs=1e-9)
        assert float(p[j]) > 0.5, (j, p.tolist())


def test_bad_inputs(world):
    from megatron_btm.inference import evaluate_forest
    with pytest.raises(FileNotFoundError, match="nope/test.bin.*dom0"):
        evaluate_forest(world.forest, world.data, ["nope"])
    with pytest.raises(ValueError, match="2 values but the forest has 3 experts"):
        evaluate_forest(world.forest, world.data, ["dom0"], priors={"dom0": [0.5, 0.5]})
    with pytest.raises(ValueError, match=r"priors given for domain\(s\) \['dom1'\]"):
        evaluate_forest(world.forest, world.data, ["dom0"], priors={"dom1": [1 / 3] * 3})
