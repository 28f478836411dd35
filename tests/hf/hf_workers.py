"""Spawned gloo workers for the multi-process import tests (imported by name in the children)."""
import os
import tempfile

import torch


def load_worker(rank, world, init_file, cases, result_dir):
    """Each imported checkpoint at TP=2 (logits gathered over the vocab shards) and at PP=2
    (stage 0's hidden states sent to stage 1, as the pipeline schedule does)."""
    torch.set_num_threads(1)
    from hf_helpers import megatron_logits, megatron_model, tokens

    from megatron_btm.megatron.parallel import init_distributed
    init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    ids = tokens()
    b, s = ids.shape
    pos = torch.arange(s).expand(b, s)
    for name, ckpt in cases:
        model, cfg = megatron_model(ckpt, tp=2)
        local = megatron_logits(model, ids).contiguous()  # [b, s, V / 2]
        parts = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(parts, local)
        tp2 = torch.cat(parts, dim=-1)
        model, cfg = megatron_model(ckpt, pp=2)
        with torch.no_grad():
            if rank == 0:
                torch.distributed.send(model(ids, pos, None).contiguous(), 1)
            else:
                hidden = torch.empty(s, b, cfg.hidden_size)
                torch.distributed.recv(hidden, 0)
                model.set_input_tensor(hidden)
                pp2 = model(ids, pos, None)
                torch.save({"tp2": tp2, "pp2": pp2}, os.path.join(result_dir, f"{name}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as d:
        torch.multiprocessing.spawn(fn, args=(world, os.path.join(d, "init"), *args), nprocs=world,
                                    join=True)


LLAMA = {"arch": "llama", "num_query_groups": 2}  # RoPE, RMSNorm, SwiGLU, GQA, untied


def llama_layout_worker(rank, world, init_file, workdir, tp, pp, result_file):
    """Train the llama-preset pico model for 3 steps at (tp, pp) from shared initial weights
    (written by the world-1 run, which is the TP=1/PP=1 reference)."""
    import json
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "megatron"))
    import mp_workers

    from megatron_btm.megatron import parallel
    from megatron_btm.training.loop import save_initial_weights, train
    torch.set_num_threads(1)
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = mp_workers.make_cfg(model=LLAMA, parallel={"tp": tp, "pp": pp})
    init = os.path.join(workdir, "init")
    if world == 1:
        save_initial_weights(cfg, init)
    train_ds, _ = mp_workers.datasets()
    r = train(cfg, train_dataset=train_ds, valid_datasets=None,
              output_dir=os.path.join(workdir, f"tp{tp}pp{pp}"), init_from=init, resume="none")
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump([loss for _, loss in r.losses], f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
