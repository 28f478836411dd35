"""The CPU backend: the only module that touches Megatron-Core internals.

Megatron-Core has no device setting; 0.16.x hard-codes CUDA in a handful of places that a
CPU/gloo run reaches. `activate()` neutralises exactly those, and only when CUDA is absent:

1. Module-scoped `torch`: in the modules of `PATCHED_MODULES` (and nowhere else) the global
   name `torch` is rebound to a proxy that forwards everything to real torch, except that
   tensor factories given a CUDA device allocate on CPU and `torch.cuda.current_device()` /
   `synchronize()` / `empty_cache()` are harmless. torch itself is not modified.
2. Six functions test `x.type() == 'torch.cuda.FloatTensor'` or call `x.cuda()`; each runs
   inside a context where CPU tensors report CUDA type names and `.cuda()` is the identity.
3. The tensor-parallel RNG tracker (CUDA generator states) becomes a CPU-generator tracker, so
   dropout inside TP regions and activation recompute work. Note: on CPU,
   `model_parallel_cuda_manual_seed` does not seed the default generator; call
   `torch.manual_seed(seed)` yourself with the same value on every TP rank.
4. MoE (num_moe_experts): the router's linear names TE's `te_general_gemm` even without TE,
   and the alltoall dispatcher copies split sizes to the host only from CUDA tensors; both are
   fixed here, and the MoE modules are in PATCHED_MODULES (their `torch.cuda.Stream` is a no-op
   stream). Both token dispatchers (alltoall, allgather) run on gloo, at TP=2 and EP=2.

Tested against the pinned megatron-core range (SUPPORTED); `check_version()` refuses other
versions with a clear error rather than failing somewhere deep inside a training step. It is
called by `activate()` and, on CPU and GPU alike, by `parallel.setup_model_parallel`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

SUPPORTED = ((0, 16), (0, 17))  # [min, max) of megatron-core (major, minor)

# Modules whose global `torch` is rebound (megatron-core 0.16.x), with what they hard-code.
PATCHED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",          # device="cuda" token counters
    "megatron.core.pipeline_parallel.p2p_communication",  # current_device(), synchronize()
    "megatron.core.utils",                                # GlobalMemoryBuffer, l2-norm fallback
    "megatron.core.transformer.utils",                    # default causal mask on cuda
    "megatron.core.tensor_parallel.mappings",             # sequence-parallel gather buffers
    "megatron.core.tensor_parallel.layers",
    "megatron.core.distributed.param_and_grad_buffer",    # DDP grad buffers
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",                  # optimizer + grad clipping
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",                # fp16 loss scale tensors
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # torch_dist save path
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # RoPE inv_freq to current_device()
    # MoE (num_moe_experts): router weights and aux-loss tensors to current_device(), the
    # alltoall dispatcher's device-to-host side stream, the aux-loss tracker's device="cuda"
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.experts",
)

_CPU = torch.device("cpu")
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn",
              "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor")
_active = False


def cuda_present() -> bool:
    return torch.cuda.is_available()


def is_active() -> bool:
    return _active


def check_version() -> str:
    """Return the installed megatron-core version; raise if outside the tested range."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        v = version("megatron-core")
    except PackageNotFoundError:
        raise RuntimeError("megatron-core is not installed: pip install 'megatron-core>=0.16,<0.17'") from None
    major_minor = tuple(int(x) for x in v.split(".")[:2])
    lo, hi = SUPPORTED
    if not (lo <= major_minor < hi):
        raise RuntimeError(
            f"megatron_btm is tested with megatron-core >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} but "
            f"{v} is installed; the internals it relies on (the CPU backend's CUDA hard-codes, "
            f"the distributed-optimizer checkpoint path) may have moved. Install a tested version.")
    return v


# ---------------------------------------------------------------- 1. module-scoped torch proxy
def _to_cpu_device(device):
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or \
            (isinstance(device, torch.device) and device.type == "cuda"):
        return _CPU
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)
    return factory


class _NullStream:
    """The one CPU "stream" (and its event): waiting and synchronizing are no-ops."""

    def wait_stream(self, other):
        return None

    def record_event(self, *args):
        return self

    def synchronize(self):
        return None


_NULL_STREAM = _NullStream()


class _CudaNamespace(types.SimpleNamespace):
    def __getattr__(self, name):  # everything not overridden: the real torch.cuda
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """Stands in for `torch` inside PATCHED_MODULES."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaNamespace(current_device=lambda: "cpu", synchronize=lambda *a, **k: None,
                                   empty_cache=lambda: None, is_available=lambda: False,
                                   # MoE alltoall dispatcher: one stream, so never "on a side stream"
                                   Stream=lambda *a, **k: _NULL_STREAM,
                                   current_stream=lambda *a, **k: _NULL_STREAM,
                                   stream=lambda s: contextlib.nullcontext())
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):  # only reached for names not set above; cache them
        value = getattr(torch, name)
        setattr(self, name, value)
        return value


# ------------------------------------------- 2. x.type() == 'torch.cuda.FloatTensor' / x.cuda()
@contextlib.contextmanager
def _cpu_tensors_look_cuda():
    orig_type, orig_cuda = torch.Tensor.type, torch.Tensor.cuda

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu":
            return orig_type(self).replace("torch.", "torch.cuda.", 1)
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type, torch.Tensor.cuda = _type, (lambda self, *a, **k: self)
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = orig_type, orig_cuda


def _looking_cuda(fn):
    if getattr(fn, "_btm_cpu_backend", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_look_cuda():
            return fn(*args, **kwargs)
    wrapper._btm_cpu_backend = True
    return wrapper


def _wrap_tensor_method_checks():
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import distrib_optimizer as dopt
    from megatron.core.optimizer import optimizer as opt
    opt.clip_grad_by_total_norm_fp32 = _looking_cuda(opt.clip_grad_by_total_norm_fp32)
    dopt.DistributedOptimizer.__init__ = _looking_cuda(dopt.DistributedOptimizer.__init__)
    opt.Float16OptimizerWithFloat16Params.__init__ = _looking_cuda(
        opt.Float16OptimizerWithFloat16Params.__init__)
    dopt.DistributedOptimizer.get_parameter_state_dp_zero = _looking_cuda(
        dopt.DistributedOptimizer.get_parameter_state_dp_zero)
    from megatron.core.optimizer import grad_scaler  # fp16 resume: state_dict['scale'].cuda(...)
    grad_scaler.DynamicGradScaler.load_state_dict = _looking_cuda(
        grad_scaler.DynamicGradScaler.load_state_dict)
    # tied embeddings with PP > 1: weight.data = weight.data.cuda()
    LanguageModule.setup_embeddings_and_output_layer = _looking_cuda(
        LanguageModule.setup_embeddings_and_output_layer)


# --------------------------------------------------------------------- 3. CPU RNG tracker
def _install_cpu_rng_tracker():
    from megatron.core.tensor_parallel import random as tpr

    class CpuRNGStatesTracker(tpr.CudaRNGStatesTracker):
        """CudaRNGStatesTracker's API over CPU default-generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=tpr._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    tpr.CudaRNGStatesTracker = CpuRNGStatesTracker  # the class initialize_rng_tracker builds
    tpr._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tpr._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    tpr.initialize_rng_tracker(force_reset=True)


# ------------------------------------------------------------ 4. MoE without Transformer Engine
def _fix_moe_without_te():
    """moe_utils names `te_general_gemm` in the router's linear even when TE failed to import
    (a NameError in 0.16.1); None selects its torch matmul path. The alltoall dispatcher moves
    split sizes to the host only from CUDA tensors (`_host_copy` does it for CPU ones)."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy


def _host_copy(tensor, as_numpy=False, record_stream=False):
    """moe_utils.maybe_move_tensor_to_cpu for CPU tensors: the alltoall dispatcher's split sizes
    must reach all_to_all as numpy (host) values, as they do from a GPU."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def activate() -> bool:
    """Install the CPU backend if CUDA is absent (idempotent). Returns whether it is active.

    Call before building models. On a CUDA machine this does nothing: Megatron runs as shipped.
    """
    global _active
    if _active:
        return True
    if cuda_present():
        return False
    check_version()
    proxy = _CpuTorch()
    for name in PATCHED_MODULES:
        importlib.import_module(name).torch = proxy
    _wrap_tensor_method_checks()
    _install_cpu_rng_tracker()
    _fix_moe_without_te()
    _active = True
    return True
