"""Shared fixtures for the data tests: a small slice of the real corpora, a tokenizer trained on
it, the slice preprocessed, and a world-size-1 gloo process group (Megatron's dataset cache
needs one)."""
from pathlib import Path

import pytest

from data_helpers import SLICE


def _head_lines(path: Path, n: int) -> bytes:
    out = []
    with open(path, "rb") as f:
        for line in f:
            out.append(line)
            if len(out) == n:
                break
    return b"".join(out)


@pytest.fixture(scope="session")
def corpus_slice(corpora, tmp_path_factory) -> Path:
    """<tmp>/corpus/<domain>/<split>.jsonl: the first lines of two real domains."""
    root = tmp_path_factory.mktemp("corpus")
    for domain, splits in SLICE.items():
        (root / domain).mkdir()
        for split, n in splits.items():
            (root / domain / f"{split}.jsonl").write_bytes(_head_lines(corpora / domain / f"{split}.jsonl", n))
    return root


@pytest.fixture(scope="session")
def tokenizer_path(corpus_slice, tmp_path_factory) -> Path:
    from megatron_btm.data.tokenizer import train_bpe
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([corpus_slice / d / "train.jsonl" for d in SLICE], 1024, out)
    return out


@pytest.fixture(scope="session")
def preprocessed(corpus_slice, tokenizer_path, tmp_path_factory) -> Path:
    """The slice preprocessed with 2 workers and small chunks (exercises ordered pool results)."""
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess
    out = tmp_path_factory.mktemp("pre") / "data"
    preprocess(PreprocessConfig(corpus_dir=str(corpus_slice), output_dir=str(out),
                                tokenizer=str(tokenizer_path), workers=2, chunk_lines=7,
                                progress=False))
    return out


@pytest.fixture(scope="module")
def gloo_group(tmp_path_factory):
    import torch.distributed as dist
    if dist.is_initialized():
        yield
        return
    init = tmp_path_factory.mktemp("gloo") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
