"""Import a Hugging Face model folder as a megatron-btm torch_dist checkpoint.

    from megatron_btm.hf.importer import import_hf
    import_hf("Llama-3.2-1B/", "ckpt/llama", tp=2)

The output is what the trainer writes and every loader reads (`megatron.checkpoint`):

    <output>/latest                 "iter_0000000"
    <output>/iter_0000000/          torch_dist files + meta.json (model_config: our GPTConfig)
    <output>/tokenizer.json ...     the HF folder's tokenizer files, copied verbatim

Streaming: each Megatron tensor (a layer's slice of a stacked key) is built from its HF
tensor(s) and appended to the checkpoint at once: without torch by `hf.torchfree` (safetensors,
dtypes kept; the same files), else through `averaging.torch_dist.TorchDistWriter`. Kinds
that only move rows (copy, glu, qkv) are read straight into their Megatron layout in one reused
buffer (`mapping.row_moves`), so the peak memory is about the largest tensor above the
imports; neither transformers nor megatron.core is imported (config.json: `Family.hf_config`). Everything that can be checked from config.json
and the weight headers (architecture, missing or misshapen tensors, unused weights, the output
folder) is checked before anything is written; the folder is built under a temporary name and
renamed into place when complete. Tensors use global (TP=1) shapes: the checkpoint loads at any
TP/PP; `tp`/`pp` are checked against the architecture and choose a vocabulary padding that
`tp` divides.
"""
from __future__ import annotations

import datetime
import io
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_btm.utils.dtypes import DTYPE_NAMES, torch_dtype
from megatron_btm.utils.io import read_json

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# tensors above this size (bytes) that need no conversion are read and written in row slices
STREAM_BYTES = 16 * 2**20
DTYPES = ("auto", *DTYPE_NAMES)  # auto: as stored
FORMAT, CKPT_NAME = "torch_dist", "iter_0000000"  # megatron.checkpoint's FORMAT, iter_name(0)
# HF buffers and duplicates that are not parameters of the model
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def vocab_multiple(vocab_size: int, tp: int) -> int:
    """make_vocab_size_divisible_by: the largest power of two <= 128 dividing the vocabulary (no
    padding rows) that `tp` divides; 128 (zero padding rows) when there is none."""
    for m in (128, 64, 32, 16, 8, 4, 2, 1):
        if vocab_size % m == 0 and m % tp == 0:
            return m
    if 128 % tp:
        raise ValueError(f"--tp {tp}: must divide 128 (the vocabulary padding multiple)")
    return 128


def _hf_config(folder: Path):
    """(config.json, family, its config: the file over the class defaults; no transformers)."""
    from megatron_btm.hf.families import for_architectures
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a Hugging Face model folder has config.json)")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    family = for_architectures(raw.get("architectures"), str(path), raw.get("model_type"))
    return raw, family, family.hf_config(raw)


def _check_layout(cfg, tp: int, pp: int) -> None:
    for name, n in (("--tp", tp), ("--pp", pp)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} {n!r}: must be a positive integer")
    if cfg.num_attention_heads % tp or cfg.query_groups % tp:
        raise ValueError(f"--tp {tp}: must divide the attention heads ({cfg.num_attention_heads}) "
                         f"and key/value heads ({cfg.query_groups})")
    if cfg.num_layers % pp:
        raise ValueError(f"--pp {pp}: must divide the number of layers ({cfg.num_layers})")


def plan_import(hf_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1, seq_length: int | None = None):
    """Check the folder; return (family, GPTConfig, HFWeights, [(key, rule, layer, hf keys)])."""
    from megatron_btm.hf import convert
    from megatron_btm.hf.mapping import expected_hf_shapes, megatron_shapes
    from megatron_btm.hf.reader import HFWeights
    from megatron_btm.megatron.model import GPTConfig

    folder = Path(hf_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: Hugging Face model folder not found")
    raw, family, hf_cfg = _hf_config(folder)
    where = str(folder / "config.json")
    fields = family.from_hf(hf_cfg, where)
    if seq_length is not None:  # the training length; RoPE models have no position table
        if fields["arch"] == "gpt2" and seq_length != fields["seq_length"]:
            raise ValueError(f"--seq-length {seq_length}: GPT-2's learned positions fix it to "
                             f"n_positions={fields['seq_length']} ({where})")
        if seq_length > fields["seq_length"]:
            raise ValueError(f"--seq-length {seq_length}: exceeds the {fields['seq_length']} "
                             f"positions of {where}")
        fields["seq_length"] = seq_length
    cfg = GPTConfig(**fields, make_vocab_size_divisible_by=vocab_multiple(fields["vocab_size"], tp))
    _check_layout(cfg, tp, pp)
    weights = HFWeights(folder)
    prefix = ""
    if family.preset == "gpt2" and not any(k.startswith("transformer.") for k in weights.keys()):
        prefix = "transformer."  # GPT-2 checkpoints saved from the base model lack the prefix
    name = lambda k: k[len(prefix):] if prefix and k.startswith(prefix) else k  # noqa: E731
    shapes = megatron_shapes(cfg, cfg.padded_vocab_size(tp))
    plan, used = [], set()
    for key, rule, layer in convert.import_plan(cfg, family.table):
        keys = [name(k) for k in convert.hf_keys(rule, layer)]
        want = expected_hf_shapes(rule.kind, shapes[rule.megatron], cfg, cfg.vocab_size)
        for k, w in zip(keys, want):
            if k not in weights:
                raise ValueError(f"{folder}: tensor {k!r} is missing (needed for {family.architecture} "
                                 f"with {where})")
            if weights.shape(k) != w:
                raise ValueError(f"{weights.file_of(k)}: tensor {k!r} has shape {list(weights.shape(k))} "
                                 f"but {where} implies {list(w)}")
        used.update(keys)
        plan.append((key, rule, layer, keys))
    unused = [k for k in weights.keys() if k not in used and not _IGNORED.search(k)
              and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if unused:
        raise ValueError(f"{folder}: tensor(s) {unused[:5]} are not used by {family.architecture} "
                         f"as configured in {where} (refusing to drop weights)")
    return raw, family, cfg, weights, plan


def import_hf(hf_dir: str | os.PathLike, output: str | os.PathLike, *, tp: int = 1, pp: int = 1,
              dtype: str = "auto", seq_length: int | None = None, torch_free: bool = True) -> Path:
    """Convert the HF folder `hf_dir` into a checkpoint root `output` (new or empty); return it.

    `seq_length` (model.seq_length, the training length) defaults to config.json's
    max_position_embeddings (capped at a sliding window); RoPE models may take less.
    `torch_free`: write through `hf.torchfree` (no torch import) when it can import the folder
    (safetensors, dtypes kept); the same checkpoint as the torch writer.
    """
    from megatron_btm.export.hf import check_output
    from megatron_btm.utils.io import atomic_dir, atomic_write_json, atomic_write_text

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: valid values are {list(DTYPES)}")
    raw, family, cfg, weights, plan = plan_import(hf_dir, tp=tp, pp=pp, seq_length=seq_length)
    output = Path(output)
    check_output(output)
    padded = cfg.padded_vocab_size(tp)
    with atomic_dir(output) as tmp:
        if torch_free:
            from megatron_btm.hf import torchfree
            torch_free = torchfree.usable(weights, plan, dtype)
        if torch_free:
            torchfree.write_checkpoint(tmp / CKPT_NAME, plan, weights, cfg, padded)
        else:
            _write_with_torch(tmp / CKPT_NAME, plan, weights, cfg, padded,
                              None if dtype == "auto" else torch_dtype(dtype))
        atomic_write_json(tmp / CKPT_NAME / "meta.json", meta_for(cfg, {
            "path": str(Path(hf_dir).resolve()), "architecture": family.architecture,
            "dtype": dtype, "hf_config": raw, **_router(family)}))
        atomic_write_text(tmp / "latest", CKPT_NAME + "\n")
        for name in TOKENIZER_FILES:
            if (Path(hf_dir) / name).is_file():
                shutil.copyfile(Path(hf_dir) / name, tmp / name)
    return output


def _write_with_torch(path: Path, plan, weights, cfg, padded: int, dtype) -> None:
    """The torch_dist files of `plan` through torch tensors (`dtype`: None keeps the stored)."""
    from megatron_btm.averaging.torch_dist import TorchDistWriter
    from megatron_btm.hf import convert
    writer, buffer = TorchDistWriter(path), _Buffer()
    try:
        for key, rule, layer, keys in plan:
            t = None  # the previous tensor: let `buffer` reuse or free it
            if layer is None and rule.kind in ("copy", "vocab") and \
                    _nbytes(weights, keys[0]) > STREAM_BYTES:
                _write_in_rows(writer, key, weights, keys[0], padded if rule.kind == "vocab"
                               else weights.shape(keys[0])[0], dtype, buffer)
                continue
            t = _read_in_place(rule, keys, weights, cfg, dtype, buffer)
            if t is None:  # a kind that computes (transpose, GPT-2's fused c_attn, padding)
                t = convert.convert_one(rule, [weights.get(k) for k in keys], cfg, padded)
            if dtype is not None:
                t = t.to(dtype)
            if layer is None:
                writer.declare_tensor(key, t.shape, t.dtype)
                writer.write_chunk(key, (0,) * t.dim(), t)
                continue
            at, stack = convert.stack_index(cfg, layer)  # MoE experts: (layer, expert)
            if not any(at):
                writer.declare_tensor(key, (*stack, *t.shape), t.dtype)
            writer.write_chunk(key, at + (0,) * t.dim(), t.reshape((1,) * len(at) + t.shape))
        write_empty_extra_state(writer, cfg)
        writer.finish(common={"run_state": {"step": 0}})
    finally:
        writer.abort()


def _router(family) -> dict[str, Any]:
    """An MoE import records the Megatron router settings that reproduce the HF router."""
    from megatron_btm.hf.families import MIXTRAL_ROUTER
    return {"router": MIXTRAL_ROUTER} if family.moe else {}


def _nbytes(weights, key: str) -> int:
    n = 1
    for d in weights.shape(key):
        n *= d
    return n * 4  # an upper bound on the element size of the stored dtypes (<= fp32)


class _Buffer:
    """One reusable tensor: the import plan repeats a shape layer after layer (rules are
    layer-major), so each tensor is read into the previous one's memory. A new shape frees the
    old buffer first and hands its pages back to the system (`malloc_trim`), so the peak is one
    buffer of the largest tensor, not the allocator's high-water mark."""

    def __init__(self):
        self._t: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self._t
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            import torch
            self._t = t = None
            _malloc_trim()
            self._t = t = torch.empty(shape, dtype=dtype)
        return t


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps its own policy
        pass


def _read_in_place(rule, keys: list[str], weights, cfg, dtype, buffer: _Buffer) -> torch.Tensor | None:
    """A rule that only moves rows (copy, glu, qkv), read from the HF files straight into its
    Megatron layout in `buffer`; None for the kinds that compute, or a dtype change."""
    from megatron_btm.hf.mapping import row_moves
    shapes = [weights.shape(k) for k in keys]
    stored = {weights.dtype(k) for k in keys}
    if len(stored) != 1 or (dtype is not None and dtype not in stored) or not all(shapes) \
            or len({s[1:] for s in shapes}) != 1:
        return None
    moves = row_moves(rule.kind, [s[0] for s in shapes], cfg)
    if moves is None:
        return None
    out = buffer.take((sum(s[0] for s in shapes), *shapes[0][1:]), stored.pop())
    for i, first, end, at in moves:
        weights.get_rows(keys[i], first, end, out[at:at + end - first])
    return out


def _write_in_rows(writer, key: str, weights, hf_key: str, rows: int, dtype, buffer: _Buffer) -> None:
    """A large embedding / output table (copied as is, zero rows padding the vocabulary to `rows`)
    written in slices of about STREAM_BYTES, so that it is never whole in memory."""
    have, *rest = weights.shape(hf_key)
    step = max(1, STREAM_BYTES // max(1, _nbytes(weights, hf_key) // max(have, 1)))
    stored = weights.dtype(hf_key)
    writer.declare_tensor(key, (rows, *rest), dtype or stored)
    start = 0
    while start < have:
        n = min(step, have - start)
        chunk = weights.get_rows(hf_key, start, start + n, buffer.take((n, *rest), stored))
        writer.write_chunk(key, (start, *[0] * len(rest)), chunk.to(dtype) if dtype else chunk)
        start += n
        del chunk  # before the next take(): a smaller last slice frees this buffer
    if rows > have:
        import torch
        writer.write_chunk(key, (have, *[0] * len(rest)),
                           torch.zeros(rows - have, *rest, dtype=dtype or stored))


def write_empty_extra_state(writer, cfg) -> None:
    """The per-layer `_extra_state` ShardedObjects of the linear layers, empty (no FP8 state)."""
    from megatron_btm.hf.mapping import extra_state_keys
    import torch
    empty = io.BytesIO()
    torch.save([None], empty)  # Megatron's ShardedObject payload of an empty _extra_state
    for key in extra_state_keys(cfg):  # MoE: per layer and expert
        writer.write_object_bytes(key, empty.getvalue())


def meta_for(cfg, imported_from: dict[str, Any]) -> dict[str, Any]:
    """meta.json of an imported (weights-only, step 0) checkpoint."""
    return {"kind": "import", "model_config": cfg.to_dict(), "format": FORMAT, "step": 0,
            "tokens": 0, "parallel": {"tp": 1, "pp": 1, "dp": 1}, "weights_only": True,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "imported_from": imported_from}
