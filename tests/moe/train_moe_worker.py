"""The pico trainings of tests/moe/test_train_moe.py, in one process (one Megatron import):
a MoE seed from `btm train-seed`, then `btm train-moe` runs from it. Usage: ROOT DATA."""
import json
import sys
from pathlib import Path

from megatron_btm import cli

PICO = ["--set", "micro_batch_size=2", "--set", "global_batch_size=4", "--set", "eval_interval=0",
        "--set", "eval_iters=1", "--set", "save_interval=0", "--set", "tensorboard=false",
        "--set", "progress=false", "--set", "optim.warmup_steps=0",
        "--set", "optim.decay_style=constant",
        "--set", "num_threads=1"]  # the same float sums in every process (resume equality)
MODEL = ["--set", "model.num_layers=2", "--set", "model.hidden_size=32",
         "--set", "model.num_attention_heads=2", "--set", "model.seq_length=32",
         "--set", "model.vocab_size=320", "--set", "model.num_moe_experts=4",
         "--set", "model.moe_router_topk=2", "--set", "model.hidden_dropout=0.1"]
STEPS = 10
EXPERT_IDS = ("w", "x", "y", "z")
RESUME_AT = 4


def btm(*args):
    code = cli.main([str(a) for a in args])
    assert code == 0, args


def moe_args(root: Path, data: Path, name: str, *extra) -> list:
    return ["train-moe", *PICO, "--checkpoint", root / "seed", "--data", data, "--domains",
            "bible,legal", "--output", root / name, *extra]


FULL = ("--mode", "full", "--steps", STEPS, "--lr", "0.01")


def moe(root: Path, data: Path, name: str, *extra):
    btm(*moe_args(root, data, name, *extra))


def main(root: Path, data: Path):
    btm("train-seed", *PICO, *MODEL, "--set", "steps=2", "--data", data, "--domains",
        "bible,legal", "--output", root / "seed")
    # stand in for a `btm merge-moe` parent: its meta.json names the experts (moe_merge)
    from megatron_btm.megatron.checkpoint import resolve_checkpoint
    meta_file = resolve_checkpoint(root / "seed") / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["moe_merge"] = {"expert_ids": list(EXPERT_IDS), "domains": list(EXPERT_IDS)}
    meta_file.write_text(json.dumps(meta))
    moe(root, data, "router", "--mode", "router-only", "--steps", STEPS, "--lr", "0.01")
    moe(root, data, "full", *FULL)
    # the aux loss enters the gradient: one router-only step pair without and with it
    for name, coeff in (("aux0", 0.0), ("aux1", 1.0)):
        moe(root, data, name, "--mode", "router-only", "--steps", 2, "--lr", "0.01",
            "--aux-loss-coeff", coeff)
    # resume: stopped after RESUME_AT steps (its checkpoint saved, no stage.json); the test
    # resumes it to the end in a new process with the command of the "full" run
    from megatron_btm.stages.train_moe import moe_train_config, read_parent, train_moe
    cfg = moe_train_config(read_parent(root / "seed")[1], None,
                           [s for s in PICO if s != "--set"] + [f"steps={STEPS}", "optim.lr=0.01"])
    train_moe(cfg, checkpoint=root / "seed", data_dir=data, domains=["bible", "legal"],
              output_dir=root / "resumed", mode="full", stop_after=RESUME_AT)
    assert not (root / "resumed" / "stage.json").exists()
    (root / "done").write_text("ok\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
