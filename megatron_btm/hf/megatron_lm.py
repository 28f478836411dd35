"""Import a Megatron-LM `--save` directory (torch_dist format) as a megatron-btm checkpoint.

Megatron-LM's layout (megatron/training/checkpointing.py; docs/INTEROP.md):

    <save>/latest_checkpointed_iteration.txt   the iteration number, or "release"
    <save>/iter_NNNNNNN/ (or release/)         torch_dist: metadata.json, .metadata, *.distcp,
                                               common.pt (args, checkpoint_version, iteration, ...)

The model's tensors are Megatron-Core ShardedTensors whose keys are the GPTModel's own names
(`embedding.word_embeddings.weight`, `decoder.layers.<name>` stacked over layers, ...): the
state dict nests them under "model" (or "model0", ... with virtual pipelining) but the stored
keys carry no `model.` prefix, and the DDP / Float16Module wrappers add no `module.` (their
sharded_state_dict delegates to the inner module) — the same keys our checkpoints use. A
`model.`/`module.` prefix (some converted checkpoints) is stripped anyway. Optimizer state,
RNG and scheduler entries are dropped; the TE `_extra_state` objects are replaced by empty ones.
The architecture comes from common.pt's `args` (an argparse.Namespace), read with a restricted
unpickler: only Namespace, tensors and plain containers are rebuilt; any other class (enums of
Megatron's argument values) becomes an inert placeholder, and no code of the pickle is run.
"""
from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path
from typing import Any

TRACKER = "latest_checkpointed_iteration.txt"
PREFIXES = ("module.", "model.")


def is_megatron_lm(path: str | os.PathLike) -> bool:
    return (Path(path) / TRACKER).is_file()


def iteration_dir(root: str | os.PathLike) -> tuple[Path, int]:
    """The checkpoint folder the tracker file names, and its iteration (0 for "release")."""
    root = Path(root)
    text = (root / TRACKER).read_text().strip()
    if text == "release":
        folder, iteration = root / "release", 0
    elif text.isdigit():
        folder, iteration = root / f"iter_{int(text):07d}", int(text)
    else:
        raise ValueError(f"{root / TRACKER}: holds {text[:40]!r}, expected an iteration number or 'release'")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: named by {root / TRACKER} but missing")
    if not (folder / "metadata.json").is_file():
        legacy = any(folder.glob("mp_rank_*"))
        raise ValueError(f"{folder}: not a torch_dist checkpoint (no metadata.json"
                         f"{'; mp_rank_* folders are the legacy torch format' if legacy else ''}); "
                         f"save with --ckpt-format torch_dist, or convert it with Megatron-LM's "
                         f"tools/checkpoint/convert.py")
    return folder, iteration


class _Placeholder:
    """Stands in for a class of the pickle that is not allowed (never imported)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _Unpickler(pickle.Unpickler):
    ALLOWED = {("argparse", "Namespace"): argparse.Namespace, ("collections", "OrderedDict"): dict,
               ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
               ("builtins", "slice"): slice, ("builtins", "complex"): complex}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[module, name]
        if module == "torch" and name in ("float32", "float16", "bfloat16", "float64", "int64", "int32"):
            import torch
            return getattr(torch, name)
        return type(name, (_Placeholder,), {"__module__": f"placeholder.{module}"})

    def persistent_load(self, pid):  # tensors (RNG states, ...) of common.pt are not needed
        return None


def read_common(folder: Path) -> dict[str, Any]:
    """common.pt's entries (args, checkpoint_version, iteration, ...), safely unpickled."""
    import zipfile
    path = folder / "common.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (Megatron-LM saves args and iteration there)")
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            with z.open(name) as f:
                common = _Unpickler(f).load()
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch.save file ({e or type(e).__name__})") from None
    if not isinstance(common, dict):
        raise ValueError(f"{path}: holds a {type(common).__name__}, expected a dict")
    return common


def _arg(args, name, default=None):
    return getattr(args, name, default)


def config_from_args(args, vocab_rows: int, where: str):
    """Our GPTConfig for the Megatron-LM arguments (the embedding has `vocab_rows` rows)."""
    from megatron_btm.hf.importer import vocab_multiple
    from megatron_btm.megatron.model import GPTConfig
    if not isinstance(args, argparse.Namespace):
        raise ValueError(f"{where}: no 'args' (argparse.Namespace) entry; cannot tell the architecture")
    unsupported = [(n, _arg(args, n)) for n in ("num_experts", "multi_latent_attention", "mtp_num_layers",
                                                 "apply_layernorm_1p", "squared_relu")
                   if _arg(args, n) not in (None, False, 0)]
    if _arg(args, "rotary_percent", 1.0) != 1.0:
        unsupported.append(("rotary_percent", args.rotary_percent))
    position = _arg(args, "position_embedding_type", "learned_absolute")
    if position not in ("learned_absolute", "rope"):
        unsupported.append(("position_embedding_type", position))
    if unsupported:
        raise ValueError(f"{where}: args {', '.join(f'{n}={v!r}' for n, v in unsupported)} are not "
                         f"supported (dense GPT models with learned or full RoPE positions only)")
    swiglu = bool(_arg(args, "swiglu", False))
    bias = bool(_arg(args, "add_bias_linear", True))
    rope = position == "rope"
    scaling = _arg(args, "rope_scaling_factor") if _arg(args, "use_rope_scaling", False) else None
    heads = args.num_attention_heads
    fields = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=heads,
        ffn_hidden_size=_arg(args, "ffn_hidden_size"), seq_length=args.seq_length,
        vocab_size=vocab_rows, make_vocab_size_divisible_by=vocab_multiple(vocab_rows, 1),
        hidden_dropout=float(_arg(args, "hidden_dropout", 0.0)),
        attention_dropout=float(_arg(args, "attention_dropout", 0.0)),
        init_method_std=float(_arg(args, "init_method_std", 0.02)),
        tie_embeddings=not _arg(args, "untie_embeddings_and_output_weights", False),
        arch="llama" if rope else "gpt2", position_embedding_type=position,
        rotary_base=float(_arg(args, "rotary_base", 10000)) if rope else None,
        rope_scaling_factor=float(scaling) if scaling else None,
        normalization=_arg(args, "normalization", "LayerNorm"),
        layernorm_epsilon=float(_arg(args, "norm_epsilon", 1e-5)), gated_linear_unit=swiglu,
        activation="silu" if swiglu else ("gelu_tanh" if _arg(args, "openai_gelu", False) else "gelu"),
        num_query_groups=_arg(args, "num_query_groups") if _arg(args, "group_query_attention") else heads,
        kv_channels=None if _arg(args, "kv_channels") in (None, args.hidden_size // heads)
        else args.kv_channels,  # Megatron-LM always sets it; ours: None = hidden / heads
        add_bias_linear=bias,
        add_qkv_bias=bool(_arg(args, "add_qkv_bias", False)) or bias,
        qk_layernorm=bool(_arg(args, "qk_layernorm", False)))
    if position == "learned_absolute":
        fields["seq_length"] = _arg(args, "max_position_embeddings", args.seq_length)
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{where}: args give an unsupported architecture ({e})") from None


def expected_keys(cfg) -> dict[str, tuple[int, ...]]:
    """Every model tensor a checkpoint of `cfg` holds, with its global shape."""
    from megatron_btm.hf.mapping import LAYERS, megatron_shapes
    shapes = megatron_shapes(cfg, cfg.padded_vocab_size())
    ln_bias, bias = cfg.normalization == "LayerNorm", cfg.add_bias_linear
    keep = {"embedding.position_embeddings.weight": cfg.position_embedding_type == "learned_absolute",
            "output_layer.weight": not cfg.tie_embeddings,
            "self_attention.linear_qkv.bias": bias or cfg.add_qkv_bias,
            "self_attention.q_layernorm.weight": cfg.qk_layernorm,
            "self_attention.k_layernorm.weight": cfg.qk_layernorm}
    out = {}
    for key, shape in shapes.items():
        wanted = keep.get(key, ln_bias if key.endswith("layer_norm_bias") or key.endswith("layernorm.bias")
                           else bias if key.endswith(".bias") else True)
        if not wanted:
            continue
        top = key.startswith(("embedding.", "decoder.", "output_layer."))
        out[key if top else LAYERS + key] = shape if top else (cfg.num_layers, *shape)
    return out


def _source_keys(reader, expected: dict, where: str) -> dict[str, str]:
    """Our key -> the stored key (prefix stripped, unfused norm names accepted)."""
    from megatron_btm.hf.mapping import ALIASES, LAYERS
    stored = {}
    for key in reader.tensors():
        name = key
        while name.startswith(PREFIXES) and name not in expected:
            name = name.split(".", 1)[1]
        for fused, plain in ALIASES.items():
            if name == LAYERS + plain:
                name = LAYERS + fused
        if name in expected:
            stored[name] = key
    missing = [k for k in expected if k not in stored]
    if missing:
        raise ValueError(f"{where}: model tensor(s) {missing[:4]} are missing (the args describe "
                         f"{len(expected)} tensors; is this a GPT model?)")
    return stored


def import_megatron_lm(src: str | os.PathLike, output: str | os.PathLike, *, dtype: str = "auto") -> Path:
    """Convert the Megatron-LM save folder `src` into a checkpoint root `output`; return it."""
    from megatron_btm.averaging.torch_dist import TorchDistReader, TorchDistWriter
    from megatron_btm.export.hf import check_output
    from megatron_btm.hf.importer import DTYPES, meta_for, write_empty_extra_state
    from megatron_btm.megatron.checkpoint import iter_name
    from megatron_btm.utils.dtypes import torch_dtype
    from megatron_btm.utils.io import atomic_dir, atomic_write_json, atomic_write_text

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: valid values are {list(DTYPES)}")
    folder, iteration = iteration_dir(src)
    common = read_common(folder)
    where = str(folder / "common.pt")
    reader = TorchDistReader(folder)
    try:
        words = next((k for k in reader.tensors() if k.endswith("embedding.word_embeddings.weight")), None)
        if words is None:
            raise ValueError(f"{folder}: no embedding.word_embeddings.weight tensor (not a GPT model?)")
        cfg = config_from_args(common.get("args"), int(reader.tensors()[words].size[0]), where)
        expected = expected_keys(cfg)
        stored = _source_keys(reader, expected, str(folder))
        for key, shape in expected.items():
            have = tuple(reader.tensors()[stored[key]].size)
            if have != shape:
                raise ValueError(f"{folder}: tensor {stored[key]!r} has shape {list(have)} but {where}'s "
                                 f"args imply {list(shape)}")
        output = Path(output)
        check_output(output)
        with atomic_dir(output) as tmp:
            writer = TorchDistWriter(tmp / iter_name(0))
            try:
                for key, source in stored.items():
                    t = reader.read_tensor(source)
                    if dtype != "auto":
                        t = t.to(torch_dtype(dtype))
                    writer.declare_tensor(key, t.shape, t.dtype)
                    writer.write_chunk(key, (0,) * t.dim(), t)
                    del t
                write_empty_extra_state(writer, cfg)
                writer.finish(common={"run_state": {"step": 0}})
            finally:
                writer.abort()
            info = {"path": str(Path(src).resolve()), "format": "megatron-lm torch_dist",
                    "iteration": iteration, "checkpoint_version": common.get("checkpoint_version"),
                    "dtype": dtype, "args": {k: v for k, v in sorted(vars(common["args"]).items())
                                            if isinstance(v, (int, float, str, bool, type(None)))}}
            atomic_write_json(tmp / iter_name(0) / "meta.json", meta_for(cfg, info))
            atomic_write_text(tmp / "latest", iter_name(0) + "\n")
    finally:
        reader.close()
    return output
