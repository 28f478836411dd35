"""The fused ensemble-logit mixing op (DESIGN.md "The math"; kernels in csrc/).

    mix_nll(logits_KNV, log_weights_NK, targets_N, ignore_index=-100, tp_group=None)
        -> (nll_N, expert_ll_KN)
    mix_logprobs(logits_KNV, log_weights_NK, tp_group=None) -> logprobs_NV
    backend(device=None) -> "cpp-openmp" | "cuda" | "torch-reference"

`reference` holds the pure-PyTorch versions (naive expressions and the streaming fallback).
"""
from megatron_btm.ops import reference
from megatron_btm.ops._kernels import backend
from megatron_btm.ops.mixing import mix_logprobs, mix_nll

__all__ = ["mix_nll", "mix_logprobs", "backend", "reference"]
