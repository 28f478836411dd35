"""Vocab-parallel mixing with real gloo process groups: each rank holds a V-slice of every
expert's logits (as Megatron's ColumnParallelLinear output layer gives), and mix_nll /
mix_logprobs with tp_group must equal the unsharded float64 reference — forward and gradients.

Processes are spawned once per TP size for the whole module (TP=2; TP=4, which also runs two
TP=2 sub-groups [0,1] and [2,3] so a group rank differs from the global rank); every case runs
inside them and the parent asserts on what they recorded."""
from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mixing_cases import IGNORE, make_case

pytestmark = pytest.mark.distributed

# (K, N, V per rank, logits dtype, extreme logits): V per rank odd so no vector width divides it.
CASES = {
    "k3_f64_pm1e4": (3, 5, 37, torch.float64, True),
    "k8_f32": (8, 4, 1031, torch.float32, False),
    "k2_n1_bf16": (2, 1, 301, torch.bfloat16, False),
    "k16_f32_pm1e4": (16, 3, 65, torch.float32, True),
}
# (atol, rtol) for outputs, (atol, rtol) for gradients, against the fp64 reference.
TOL = {torch.float64: ((1e-9, 1e-9), (1e-9, 1e-9)), torch.float32: ((1e-5, 1e-6), (2e-5, 1e-5)),
       torch.bfloat16: ((1e-5, 1e-6), (1e-3, 1e-2))}
GROUPS = {2: ["tp2"], 4: ["tp4", "tp2-sub"]}


def _check(name, got, want, tol, errors):
    try:
        torch.testing.assert_close(got.double(), want, atol=tol[0], rtol=tol[1])
    except AssertionError as e:
        errors.append(f"{name}: {e}")


def _run_case(case, group, grank, gsize):
    K, N, Vl, dtype, extreme = CASES[case]
    V = Vl * gsize
    logits, lw64, targets = make_case(K, N, V, seed=7, extreme=extreme, dtype=dtype)
    lw = lw64.to(torch.float64 if dtype == torch.float64 else torch.float32)
    sl = slice(grank * Vl, (grank + 1) * Vl)
    out_tol, grad_tol = TOL[dtype]
    if extreme and dtype != torch.float64:  # fp32 conditioning at |L| ~ 1e4 (see test_mixing_op)
        grad_tol = (1e-3, grad_tol[1])
    errors: list[str] = []
    g = torch.Generator().manual_seed(3)
    w_nll = torch.rand(N, generator=g, dtype=torch.float64)
    w_ell = torch.randn(K, N, generator=g, dtype=torch.float64)
    w_out = torch.randn(N, V, generator=g, dtype=torch.float64)

    # mix_nll on the shard
    local = logits[:, :, sl].contiguous().requires_grad_(True)
    lw_local = lw.clone().requires_grad_(True)
    nll, ell = ops_mod().mix_nll(local, lw_local, targets, ignore_index=IGNORE, tp_group=group)
    ((nll.double() * w_nll).sum() + (ell.double() * w_ell).sum()).backward()
    ref_logits = logits.detach().double().clone().requires_grad_(True)
    ref_lw = lw.detach().double().clone().requires_grad_(True)
    ref_nll, ref_ell = ops_mod().reference.mix_nll(ref_logits, ref_lw, targets, IGNORE)
    ((ref_nll * w_nll).sum() + (ref_ell * w_ell).sum()).backward()
    _check("nll", nll, ref_nll, out_tol, errors)
    _check("expert_ll", ell, ref_ell, out_tol, errors)
    _check("grad_logits", local.grad, ref_logits.grad[:, :, sl], grad_tol, errors)
    _check("grad_log_weights", lw_local.grad, ref_lw.grad, (max(grad_tol[0], 1e-5), 1e-4), errors)

    # mix_logprobs on the shard: the local V-slice of the mixed distribution
    local = logits[:, :, sl].contiguous().requires_grad_(True)
    lw_local = lw.clone().requires_grad_(True)
    out = ops_mod().mix_logprobs(local, lw_local, tp_group=group)
    (out.double() * w_out[:, sl]).sum().backward()
    ref_logits = logits.detach().double().clone().requires_grad_(True)
    ref_lw = lw.detach().double().clone().requires_grad_(True)
    ref_out = ops_mod().reference.mix_logprobs(ref_logits, ref_lw)
    (ref_out * w_out).sum().backward()
    _check("logprobs", out, ref_out[:, sl], out_tol, errors)
    _check("logprobs_grad_logits", local.grad, ref_logits.grad[:, :, sl], grad_tol, errors)
    _check("logprobs_grad_log_weights", lw_local.grad, ref_lw.grad,
           (max(grad_tol[0], 1e-4), 1e-4), errors)
    return errors


def ops_mod():
    from megatron_btm import ops
    return ops


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 4 processes share 2 cores
    results: dict[str, list[str]] = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        groups = [("tp2" if world == 2 else "tp4", dist.group.WORLD, rank, world)]
        if world == 4:  # every rank creates both sub-groups, in the same order
            sub = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            groups.append(("tp2-sub", sub[rank // 2], rank % 2, 2))
        for gname, group, grank, gsize in groups:
            for case in CASES:
                results[f"{gname}/{case}"] = _run_case(case, group, grank, gsize)
        dist.barrier()
    except Exception:  # recorded, so the parent reports it per case instead of hanging
        results["__error__"] = [traceback.format_exc()]
    torch.save(results, os.path.join(out_dir, f"world{world}_rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel")
    collected: dict[tuple[int, int], dict[str, list[str]]] = {}
    for world in GROUPS:
        init_file = str(out / f"init_{world}")
        mp.spawn(_worker, args=(world, init_file, str(out)), nprocs=world, join=True)
        for rank in range(world):
            collected[(world, rank)] = torch.load(out / f"world{world}_rank{rank}.pt")
    return collected


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world,gname", [(w, g) for w, gs in GROUPS.items() for g in gs])
def test_vocab_parallel_equals_unsharded(tp_results, world, gname, case):
    for rank in range(world):
        res = tp_results[(world, rank)]
        assert "__error__" not in res, res.get("__error__")
        errors = res[f"{gname}/{case}"]
        assert not errors, f"rank {rank} of {gname}: " + "\n".join(errors)
