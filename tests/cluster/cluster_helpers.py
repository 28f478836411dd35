"""Helpers of the cluster tests: a synthetic corpus whose domains use disjoint vocabularies."""
import json
from pathlib import Path

import numpy as np

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
