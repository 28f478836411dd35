"""Checks a training run makes before it starts: the resumed run is the same run, the data is
not silently repeated, and the checkpoint record the merge verifies.

Resume: a run folder's run.json records the config, the blend and the tokenizer it was started
with. `check_resume` compares them with the command being run and refuses any change, naming
the keys (ConfigError), except keys that cannot change the trained weights (logging, progress,
checkpoint cadence: RESUME_FREE) and keys the user allows with `--allow-change KEY,...`. The
architecture (a Megatron "Global shape mismatch" otherwise) and the tokenizer never change.
"""
from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from megatron_btm.errors import ConfigError, TokenizerError

log = logging.getLogger(__name__)

# train_config keys a resumed run may change freely (they do not touch the trained weights)
RESUME_FREE = frozenset({
    "progress", "log_interval", "tensorboard", "wandb", "wandb_project", "num_threads",
    "eval_interval", "eval_iters", "save_interval", "keep_checkpoints"})
# a resume may change these only with --allow-change (the blend is "blend")
NEVER = ("model.", "tokenizer_sha256", "kind")
# repeating the training data more than this many times gets a warning
REPEAT_WARN = 4.0


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k != "blend":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def run_identity(cfg, *, blend: Mapping[str, float], tokenizer_sha256: str, kind: str) -> dict:
    """The flattened record a resumed run must match: config keys, blend, tokenizer, kind."""
    train = {k: v for k, v in cfg.to_dict().items() if k != "model"}
    record = {**_flat(train), **_flat({"model": cfg.model.to_dict()}), "blend": dict(blend),
              "tokenizer_sha256": tokenizer_sha256, "kind": kind}
    return json.loads(json.dumps(record))  # as run.json reads back (tuples -> lists)


def recorded_identity(run: Mapping[str, Any]) -> dict:
    """The same record from a run.json written by training.loop (run_meta + configs)."""
    train = {k: v for k, v in (run.get("train_config") or {}).items() if k != "model"}
    return {**_flat(train), **_flat({"model": run.get("model_config") or {}}),
            "blend": dict(run.get("blend") or {}), "tokenizer_sha256": run.get("tokenizer_sha256"),
            "kind": run.get("kind")}


def check_resume(run_json: Path, run: Mapping[str, Any], now: Mapping[str, Any],
                 allow: Iterable[str] = ()) -> list[dict]:
    """Refuse a resume whose config / blend / tokenizer differ from `run` (run.json), except
    RESUME_FREE keys and `allow`ed ones; return the allowed changes [{key, old, new}]."""
    allow = set(allow)
    old = recorded_identity(run)
    changed = sorted(k for k in set(old) | set(now)
                     if k not in RESUME_FREE and old.get(k) != now.get(k)
                     and not (k not in old and k != "blend"))  # keys older runs did not record
    if "tokenizer_sha256" in changed and old.get("tokenizer_sha256"):
        raise TokenizerError(
            f"{run_json}: the run was trained with tokenizer sha256 "
            f"{old['tokenizer_sha256'][:16]}… but --data has {str(now['tokenizer_sha256'])[:16]}…; "
            "a resumed run keeps its tokenizer (use the data folder it was started with)")
    never = [k for k in changed if k.startswith(NEVER)]
    refused = [k for k in changed if k not in allow and k not in never]
    if never or refused:
        keys = never + refused
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in keys[:6])
        hint = (f"start a new run (another --output): {', '.join(never)} cannot change in a run"
                if never else f"pass --allow-change {','.join(refused)} if the change is intended, "
                "or --resume none with another --output")
        raise ConfigError(f"{run_json}: --resume auto would continue this run with a different "
                          f"{', '.join(keys)} ({shown}); {hint}")
    unused = sorted(allow - set(changed))
    if unused:
        warnings.warn(f"--allow-change {','.join(unused)}: unchanged in {run_json}", stacklevel=2)
    return [{"key": k, "old": old.get(k), "new": now.get(k)} for k in changed]


def warn_repeats(data_dir, blend: Mapping[str, float], *, samples: int, seq_length: int) -> None:
    """Warn when a domain's train split is read many times over (a tiny domain at a long
    seq_length): the run then mostly memorises it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_btm.data.datasets import dataset_prefix
    total = sum(blend.values()) or 1.0
    for domain, w in blend.items():
        if w <= 0:
            continue
        ds = IndexedDataset(dataset_prefix(data_dir, domain, "train"))  # keep: the lengths
        tokens = int(ds.sequence_lengths.sum())  # are a view of its mmap
        del ds
        wanted = samples * (seq_length + 1) * w / total
        repeats = wanted / max(tokens, 1)
        if repeats > REPEAT_WARN:
            warnings.warn(f"domain {domain!r}: its train split has {tokens} tokens but the run "
                          f"reads ~{int(wanted)} tokens of it (steps x global_batch_size x "
                          f"seq_length {seq_length}): the data repeats ~{repeats:.0f} times; use "
                          "more data, fewer steps or a shorter seq_length", stacklevel=2)
