"""Spawned workers for the MoE model tests (Megatron MoELayer on the CPU backend, gloo)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "megatron"))
import mp_workers  # noqa: E402

MOE = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
       "vocab_size": 100, "num_moe_experts": 4, "moe_router_topk": 2}


def _logits(model, ids):
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    model.eval()
    with torch.no_grad():
        out = model(ids, pos, None)
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    return gather_from_tensor_model_parallel_region(out)  # vocab-parallel at TP > 1


def layouts_worker(rank, world, init_file, workdir, arch, dispatcher, result_file):
    """Save an MoE model at TP=1, load it at TP=2 and at EP=2; same logits (and a train step)."""
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps

    from megatron_btm.megatron import parallel
    from megatron_btm.megatron.checkpoint import load_weights, read_meta, save_checkpoint
    from megatron_btm.megatron.model import GPTConfig, build_model
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = GPTConfig(**MOE, arch=arch, moe_token_dispatcher_type=dispatcher)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    parallel.setup_model_parallel(parallel.ParallelConfig())
    parallel.seed_all(3)
    ref_model = build_model(cfg)
    ref = _logits(ref_model, ids)
    ckpt = save_checkpoint(f"{workdir}/ckpt", step=0, model_chunks=[ref_model],
                           meta={"model_config": cfg.to_dict()})
    out["meta_roundtrip"] = GPTConfig.from_dict(read_meta(ckpt)["model_config"]) == cfg
    out["params"] = [sum(p.numel() for p in ref_model.parameters()), cfg.num_parameters()]
    for name, tp, ep in (("tp2", 2, 1), ("ep2", 1, 2)):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                        expert_tensor_parallel_size=1)
        parallel.seed_all(4)
        model = build_model(cfg, tp=tp)
        load_weights([model], ckpt)
        diff = (_logits(model, ids) - ref).abs().max().item()
        if tp > 1:  # Megatron's MoELayer trains at TP > 1 only with sequence parallelism,
            out[name] = {"diff": diff}  # which the local spec's torch norms refuse: inference only
            continue
        model.train()
        pos = torch.arange(16)[None].expand(2, -1)
        loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        grads = all(p.grad is not None for n, p in model.named_parameters() if "router" in n)
        out[name] = {"diff": diff, "router_grads": grads, "loss": loss.item()}
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(out, f)
