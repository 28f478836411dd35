"""An expert saved (and scored) at TP=2, or saved at PP=2, evaluates at TP=1 to the same
log-likelihoods as the saved model itself."""
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed]


def test_tp2_checkpoint_scores_the_same_at_tp1(world, tmp_path):
    from megatron_btm.inference.scoring import IGNORE, load_expert
    sys.path.insert(0, str(Path(__file__).parent))
    import tp_worker
    g = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, world.vocab, (2, 17), generator=g)
    blocks[1, 12:] = IGNORE
    errors = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.spawn(tp_worker.save_and_score_tp2,
                                args=(2, str(tmp_path), world.vocab, blocks, errors), nprocs=2, join=True)
    res = torch.load(tmp_path / "result.pt")
    expert = load_expert(res["ckpt"], tp=1)
    assert expert.config.init_seed == 77
    ll1 = expert.token_ll(blocks)
    assert ll1[1, 11:].eq(0).all() and ll1[0].lt(0).all()
    torch.testing.assert_close(res["ll"], ll1, rtol=1e-5, atol=1e-5)
    # TP=2 vocab-parallel mixing of two copies of one expert = that expert's NLL
    torch.testing.assert_close(res["nll"], -ll1, rtol=1e-5, atol=1e-5)
    inputs = blocks[:, :-1].clamp(min=0)
    torch.testing.assert_close(res["full"], expert.full_logits(inputs), rtol=1e-5, atol=1e-5)
    assert res["full"].shape[-1] == world.vocab
    # PP=2 checkpoint loaded at PP=1 = a TP=1 model holding the two stages' own weights
    from inference_helpers import build_pico, forward_logprobs, pico_config
    pp2 = load_expert(tmp_path / "pp2" / "iter_0000000", tp=1).token_ll(blocks)
    model = build_pico(pico_config(world.vocab, 5))  # another init: every weight gets copied
    stages = {**torch.load(tmp_path / "pp2_rank1.pt"), **torch.load(tmp_path / "pp2_rank0.pt")}
    copied = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(stages[name])
            copied += 1
    assert copied == len(list(model.parameters())) >= 2 * 12
    direct = forward_logprobs(model, inputs, world.vocab)
    direct = direct.gather(-1, blocks[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    direct[1, 11:] = 0.0
    torch.testing.assert_close(pp2, direct, rtol=1e-5, atol=1e-5)
