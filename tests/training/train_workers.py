"""Training runs for the mixed-precision tests (also run as a script by the SIGKILL test)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "megatron"))
import mp_workers  # noqa: E402

PICO2 = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 100}
CHAIN_VOCAB = 260  # >= a byte-level BPE's 257 ids, for the export test


class CountingDataset(mp_workers.SyntheticDataset):
    """Learnable sequences: x[t+1] = x[t] + stride (mod vocab), a random start and one of 3
    strides per sequence; a pico model learns it within tens of steps."""

    def __init__(self, n, seq, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.tokens = (start + stride * torch.arange(seq + 1)) % vocab
        self.seq = seq


def make_cfg(dtype, steps, **overrides):
    model = dict(PICO2, **overrides.pop("model", {}))
    optim = {"lr": 1e-2, "warmup_steps": 0, "decay_style": "constant", **overrides.pop("optim", {})}
    return mp_workers.make_cfg(model=model, dtype=dtype, steps=steps, global_batch_size=4,
                               optim=optim, **overrides)


def datasets(steps, vocab=PICO2["vocab_size"]):
    return (CountingDataset(4 * steps, PICO2["seq_length"], vocab, seed=0),
            {"v": CountingDataset(8, PICO2["seq_length"], vocab, seed=1)})


def train_run(out, dtype, steps, **overrides):
    """One single-process run (needs torch.distributed initialised); returns the TrainResult."""
    from megatron_btm.training.loop import train
    train_ds, valid = datasets(steps, overrides.get("model", {}).get("vocab_size", PICO2["vocab_size"]))
    return train(make_cfg(dtype, steps, **overrides), train_dataset=train_ds, valid_datasets=valid,
                 output_dir=out, resume="auto")


def dtype_worker(rank, world, init_file, workdir, runs, result_file):
    """Each (name, dtype, steps, overrides) run in turn; losses and valid losses to JSON."""
    torch.set_num_threads(1)
    from megatron_btm.megatron import parallel
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, dtype, steps, overrides in runs:
        r = train_run(os.path.join(workdir, name), dtype, steps, **overrides)
        results[name] = {"losses": [l for _, l in r.losses], "valid": r.valid_loss["v"],
                         "checkpoint": str(r.checkpoint)}
    with open(result_file, "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # SIGKILL resume test: python train_workers.py OUT DTYPE STEPS SAVE_INTERVAL
    torch.set_num_threads(1)
    from megatron_btm.megatron import parallel
    parallel.init_distributed()
    out, dtype, steps, save_interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    train_run(out, dtype, steps, save_interval=save_interval, keep_checkpoints=10,
              model={"hidden_dropout": 0.1, "attention_dropout": 0.1})


def chain_worker(rank, world, init_file, workdir, tokenizer, result_file):
    """bf16 run (checkpoints at steps 3 and 6) → average of the two → inference → HF export."""
    torch.set_num_threads(1)
    from megatron_btm.averaging.apply import average_checkpoints
    from megatron_btm.export import ExportConfig, export_checkpoint
    from megatron_btm.inference.scoring import load_expert, score_blocks
    from megatron_btm.megatron import parallel
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    run = os.path.join(workdir, "bf16")
    r = train_run(run, "bf16", 6, save_interval=3, keep_checkpoints=2, eval_iters=2,
                  model={"vocab_size": CHAIN_VOCAB})
    ckpts = [os.path.join(run, "checkpoints", f"iter_{s:07d}") for s in (3, 6)]
    avg = os.path.join(workdir, "avg")
    average_checkpoints(ckpts, [0.5, 0.5], avg, progress=False)
    _, valid = datasets(6, vocab=CHAIN_VOCAB)
    blocks = valid["v"].tokens[:4]  # the samples the training run validated on (2 iters × mbs 2)
    results = {"train_valid": r.valid_loss["v"]}
    for name, path in (("last", ckpts[1]), ("avg", avg)):
        expert = load_expert(path, name=name)
        results[name] = {"nll": float(-score_blocks(expert, blocks).mean()),
                         "param_dtype": str(next(expert.model.parameters()).dtype)}
        if name == "avg":
            results["avg"]["logits"] = expert.full_logits(blocks[:, :-1]).tolist()
    hf = export_checkpoint(avg, tokenizer=tokenizer, output=os.path.join(workdir, "hf"),
                           config=ExportConfig(dtype="fp32"))
    results.update(blocks=blocks.tolist(), hf=str(hf), checkpoints=ckpts, averaged=avg)
    with open(result_file, "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


def run_state_worker(rank, world, init_file, workdir, result_file):
    """2 steps with a checkpoint each on `world` ranks, rank 1's clock running 1.5x fast (its
    device_seconds differ from rank 0's for sure); Megatron's common-state warnings and each
    rank's device_seconds to JSON (one file per rank)."""
    import logging
    import time as real_time
    import types

    from megatron_btm.megatron import parallel
    from megatron_btm.training import loop
    torch.set_num_threads(1)
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    if rank == 1:
        loop.time = types.SimpleNamespace(perf_counter=lambda: 1.5 * real_time.perf_counter())
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megatron.core.dist_checkpointing").addHandler(handler)
    r = train_run(workdir, "fp32", 2, save_interval=1, keep_checkpoints=2)
    with open(f"{result_file}.{rank}", "w") as f:
        json.dump({"device_seconds": r.device_seconds,
                   "common_state_warnings": [w for w in warnings if "common state dict" in w]}, f)
    torch.distributed.destroy_process_group()
