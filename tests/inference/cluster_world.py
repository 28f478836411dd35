"""A 2-expert forest whose expert ids are cluster names, and a clusters artefact over the words
of the inference fixture's data (the `world` fixture of conftest.py)."""
from collections import Counter
from pathlib import Path

import numpy as np


def decoded_docs(world, domain: str, split: str = "test") -> list[str]:
    from megatron_btm.data.datasets import read_documents
    from megatron_btm.data.tokenizer import load_tokenizer
    from megatron_btm.routing.cluster_tokens import ids_text
    tok = load_tokenizer(world.tokenizer)
    return [ids_text(tok, d) for d in read_documents(world.data, domain, split)]


def make_clusters(world, out: Path, names: list[str], *, seed: int = 0, dim: int = 4) -> Path:
    """A saved artefact: the 40 most frequent words of dom0/dom1, random idf and projection,
    centroids = the normalised mean embeddings of dom0's and dom1's documents (then more
    random unit centroids for further names)."""
    from megatron_btm.cluster.artefact import ClusterModel, save_clusters
    from megatron_btm.cluster.features import Featurizer
    from megatron_btm.cluster.text import Analyzer
    analyzer = Analyzer(stop_words=frozenset())
    docs = {d: decoded_docs(world, d, "valid") for d in ("dom0", "dom1")}
    counts = Counter(t for ds in docs.values() for doc in ds for t in analyzer.tokens(doc))
    vocab = [w for w, _ in counts.most_common(40)]
    rng = np.random.default_rng(seed)
    feat = Featurizer(analyzer=analyzer, vocabulary=vocab, idf=rng.uniform(1, 3, len(vocab)),
                      components=rng.normal(size=(dim, len(vocab))).astype(np.float32))
    cents = [feat.embed(docs[d]).mean(0) for d in ("dom0", "dom1")]
    cents += list(rng.normal(size=(max(len(names) - 2, 0), dim)))
    cents = np.stack([c / np.linalg.norm(c) for c in cents])[:len(names)]
    save_clusters(out, ClusterModel(featurizer=feat, centroids=cents, names=names), overwrite=True)
    return out


def two_expert_forest(world, root: Path, ids=("ca", "cb")) -> Path:
    """Experts `ids` = the fixture's checkpoints 0 and 1 (cycle 1)."""
    from megatron_btm.forest import Forest
    if (root / "forest.json").is_file():
        return root
    forest = Forest.create(root, seed_checkpoint=world.checkpoints[0], seed_meta={"model_config": {}})
    for j, eid in enumerate(ids):
        forest.add_expert(eid, domain=eid, checkpoint_dir=world.checkpoints[j],
                          parents=[("seed", 1.0)], cycle=1, steps=0, tokens=0, config={})
    return root
