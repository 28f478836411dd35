"""Merge a forest's dense experts into one Megatron-Core MoE GPTModel checkpoint (BTX).

`merge_moe(MergeMoeConfig(...))`, the library behind `btm merge-moe`:
1. Checks, before anything is written: the experts exist in the forest (checksums verified),
   share one architecture, vocabulary and tokenizer (the `btm average` checks,
   averaging.apply.open_sources), top-k ≤ n, a posterior prior belongs to this forest, the
   output is absent or empty; for `--router hidden`, the data folder's tokenizer and each
   domain's split.
2. Streams, one tensor at a time (memory bounded by the largest tensor, whatever n): every
   shared tensor (attention, norms incl. the pre-MLP norm, embeddings, output layer) is
   averaged with the shared weights by averaging's `_stream_average`; expert e's
   `linear_fc{1,2}.{weight,bias}` become MoE expert e (`decoder.layers.mlp.experts.experts.*`,
   expert axis 1, scale 1); the router [L, n, H] is written last (bias: zeros).
3. Router rows: `random` = Megatron's normal init (std init_method_std, --seed); `hidden`,
   `hidden-centered`, `lda` = the merge is first written with a zero router (uniform over all
   n experts), that model runs on each domain's sample and the router's inputs give the rows
   (router_init.hidden_rows; `lda` also a bias, kept where the router has one); the output is
   then copied from it with the router replaced (moe.rewrite).
4. The output is built under a `.tmp-` name and renamed when complete (utils.io.atomic_dir).
"""
from __future__ import annotations

import datetime
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROUTERS = ("hidden", "hidden-centered", "lda", "random")
DATA_ROUTERS = ROUTERS[:3]
"""router inits computed from each domain's sample (router_init.METHODS)"""


@dataclass(kw_only=True)
class MergeMoeConfig:
    forest: str
    output: str
    experts: Sequence[str] | None = None
    """expert ids in MoE order (default: every expert, in the forest's order)"""
    shared: str = "uniform"
    """uniform, or posterior:PRIOR (a `btm prior` JSON of this forest)"""
    router: str = "hidden"
    topk: int = 2
    seed: int = 0
    """seed of --router random"""
    data: str | None = None
    """preprocessed data folder (for --router hidden)"""
    split: str = "valid"
    num_sequences: int = 16
    """blocks of seq_length tokens per domain for --router hidden"""
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"--router {self.router!r}: valid values are {list(ROUTERS)}")
        if self.shared != "uniform" and not (self.shared.startswith("posterior:") and
                                             len(self.shared) > len("posterior:")):
            raise ValueError(f"--shared {self.shared!r}: use uniform or posterior:PRIOR.json")
        for name in ("topk", "num_sequences", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: must be an integer >= 1")
        if self.router in DATA_ROUTERS and not self.data:
            raise ValueError(f"--router {self.router} needs --data (the preprocessed data folder whose "
                             "<domain>/<split> samples give each expert's router row)")
        if self.experts is not None and len(set(self.experts)) != len(self.experts):
            raise ValueError(f"--experts {','.join(self.experts)}: an expert is named twice")


def check_output(output: str | Path) -> bool:
    """Refuse an output that exists and is not an empty folder; True if it is an empty folder."""
    out = Path(output)
    if not out.exists():
        return False
    if out.is_dir() and not any(out.iterdir()):
        return True
    raise FileExistsError(f"--output {out}: already exists and is not empty (refusing to overwrite)")


def shared_weights(cfg: MergeMoeConfig, forest, ids: list[str]) -> list[float]:
    """α_e of the shared (non-MLP) parameters over the merged experts."""
    from megatron_btm.averaging.methods import normalize_weights
    if cfg.shared == "uniform":
        return [1.0 / len(ids)] * len(ids)
    from megatron_btm.routing.prior import load_prior
    path = cfg.shared[len("posterior:"):]
    all_ids = [r.id for r in forest.require_experts()]
    prior, _, _ = load_prior(path, expert_ids=all_ids)  # the prior must be over this forest
    values = [float(prior[all_ids.index(i)]) for i in ids]
    total = sum(values)  # renormalised over the chosen experts (expected, no warning)
    return normalize_weights([v / total if total > 0 else v for v in values],
                             name=f"--shared posterior:{path} over experts {','.join(ids)}")


def merge_moe(cfg: MergeMoeConfig) -> dict[str, Any]:
    """Write the MoE checkpoint at cfg.output (see the module docstring); return a summary."""
    from megatron_btm.averaging.apply import _is_model_key, open_sources
    from megatron_btm.forest import Forest
    from megatron_btm.moe import layout, router_init
    from megatron_btm.utils.io import atomic_dir, atomic_write_json
    t0 = time.perf_counter()
    forest = Forest.open(cfg.forest)
    ids = list(cfg.experts) if cfg.experts else [r.id for r in forest.require_experts()]
    records = [forest.get(i) for i in ids]  # unknown id: one line naming the known ones
    if cfg.topk > len(ids):
        raise ValueError(f"--topk {cfg.topk}: larger than the {len(ids)} experts merged "
                         f"({','.join(ids)})")
    weights = shared_weights(cfg, forest, ids)
    empty_output = check_output(cfg.output)
    paths = [forest.checkpoint_path(i) for i in ids]  # checksums verified
    src = open_sources(paths, objects=lambda k: _is_model_key(k) and not layout.is_dense_mlp_object(k))
    try:
        if not src.model_config:
            raise ValueError(f"{paths[0]}/meta.json: no model_config (cannot build the MoE model)")
        moe_config = layout.moe_model_config(src.model_config, num_experts=len(ids), topk=cfg.topk)
        plan = _plan(src, paths)
        domains = [r.domain for r in records]
        blocks = router_init.domain_blocks(cfg, forest, ids, paths, domains, moe_config) \
            if cfg.router in DATA_ROUTERS else None
        with atomic_dir(cfg.output, overwrite=empty_output) as tmp:
            if cfg.router == "random":
                rows = router_init.random_rows(moe_config, seed=cfg.seed, dtype=plan["dtype"])
                _write(src, weights, plan, rows, tmp, cfg.progress)
                router_info = {"init": "random", "seed": cfg.seed}
            else:
                scratch = tmp / ".uniform-router"
                zeros = router_init.zero_rows(moe_config, dtype=plan["dtype"])
                _write(src, weights, plan, zeros, scratch, cfg.progress)
                uniform = dict(moe_config, moe_router_topk=len(ids))
                atomic_write_json(scratch / "meta.json", {"format": "torch_dist", "model_config": uniform})
                rows, bias, tokens = router_init.hidden_rows(scratch, blocks, domains, method=cfg.router,
                                                             batch_size=cfg.batch_size, progress=cfg.progress)
                bias = bias if plan["bias"] else None   # a router without bias: the rows only
                _copy_with_router(scratch, tmp, rows.to(plan["dtype"]), bias, src.common, cfg.progress)
                shutil.rmtree(scratch)
                router_info = {"init": cfg.router, "bias": "lda" if bias is not None else "zeros", "computed_with": "uniform-router MoE (top-n, zero router)",
                               "data": str(Path(cfg.data).resolve()), "split": cfg.split,
                               "num_sequences": cfg.num_sequences, "tokens": tokens}
            atomic_write_json(tmp / "meta.json", {
                "format": "torch_dist", "step": 0, "tokens": 0, "weights_only": True,
                "model_config": moe_config, "tokenizer_sha256": src.tokenizer_sha256,
                "parallel": (src.metas[0] or {}).get("parallel", {"tp": 1, "pp": 1}),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "moe_merge": {"forest": str(Path(cfg.forest).resolve()), "expert_ids": ids,
                              "domains": domains, "shared": {"method": cfg.shared.split(":")[0],
                                                             "weights": weights,
                                                             **({"prior": str(Path(cfg.shared[10:]).resolve())}
                                                                if cfg.shared != "uniform" else {})},
                              "router": router_info, "topk": cfg.topk,
                              "sources": [str(p.resolve()) for p in paths]}})
    finally:
        src.close()
    return {"output": str(cfg.output), "experts": ids, "shared_weights": weights,
            "router": cfg.router, "topk": cfg.topk, "wall_s": round(time.perf_counter() - t0, 3)}


def _plan(src, paths) -> dict[str, Any]:
    """Which tensors are shared and which are the experts' MLPs; the router's shape and dtype."""
    from megatron_btm.moe import layout
    mlp = [k for k in src.keys if layout.is_dense_mlp_tensor(k)]
    fc1 = layout.DENSE_MLP + "linear_fc1.weight"
    if fc1 not in mlp or layout.DENSE_MLP + "linear_fc2.weight" not in mlp:
        raise ValueError(f"{paths[0]}: no dense MLP tensors {fc1!r} / linear_fc2.weight "
                         f"(not a dense Megatron GPT checkpoint?)")
    md = src.readers[0].tensors()
    return {"mlp": mlp, "shared": [k for k in src.keys if k not in mlp], "dtype": md[fc1].properties.dtype,
            "bias": layout.DENSE_MLP + "linear_fc1.bias" in mlp}


def _write(src, weights, plan, router_rows, out_dir: Path, progress: bool) -> None:
    """One complete MoE torch_dist checkpoint in out_dir (no meta.json)."""
    from megatron_btm.averaging.apply import _stream_average
    from megatron_btm.averaging.torch_dist import TorchDistWriter
    writer = TorchDistWriter(out_dir)
    try:
        layout0 = src.readers[0].tensors()
        active = [(r, w) for r, w in zip(src.readers, weights) if w != 0.0]
        _stream_average(plan["shared"], layout0, active, writer, progress, desc="shared")
        _write_experts(src.readers, plan["mlp"], layout0, writer, progress)
        _write_router(writer, router_rows, plan["bias"])
        _write_objects(src, writer)
        writer.finish(src.common)
    except BaseException:
        writer.abort()
        raise


def _write_experts(readers, keys, layout0, writer, progress: bool) -> None:
    """Expert e's dense MLP tensor [L, ...] as slice e of the MoE tensor [L, n, ...], in the
    dense chunk layout with the expert axis inserted (Megatron's own MoE layout)."""
    from tqdm import tqdm

    from megatron_btm.averaging.apply import _Scratch
    from megatron_btm.averaging.torch_dist import chunk_slices
    from megatron_btm.moe import layout
    scratch, n = _Scratch(), len(readers)
    bar = tqdm(total=len(keys) * n, desc="experts", unit="tensor", disable=not progress)
    for key in keys:
        md = layout0[key]
        size = list(md.size)
        writer.declare_tensor(layout.expert_key(key), size[:1] + [n] + size[1:], md.properties.dtype)
        for e, reader in enumerate(readers):
            tensor = reader.read_tensor(key, out=scratch.get("in", md.properties.dtype, md.size))
            for chunk in md.chunks:
                offsets = (chunk.offsets[0], e, *chunk.offsets[1:])
                writer.write_chunk(layout.expert_key(key), offsets, tensor[chunk_slices(chunk)].unsqueeze(1))
            bar.update(1)
    bar.close()


def _write_router(writer, rows, bias: bool) -> None:
    """Router weight [L, n, H] (and zero bias [L, n]) in per-layer chunks, as Megatron saves it."""
    import torch

    from megatron_btm.moe import layout
    tensors = [(layout.ROUTER_WEIGHT, rows)]
    if bias:
        tensors.append((layout.ROUTER_BIAS, torch.zeros(rows.shape[:2], dtype=rows.dtype)))
    for key, t in tensors:
        writer.declare_tensor(key, t.shape, t.dtype)
        for layer in range(t.shape[0]):
            writer.write_chunk(key, (layer,) + (0,) * (t.dim() - 1), t[layer:layer + 1])


def _write_objects(src, writer) -> None:
    """Shared objects once (checked identical); each expert's MLP objects under its MoE index."""
    from megatron_btm.averaging.apply import _is_model_key
    from megatron_btm.moe import layout
    for key, raw in src.objects.items():
        writer.write_object_bytes(key, raw)
    n = len(src.readers)
    for e, reader in enumerate(src.readers):
        for key in reader.objects():
            if _is_model_key(key) and layout.is_dense_mlp_object(key):
                writer.write_object_bytes(layout.expert_object_key(key, e, n), reader.read_object_bytes(key))


def _copy_with_router(scratch: Path, out_dir: Path, rows, bias, common: dict, progress: bool) -> None:
    from megatron_btm.averaging.torch_dist import TorchDistReader, TorchDistWriter
    from megatron_btm.moe import layout
    from megatron_btm.moe.rewrite import rewrite
    reader, writer = TorchDistReader(scratch), TorchDistWriter(out_dir)
    try:
        replace = {layout.ROUTER_WEIGHT: rows}
        if bias is not None:
            replace[layout.ROUTER_BIAS] = bias.to(rows.dtype)
        rewrite(reader, writer, replace=replace, progress=progress, desc="router")
        writer.finish(common)
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
