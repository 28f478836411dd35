"""The aux-loss-free runs of tests/moe/test_train_moe_bias.py, in one process: a sigmoid MoE
parent with the expert bias (`btm train-seed`), then `btm train-moe` from it with every
router's top-k choices counted per step by a forward hook (ROOT/counts.json), and a run stopped
after RESUME_AT steps that the test resumes. Usage: ROOT DATA."""
import json
import sys
from pathlib import Path

from megatron_btm import cli

PICO = ["--set", "micro_batch_size=2", "--set", "global_batch_size=4", "--set", "eval_interval=0",
        "--set", "eval_iters=1", "--set", "tensorboard=false", "--set", "progress=false",
        "--set", "optim.warmup_steps=0", "--set", "optim.decay_style=constant",
        "--set", "num_threads=1"]  # the same float sums in every process (resume equality)
MODEL = ["--set", "model.num_layers=2", "--set", "model.hidden_size=32",
         "--set", "model.num_attention_heads=2", "--set", "model.seq_length=32",
         "--set", "model.vocab_size=320", "--set", "model.num_moe_experts=4",
         "--set", "model.moe_router_topk=2", "--set", "model.moe_router_score_function=sigmoid",
         "--set", "model.moe_router_enable_expert_bias=true",
         "--set", "model.moe_router_load_balancing_type=none"]
STEPS, RESUME_AT, MICROBATCHES = 4, 2, 2
TOKENS_PER_STEP = 4 * 32  # global batch × sequence length


def moe_args(root: Path, data: Path, name: str) -> list:
    return ["train-moe", *PICO, "--checkpoint", root / "seed", "--data", data, "--domains",
            "bible,legal", "--output", root / name, "--mode", "full", "--steps", STEPS,
            "--lr", "0.01", "--set", "save_interval=1", "--set", "keep_checkpoints=10"]


def btm(*args):
    assert cli.main([str(a) for a in args]) == 0, args


def count_routing(counts: dict):
    """Forward hook on every module: a training router's routing map, summed per expert, is
    appended to counts[layer]. Returns the hook's handle."""
    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    def hook(module, args, output):
        if isinstance(module, TopKRouter) and module.training and torch.is_grad_enabled():
            _, routing_map = output
            counts.setdefault(module.layer_number, []).append(routing_map.sum(dim=0).tolist())
    return torch.nn.modules.module.register_module_forward_hook(hook)


def main(root: Path, data: Path):
    btm("train-seed", *PICO, *MODEL, "--set", "steps=1", "--set", "save_interval=0",
        "--data", data, "--domains", "bible,legal", "--output", root / "seed")
    counts: dict = {}
    handle = count_routing(counts)
    btm(*moe_args(root, data, "bias"))
    handle.remove()
    (root / "counts.json").write_text(json.dumps({str(k): v for k, v in sorted(counts.items())}))
    from megatron_btm.stages.train_moe import moe_train_config, read_parent, train_moe
    cfg = moe_train_config(read_parent(root / "seed")[1], None,
                           [s for s in PICO if s != "--set"] +
                           [f"steps={STEPS}", "optim.lr=0.01", "save_interval=1", "keep_checkpoints=10"])
    train_moe(cfg, checkpoint=root / "seed", data_dir=data, domains=["bible", "legal"],
              output_dir=root / "resumed", mode="full", stop_after=RESUME_AT)
    assert not (root / "resumed" / "stage.json").exists()
    (root / "done").write_text("ok\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
