"""`assign`: a deterministic corpus folder by cluster that `btm preprocess` reads as is."""
import json

import numpy as np

from megatron_btm.cluster.artefact import load_clusters
from megatron_btm.cluster.assign import AssignConfig, assign_corpus
from megatron_btm.cluster.report import purity
from megatron_btm.data import jsonl
from megatron_btm.utils.io import sha256_tree


def test_assign_layout_report_and_determinism(toy_clusters, toy_corpus, tmp_path):
    cfg = dict(clusters=str(toy_clusters), corpus=str(toy_corpus), progress=False)
    report = assign_corpus(AssignConfig(output=str(tmp_path / "a"), **cfg))
    assign_corpus(AssignConfig(output=str(tmp_path / "b"), batch_size=7, **cfg))
    tree = sha256_tree(tmp_path / "a")
    assert tree == sha256_tree(tmp_path / "b")  # same bytes, whatever the batch size
    names = load_clusters(toy_clusters).names
    assert jsonl.list_domains(tmp_path / "a") == names
    assert {"report.json", "report.md", "heatmap.png"} <= set(tree)
    assert (tmp_path / "a" / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every document lands exactly once, with its provenance; the report counts what was written
    model = load_clusters(toy_clusters)
    for split in ("train", "valid", "test"):
        counts = np.zeros((3, 3), dtype=int)
        written = []
        for j, name in enumerate(names):
            for line in (tmp_path / "a" / name / f"{split}.jsonl").read_text().splitlines():
                doc = json.loads(line)
                counts[j, report["domains"].index(doc["source"])] += 1
                written.append(doc["text"])
                assert model.assign([doc["text"]])[0] == j  # its nearest centroid
        originals = [t for d in report["domains"]
                     for t in jsonl.iter_texts(toy_corpus / d / f"{split}.jsonl")]
        assert sorted(written) == sorted(originals)
        assert report["splits"][split]["counts"] == counts.tolist()
        assert report["splits"][split]["purity"] == purity(counts)
    assert report["purity"] == 1.0 and report["empty_splits"] == []
    assert json.loads((tmp_path / "a" / "report.json").read_text()) == report


def test_assigned_corpus_preprocesses(toy_clusters, toy_corpus, tmp_path):
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess
    out = tmp_path / "assigned"
    report = assign_corpus(AssignConfig(clusters=str(toy_clusters), corpus=str(toy_corpus),
                               output=str(out), progress=False))
    rep = preprocess(PreprocessConfig(corpus_dir=str(out), output_dir=str(tmp_path / "data"),
                                      vocab_size=300, min_frequency=1, workers=1, progress=False))
    got = {d: {s: st.documents for s, st in splits.items()} for d, splits in rep.splits.items()}
    want = {name: {s: report["splits"][s]["sizes"][name] for s in ("train", "valid", "test")}
            for name in report["clusters"]}
    assert got == want and sum(got[n]["train"] for n in got) == 180


def test_empty_split_is_reported(toy_clusters, toy_corpus, tmp_path):
    # a corpus with only "astro" documents: the two other clusters get no document
    corpus = tmp_path / "one"
    (corpus / "astro").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (corpus / "astro" / f"{split}.jsonl").write_bytes(
            (toy_corpus / "astro" / f"{split}.jsonl").read_bytes())
    report = assign_corpus(AssignConfig(clusters=str(toy_clusters), corpus=str(corpus),
                                        output=str(tmp_path / "o"), progress=False))
    assert report["purity"] is None  # one provenance: no purity
    assert len(report["empty_splits"]) == 6
    assert sorted(report["sizes"].values()) == [0, 0, 80]
