"""Workers of the CUDA tests (tests/training/test_train_gpu.py); spawned, one process each."""
import json
import os

import torch

import train_workers as workers


def _deterministic():
    """Math SDPA and deterministic cuBLAS: the resume check then isolates the checkpoint path
    from kernel nondeterminism (flash/efficient attention backward use atomics)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.use_deterministic_algorithms(True, warn_only=True)


def resume_worker(rank, world, init_file, workdir, result_file):
    """bf16 TP=1 on CUDA: 4 steps straight; 2 steps + save, then resumed to 4; load_expert."""
    _deterministic()
    from megatron_btm.inference.scoring import load_expert, score_blocks
    from megatron_btm.megatron import parallel
    from megatron_btm.training.loop import train
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    train_ds, valid = workers.datasets(4)
    cfg = workers.make_cfg("bf16", 4, save_interval=2)
    full = train(cfg, train_dataset=train_ds, valid_datasets=valid, output_dir=f"{workdir}/full")
    first = train(cfg, train_dataset=train_ds, valid_datasets=None, output_dir=f"{workdir}/cut",
                  stop_after=2)
    rest = train(cfg, train_dataset=train_ds, valid_datasets=valid, output_dir=f"{workdir}/cut")
    meta = json.loads(open(f"{full.checkpoint}/meta.json").read())
    expert = load_expert(full.checkpoint, name="full")
    blocks = valid["v"].tokens[:4]
    ll = score_blocks(expert, blocks)
    logits = expert.full_logits(blocks[:, :-1]).double().cpu()
    ref = torch.log_softmax(logits, -1).gather(-1, blocks[:, 1:, None])[..., 0]
    out = {"full": [l for _, l in full.losses],
           "resumed": [l for _, l in first.losses] + [l for _, l in rest.losses],
           "choices": meta["device_choices"], "expert_device": str(expert.device),
           "ll_max_err": float((ll - ref).abs().max()), "ll_mean": float(ll.mean())}
    with open(result_file, "w") as f:
        json.dump(out, f)
    torch.distributed.destroy_process_group()


def te_cross_spec_worker(rank, world, init_file, workdir, result_file):
    """A local-spec checkpoint into a Transformer Engine model and back: same logits."""
    from megatron_btm.megatron import checkpoint, parallel
    from megatron_btm.megatron.model import build_model
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    parallel.setup_model_parallel(parallel.ParallelConfig())
    cfg = workers.make_cfg("fp32", 1).model
    from megatron_btm.megatron import device
    dev = device.current()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), device=dev)
    pos = torch.arange(cfg.seq_length, device=dev).expand(2, -1)

    def built(use_te, seed):
        parallel.seed_all(seed)
        return build_model(cfg, use_te=use_te, pre_process=True, post_process=True).to(dev).eval()

    def logits(m):
        with torch.no_grad():
            return m(tokens, pos, None).float()
    local = built(False, 1)
    local_ckpt = checkpoint.save_checkpoint(f"{workdir}/local", step=0, model_chunks=[local])
    te = built(True, 2)
    checkpoint.load_weights([te], local_ckpt)
    te_ckpt = checkpoint.save_checkpoint(f"{workdir}/te", step=0, model_chunks=[te])
    back = built(False, 3)
    checkpoint.load_weights([back], te_ckpt)
    out = {"local_vs_te": float((logits(local) - logits(te)).abs().max()),
           "local_vs_back": float((logits(local) - logits(back)).abs().max()),
           "te_has_extra": any(k.endswith("_extra_state") for k in te.state_dict())}
    with open(result_file, "w") as f:
        json.dump(out, f)
    torch.distributed.destroy_process_group()
