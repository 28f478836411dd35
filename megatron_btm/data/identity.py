"""Which tokenizer a model, a data folder or a forest was made with, and refusing a mix.

The identity of a tokenizer is `Tokenizer.sha256` (the sha256 of its serialised JSON), with its
vocabulary size. It is recorded in every checkpoint's meta.json (`tokenizer_sha256`), in a run's
run.json, in the forest (forest.json seed meta `tokenizer`); a preprocessed data folder's
identity is its tokenizer.json. Two BPEs of the same vocabulary size give the same tensor shapes
but different token ids, so nothing else catches the mix: every command that combines models,
data or a tokenizer calls `check_same_tokenizer` and refuses a mismatch (TokenizerError naming
both sides and both hashes).

    from megatron_btm.data.identity import check_same_tokenizer, checkpoint_tokenizer, tokenizer_of
    check_same_tokenizer(("--tokenizer " + path, tokenizer_of(path)),
                         (f"{ckpt}/meta.json", checkpoint_tokenizer(ckpt)))

A side whose hash is None (a checkpoint written before hashes were recorded) is skipped.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from megatron_btm.errors import TokenizerError

META_KEY = "tokenizer_sha256"


def tokenizer_of(path: str | os.PathLike) -> str:
    """The sha256 identity of a tokenizer.json, or of the tokenizer.json inside a folder (a
    preprocessed data folder)."""
    from megatron_btm.data.tokenizer import load_tokenizer
    return load_tokenizer(path).sha256


def checkpoint_tokenizer(ckpt: str | os.PathLike) -> str | None:
    """`tokenizer_sha256` of a checkpoint folder's meta.json (None when not recorded)."""
    meta = Path(ckpt) / "meta.json"
    if not meta.is_file() and (Path(ckpt) / "checkpoints").is_dir():  # a run folder
        from megatron_btm.megatron.checkpoint import latest_checkpoint
        latest = latest_checkpoint(Path(ckpt) / "checkpoints")
        meta = latest / "meta.json" if latest is not None else meta
    if not meta.is_file():
        return None
    try:
        value = json.loads(meta.read_text()).get(META_KEY)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def check_same_tokenizer(*sides: tuple[str, str | None]) -> str | None:
    """Refuse unless every (label, sha256) side with a known hash names the same tokenizer;
    return that hash (None if none is known). The message names both sides and both hashes."""
    known = [(label, sha) for label, sha in sides if sha]
    for label, sha in known[1:]:
        if sha != known[0][1]:
            raise TokenizerError(
                f"tokenizer mismatch: {known[0][0]} has tokenizer sha256 {known[0][1][:16]}… but "
                f"{label} has {sha[:16]}…; models, data and tokenizer must come from the same "
                "tokenizer.json (preprocess the data with the forest's tokenizer)")
    return known[0][1] if known else None


def check_checkpoints(checkpoints: Iterable[tuple[str, str | os.PathLike]],
                      *others: tuple[str, str | None]) -> str | None:
    """`check_same_tokenizer` over (name, checkpoint folder) pairs and further sides."""
    sides = [(f"{name} ({Path(path) / 'meta.json'})", checkpoint_tokenizer(path))
             for name, path in checkpoints]
    return check_same_tokenizer(*others, *sides)


def check_data(data_dir: str | os.PathLike, checkpoints, *others) -> str:
    """The data folder's tokenizer against every checkpoint (and further sides); its hash."""
    sha = tokenizer_of(data_dir)
    check_checkpoints(checkpoints, (f"--data {Path(data_dir) / 'tokenizer.json'}", sha), *others)
    return sha


def forest_tokenizer(forest_root: str | os.PathLike) -> str | None:
    """The tokenizer sha256 a forest records (forest.json seed meta), None if not recorded."""
    from megatron_btm.forest import Forest
    return (Forest.open(forest_root).tokenizer() or {}).get("sha256")


def check_export(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike,
                 tokenizer_sha256: str | None = None, *,
                 forest_root: str | os.PathLike | None = None) -> str | None:
    """The one check `export-hf` makes: the --tokenizer (its sha256, computed here unless given)
    is the checkpoint's (meta.json) and, exporting from a forest, the forest's."""
    sha = tokenizer_sha256 or tokenizer_of(tokenizer)
    sides = [(f"--tokenizer {tokenizer}", sha)]
    if forest_root is not None:
        sides.append((f"forest {Path(forest_root) / 'forest.json'}", forest_tokenizer(forest_root)))
    return check_checkpoints([("the exported checkpoint", checkpoint)], *sides)
