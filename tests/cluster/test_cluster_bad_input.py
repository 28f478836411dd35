"""Bad input to `btm cluster`: one line naming the input and the rule, exit status 2."""
import json
import shutil

import pytest

from megatron_btm import cli


def btm_error(capsys, *argv) -> str:
    assert cli.main(["cluster", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("btm cluster: error: "), err
    return err


def fit_args(corpus, out, k):
    return ["fit", "--corpus", str(corpus), "--output", str(out), "--k", str(k), "--min-df", "1"]


@pytest.mark.parametrize("k,match", [(1, "k=1: must be an integer from 2 to 128"),
                                     (129, "k=129: must be an integer from 2 to 128"),
                                     (6, "k=6: more clusters than documents (5 in")])
def test_bad_k(capsys, tmp_path, k, match):
    (tmp_path / "small" / "d").mkdir(parents=True)
    (tmp_path / "small" / "d" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"document number {i} words"}) + "\n" for i in range(5)))
    err = btm_error(capsys, *fit_args(tmp_path / "small", tmp_path / "c", k))
    assert match in err
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".tmp-*"))


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no domain folders with .jsonl files (an empty corpus)" in btm_error(
        capsys, *fit_args(tmp_path / "empty", tmp_path / "c", 2))
    (tmp_path / "blank" / "d").mkdir(parents=True)
    (tmp_path / "blank" / "d" / "train.jsonl").write_text('\n{"text": "  "}\n')
    assert "no documents in the train split of d (an empty corpus)" in btm_error(
        capsys, *fit_args(tmp_path / "blank", tmp_path / "c", 2))
    assert "corpus folder not found" in btm_error(
        capsys, *fit_args(tmp_path / "missing", tmp_path / "c", 2))


def test_bad_cluster_names(capsys, toy_corpus, tmp_path):
    err = btm_error(capsys, *fit_args(toy_corpus, tmp_path / "c", 3), "--names", "ok,a b,c")
    assert "cluster name 'a b' is not allowed: 1-128 characters" in err
    err = btm_error(capsys, *fit_args(toy_corpus, tmp_path / "c", 3), "--names", "x,y")
    assert "2 given for k=3" in err
    err = btm_error(capsys, *fit_args(toy_corpus, tmp_path / "c", 2), "--prefix=-c")
    assert "cluster name '-c0' is not allowed" in err


def edited_artefact(toy_clusters, tmp_path, **changes):
    bad = tmp_path / "edited"
    shutil.copytree(toy_clusters, bad)
    meta = json.loads((bad / "clusters.json").read_text())
    meta.update(changes)
    (bad / "clusters.json").write_text(json.dumps(meta))
    return bad


def assign_args(clusters, corpus, out):
    return ["assign", "--clusters", str(clusters), "--corpus", str(corpus), "--output", str(out)]


def test_artefact_of_another_version_or_with_bad_names(capsys, toy_clusters, toy_corpus, tmp_path):
    bad = edited_artefact(toy_clusters, tmp_path, version=2)
    err = btm_error(capsys, *assign_args(bad, toy_corpus, tmp_path / "o"))
    assert "format version 2, this code reads version 1" in err
    shutil.rmtree(bad)
    bad = edited_artefact(toy_clusters, tmp_path, names=["a", "../b", "c"])
    assert "cluster name '../b' is not allowed" in btm_error(
        capsys, *assign_args(bad, toy_corpus, tmp_path / "o"))
    shutil.rmtree(bad)
    bad = edited_artefact(toy_clusters, tmp_path, format="something-else")
    assert 'not a clusters file (expected "format": "btm-clusters")' in btm_error(
        capsys, *assign_args(bad, toy_corpus, tmp_path / "o"))
    assert "not a clusters folder" in btm_error(
        capsys, *assign_args(tmp_path / "nope", toy_corpus, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_assign_refuses_missing_split_and_existing_output(capsys, toy_clusters, toy_corpus, tmp_path):
    err = btm_error(capsys, *assign_args(toy_clusters, toy_corpus, tmp_path / "o"),
                    "--splits", "train,dev")
    assert "dev.jsonl: file not found" in err
    (tmp_path / "o").mkdir()
    assert "already exists (pass --overwrite" in btm_error(
        capsys, *assign_args(toy_clusters, toy_corpus, tmp_path / "o"))
    assert "must not be the corpus folder or inside it" in btm_error(
        capsys, *assign_args(toy_clusters, toy_corpus, toy_corpus / "out"))


def test_cluster_without_subcommand(capsys):
    assert cli.main(["cluster"]) == 2
    assert "give a subcommand: fit or assign" in capsys.readouterr().err
