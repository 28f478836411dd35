"""The pico trainings of tests/moe/test_train_moe.py, in one process (one Megatron import):
a MoE seed from `btm train-seed`, then `btm train-moe` runs from it. Usage: ROOT DATA."""
import sys
from pathlib import Path

import torch

from megatron_btm import cli

PICO = ["--set", "micro_batch_size=2", "--set", "global_batch_size=4", "--set", "eval_interval=0",
        "--set", "eval_iters=1", "--set", "save_interval=0", "--set", "tensorboard=false",
        "--set", "progress=false", "--set", "optim.warmup_steps=0",
        "--set", "optim.decay_style=constant"]
MODEL = ["--set", "model.num_layers=2", "--set", "model.hidden_size=32",
         "--set", "model.num_attention_heads=2", "--set", "model.seq_length=32",
         "--set", "model.vocab_size=320", "--set", "model.num_moe_experts=4",
         "--set", "model.moe_router_topk=2", "--set", "model.hidden_dropout=0.1"]
STEPS = 10
RESUME_AT = 4


def btm(*args):
    code = cli.main([str(a) for a in args])
    assert code == 0, args


def moe(root: Path, data: Path, name: str, *extra):
    btm("train-moe", *PICO, "--checkpoint", root / "seed", "--data", data, "--domains",
        "bible,legal", "--output", root / name, *extra)


def main(root: Path, data: Path):
    torch.set_num_threads(1)
    btm("train-seed", *PICO, *MODEL, "--set", "steps=2", "--data", data, "--domains",
        "bible,legal", "--output", root / "seed")
    moe(root, data, "router", "--mode", "router-only", "--steps", STEPS, "--lr", "0.01")
    moe(root, data, "full", "--mode", "full", "--steps", STEPS, "--lr", "0.01")
    # the aux loss enters the gradient: one router-only step pair without and with it
    for name, coeff in (("aux0", 0.0), ("aux1", 1.0)):
        moe(root, data, name, "--mode", "router-only", "--steps", 2, "--lr", "0.01",
            "--aux-loss-coeff", coeff)
    # resume: stopped after RESUME_AT steps (its checkpoint saved), then resumed to the end
    from megatron_btm.stages.train_moe import moe_train_config, read_parent, train_moe
    args = dict(checkpoint=root / "seed", data_dir=data, domains=["bible", "legal"],
                output_dir=root / "resumed", mode="full")
    for stop in (RESUME_AT, None):
        cfg = moe_train_config(read_parent(root / "seed")[1], None,
                               [s for s in PICO if s != "--set"] + [f"steps={STEPS}", "optim.lr=0.01"])
        train_moe(cfg, stop_after=stop, **args)
        if stop:
            assert not (root / "resumed" / "stage.json").exists()
    (root / "done").write_text("ok\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
