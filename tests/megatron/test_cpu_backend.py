"""The CPU backend patches only what it lists, only without CUDA, only on a tested version."""
import importlib

import pytest
import torch

from megatron_btm.megatron import cpu_backend


def test_refuses_untested_megatron_version(monkeypatch):
    import importlib.metadata as md
    monkeypatch.setattr(md, "version", lambda name: "0.18.0")
    with pytest.raises(RuntimeError, match=r"tested with megatron-core >=0.16,<0.17 but 0.18.0"):
        cpu_backend.check_version()


def test_inactive_when_cuda_present(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_active", False)
    monkeypatch.setattr(cpu_backend, "cuda_present", lambda: True)
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    before = schedules.torch
    assert cpu_backend.activate() is False
    assert schedules.torch is before


def test_active_patches_only_listed_modules():
    cpu_backend.activate()
    assert cpu_backend.is_active()
    for name in cpu_backend.PATCHED_MODULES:
        mod = importlib.import_module(name)
        assert mod.torch is not torch and mod.torch.cuda.current_device() == "cpu"
        # factories with a CUDA device allocate on CPU inside the patched module
        assert mod.torch.zeros(2, device="cuda").device.type == "cpu"
    # torch itself and unlisted megatron modules are untouched
    assert importlib.import_module("megatron.core.transformer.transformer_block").torch is torch
    assert torch.zeros(1).device.type == "cpu"
    with pytest.raises((RuntimeError, AssertionError, AttributeError)):
        torch.cuda.current_device()


def test_cpu_rng_tracker_forks_independent_stream():
    cpu_backend.activate()
    from megatron.core import tensor_parallel
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-stream", 123)
    torch.manual_seed(0)
    outer_before = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("test-stream"):
        inner = torch.rand(3)
    outer_after = torch.rand(3)
    assert torch.equal(outer_before, outer_after)  # the fork does not consume the outer stream
    assert torch.equal(inner, torch.rand(3, generator=torch.Generator().manual_seed(123)))
