"""The one device choice and the GPU defaults it derives (CUDA simulated where it must be)."""
import pytest
import torch

from megatron_btm.megatron import cpu_backend, device, parallel


def _choices(**kw):
    args = dict(dtype="auto", tp=1, dp=1, use_te=False, distributed_optimizer=None,
                overlap_grad_reduce=None, overlap_param_gather=None, sequence_parallel=None)
    return device.training_choices(**{**args, **kw})


def test_local_rank_from_torchrun_then_slurm(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    assert device.local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert device.local_rank() == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device.local_rank() == 1


def test_cpu_everything_off():
    c = _choices(tp=2, dp=4)
    assert (c["device"], c["backend"], c["dtype"]) == ("cpu", "gloo", "fp32")
    assert not any(c["fusions"].values())
    assert not any(c[k] for k in ("use_distributed_optimizer", "overlap_grad_reduce",
                                  "overlap_param_gather", "sequence_parallel", "pinned_prefetch"))
    assert device.current() == torch.device("cpu")
    batch = {"tokens": torch.arange(4)}
    assert device.to_device(device.pin(batch))["tokens"] is batch["tokens"]  # untouched on CPU


def test_gpu_defaults(monkeypatch):
    monkeypatch.setattr(device, "cuda", lambda: True)
    monkeypatch.setattr(device, "_importable", lambda name: name == "triton")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    single = _choices()
    assert single["device"] == "cuda:1" and single["backend"] == "nccl" and single["dtype"] == "bf16"
    assert single["fusions"]["bias_activation_fusion"] and single["fusions"]["bias_dropout_fusion"]
    # without TE: no persistent layernorm (torch LayerNorm refuses it), no wgrad fusion kernel
    assert not single["fusions"]["persist_layer_norm"]
    assert not single["fusions"]["gradient_accumulation_fusion"]
    assert not single["use_distributed_optimizer"] and not single["overlap_grad_reduce"]
    assert single["pinned_prefetch"]
    te = _choices(tp=2, dp=2, use_te=True)
    assert te["fusions"]["persist_layer_norm"] and te["fusions"]["gradient_accumulation_fusion"]
    assert te["use_distributed_optimizer"] and te["overlap_grad_reduce"] and te["overlap_param_gather"]
    assert te["sequence_parallel"]
    assert not _choices(tp=2, use_te=False)["sequence_parallel"]  # the local spec would assert
    # explicit settings win
    mine = _choices(dtype="fp32", dp=2, use_te=True, distributed_optimizer=False,
                    overlap_grad_reduce=False, sequence_parallel=False, tp=2)
    assert mine["dtype"] == "fp32" and not mine["use_distributed_optimizer"]
    assert not mine["overlap_grad_reduce"] and not mine["overlap_param_gather"]
    assert not mine["sequence_parallel"]
    assert "overlap_grad_reduce: False" in device.describe(mine)


def test_overlap_param_gather_needs_distributed_optimizer():
    with pytest.raises(ValueError, match="overlap_param_gather=true needs "
                                         "parallel.use_distributed_optimizer"):
        parallel.ParallelConfig(overlap_param_gather=True, use_distributed_optimizer=False)


def test_version_guard_runs_with_cuda_too(monkeypatch):
    """On a GPU the CPU backend stays off, but the version guard still refuses an untested
    megatron-core (checkpoint.py uses the distributed optimizer's internals there too)."""
    import importlib.metadata as md
    parallel.init_distributed()
    monkeypatch.setattr(cpu_backend, "cuda_present", lambda: True)
    monkeypatch.setattr(md, "version", lambda name: "0.18.0")
    with pytest.raises(RuntimeError, match=r"tested with megatron-core >=0.16,<0.17 but 0.18.0"):
        parallel.setup_model_parallel(parallel.ParallelConfig())
