"""Opt-out: drop one expert of an MoE checkpoint (its FFN slice and router row), FlexOlmo style.

`remove_expert(checkpoint, expert, output)` writes a new checkpoint with num_moe_experts n-1
(streamed chunk by chunk, moe.rewrite), every other tensor byte-identical; top-k is clamped to
n-1 when it was n (a note in the summary and in meta.json). The shared (averaged) parameters
are unchanged: they still hold the removed expert's share of the average. For a complete
opt-out re-merge the forest without it (`btm merge-moe --experts ...`).
"""
from __future__ import annotations

import copy
import datetime
import os
import warnings
from pathlib import Path
from typing import Any


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / "metadata.json").is_file():
        return p
    from megatron_btm.megatron.checkpoint import resolve_checkpoint
    return resolve_checkpoint(p)


def expert_index(meta: dict, expert: str, where: str) -> int:
    """Index of `expert` (an id of meta.json's moe_merge.expert_ids, or an integer index)."""
    n = meta["model_config"]["num_moe_experts"]
    ids = (meta.get("moe_merge") or {}).get("expert_ids")
    if ids and expert in ids:
        return ids.index(expert)
    if expert.isdigit() and int(expert) < n:
        return int(expert)
    known = f"ids {ids} or indices 0..{n - 1}" if ids else f"indices 0..{n - 1}"
    raise ValueError(f"--expert {expert!r}: not an expert of {where} (known: {known})")


def remove_expert(checkpoint: str | os.PathLike, expert: str, output: str | os.PathLike, *,
                  progress: bool = True) -> dict[str, Any]:
    from megatron_btm.averaging.torch_dist import TorchDistReader, TorchDistWriter
    from megatron_btm.megatron.model import GPTConfig
    from megatron_btm.moe.merge import check_output
    from megatron_btm.moe.rewrite import model_common, rewrite
    from megatron_btm.utils.io import atomic_dir, atomic_write_json, read_json
    ckpt = _checkpoint_dir(checkpoint)
    meta = read_json(ckpt / "meta.json")
    cfg = (meta or {}).get("model_config") or {}
    n = cfg.get("num_moe_experts")
    if not n:
        raise ValueError(f"--checkpoint {ckpt}: not a mixture-of-experts checkpoint "
                         f"(model_config.num_moe_experts is null in its meta.json)")
    if n < 2:
        raise ValueError(f"--checkpoint {ckpt}: has a single expert; removing it leaves no model")
    index = expert_index(meta, str(expert), str(ckpt))
    empty_output = check_output(output)
    topk = cfg.get("moe_router_topk", 2)
    note = None
    if topk > n - 1:
        note = f"moe_router_topk {topk} clamped to {n - 1} (the experts left)"
        warnings.warn(note, stacklevel=2)
    new_cfg = GPTConfig.from_dict(dict(cfg, num_moe_experts=n - 1, moe_router_topk=min(topk, n - 1))).to_dict()
    new_meta = copy.deepcopy(meta)
    merge = new_meta.get("moe_merge")
    removed_id = str(expert)
    if merge and merge.get("expert_ids"):
        removed_id = merge["expert_ids"][index]
        for key in ("expert_ids", "domains", "sources"):
            if isinstance(merge.get(key), list) and len(merge[key]) == n:
                merge[key] = merge[key][:index] + merge[key][index + 1:]
    record = {"removed": removed_id, "index": index, "parent": str(ckpt.resolve()),
              "parent_num_experts": n, **({"note": note} if note else {})}
    new_meta.update(model_config=new_cfg, moe_removed=list(meta.get("moe_removed", [])) + [record],
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    reader = TorchDistReader(ckpt)
    try:
        with atomic_dir(output, overwrite=empty_output) as tmp:
            writer = TorchDistWriter(tmp)
            try:
                count = rewrite(reader, writer, drop_expert=index, progress=progress, desc="remove")
                writer.finish(model_common(reader))
            except BaseException:
                writer.abort()
                raise
            atomic_write_json(tmp / "meta.json", new_meta)
    finally:
        reader.close()
    return {"output": str(output), "removed": removed_id, "index": index,
            "num_moe_experts": n - 1, "moe_router_topk": new_cfg["moe_router_topk"],
            "num_tensors": count, **({"note": note} if note else {})}
