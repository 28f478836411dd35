"""Write a Hugging Face model folder (GPT-2, Llama, Mistral, Qwen2 or Qwen3 + tokenizer) from one
of our checkpoints (the family's mapping table: `megatron_btm.hf.mapping`).

The folder is built under a temporary name and renamed into place when complete
(`utils.io.atomic_dir`), so a crash never leaves a half-exported model that looks usable:

    config.json  generation_config.json  model.safetensors
    tokenizer.json  tokenizer_config.json (+ special_tokens_map.json)  README.md  btm_export.json

Weights are read straight from the torch_dist files (`dcp_reader`): no process group, no
Megatron model, any saved TP/PP. Loading needs only `transformers`:
`AutoModelForCausalLM.from_pretrained(dir)`, `AutoTokenizer.from_pretrained(dir)`.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_btm.utils.dtypes import DTYPE_NAMES as DTYPES
from megatron_btm.utils.dtypes import torch_dtype, torch_dtype_name


@dataclass(kw_only=True)
class ExportConfig:
    """How to export (the source and destination are arguments of the export functions)."""

    dtype: str = "fp32"
    """Weight dtype of model.safetensors: fp32, bf16 or fp16 (converted from the stored dtype)."""
    keep_padded_vocab: bool = False
    """Keep Megatron's vocabulary padding rows (HF vocab_size = padded size) instead of slicing
    the embedding/output to the tokenizer's vocabulary."""
    architecture: str | None = None
    """HF class to write (e.g. MistralForCausalLM); None: the family the model's fields match."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: valid values are {list(DTYPES)}")
        if not isinstance(self.keep_padded_vocab, bool):
            raise ValueError(f"keep_padded_vocab={self.keep_padded_vocab!r}: must be true or false")
        if self.architecture is not None:
            from megatron_btm.hf.families import FAMILIES
            if self.architecture not in FAMILIES:
                raise ValueError(f"architecture={self.architecture!r}: supported: {sorted(FAMILIES)}")


def check_output(output: Path) -> None:
    """Refuse anything but a missing or empty folder (never overwrite a previous export)."""
    if output.is_file():
        raise FileExistsError(f"--output {output}: is a file; choose a new folder")
    if output.is_dir():
        if any(output.iterdir()):
            raise FileExistsError(f"--output {output}: folder is not empty; choose a new or empty "
                                  f"folder (refusing to overwrite)")
        output.rmdir()  # empty: atomic_dir renames the finished export into its place


def _is_hf_tokenizer_folder(path: Path) -> bool:
    """A folder of HF tokenizer files (an import copies them beside the checkpoint): copied
    verbatim, instead of rebuilding the tokenizer from our tokenizer.json."""
    return path.is_dir() and (path / "tokenizer_config.json").is_file()


def export_checkpoint(checkpoint: str | os.PathLike, *, tokenizer: str | os.PathLike,
                      output: str | os.PathLike, config: ExportConfig | None = None,
                      card: dict[str, Any] | None = None,
                      forest_root: str | os.PathLike | None = None) -> Path:
    """Export a checkpoint (folder, `checkpoints/` root or run folder) to an HF folder `output`.

    The HF family follows the model's architecture fields (GPT-2, Llama, Qwen2, Qwen3, Mixtral
    for a Llama-style MoE; Mistral
    when `config.architecture` asks for it). `card` adds provenance to README.md /
    btm_export.json (the forest export passes the expert's domain and lineage).
    """
    from safetensors.torch import save_file

    from megatron_btm.export import dcp_reader
    from megatron_btm.hf import convert, families
    from megatron_btm.megatron.checkpoint import read_meta, resolve_checkpoint
    from megatron_btm.megatron.model import GPTConfig
    from megatron_btm.utils.io import atomic_dir, atomic_write_json, atomic_write_text, sha256_file

    config = config or ExportConfig()
    output = Path(output)
    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    if "model_config" not in meta:
        raise ValueError(f"{ckpt / 'meta.json'}: no 'model_config' key (needed to know the "
                         f"architecture)")
    model_cfg = GPTConfig.from_dict(meta["model_config"], where=f"{ckpt / 'meta.json'}: model_config")
    # an imported checkpoint goes back to its own class (Mistral has Llama's fields)
    imported = (meta.get("imported_from") or {}).get("architecture")
    if config.architecture is None and imported in families.FAMILIES and \
            families.mismatch(families.FAMILIES[imported], model_cfg) is None:
        family = families.FAMILIES[imported]
    else:
        family = families.for_config(model_cfg, config.architecture)
    tokenizer = Path(tokenizer)
    hf_tok = _is_hf_tokenizer_folder(tokenizer)
    if hf_tok:
        tok, tok_vocab, tok_sha = None, model_cfg.vocab_size, (
            sha256_file(tokenizer / "tokenizer.json") if (tokenizer / "tokenizer.json").is_file() else "n/a")
    else:
        from megatron_btm.data.tokenizer import load_tokenizer
        from megatron_btm.data.identity import check_export
        tok = load_tokenizer(tokenizer)
        tok_vocab, tok_sha = tok.vocab_size, tok.sha256
        check_export(ckpt, tokenizer, tok.sha256, forest_root=forest_root)   # the same tokenizer
        if tok.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"--tokenizer {tokenizer}: vocabulary of {tok.vocab_size} tokens is larger "
                             f"than the model's vocab_size={model_cfg.vocab_size} ({ckpt}); wrong "
                             f"tokenizer for this model?")
    check_output(output)

    vocab = model_cfg.padded_vocab_size() if config.keep_padded_vocab else tok_vocab
    keys = convert.required_keys(dcp_reader.list_tensors(ckpt), model_cfg, family.table)
    state = dcp_reader.read_tensors(ckpt, keys)
    dtype = torch_dtype(config.dtype)
    hf_state = convert.megatron_to_hf(state, model_cfg, family.table, vocab_size=vocab, dtype=dtype)
    del state
    provenance = {
        "source_checkpoint": str(ckpt.resolve()), "source_meta": meta,
        "tokenizer": str(tokenizer.resolve()), "tokenizer_sha256": tok_sha,
        "tokenizer_vocab_size": tok_vocab, "padded_vocab_size": model_cfg.padded_vocab_size(),
        "hf_vocab_size": vocab, "dtype": config.dtype, "architecture": family.architecture,
        "tokenizer_files": "copied" if hf_tok else "rebuilt",
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(card or {})}
    with atomic_dir(output) as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if hf_tok:
            _copy_hf_tokenizer(tmp, tokenizer, family, model_cfg, vocab, config.dtype)
        else:
            _write_hf_configs(tmp, family, model_cfg, vocab, tok, config.dtype)
        atomic_write_json(tmp / "btm_export.json", provenance)
        atomic_write_text(tmp / "README.md", model_card(provenance, model_cfg.to_dict()))
    return output


def _save_model_config(folder: Path, family, model_cfg, vocab: int, bos, eos, dtype: str) -> None:
    import transformers
    cls = getattr(transformers, family.config_class)
    cls(**family.to_hf(model_cfg), vocab_size=vocab, bos_token_id=bos, eos_token_id=eos,
        architectures=[family.architecture], dtype=torch_dtype_name(dtype)).save_pretrained(folder)


def _copy_hf_tokenizer(folder: Path, tokenizer: Path, family, model_cfg, vocab: int, dtype: str) -> None:
    import shutil

    from megatron_btm.hf.importer import TOKENIZER_FILES
    from megatron_btm.utils.io import read_json
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, folder / name)
    gen = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    _save_model_config(folder, family, model_cfg, vocab, gen.get("bos_token_id"), gen.get("eos_token_id"),
                       dtype)


def _write_hf_configs(folder: Path, family, model_cfg, vocab: int, tok, dtype: str) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from megatron_btm.data.tokenizer import EOD_TOKEN
    from megatron_btm.utils.io import atomic_write_json, read_json
    seq_length = model_cfg.seq_length
    _save_model_config(folder, family, model_cfg, vocab, tok.eod, tok.eod, dtype)
    GenerationConfig(bos_token_id=tok.eod, eos_token_id=tok.eod, pad_token_id=tok.eod,
                     max_length=seq_length).save_pretrained(folder)
    # GPT-2's convention: <|endoftext|> is bos, eos and unk; no pad (we set none either)
    fast = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok.to_json()),
                                   bos_token=EOD_TOKEN, eos_token=EOD_TOKEN, unk_token=EOD_TOKEN,
                                   model_max_length=seq_length, clean_up_tokenization_spaces=False)
    fast.save_pretrained(folder)
    # transformers 5 writes its new class name ("TokenizersBackend"), unknown to transformers
    # 4.x (NGC images); the generic fast class loads the same tokenizer.json in both.
    tok_config = read_json(folder / "tokenizer_config.json")
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_json(folder / "tokenizer_config.json", tok_config)


def model_card(info: dict[str, Any], model_config: dict[str, Any]) -> str:
    """README.md: what the model is, where it came from (domain, lineage), how to load it."""
    meta = info.get("source_meta", {})
    arch = info.get("architecture", "GPT2LMHeadModel")
    lines = ["---", "library_name: transformers",
             f"tags: [{model_config.get('arch', 'gpt2')}, branch-train-merge, megatron-btm]", "---", ""]
    title = f"expert `{info['expert_id']}` ({info['domain']})" if "expert_id" in info else "model"
    if info.get("expert_id") == "seed":
        title = "seed LM (trained on the mixture of domains)"
    lines += [f"# megatron-btm {title}", "",
              f"A {arch} LM exported from a megatron-btm (Branch-Train-Merge on "
              "Megatron-Core) checkpoint.", ""]
    if "expert_id" in info:
        lines += ["## Expert", "", f"- forest: `{info['forest']}`", f"- domain: {info['domain']}",
                  f"- cycle: {info['cycle']}",
                  f"- parents (initialised as their weighted average): "
                  f"{', '.join(f'{p} ({w:g})' for p, w in info['parents']) or 'none'}",
                  f"- steps: {info.get('steps', 0)}, tokens: {info.get('tokens', 0)}", "",
                  "Lineage (ancestor, weight of the edge, depth):", "", "```"]
        lines += ["  " * (d - 1) + f"{a} ({w:g})" for a, w, d in info.get("lineage", [])] or ["(none)"]
        lines += ["```", ""]
    if "averaging" in meta:
        lines += ["## Parameter average", "", "```json", json.dumps(meta["averaging"], indent=2),
                  "```", ""]
    ours = info.get("tokenizer_files") != "copied"  # our BPE, rebuilt as an HF tokenizer
    eod = "; end of document = `<|endoftext|>`" if ours else "; HF tokenizer files copied verbatim"
    note = ["- note: the HF tokenizer maps the literal text `<|endoftext|>` to the special token "
            "(transformers' default); megatron-btm's data pipeline encodes it as plain text"] if ours else []
    lines += ["## Source", "", f"- checkpoint: `{info['source_checkpoint']}` (step {meta.get('step')}, "
              f"tokens {meta.get('tokens', 'n/a')})",
              f"- tokenizer: `{info['tokenizer']}` (sha256 {info['tokenizer_sha256'][:16]}…, "
              f"{info['tokenizer_vocab_size']} tokens{eod})",
              f"- vocabulary: HF vocab_size {info['hf_vocab_size']} (Megatron padded "
              f"{info['padded_vocab_size']}; padding rows "
              f"{'kept' if info['hf_vocab_size'] == info['padded_vocab_size'] else 'removed'})",
              f"- dtype: {info['dtype']}", *note, "", "Architecture (megatron-btm GPTConfig):", "",
              "```json", json.dumps(model_config, indent=2, sort_keys=True), "```", "",
              "## Use", "", "```python",
              f"from transformers import AutoTokenizer, {arch}",
              f"model = {arch}.from_pretrained(PATH)",
              "tok = AutoTokenizer.from_pretrained(PATH)", "```", ""]
    return "\n".join(lines)


def export_expert(forest_root: str | os.PathLike, expert_id: str, *, tokenizer: str | os.PathLike,
                  output: str | os.PathLike, config: ExportConfig | None = None) -> Path:
    """Export one expert of a forest ('seed' for the seed LM), with its domain and lineage."""
    from megatron_btm.forest import Forest
    forest = Forest.open(forest_root)
    rec = forest.get(expert_id)  # UnknownExpertError (a ValueError) lists nothing secret
    ckpt = forest.checkpoint_path(expert_id)  # verifies the recorded sha256 first
    card = {"forest": str(forest.root), "expert_id": rec.id, "domain": rec.domain,
            "cycle": rec.cycle, "parents": [list(p) for p in rec.parents], "steps": rec.steps,
            "tokens": rec.tokens, "lineage": [list(x) for x in forest.lineage(expert_id)]}
    return export_checkpoint(ckpt, tokenizer=tokenizer, output=output, config=config, card=card,
                             forest_root=forest.root)

