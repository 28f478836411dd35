"""The fused ensemble-logit mixing op as torch.library custom ops (DESIGN.md "The math").

    log p(y_n) = log Σ_j exp(lw_nj + ll_jn),   ll_jn = L_jn[y_n] − logsumexp_v L_jnv

`mix_nll` returns (nll_N, expert_ll_KN) from one streaming pass over the logits (csrc/ or the
reference fallback); the O(K·N) combination over experts happens here. Log-weights are used as
given — no renormalisation over experts — so ∂nll/∂lw_nj = −r_nj with responsibilities
r_nj = exp(lw_nj + ll_jn + nll_n). (With lw = log_softmax(θ), the chain rule turns this into
DESIGN.md's −(r − w).) −inf log-weights (pruned experts) give r = 0 and zero gradients.

Vocab-parallel (tp_group given): every rank holds the same V-slice of every expert, as Megatron's
ColumnParallelLinear output layer produces (rank r holds [r·V_local, (r+1)·V_local)). Each rank
computes partial max / sum-exp / target logit, then one MAX and one SUM all-reduce (the target
logits ride along with the rescaled sums) make the row statistics global, as Megatron's
vocab-parallel cross-entropy does. The backward of mix_nll needs no communication;
mix_logprobs' backward all-reduces one [K, N] sum.

Custom ops take the process group by name (a ProcessGroup is not a schema type).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from megatron_btm.ops import _kernels
from megatron_btm.ops.reference import acc_dtype

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---- process-group helpers ----

def _group(group_name: Optional[str]):
    if group_name is None:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name)


def _vocab_start(group, V_local: int) -> int:
    return 0 if group is None else dist.get_rank(group) * V_local


def _global_norm(max_KN: Tensor, sum_KN: Tensor, group,
                 tgt_KN: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Row log-normaliser over the full vocabulary from per-slice (max, Σ exp(L − max)) pairs,
    as (shift, logsum) with lse = shift + logsum and shift the global max: keeping them apart
    makes L − shift exact, where L − lse loses digits in fp32 for |L| ~ 1e4. With a group, the
    per-slice target logits `tgt_KN` (0 on every rank but the one holding the target) are
    summed in the same all-reduce as the rescaled sums: a MAX and one SUM in all."""
    if group is not None:
        gmax_KN = max_KN.clone()
        dist.all_reduce(gmax_KN, op=dist.ReduceOp.MAX, group=group)
        shift_KN = torch.where(torch.isfinite(gmax_KN), gmax_KN, torch.zeros_like(gmax_KN))
        sum_KN = sum_KN * torch.exp(max_KN - shift_KN)  # a slice of all -inf contributes 0
        both = sum_KN.unsqueeze(0) if tgt_KN is None else torch.stack([sum_KN, tgt_KN])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        sum_KN = both[0]
        tgt_KN = None if tgt_KN is None else both[1]
    else:
        shift_KN = torch.where(torch.isfinite(max_KN), max_KN, torch.zeros_like(max_KN))
    return shift_KN, torch.log(sum_KN), tgt_KN


def _combine(tgt_KN: Tensor, shift_KN: Tensor, logsum_KN: Tensor, log_weights_NK: Tensor,
             valid_N: Tensor):
    """Pure O(K·N) part: expert log-likelihoods and the mixed NLL (0 where ignored)."""
    ll_KN = (tgt_KN - shift_KN) - logsum_KN
    ell_KN = torch.where(valid_N.unsqueeze(0), ll_KN, torch.zeros_like(tgt_KN))
    mixed_N = torch.logsumexp(log_weights_NK.to(ell_KN.dtype) + ell_KN.t(), dim=-1)
    nll_N = torch.where(valid_N, -mixed_N, torch.zeros_like(mixed_N))
    return nll_N, ell_KN


# ---- mix_nll ----

@torch.library.custom_op("btm::mix_nll", mutates_args=())
def _mix_nll(logits: Tensor, log_weights: Tensor, targets: Tensor, ignore_index: int,
             group_name: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    group = _group(group_name)
    start = _vocab_start(group, logits.shape[-1])
    max_KN, sum_KN, tgt_KN = _kernels.stats(logits, targets, start, ignore_index)
    shift_KN, logsum_KN, tgt_KN = _global_norm(max_KN, sum_KN, group, tgt_KN)
    nll_N, ell_KN = _combine(tgt_KN, shift_KN, logsum_KN, log_weights, targets != ignore_index)
    return nll_N, ell_KN, shift_KN, logsum_KN


@_mix_nll.register_fake
def _(logits, log_weights, targets, ignore_index, group_name):
    K, N, _ = logits.shape
    acc = acc_dtype(logits.dtype)
    return (logits.new_empty((N,), dtype=acc), logits.new_empty((K, N), dtype=acc),
            logits.new_empty((K, N), dtype=acc), logits.new_empty((K, N), dtype=acc))


@torch.library.custom_op("btm::mix_nll_backward", mutates_args=())
def _mix_nll_backward(logits: Tensor, shift: Tensor, logsum: Tensor, coef: Tensor,
                      targets: Tensor, ignore_index: int, group_name: Optional[str]) -> Tensor:
    start = _vocab_start(_group(group_name), logits.shape[-1])
    return _kernels.grad_logits(logits, shift, logsum, coef, targets, start, ignore_index)


@_mix_nll_backward.register_fake
def _(logits, shift, logsum, coef, targets, ignore_index, group_name):
    return torch.empty_like(logits)


def _nll_setup_context(ctx, inputs, output):
    logits, log_weights, targets, ignore_index, group_name = inputs
    nll_N, ell_KN, shift_KN, logsum_KN = output
    ctx.save_for_backward(logits, log_weights, targets, nll_N, ell_KN, shift_KN, logsum_KN)
    ctx.ignore_index, ctx.group_name = ignore_index, group_name


def _nll_backward(ctx, g_nll_N, g_ell_KN, _g_shift, _g_logsum):
    logits, log_weights, targets, nll_N, ell_KN, shift_KN, logsum_KN = ctx.saved_tensors
    valid_N = targets != ctx.ignore_index
    acc = ell_KN.dtype
    # r_nj = exp(lw + ll − log p); 0 for pruned experts, ignored tokens, all-pruned tokens.
    x_NK = log_weights.to(acc) + ell_KN.t() + nll_N.unsqueeze(-1)
    ok_N1 = (valid_N & torch.isfinite(nll_N)).unsqueeze(-1)
    r_NK = torch.where(ok_N1, torch.exp(x_NK), torch.zeros_like(x_NK))
    g_nll_N = torch.zeros_like(nll_N) if g_nll_N is None else g_nll_N.to(acc)
    g_ell_KN = torch.zeros_like(ell_KN) if g_ell_KN is None else g_ell_KN.to(acc)
    g_ell_KN = torch.where(valid_N.unsqueeze(0), g_ell_KN, torch.zeros_like(g_ell_KN))
    # ∂nll/∂L = r·(softmax − onehot), ∂ll/∂L = −(softmax − onehot): one coefficient per row.
    coef_KN = (g_nll_N.unsqueeze(-1) * r_NK).t() - g_ell_KN
    grad_logits = grad_lw = None
    if ctx.needs_input_grad[0]:
        grad_logits = _mix_nll_backward(logits, shift_KN, logsum_KN, coef_KN.contiguous(),
                                        targets, ctx.ignore_index, ctx.group_name)
    if ctx.needs_input_grad[1]:
        grad_lw = (-g_nll_N.unsqueeze(-1) * r_NK).to(log_weights.dtype)
    return grad_logits, grad_lw, None, None, None


_mix_nll.register_autograd(_nll_backward, setup_context=_nll_setup_context)


# ---- mix_logprobs ("full" mode) ----

@torch.library.custom_op("btm::mix_logprobs", mutates_args=())
def _mix_logprobs(logits: Tensor, log_weights: Tensor,
                  group_name: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    group = _group(group_name)
    K, N, V = logits.shape
    no_targets = torch.full((N,), -1, dtype=torch.long, device=logits.device)
    max_KN, sum_KN, _ = _kernels.stats(logits, no_targets, 0, -1)  # pass 1
    shift_KN, logsum_KN, _ = _global_norm(max_KN, sum_KN, group)
    b_KN = log_weights.to(logsum_KN.dtype).t() - logsum_KN
    return _kernels.logprobs(logits, shift_KN, b_KN), shift_KN, logsum_KN  # pass 2


@_mix_logprobs.register_fake
def _(logits, log_weights, group_name):
    K, N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    return (logits.new_empty((N, V), dtype=acc), logits.new_empty((K, N), dtype=acc),
            logits.new_empty((K, N), dtype=acc))


@torch.library.custom_op("btm::mix_logprobs_backward", mutates_args=())
def _mix_logprobs_backward(logits: Tensor, log_weights: Tensor, shift: Tensor, logsum: Tensor,
                           out: Tensor, grad_out: Tensor,
                           group_name: Optional[str]) -> tuple[Tensor, Tensor]:
    """∂/∂L_jv = g_v R_jv − softmax(L_j)_v S_j and ∂/∂lw_j = S_j, with R_jv = exp(a_j + L_jv −
    out_v) and S_j = Σ_v g_v R_jv (all-reduced over the vocab shards). Expert by expert: N×V
    temporaries. Generation rarely needs this; it is here so the full mode is differentiable."""
    group = _group(group_name)
    K = logits.shape[0]
    # fp64 here: with |L| ~ 1e4 the stored fp32 `out` is only good to ~1e-3 absolute, and R is
    # exp of a difference against it; recomputing `out` in fp64 keeps the gradient exact.
    acc = torch.float64
    g_NV = grad_out.to(acc)
    b_KN = log_weights.to(acc).t() - logsum.to(acc)

    def z(k: int) -> Tensor:  # L − max, exact
        return logits[k].to(acc) - shift[k].to(acc).unsqueeze(-1)

    out = torch.full_like(g_NV, float("-inf"))
    for k in range(K):
        out = torch.logaddexp(out, b_KN[k].unsqueeze(-1) + z(k))
    dead_NV = out == float("-inf")

    def gr(k: int) -> Tensor:
        r_NV = torch.exp(b_KN[k].unsqueeze(-1) + z(k) - out)
        return torch.where(dead_NV, torch.zeros_like(r_NV), r_NV) * g_NV

    s_KN = torch.stack([gr(k).sum(-1) for k in range(K)])
    if group is not None:
        dist.all_reduce(s_KN, op=dist.ReduceOp.SUM, group=group)
    grad_logits = torch.empty_like(logits)
    for k in range(K):
        soft_NV = torch.exp(z(k) - logsum[k].to(acc).unsqueeze(-1))
        grad_logits[k] = (gr(k) - soft_NV * s_KN[k].unsqueeze(-1)).to(logits.dtype)
    return grad_logits, s_KN.t().to(log_weights.dtype).contiguous()


@_mix_logprobs_backward.register_fake
def _(logits, log_weights, shift, logsum, out, grad_out, group_name):
    return torch.empty_like(logits), torch.empty_like(log_weights)


def _lp_setup_context(ctx, inputs, output):
    logits, log_weights, group_name = inputs
    out_NV, shift_KN, logsum_KN = output
    ctx.save_for_backward(logits, log_weights, shift_KN, logsum_KN, out_NV)
    ctx.group_name = group_name


def _lp_backward(ctx, g_out_NV, _g_shift, _g_logsum):
    logits, log_weights, shift_KN, logsum_KN, out_NV = ctx.saved_tensors
    if g_out_NV is None:
        return None, None, None
    grad_logits, grad_lw = _mix_logprobs_backward(logits, log_weights, shift_KN, logsum_KN,
                                                  out_NV, g_out_NV.contiguous(), ctx.group_name)
    return grad_logits, grad_lw, None


_mix_logprobs.register_autograd(_lp_backward, setup_context=_lp_setup_context)


# ---- public API ----

def _group_name(tp_group) -> Optional[str]:
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return None
    return tp_group.group_name


def _check_inputs(logits_KNV: Tensor, log_weights_NK: Tensor, tp_group) -> None:
    if logits_KNV.dim() != 3:
        raise ValueError(f"logits_KNV must be 3-D [K, N, V], got shape {tuple(logits_KNV.shape)}")
    if logits_KNV.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits_KNV dtype {logits_KNV.dtype} not supported; valid: "
                         f"{[str(d) for d in _LOGIT_DTYPES]}")
    K, N, _ = logits_KNV.shape
    if tuple(log_weights_NK.shape) != (N, K):
        raise ValueError(f"log_weights_NK must be [N, K] = [{N}, {K}] to match logits_KNV "
                         f"{tuple(logits_KNV.shape)}, got {tuple(log_weights_NK.shape)}")
    if not log_weights_NK.is_floating_point():
        raise ValueError(f"log_weights_NK must be floating point, got {log_weights_NK.dtype}")
    if log_weights_NK.device != logits_KNV.device:
        raise ValueError(f"log_weights_NK is on {log_weights_NK.device}, logits_KNV on "
                         f"{logits_KNV.device}")


def _check_targets(targets_N: Tensor, N: int, V_global: int, ignore_index: int) -> Tensor:
    if targets_N.dim() != 1 or targets_N.shape[0] != N:
        raise ValueError(f"targets_N must be [N] = [{N}], got shape {tuple(targets_N.shape)}")
    if targets_N.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets_N must be int64 (or int32), got {targets_N.dtype}")
    targets_N = targets_N.long()
    if not (torch.compiler.is_compiling() or is_fake(targets_N)):  # data-dependent: eager only
        bad_N = (targets_N != ignore_index) & ((targets_N < 0) | (targets_N >= V_global))
        if bool(bad_N.any()):
            i = int(bad_N.nonzero()[0, 0])
            raise ValueError(f"targets_N[{i}] = {int(targets_N[i])} is outside the vocabulary "
                             f"[0, {V_global}) and is not ignore_index={ignore_index}")
    return targets_N


def mix_nll(logits_KNV: Tensor, log_weights_NK: Tensor, targets_N: Tensor,
            ignore_index: int = -100, tp_group=None) -> tuple[Tensor, Tensor]:
    """Ensemble NLL per token [N] and per-expert target log-likelihoods [K, N], in fp32 (fp64 for
    fp64 logits); both 0 where targets_N == ignore_index. Differentiable w.r.t. logits_KNV and
    log_weights_NK. log_weights_NK is used as given (normally a log-posterior, logsumexp over K
    = 0); −inf marks a pruned expert. With tp_group, logits_KNV is this rank's V-slice."""
    _check_inputs(logits_KNV, log_weights_NK, tp_group)
    group_name = _group_name(tp_group)
    world = 1 if group_name is None else dist.get_world_size(tp_group)
    targets_N = _check_targets(targets_N, logits_KNV.shape[1], logits_KNV.shape[2] * world,
                               ignore_index)
    nll_N, ell_KN, _, _ = _mix_nll(logits_KNV, log_weights_NK, targets_N, int(ignore_index),
                                group_name)
    return nll_N, ell_KN


def mix_logprobs(logits_KNV: Tensor, log_weights_NK: Tensor, tp_group=None) -> Tensor:
    """Mixed log-distribution log Σ_j exp(lw_j + log_softmax(L_j)) [N, V] (the local V-slice
    with tp_group), in fp32 (fp64 for fp64 logits); two passes over the logits."""
    _check_inputs(logits_KNV, log_weights_NK, tp_group)
    out_NV, _, _ = _mix_logprobs(logits_KNV, log_weights_NK, _group_name(tp_group))
    return out_NV
