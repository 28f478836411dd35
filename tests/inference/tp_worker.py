"""Spawned worker of test_tp_checkpoint.py: save a pico expert at TP=2 (scored there too) and
the same initialisation at PP=2."""
import traceback

import torch


def save_and_score_tp2(rank, world, root, vocab, blocks, errors):
    try:
        torch.set_num_threads(1)
        from inference_helpers import build_pico, pico_config
        from megatron_btm.inference.ensemble import ensemble_nll_from_logits
        from megatron_btm.inference.scoring import _tp_group, load_expert, split_block
        from megatron_btm.megatron.checkpoint import save_checkpoint
        from megatron_btm.megatron.parallel import init_distributed
        init_distributed(init_method=f"file://{root}/pg", rank=rank, world_size=world)
        cfg = pico_config(vocab, seed=77)
        model = build_pico(cfg, tp=2)
        ckpt = save_checkpoint(f"{root}/tp2", step=0, model_chunks=[model],
                               meta={"model_config": cfg.to_dict()})
        expert = load_expert(ckpt, tp=2)
        ll = expert.token_ll(blocks)
        inputs, targets = split_block(blocks)
        # the vocab-parallel path of the fused op: two copies of the expert, rank-local V slices
        local = expert.logits(inputs)
        nll, _ = ensemble_nll_from_logits(torch.stack([local, local]), targets,
                                          torch.log(torch.tensor([0.5, 0.5])), tp_group=_tp_group())
        full = expert.full_logits(inputs)
        from megatron_btm.megatron.model import build_model
        from megatron_btm.megatron.parallel import ParallelConfig, seed_all, setup_model_parallel
        setup_model_parallel(ParallelConfig(tp=1, pp=2))
        seed_all(cfg.init_seed)
        stage = build_model(cfg, pp=2)
        save_checkpoint(f"{root}/pp2", step=0, model_chunks=[stage], meta={"model_config": cfg.to_dict()})
        # this stage's parameters under global layer numbers (the test's reference weights)
        offset = rank * cfg.num_layers // 2
        params = {}
        for name, p in stage.named_parameters():
            if name.startswith("decoder.layers."):
                i, rest = name[len("decoder.layers."):].split(".", 1)
                name = f"decoder.layers.{int(i) + offset}.{rest}"
            params[name] = p.detach().clone()
        torch.save(params, f"{root}/pp2_rank{rank}.pt")
        if rank == 0:
            torch.save({"ckpt": str(ckpt), "ll": ll, "nll": nll, "full": full}, f"{root}/result.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:
        errors.put(traceback.format_exc())
        raise
