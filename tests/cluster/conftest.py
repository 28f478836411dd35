"""Fixtures for the cluster tests: a synthetic corpus with three vocabularies, a fitted model,
and a slice of the real corpora (../shared/corpora relative to the repo root)."""
import os
from pathlib import Path

import pytest

from cluster_helpers import write_corpus

REPO = Path(__file__).resolve().parents[2]
CORPORA = Path(os.environ.get("BTM_CORPORA", REPO.parent / "shared" / "corpora"))


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("toy") / "corpus")


@pytest.fixture(scope="session")
def toy_clusters(toy_corpus, tmp_path_factory) -> Path:
    from megatron_btm.cluster.fit import FitConfig, fit_clusters
    out = tmp_path_factory.mktemp("fit") / "clusters"
    fit_clusters(FitConfig(corpus=str(toy_corpus), output=str(out), k=3, dim=8, min_df=1,
                           batch_size=64, tolerance=0.5, seed=0, progress=False))
    return out


@pytest.fixture(scope="session")
def real_slice(tmp_path_factory) -> Path:
    """The first 40/8/8 lines of three real domains."""
    if not CORPORA.is_dir():
        pytest.skip(f"real corpora not found at {CORPORA} (set BTM_CORPORA)")
    root = tmp_path_factory.mktemp("real")
    for domain in ("bible", "code_python", "legal"):
        (root / domain).mkdir()
        for split, n in (("train", 40), ("valid", 8), ("test", 8)):
            with open(CORPORA / domain / f"{split}.jsonl", "rb") as f:
                lines = [line for _, line in zip(range(n), f)]
            (root / domain / f"{split}.jsonl").write_bytes(b"".join(lines))
    return root


@pytest.fixture(scope="session")
def real_clusters(real_slice, tmp_path_factory) -> Path:
    from megatron_btm.cluster.fit import FitConfig, fit_clusters
    out = tmp_path_factory.mktemp("realfit") / "clusters"
    fit_clusters(FitConfig(corpus=str(real_slice), output=str(out), k=3, seed=0, progress=False))
    return out
