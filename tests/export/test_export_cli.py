"""`btm export-hf` / tools/export_hf.py: forest experts with their lineage, and bad input."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_btm.export import cli, export_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _run(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def forest(trained, tmp_path_factory):
    """A forest: seed = the tied model, expert legal-c1 (cycle 1, from the seed) = the untied
    model, expert legal-c2 (cycle 2, 0.75·legal-c1 + 0.25·seed) = the tied model again."""
    from megatron_btm.forest import Forest
    root = tmp_path_factory.mktemp("forest") / "f"
    f = Forest.create(root, seed_checkpoint=trained["tied"]["checkpoint"], seed_meta={"steps": 4})
    f.add_expert("legal-c1", domain="legal", checkpoint_dir=trained["untied"]["checkpoint"],
                 parents=[("seed", 1.0)], cycle=1, steps=4, tokens=512, config={})
    f.add_expert("legal-c2", domain="legal", checkpoint_dir=trained["tied"]["checkpoint"],
                 parents=[("legal-c1", 0.75), ("seed", 0.25)], cycle=2, steps=4, tokens=512,
                 config={})
    return root


def test_forest_expert_export_has_logits_domain_and_lineage(forest, trained, tokenizer_path,
                                                           tmp_path, capsys):
    from transformers import GPT2LMHeadModel
    out = tmp_path / "hf"
    assert _run("--forest", forest, "--expert", "legal-c2", "--tokenizer", tokenizer_path,
                "--output", out) == 0
    assert str(out) in capsys.readouterr().out
    ref = trained["tied"]
    model = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(ref["tokens"]).logits
    torch.testing.assert_close(got, ref["logits"][..., :got.shape[-1]], atol=1e-4, rtol=0)
    readme = (out / "README.md").read_text()
    assert "expert `legal-c2` (legal)" in readme and "cycle: 2" in readme
    assert "legal-c1 (0.75), seed (0.25)" in readme
    # lineage as an indented tree: legal-c1's own parent (the seed) one level deeper
    assert "legal-c1 (0.75)\n  seed (1)\nseed (0.25)" in readme
    info = json.loads((out / "btm_export.json").read_text())
    assert info["expert_id"] == "legal-c2" and info["domain"] == "legal"
    assert info["lineage"] == [["legal-c1", 0.75, 1], ["seed", 1.0, 2], ["seed", 0.25, 1]]


def test_unknown_expert_is_named(forest, tokenizer_path, tmp_path):
    with pytest.raises(ValueError, match="nope-c1"):
        _run("--forest", forest, "--expert", "nope-c1", "--tokenizer", tokenizer_path,
             "--output", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_forest_without_expert_and_expert_without_forest(forest, trained, tokenizer_path, tmp_path):
    with pytest.raises(ValueError, match="--forest needs --expert"):
        _run("--forest", forest, "--tokenizer", tokenizer_path, "--output", tmp_path / "a")
    with pytest.raises(ValueError, match="--expert is only valid with --forest"):
        _run("--checkpoint", trained["tied"]["checkpoint"], "--expert", "x", "--tokenizer",
             tokenizer_path, "--output", tmp_path / "b")
    with pytest.raises(SystemExit):  # argparse: not both sources
        _run("--checkpoint", "c", "--forest", "f", "--tokenizer", "t", "--output", "o")


def test_missing_tokenizer(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer.json"):
        export_checkpoint(trained["tied"]["checkpoint"], tokenizer=tmp_path / "no_such_tokenizer.json",
                          output=tmp_path / "hf")


def test_tokenizer_larger_than_model_vocab(trained, tokenizer_path, tmp_path):
    # the same weights, but meta.json claiming a 260-token vocabulary (< the tokenizer's 300)
    ckpt = tmp_path / "small"
    shutil.copytree(trained["tied"]["checkpoint"], ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model_config"]["vocab_size"] = 260
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"vocabulary of 300 tokens is larger than the model's "
                                         r"vocab_size=260"):
        export_checkpoint(ckpt, tokenizer=tokenizer_path, output=tmp_path / "hf")


def test_non_empty_output_is_refused_and_kept(trained, tokenizer_path, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(trained["tied"]["checkpoint"], tokenizer=tokenizer_path, output=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is accepted
    export_checkpoint(trained["tied"]["checkpoint"], tokenizer=tokenizer_path, output=empty)
    assert (empty / "model.safetensors").is_file()


def test_not_a_checkpoint(tokenizer_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        export_checkpoint(tmp_path, tokenizer=tokenizer_path, output=tmp_path / "hf")


def test_bad_dtype():
    from megatron_btm.export import ExportConfig
    with pytest.raises(ValueError, match=r"dtype='fp8'.*valid values"):
        ExportConfig(dtype="fp8")


def test_tools_wrapper_runs_as_a_script(trained, tokenizer_path, tmp_path):
    """tools/export_hf.py in a fresh interpreter: exports, and reports bad input with exit 2."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ok = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), "--checkpoint",
                         str(Path(trained["tied"]["checkpoint"]).parent.parent),  # a run folder
                         "--tokenizer", str(tokenizer_path), "--output", str(tmp_path / "hf"),
                         "--dtype", "fp16"], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float16"
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), "--checkpoint",
                          str(tmp_path / "missing"), "--tokenizer", str(tokenizer_path),
                          "--output", str(tmp_path / "hf2")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "missing: no checkpoint here" in bad.stderr


def test_btm_cli_contract(trained, tokenizer_path, tmp_path, monkeypatch, capsys):
    """Through `btm` itself (cli.main): help text, success, and a user error → exit 2."""
    from megatron_btm import cli as btm
    monkeypatch.setitem(btm.COMMANDS, "export-hf", "megatron_btm.export.cli")
    assert btm.main(["export-hf", "--help"]) == 0
    assert "--keep-padded-vocab" in capsys.readouterr().out
    assert btm.main(["export-hf", "--checkpoint", trained["tied"]["checkpoint"], "--tokenizer",
                     str(tokenizer_path), "--output", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    capsys.readouterr()
    assert btm.main(["export-hf", "--checkpoint", trained["tied"]["checkpoint"], "--tokenizer",
                     str(tokenizer_path), "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "btm export-hf: error:" in err and "not empty" in err
