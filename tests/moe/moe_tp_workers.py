"""Spawned workers of tests/moe/test_moe_tp.py: MoE (and dense) training at TP=2 with sequence
parallelism against TP=1 from the same initial weights (the harness of
tests/megatron/test_parallel_training.py: gloo groups, spawned ranks, synthetic data), and
`btm train-moe` at TP=2 through the CLI."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "megatron"))
import mp_workers  # noqa: E402

MOE = {"num_layers": 2, "num_moe_experts": 4, "moe_router_topk": 2}
# name -> model fields over mp_workers.PICO (hidden 32, 4 heads, seq 16, vocab 100)
CASES = {
    "moe": dict(MOE),                                             # GPT-2 style, alltoall
    "moe_llama_allgather": dict(MOE, arch="llama", moe_token_dispatcher_type="allgather"),
    # aux-loss-free: sigmoid scores, the expert bias updated from the token counts
    "moe_bias": dict(MOE, moe_router_score_function="sigmoid",
                     moe_router_enable_expert_bias=True, moe_router_load_balancing_type="none"),
    "dense": {"num_layers": 2},
}
IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(5))


# Adam's eps at 1e-3 (not 1e-8): Adam turns a gradient element that is float noise (~1e-9,
# different between layouts) into a full-size step of either sign, and a top-k router turns
# such parameter differences into a different expert for a token whose top-2 logits nearly
# tie; a larger eps keeps the layouts' float differences at float-noise size.
OPTIM = {"lr": 1e-2, "warmup_steps": 0, "decay_style": "constant", "adam_eps": 1e-3}


def cfg_of(name, tp):
    # dense: sequence parallelism asked for; MoE: on by default at TP > 1
    parallel = {"tp": tp, **({"sequence_parallel": True} if name == "dense" and tp > 1 else {})}
    return mp_workers.make_cfg(model=dict(CASES[name]), parallel=parallel, optim=dict(OPTIM))


def _init_dist(rank, world, init_file):
    torch.set_num_threads(1)
    from megatron_btm.megatron import parallel
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)


def train_worker(rank, world, init_file, workdir, tp, result_file):
    """Every case at `tp` for 3 steps from workdir/init-<case> (written here at TP=1)."""
    _init_dist(rank, world, init_file)
    from megatron_btm.training.loop import save_initial_weights, train
    train_ds, _ = mp_workers.datasets()
    results = {}
    for name in CASES:
        cfg = cfg_of(name, tp)
        init = os.path.join(workdir, f"init-{name}")
        if tp == 1:
            save_initial_weights(cfg, init)
        r = train(cfg, train_dataset=train_ds, valid_datasets=None,
                  output_dir=os.path.join(workdir, f"{name}-tp{tp}"), init_from=init, resume="none")
        results[name] = {"losses": [l for _, l in r.losses], "checkpoint": str(r.checkpoint),
                         "init": init}
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(results, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def logits(cfg, checkpoint):
    """Full-vocabulary logits of `checkpoint` at cfg's layout for IDS (eval mode)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_btm.training.loop import load_for_eval
    (model,) = load_for_eval(cfg, checkpoint)
    pos = torch.arange(IDS.shape[1])[None].expand(IDS.shape[0], -1)
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(IDS, pos, None))


def cli_worker(rank, world, init_file, argvs, logits_file):
    """`btm ARGV` for each ARGV, on every rank of this world (the CLI finds the process group
    initialised, as under torchrun), then the last run's final checkpoint's logits at TP=world."""
    _init_dist(rank, world, init_file)
    from megatron_btm import cli
    for argv in argvs:
        assert cli.main(argv) == 0, argv
    from megatron_btm.megatron.checkpoint import read_meta, resolve_checkpoint
    from megatron_btm.training.config import TrainConfig
    ckpt = resolve_checkpoint(argvs[-1][argvs[-1].index("--output") + 1])
    cfg = TrainConfig.from_dict({"model": read_meta(ckpt)["model_config"], "parallel": {"tp": world}})
    out = logits(cfg, ckpt)
    if rank == 0:
        torch.save(out, logits_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def load_worker(rank, world, init_file, checkpoint, logits_file):
    """World 1: the checkpoint's logits at TP=1."""
    _init_dist(rank, world, init_file)
    from megatron_btm.megatron.checkpoint import read_meta
    from megatron_btm.training.config import TrainConfig
    cfg = TrainConfig.from_dict({"model": read_meta(checkpoint)["model_config"]})
    torch.save(logits(cfg, checkpoint), logits_file)
    torch.distributed.destroy_process_group()
