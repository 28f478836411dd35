"""Spawned workers for the export tests: train pico models (so weights are far from init),
save their checkpoints, and record Megatron's own logits on a fixed batch as the reference."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "megatron"))
import mp_workers  # noqa: E402

MODEL_VOCAB = 320  # > the test tokenizer's vocabulary; padded to 384 by Megatron
SEQ = 16


def model_cfg(**model):
    # a wide init (std 0.3, not 0.02) so that logits depend strongly on the context
    return mp_workers.make_cfg(model={"vocab_size": MODEL_VOCAB, "num_layers": 2,
                                      "init_method_std": 0.3, **model},
                               steps=4, optim={"lr": 3e-2, "warmup_steps": 0,
                                               "decay_style": "constant"})


def batch_tokens():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (3, SEQ), generator=g)  # ids every tokenizer of ours holds


def reference_logits(cfg, checkpoint):
    """Megatron GPTModel's logits [b, s, padded V], loaded at TP=1 through Megatron's loader."""
    from megatron_btm.training.loop import load_for_eval
    cfg = mp_workers.make_cfg(model=cfg.model.to_dict(), parallel={"tp": 1, "pp": 1})
    chunks = load_for_eval(cfg, checkpoint)
    tokens = batch_tokens()
    with torch.no_grad():
        pos = torch.arange(SEQ).expand_as(tokens)
        return chunks[0](tokens, pos, None)


def train_worker(rank, world, init_file, workdir, names):
    """Train the named runs (tied, untied: any world; tp2: world 2), then compute each
    checkpoint's logits at TP=1 through Megatron's loader (all ranks compute, rank 0 saves)."""
    torch.set_num_threads(1)
    from megatron_btm.megatron import parallel
    from megatron_btm.training.loop import train
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = mp_workers.SyntheticDataset(64, SEQ, MODEL_VOCAB, seed=3)
    runs = {"tied": model_cfg(), "untied": model_cfg(tie_embeddings=False),
            "tied_b": model_cfg(init_seed=5),  # same architecture, other weights (averaging)
            "tp2": mp_workers.make_cfg(model=model_cfg(init_seed=99).model.to_dict(),
                                       parallel={"tp": 2}, steps=4,
                                       optim={"lr": 3e-2, "warmup_steps": 0,
                                              "decay_style": "constant"})}
    out = {}
    for name, cfg in ((n, runs[n]) for n in names):
        r = train(cfg, train_dataset=data, valid_datasets=None,
                  output_dir=os.path.join(workdir, name), resume="none")
        out[name] = (cfg, r.checkpoint)
    for name, (cfg, ckpt) in out.items():
        logits = reference_logits(cfg, ckpt)
        if rank == 0:
            torch.save({"tokens": batch_tokens(), "logits": logits, "checkpoint": str(ckpt)},
                       os.path.join(workdir, f"{name}.ref.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # python export_workers.py WORKDIR WORLD NAME...
    workdir, world, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    torch.multiprocessing.spawn(train_worker, args=(world, os.path.join(workdir, "init"), workdir, names),
                                nprocs=world, join=True)
