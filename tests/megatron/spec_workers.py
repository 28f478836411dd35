"""Cross-spec checkpoint worker: a model whose linears carry TE-style `_extra_state` entries."""
import json

import torch.distributed.checkpoint  # noqa: F401 (FileSystemReader)

import torch

import mp_workers

EXTRA = torch.tensor([7, 1, 3], dtype=torch.uint8)  # stands in for TE's serialized FP8 metadata


def _te_shaped(chunks):
    """Give every transformer-layer linear TE's extra state (get/set_extra_state), in place.
    Megatron's sharded_state_dict then saves it as a ShardedObject, as for TE modules."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_btm.megatron.checkpoint import _unwrap
    n = 0
    for name, module in _unwrap(chunks[0]).named_modules():
        # the output layer stays Megatron's own linear under the TE spec too
        if type(module) in (ColumnParallelLinear, RowParallelLinear) and name != "output_layer":
            base = type(module)
            module.__class__ = type(f"TE{base.__name__}", (base,), {
                "get_extra_state": lambda self: EXTRA.clone(),
                "set_extra_state": lambda self, state: setattr(self, "loaded_extra", state)})
            n += 1
    assert n
    return chunks


def _weights(chunks):
    from megatron_btm.megatron.checkpoint import _unwrap
    return {k: v.clone() for k, v in _unwrap(chunks[0]).state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def cross_spec_worker(rank, world, init_file, workdir, result_file):
    torch.set_num_threads(1)
    from megatron_btm.megatron import parallel
    from megatron_btm.megatron.checkpoint import _unwrap, load_weights, save_checkpoint
    from megatron_btm.training.loop import _setup
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)

    def model(seed, te, **arch):
        chunks = _setup(mp_workers.make_cfg(model={"num_layers": 2, "init_seed": seed, **arch}))[0]
        return _te_shaped(chunks) if te else chunks
    local = model(1, te=False)
    local_ckpt = save_checkpoint(f"{workdir}/local", step=0, model_chunks=local)
    out = {}
    te = model(2, te=True)
    out["te_differs_before"] = not _same(_weights(te), _weights(local))
    try:
        load_weights(te, local_ckpt)
        out["local_into_te"] = _same(_weights(te), _weights(local))
        linears = [m for m in _unwrap(te[0]).modules() if hasattr(m, "loaded_extra")]
        out["te_kept_own_extra"] = bool(linears) and all(torch.equal(m.loaded_extra, EXTRA) for m in linears)
    except Exception as e:  # noqa: BLE001 — reported to the test
        out["local_into_te"] = f"{type(e).__name__}: {e}"[:500]
        te = model(1, te=True)
    te_ckpt = save_checkpoint(f"{workdir}/te", step=0, model_chunks=te)
    stored = torch.distributed.checkpoint.FileSystemReader(str(te_ckpt)).read_metadata()
    out["te_ckpt_has_extra"] = any("._extra_state/" in k for k in stored.state_dict_metadata)
    again = model(5, te=True)
    for m in _unwrap(again[0]).modules():
        if hasattr(m, "get_extra_state") and type(m).__name__.startswith("TE"):
            m.get_extra_state = lambda: torch.zeros(3, dtype=torch.uint8)  # differs from EXTRA
    load_weights(again, te_ckpt)
    out["te_into_te_extra"] = all(torch.equal(m.loaded_extra, EXTRA) for m in _unwrap(again[0]).modules()
                                  if type(m).__name__.startswith("TE"))
    back = model(3, te=False)
    load_weights(back, te_ckpt)
    out["te_into_local"] = _same(_weights(back), _weights(local))
    try:
        load_weights(model(4, te=False, tie_embeddings=False), local_ckpt)
    except Exception as e:  # noqa: BLE001
        out["missing"] = f"{type(e).__name__}: {e}"
    with open(result_file, "w") as f:
        json.dump(out, f)
    torch.distributed.destroy_process_group()
