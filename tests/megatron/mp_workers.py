"""Worker functions for the distributed tests (spawned processes import this module)."""
import json
import os
import sys
import tempfile

import torch

PICO = {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 100}


class SyntheticDataset:
    """Deterministic random token sequences in Megatron GPTDataset's item format."""

    def __init__(self, n, seq, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (n, seq + 1), generator=g)
        self.seq = seq

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        x = self.tokens[i]
        return {"tokens": x[:-1], "labels": x[1:], "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}


def make_cfg(**overrides):
    from megatron_btm.training.config import TrainConfig
    model = dict(PICO, **overrides.pop("model", {}))
    base = {"model": model, "steps": 3, "micro_batch_size": 2, "global_batch_size": 8,
            "save_interval": 0, "eval_interval": 0, "eval_iters": 2, "progress": False,
            "tensorboard": False, "optim": {"lr": 1e-2, "warmup_steps": 0, "decay_style": "constant"}}
    base.update(overrides)
    return TrainConfig.from_dict(base)


def datasets():
    return (SyntheticDataset(64, PICO["seq_length"], PICO["vocab_size"], seed=0),
            {"v": SyntheticDataset(16, PICO["seq_length"], PICO["vocab_size"], seed=1)})


def layouts_worker(rank, world, init_file, workdir, layouts, result_file):
    """Train each (tp, pp, extra) layout for 3 steps from the same initial weights."""
    torch.set_num_threads(1)
    from megatron_btm.megatron import parallel
    from megatron_btm.training.loop import train
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    train_ds, valid = datasets()
    for name, tp, pp, extra in layouts:
        interrupt_after = extra.pop("interrupt_after", None)
        cfg = make_cfg(parallel={"tp": tp, "pp": pp, **extra.pop("parallel", {})}, **extra)
        out = os.path.join(workdir, name)
        init = os.path.join(workdir, "init")
        losses = []
        if interrupt_after:  # stop (checkpoint), then resume the same run from that checkpoint
            first = train(cfg, train_dataset=train_ds, valid_datasets=None, output_dir=out,
                          init_from=init, resume="none", stop_after=interrupt_after)
            losses = [l for _, l in first.losses]
        r = train(cfg, train_dataset=train_ds, valid_datasets=valid, output_dir=out,
                  init_from=init, resume="auto")
        results[name] = {"losses": losses + [l for _, l in r.losses], "valid": r.valid_loss["v"],
                         "checkpoint": str(r.checkpoint)}
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(results, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def reference_worker(rank, world, init_file, workdir, result_file, eval_checkpoints):
    """World size 1: write the shared initial weights, train TP1/PP1, and evaluate checkpoints."""
    torch.set_num_threads(1)
    from megatron_btm.megatron import parallel
    from megatron_btm.training.loop import evaluate, load_for_eval, save_initial_weights, train
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    train_ds, valid = datasets()
    results = {}
    cfg = make_cfg()
    if not os.path.exists(os.path.join(workdir, "init")):
        save_initial_weights(cfg, os.path.join(workdir, "init"))
        r = train(cfg, train_dataset=train_ds, valid_datasets=valid,
                  output_dir=os.path.join(workdir, "ref"), init_from=os.path.join(workdir, "init"),
                  resume="none")
        results["ref"] = {"losses": [l for _, l in r.losses], "valid": r.valid_loss["v"]}
    for name, path in eval_checkpoints:
        chunks = load_for_eval(cfg, path)
        results[name] = {"valid": evaluate(chunks, valid, cfg)["v"]}
    with open(result_file, "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


def spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as d:
        torch.multiprocessing.spawn(fn, args=(world, os.path.join(d, "init"), *args), nprocs=world,
                                    join=True)


if __name__ == "__main__":  # resume test: python mp_workers.py OUT STEPS SAVE_INTERVAL DROPOUT
    out, steps, save_interval, dropout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    torch.set_num_threads(1)
    from megatron_btm.megatron import parallel
    from megatron_btm.training.loop import train
    parallel.init_distributed()
    cfg = make_cfg(steps=steps, save_interval=save_interval, keep_checkpoints=10,
                   model={"hidden_dropout": dropout, "attention_dropout": dropout},
                   optim={"lr": 1e-2, "warmup_steps": 2, "decay_style": "cosine", "min_lr": 1e-3})
    train_ds, valid = datasets()
    train(cfg, train_dataset=train_ds, valid_datasets=None, output_dir=out, resume="auto")


def diverging_worker(rank, world, init_file, out, result_file):
    """Train where the loss turns NaN at step 4 (a stand-in for a diverging model)."""
    torch.set_num_threads(1)
    from megatron_btm.megatron import parallel
    from megatron_btm.training import loop
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    real = loop._masked_mean
    calls = {"n": 0}

    def poisoned(loss_mask, losses):
        calls["n"] += 1
        loss, metrics = real(loss_mask, losses)
        if calls["n"] > 3 * 4:  # 4 micro-batches per step: NaN from step 4 on
            loss = loss * float("nan")
            metrics = {"loss": loss.detach().clone()}
        return loss, metrics

    loop._masked_mean = poisoned
    train_ds, _ = datasets()
    cfg = make_cfg(steps=6, save_interval=2, keep_checkpoints=5)
    try:
        loop.train(cfg, train_dataset=train_ds, valid_datasets=None, output_dir=out)
        outcome = {"error": None}
    except loop.TrainingDiverged as e:
        outcome = {"error": str(e)}
    with open(result_file, "w") as f:
        json.dump(outcome, f)


def logging_worker(rank, world, init_file, out):
    """Two steps with TensorBoard and (offline) wandb on."""
    torch.set_num_threads(1)
    os.environ["WANDB_MODE"] = "offline"
    from megatron_btm.megatron import parallel
    from megatron_btm.training.loop import train
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    train_ds, valid = datasets()
    cfg = make_cfg(steps=2, tensorboard=True, wandb=True, wandb_project="btm-test", eval_interval=1)
    train(cfg, train_dataset=train_ds, valid_datasets=valid, output_dir=out)
