"""`fit` on a corpus: clusters follow the vocabularies, the artefact round-trips without pickle."""
import json

import numpy as np
import pytest

from cluster_helpers import write_corpus
from megatron_btm.cluster.artefact import ARRAYS_FILE, META_FILE, load_clusters, save_clusters
from megatron_btm.cluster.fit import FitConfig, fit_clusters
from megatron_btm.cluster.text import Analyzer, NUMBER_TOKEN, iter_documents, split_files


def texts_of(corpus, split="train"):
    files = split_files(corpus, ["astro", "cook", "law"], split)
    return zip(*iter_documents(files))


def test_fit_separates_the_three_vocabularies(toy_clusters, toy_corpus):
    model = load_clusters(toy_clusters)
    meta = model.meta
    assert model.k == 3 and model.names == ["cluster0", "cluster1", "cluster2"]
    assert meta["num_documents"] == 180 and meta["balanced_purity"] == 1.0
    assert sorted(meta["balanced_sizes"].values()) == [60, 60, 60]
    prov, texts = texts_of(toy_corpus, "valid")
    labels = model.assign(list(texts))
    # each domain's held-out documents go to one cluster, a different one per domain
    by_domain = [set(labels[np.asarray(prov) == d].tolist()) for d in range(3)]
    assert all(len(s) == 1 for s in by_domain) and len(set.union(*by_domain)) == 3


def test_artefact_round_trips(toy_clusters, toy_corpus, tmp_path):
    model = load_clusters(toy_clusters)
    save_clusters(tmp_path / "copy", model)
    again = load_clusters(tmp_path / "copy")
    _, texts = texts_of(toy_corpus, "test")
    assert np.array_equal(model.assign(list(texts)), again.assign(list(texts)))
    np.testing.assert_array_equal(model.centroids, again.centroids)
    assert again.featurizer.vocabulary == model.featurizer.vocabulary
    # plain data only: the arrays load with pickling refused, the metadata is JSON
    with np.load(toy_clusters / ARRAYS_FILE, allow_pickle=False) as z:
        assert set(z.files) == {"idf", "components", "centroids"}
        assert all(z[f].dtype != object for f in z.files)
    meta = json.loads((toy_clusters / META_FILE).read_text())
    assert meta["version"] == 1 and "the" in meta["analyzer"]["stop_words"]


def test_fit_is_deterministic_under_a_seed(toy_corpus, toy_clusters, tmp_path):
    out = tmp_path / "again"
    fit_clusters(FitConfig(corpus=str(toy_corpus), output=str(out), k=3, dim=8, min_df=1,
                           batch_size=64, tolerance=0.5, seed=0, progress=False))
    a, b = load_clusters(toy_clusters), load_clusters(out)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.meta["balanced_sizes"] == b.meta["balanced_sizes"]


def test_fit_on_real_text_names_and_balance(real_slice, tmp_path):
    model = fit_clusters(FitConfig(corpus=str(real_slice), output=str(tmp_path / "c"), k=4,
                                   names=["w", "x", "y", "z"], tolerance=0.2, batch_size=120,
                                   seed=1, progress=False))
    assert model.names == ["w", "x", "y", "z"]
    sizes = model.meta["balanced_sizes"]
    assert sum(sizes.values()) == 120 and max(sizes.values()) <= 36 and min(sizes.values()) >= 24
    assert model.featurizer.dim <= 100 and np.isfinite(model.centroids).all()


def test_analyzer_numbers_stop_words_and_case():
    a = Analyzer(stop_words=frozenset({"the"}))
    assert a.tokens("The Quasar's 42 orbits x 3rd") == ["quasar", NUMBER_TOKEN, "orbits", NUMBER_TOKEN]


def test_incomplete_artefact_is_refused(toy_clusters, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(toy_clusters, bad)
    (bad / ARRAYS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete clusters folder"):
        load_clusters(bad)


def test_fit_balancing_bytes(tmp_path):
    # 15 "law" documents 4x longer than the 60 of each other domain: about the same bytes
    corpus = write_corpus(tmp_path / "corpus", docs_per_split=(60, 5, 5))
    law = corpus / "law" / "train.jsonl"
    lines = [json.loads(x)["text"] for x in law.read_text().splitlines()]
    law.write_text("".join(json.dumps({"text": " ".join([t] * 4)}) + "\n" for t in lines[:15]))
    model = fit_clusters(FitConfig(corpus=str(corpus), output=str(tmp_path / "c"), k=3, dim=8,
                                   min_df=1, balance="bytes", tolerance=0.25, seed=0,
                                   progress=False))
    assert model.meta["balance"] == "bytes" and model.meta["balanced_purity"] == 1.0
    assert sorted(model.meta["balanced_sizes"].values()) == [15, 60, 60]
    loads = list(model.meta["balanced_bytes"].values())
    assert max(loads) / min(loads) < 1.5
