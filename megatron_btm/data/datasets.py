"""Training and validation datasets over preprocessed data, through Megatron-Core.

Training reads a *blend* (domain → weight) of the `train` splits: the mixture of all domains for
the seed LM, a single domain for an expert. Validation is per domain (one GPTDataset over each
domain's `valid` split), so the trainer can report a validation loss per domain.

Megatron writes its sample/shuffle indices as .npy files into `cache_dir`, and a BlendedDataset
with a cache needs an initialised torch.distributed process group (rank 0 builds, the others
wait at a barrier); a world-size-1 gloo group is enough. Give every run its own cache_dir:
Megatron's cache writes are not atomic, so two jobs building the same index into one shared
folder at the same moment could read each other's half-written files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

from megatron_btm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_btm.utils.io import read_json


def dataset_prefix(data_dir: str | os.PathLike, domain: str, split: str) -> str:
    """Megatron's path prefix of a preprocessed split: `<data_dir>/<domain>/<split>` (+ .bin/.idx)."""
    return str(Path(data_dir) / domain / split)


def _check_prefix(data_dir, domain: str, split: str) -> str:
    prefix = dataset_prefix(data_dir, domain, split)
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        report = Path(data_dir) / "report.json"
        if report.is_file():
            entry = read_json(report).get("domains", {}).get(domain, {}).get(split)
            if entry is not None and entry.get("documents") == 0:
                raise ValueError(f"{prefix}: the {domain}/{split} split has no documents "
                                 f"(skipped: {entry.get('skipped')}; see {report})")
        have = sorted(p.name for p in Path(data_dir).iterdir()
                      if p.is_dir() and not p.name.startswith(".")) if Path(data_dir).is_dir() else []
        raise FileNotFoundError(f"{missing[0]}: not found (domains preprocessed in {data_dir}: "
                                f"{', '.join(have) or 'none'}; run `btm preprocess`)")
    return prefix


def check_tokenizer_matches(data_dir: str | os.PathLike, tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer other than the one the data was encoded with (data_dir/tokenizer.json)."""
    path = Path(data_dir) / "tokenizer.json"
    if not path.is_file():
        return  # data produced elsewhere: nothing to compare with
    stored = load_tokenizer(path)
    if stored.sha256 != tokenizer.sha256:
        raise ValueError(f"{path}: the data was encoded with a different tokenizer than the one "
                         f"given ({tokenizer.path}; vocab {stored.vocab_size} vs {tokenizer.vocab_size})")


def _config(*, seq_length: int, seed: int, tokenizer, blend_per_split, cache_dir: str,
            create_attention_mask: bool):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend_per_split=blend_per_split,
        path_to_cache=cache_dir, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=create_attention_mask, mid_level_dataset_surplus=0.005)


def build_gpt_datasets(data_dir: str | os.PathLike, *, blend: dict[str, float], seq_length: int,
                       num_train_samples: int, num_valid_samples: int | None, seed: int,
                       tokenizer: Tokenizer, valid_domains: list[str] | None = None,
                       cache_dir: str | os.PathLike | None = None,
                       create_attention_mask: bool = True,
                       is_built_on_rank: Callable[[], bool] | None = None):
    """(train dataset over the blend, {domain: validation GPTDataset}).

    blend: domain → weight (> 0; normalised by Megatron). valid_domains: default the blend's
    domains. num_valid_samples: per domain; None = one pass over each valid split.
    cache_dir: default `<data_dir>/index-cache` (pass a per-run folder when jobs run concurrently).
    is_built_on_rank: Megatron's hook (default: every rank builds); on ranks where it returns
    False the datasets are None.
    Lengths: a blend of several domains has exactly num_train_samples items; a single GPTDataset
    (an expert's one domain, each validation set) has whole epochs, so len >= the number asked.
    """
    import torch
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    if not isinstance(blend, dict) or not blend:
        raise ValueError(f"blend={blend!r}: need a non-empty dict domain -> weight")
    for d, w in blend.items():
        if not isinstance(w, (int, float)) or not w > 0:
            raise ValueError(f"blend[{d!r}]={w!r}: weights must be positive numbers")
    if seq_length < 1 or num_train_samples < 1:
        raise ValueError(f"seq_length={seq_length}, num_train_samples={num_train_samples}: "
                         "must be >= 1")
    if num_valid_samples is not None and num_valid_samples < 1:
        raise ValueError(f"num_valid_samples={num_valid_samples}: must be >= 1 or None")
    if not torch.distributed.is_initialized():
        raise RuntimeError("build_gpt_datasets: torch.distributed is not initialised; Megatron's "
                           "dataset cache needs a process group (a world-size-1 gloo group is "
                           "enough: torch.distributed.init_process_group('gloo', ...))")
    check_tokenizer_matches(data_dir, tokenizer)
    valid_domains = list(blend) if valid_domains is None else list(valid_domains)
    cache_dir = str(cache_dir if cache_dir is not None else Path(data_dir) / "index-cache")
    on_rank = is_built_on_rank or (lambda: True)
    common = dict(seq_length=seq_length, seed=seed, tokenizer=tokenizer, cache_dir=cache_dir,
                  create_attention_mask=create_attention_mask)

    domains = list(blend)
    prefixes = [_check_prefix(data_dir, d, "train") for d in domains]
    weights = [float(blend[d]) for d in domains]
    # One prefix with a weight would go through a BlendedDataset of one; give Megatron None.
    train_blend = (prefixes, weights if len(prefixes) > 1 else None)
    cfg = _config(blend_per_split=[train_blend, None, None], **common)
    train_ds = BlendedMegatronDatasetBuilder(GPTDataset, [num_train_samples, None, None],
                                             on_rank, cfg).build()[0]
    valid = {}
    for d in valid_domains:
        prefix = _check_prefix(data_dir, d, "valid")
        cfg = _config(blend_per_split=[None, ([prefix], None), None], **common)
        valid[d] = BlendedMegatronDatasetBuilder(GPTDataset, [None, num_valid_samples, None],
                                                 on_rank, cfg).build()[1]
    return train_ds, valid


def read_documents(data_dir: str | os.PathLike, domain: str, split: str,
                   tokenizer: Tokenizer | None = None,
                   max_docs: int | None = None) -> Iterator[list[int]]:
    """Token ids of each document of a preprocessed split, in stored order, eod included last.

    With sentence-split data a document's sentences are joined back. `tokenizer` (optional) is
    checked against the data's tokenizer.json.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if tokenizer is not None:
        check_tokenizer_matches(data_dir, tokenizer)
    ds = IndexedDataset(_check_prefix(data_dir, domain, split), mmap=True)
    doc_idx = ds.document_indices  # [num_docs + 1] boundaries into the sequences
    num_docs = len(doc_idx) - 1 if max_docs is None else min(max_docs, len(doc_idx) - 1)
    for i in range(num_docs):
        seqs = [ds[j] for j in range(int(doc_idx[i]), int(doc_idx[i + 1]))]
        yield [int(t) for s in seqs for t in s]
