"""Streaming parameter averaging of Megatron torch_dist checkpoints.

`average_checkpoints(dirs, weights, out)`:
1. Checks, before anything is written: every folder is a complete torch_dist checkpoint; the
   meta.json model configs agree (vocab → "vocab mismatch", any other architectural field →
   "architecture mismatch"); the model tensors have the same keys, shapes and dtypes (naming the
   first mismatching tensor); the model's non-tensor entries (Megatron ShardedObjects such as
   `_extra_state`) are byte-identical.
2. For each model tensor: read it from each expert with non-zero weight (its TP/PP chunks are
   put together into the global tensor), accumulate a_j·θ_j in fp32 into one buffer, cast to
   the input dtype and append it to the output at once. Reading, accumulating and writing run
   as a pipeline (`_stream_average`). Peak memory: 2 read buffers + 2 accumulators, about 4 ×
   the largest tensor, whatever the number of experts (tests/averaging/test_memory.py).
3. The output is written under a `.tmp-` name and renamed when complete (`utils.io.atomic_dir`):
   a crash or SIGKILL leaves the output path as it was; rerunning starts over.

Only the model is averaged: optimizer state, RNG state, schedulers and run state are not carried
(the output is weights-only; meta.json says so and records method, weights and sources). The
output's chunk layout is the first checkpoint's, so it loads at any TP/PP like any Megatron
checkpoint.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron_btm.averaging.methods import accumulator_dtype, normalize_weights
from megatron_btm.averaging.torch_dist import TorchDistReader, TorchDistWriter, chunk_slices
from megatron_btm.data.identity import META_KEY, check_same_tokenizer
from megatron_btm.megatron.model import MOE_TRAINING_FIELDS
from megatron_btm.utils.io import atomic_dir, atomic_write_json, read_json

# Top-level submodules of Megatron's GPTModel: the "model" part of a checkpoint. Everything else
# in a training checkpoint (optimizer.*, rng_state, ...) is not averaged.
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
# meta.json model_config fields that do not change the architecture (init and regularisation).
NON_ARCHITECTURAL = frozenset({"hidden_dropout", "attention_dropout", "init_method_std", "init_seed",
                               "arch"}) | MOE_TRAINING_FIELDS  # arch: a preset name; its fields are compared


def _is_model_key(key: str) -> bool:
    return key.startswith(MODEL_KEY_PREFIXES)


def _read_meta(path: Path) -> dict[str, Any] | None:
    return read_json(path / "meta.json") if (path / "meta.json").is_file() else None


def check_model_configs(paths: Sequence[Path], metas: Sequence[dict | None]) -> dict | None:
    """Compare meta.json model_config of every checkpoint with the first one's; return it."""
    configs = [(p, m.get("model_config")) for p, m in zip(paths, metas) if m and m.get("model_config")]
    if not configs:
        return None
    if len(configs) != len(paths):
        lacking = [str(p) for p, m in zip(paths, metas) if not (m and m.get("model_config"))]
        raise ValueError(f"architecture mismatch: {lacking[0]}/meta.json has no model_config but "
                         f"{configs[0][0]}/meta.json has one")
    (p0, ref), rest = configs[0], configs[1:]
    for p, cfg in rest:
        if cfg.get("vocab_size") != ref.get("vocab_size"):
            raise ValueError(f"vocab mismatch: model_config.vocab_size={ref.get('vocab_size')} in {p0} "
                             f"but {cfg.get('vocab_size')} in {p}")
        for field in sorted(set(ref) | set(cfg)):
            if field in NON_ARCHITECTURAL or field == "vocab_size":
                continue
            if ref.get(field) != cfg.get(field):
                raise ValueError(f"architecture mismatch: model_config.{field}={ref.get(field)!r} in "
                                 f"{p0} but {cfg.get(field)!r} in {p}")
    return ref


def check_tensors(readers: Sequence[TorchDistReader]) -> list[str]:
    """Same model tensor keys, shapes and dtypes everywhere; return the keys in file order."""
    ref_reader, ref = readers[0], {k: v for k, v in readers[0].tensors().items() if _is_model_key(k)}
    if not ref:
        raise ValueError(f"{ref_reader.path}: no model tensors (keys starting with {MODEL_KEY_PREFIXES})")
    for r in readers[1:]:
        other = {k: v for k, v in r.tensors().items() if _is_model_key(k)}
        for key in sorted(set(ref) ^ set(other)):
            where, missing = (r.path, ref_reader.path) if key in ref else (ref_reader.path, r.path)
            raise ValueError(f"tensor {key!r} is in {missing} but not in {where} "
                             f"(different architectures?)")
        for key, md in ref.items():
            a, b = tuple(md.size), tuple(other[key].size)
            if a != b:
                kind = "vocab mismatch" if key in VOCAB_KEYS and a[1:] == b[1:] else "shape mismatch"
                raise ValueError(f"{kind}: tensor {key!r} has shape {list(a)} in {ref_reader.path} "
                                 f"but {list(b)} in {r.path}")
            if md.properties.dtype != other[key].properties.dtype:
                raise ValueError(f"dtype mismatch: tensor {key!r} is {md.properties.dtype} in "
                                 f"{ref_reader.path} but {other[key].properties.dtype} in {r.path}")
    return list(ref)


def check_objects(readers: Sequence[TorchDistReader], select=_is_model_key) -> dict[str, bytes]:
    """Model ShardedObjects (those `select` keeps) must be identical in every checkpoint; return
    the first's bytes."""
    ref_reader = readers[0]
    ref = {k: ref_reader.read_object_bytes(k) for k in ref_reader.objects() if select(k)}
    for r in readers[1:]:
        keys = [k for k in r.objects() if select(k)]
        for key in sorted(set(ref) ^ set(keys)):
            where, missing = (r.path, ref_reader.path) if key in ref else (ref_reader.path, r.path)
            raise ValueError(f"object {key!r} is in {missing} but not in {where}")
        for key in keys:
            if r.read_object_bytes(key) != ref[key]:
                raise ValueError(f"object {key!r} differs between {ref_reader.path} and {r.path}; "
                                 f"non-tensor state cannot be averaged")
    return ref


class _Scratch:
    """Named flat buffers reused across tensors (grown when a larger tensor comes), so the
    average allocates, and page-faults in, its working memory once rather than per tensor."""

    def __init__(self):
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, size: torch.Size) -> torch.Tensor:
        numel = size.numel()
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < numel:
            self._bufs.pop((name, dtype), None)
            buf = self._bufs[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(size)


def _stream_average(keys, layout, active, writer: TorchDistWriter, progress: bool, desc: str = "average"):
    """The read → accumulate → write loop, as a 3-stage pipeline.

    One thread reads the next expert's tensor while the main thread accumulates the current one
    and another thread writes the previous averaged tensor, so disk reads, arithmetic and disk
    writes overlap. Buffers (all reused, none per expert): 2 read buffers, 2 accumulators, so
    peak memory is ~4 × the largest tensor whatever the number of experts. While reading an
    expert's tensor the read thread asks the kernel to prefetch that expert's next tensor
    (posix_fadvise WILLNEED), so the experts' files are read in parallel.
    Timings: read_s / write_s are the busy time of their threads; read_wait_s / write_wait_s
    the time the main thread waited for them (the part not hidden behind the other stages).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm
    timing = {"read_s": 0.0, "read_wait_s": 0.0, "accumulate_s": 0.0, "write_s": 0.0, "write_wait_s": 0.0}
    jobs = [(key, reader, w) for key in keys for reader, w in active]
    scratch = _Scratch()
    bytes_read = 0

    following = dict(zip(keys, keys[1:]))

    def read(reader, key, buf):
        t0 = time.perf_counter()
        if key in following:  # this expert's next tensor: let the kernel fetch it meanwhile
            reader.prefetch(following[key])
        tensor = reader.read_tensor(key, out=buf)
        timing["read_s"] += time.perf_counter() - t0
        return tensor

    def write(key, md, out):
        t0 = time.perf_counter()
        writer.declare_tensor(key, md.size, md.properties.dtype)
        for chunk in md.chunks:
            writer.write_chunk(key, tuple(chunk.offsets), out[chunk_slices(chunk)])
        timing["write_s"] += time.perf_counter() - t0

    def submit_read(index):
        key, reader, _ = jobs[index]
        md = layout[key]
        return reads.submit(read, reader, key, scratch.get(f"in{index % 2}", md.properties.dtype, md.size))

    reads, writes = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    pending_write = [None, None]  # per accumulator slot
    slot, first = 0, True
    bar = tqdm(total=len(keys), desc=desc, unit="tensor", disable=not progress)
    try:
        next_read = submit_read(0) if jobs else None
        for index, (key, reader, w) in enumerate(jobs):
            md = layout[key]
            dtype, acc_dtype = md.properties.dtype, accumulator_dtype(md.properties.dtype)
            t0 = time.perf_counter()
            tensor = next_read.result()
            t1 = time.perf_counter()
            timing["read_wait_s"] += t1 - t0
            # the buffer of the read after next is the one just consumed: safe to start it now
            next_read = submit_read(index + 1) if index + 1 < len(jobs) else None
            bytes_read += tensor.numel() * tensor.element_size()
            if first:
                if pending_write[slot] is not None:  # this accumulator may still be being written
                    t2 = time.perf_counter()
                    pending_write[slot].result()
                    timing["write_wait_s"] += time.perf_counter() - t2
                    t1 += time.perf_counter() - t2  # not accumulation time
                acc = scratch.get(f"acc{slot}", acc_dtype, md.size)
                acc.copy_(tensor)
                if w != 1.0:
                    acc.mul_(w)
            else:
                acc.add_(tensor, alpha=w)
            first = index + 1 == len(jobs) or jobs[index + 1][0] != key
            if first:  # last expert of this tensor: hand it to the writer, switch accumulators
                out = acc if dtype == acc_dtype else acc.to(dtype)
                pending_write[slot] = writes.submit(write, key, md, out)
                slot ^= 1
                bar.update(1)
            timing["accumulate_s"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        for fut in pending_write:
            if fut is not None:
                fut.result()
        timing["write_wait_s"] += time.perf_counter() - t2
    finally:
        reads.shutdown(wait=True, cancel_futures=True)
        writes.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return timing, bytes_read


@dataclass
class Sources:
    """Checkpoints opened and checked against each other (`open_sources`)."""

    readers: list[TorchDistReader]
    metas: list[dict | None]
    model_config: dict | None
    tokenizer_sha256: str | None
    keys: list[str]
    """model tensor keys, in the first checkpoint's order"""
    objects: dict[str, bytes]
    """the model objects `check_objects` compared (the first checkpoint's bytes)"""
    common: dict

    def close(self) -> None:
        for r in self.readers:
            r.close()


def open_sources(paths: Sequence[Path], *, objects=_is_model_key) -> Sources:
    """Open torch_dist checkpoints and run every check of step 1 (see the module docstring) on
    them; `objects` selects the ShardedObjects that must be identical."""
    readers = [TorchDistReader(p) for p in paths]
    metas = [_read_meta(p) for p in paths]
    model_config = check_model_configs(paths, metas)
    tokenizer_sha = check_same_tokenizer(*[(f"{p}/meta.json", (m or {}).get(META_KEY))
                                           for p, m in zip(paths, metas)])
    keys = check_tensors(readers)
    checked = check_objects(readers, objects)
    return Sources(readers=readers, metas=metas, model_config=model_config,
                   tokenizer_sha256=tokenizer_sha, keys=keys, objects=checked,
                   common=model_common(readers[0]))


def model_common(reader: TorchDistReader) -> dict:
    """The model part of Megatron's common.pt (run state, optimizer, ... are not carried)."""
    common = reader.read_common()
    return {"model": common["model"]} if isinstance(common, dict) and "model" in common else {}




def average_checkpoints(checkpoint_dirs: Sequence[str | Path], weights: Sequence[float],
                        output_dir: str | Path, *, meta_extra: dict[str, Any] | None = None,
                        progress: bool = True, overwrite: bool = False,
                        extra_files: dict[str, Any] | None = None,
                        created: str | None = None) -> dict[str, Any]:
    """θ = Σ_j a_j θ_j of Megatron torch_dist checkpoints, streamed; write a weights-only
    checkpoint at `output_dir` (atomically; `extra_files` {name: JSON value} are written inside
    it before it appears, e.g. a branch record). Returns a summary (sizes, timings read /
    accumulate / write in seconds).

    `weights` are normalised with a warning if they do not sum to 1 (methods.normalize_weights);
    negative / non-finite / all-zero weights are refused. Experts with weight 0 are not read.
    Checkpoints of different tokenizers (meta.json `tokenizer_sha256`) are refused; the output
    records the common one. `created`: the meta.json timestamp (default: now).
    """
    t_start = time.perf_counter()
    paths = [Path(p) for p in checkpoint_dirs]
    if not paths:
        raise ValueError("checkpoint_dirs: empty; need at least one checkpoint")
    if len(weights) != len(paths):
        raise ValueError(f"weights: {len(weights)} values for {len(paths)} checkpoints")
    weights = normalize_weights(weights)
    src = open_sources(paths)
    readers, metas, model_config, keys, objects = src.readers, src.metas, src.model_config, src.keys, src.objects
    tokenizer_sha, common = src.tokenizer_sha256, src.common

    active = [(r, w) for r, w in zip(readers, weights) if w != 0.0]
    output_dir = Path(output_dir)
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        writer = TorchDistWriter(tmp)
        try:
            timing, bytes_read = _stream_average(keys, readers[0].tensors(), active, writer, progress)
            t0 = time.perf_counter()
            for key, raw in objects.items():
                writer.write_object_bytes(key, raw)
            writer.finish(common)
        except BaseException:
            writer.abort()
            raise
        finally:
            for r in readers:
                r.close()
        meta = {
            "format": "torch_dist", "step": 0, "tokens": 0, "weights_only": True,
            "model_config": model_config, META_KEY: tokenizer_sha,
            "parallel": (metas[0] or {}).get("parallel", {"tp": 1, "pp": 1}),
            "created": created or datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "averaging": dict({"method": "weighted"}, **(meta_extra or {}),
                              weights=weights, sources=[str(p.resolve()) for p in paths]),
        }
        atomic_write_json(tmp / "meta.json", meta)
        for name, value in (extra_files or {}).items():
            atomic_write_json(tmp / name, value)
        timing["finish_s"] = time.perf_counter() - t0
    timing["wall_s"] = time.perf_counter() - t_start
    return {"output": str(output_dir), "num_tensors": len(keys), "num_objects": len(objects),
            "bytes_read": bytes_read, "bytes_written": writer.bytes_written, "weights": weights,
            **{k: round(v, 4) for k, v in timing.items()}}
