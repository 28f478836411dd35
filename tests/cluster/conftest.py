"""Fixtures for the cluster tests: a synthetic corpus with three vocabularies, a fitted model,
and a slice of the real corpora (../shared/corpora relative to the repo root)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CORPORA = Path(os.environ.get("BTM_CORPORA", REPO.parent / "shared" / "corpora"))

# Three domains whose documents draw from disjoint word pools (plus shared filler words).
POOLS = {
    "astro": "galaxy nebula quasar orbit comet planet stellar photon telescope cosmos".split(),
    "cook": "butter flour oven simmer garlic pepper recipe saucepan whisk dough".split(),
    "law": "plaintiff statute verdict appeal tribunal counsel clause liability court decree".split(),
}
FILLER = "alpha beta gamma delta kappa sigma".split()


def write_corpus(root: Path, docs_per_split=(60, 10, 10), seed=0, pools=POOLS) -> Path:
    """<root>/<domain>/{train,valid,test}.jsonl of documents of 15-30 words (70% domain words)."""
    rng = np.random.default_rng(seed)
    for domain, pool in pools.items():
        (root / domain).mkdir(parents=True, exist_ok=True)
        for split, n in zip(("train", "valid", "test"), docs_per_split):
            lines = []
            for _ in range(n):
                words = [pool[i] for i in rng.integers(0, len(pool), rng.integers(10, 21))]
                words += [FILLER[i] for i in rng.integers(0, len(FILLER), rng.integers(3, 8))]
                rng.shuffle(words)
                if rng.random() < 0.3:
                    words.append(str(int(rng.integers(0, 1000))))
                lines.append(json.dumps({"text": " ".join(words).capitalize() + "."}))
            (root / domain / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


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
