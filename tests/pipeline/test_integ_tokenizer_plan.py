"""The plan's data check refuses data of another tokenizer up front (before anything trains):
`btm cycle` against the forest's tokenizer, `btm run --dry-run` against the forest it extends
and against the data's own report. Data: two tiny preprocessings with another BPE of the same
vocabulary size; the forest is created from a stand-in checkpoint (nothing is trained)."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from megatron_btm import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integrity_helpers import btm_err, corpus_slice  # noqa: E402

pytestmark = pytest.mark.slow  # two preprocessings, ~2 min on 2 loaded cores

PICO = {"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                  "seq_length": 32, "vocab_size": 320}, "steps": 2}


@pytest.fixture(scope="module")
def world(corpora, tmp_path_factory):
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess
    from megatron_btm.forest import Forest
    root = tmp_path_factory.mktemp("integ_tok")
    for name, sources in (("A", {"bible": "bible", "legal": "legal"}),
                          ("B", {"bible": "code_c", "legal": "code_python"})):
        preprocess(PreprocessConfig(corpus_dir=str(corpus_slice(corpora, root / f"corpus{name}", sources, 20)),
                                    output_dir=str(root / f"data{name}"), vocab_size=300,
                                    workers=1, progress=False))
    sha = json.loads((root / "dataA" / "report.json").read_text())["tokenizer"]["sha256"]
    ckpt = root / "ckpt"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"tokenizer_sha256": sha}))
    Forest.create(root / "forest", seed_checkpoint=ckpt,
                  seed_meta={"tokenizer": {"sha256": sha, "vocab_size": 300}})
    return root


def _err(capsys, *args) -> str:
    err = btm_err(capsys, *args)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "tokenizer mismatch" in err, err
    return err


def test_cycle_refuses_data_of_another_tokenizer_before_training(world, capsys):
    cfg = world / "pico.yaml"
    cfg.write_text(yaml.safe_dump(PICO))
    err = _err(capsys, "cycle", "--forest", world / "forest", "--data", world / "dataB",
               "--domains", "bible", "--output", world / "c1", "--config", cfg)
    assert str(world / "dataB" / "tokenizer.json") in err and "forest.json" in err, err
    a = json.loads((world / "dataA" / "report.json").read_text())["tokenizer"]["sha256"]
    b = json.loads((world / "dataB" / "report.json").read_text())["tokenizer"]["sha256"]
    assert a != b and a[:16] in err and b[:16] in err, err
    assert not (world / "c1" / "experts").exists()   # nothing trained


def _plan(world: Path, data: Path, name: str) -> Path:
    plan = {"name": "p", "run_dir": str(world / f"run-{name}"), "data_dir": str(data),
            "train": PICO, "forest": str(world / "forest"), "first_cycle": 1,
            "cycles": [{"domains": ["bible"]}]}
    path = world / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_run_dry_run_checks_the_forest_tokenizer(world, capsys):
    capsys.readouterr()
    assert cli.main(["run", str(_plan(world, world / "dataA", "ok")), "--dry-run"]) == 0, \
        capsys.readouterr().err
    err = _err(capsys, "run", _plan(world, world / "dataB", "bad"), "--dry-run")
    assert str(world / "dataB" / "tokenizer.json") in err and "forest.json" in err, err


def test_run_dry_run_checks_the_data_against_its_own_report(world, capsys):
    mixed = world / "mixed"   # dataA with dataB's tokenizer.json dropped in
    shutil.copytree(world / "dataA", mixed)
    shutil.copy(world / "dataB" / "tokenizer.json", mixed / "tokenizer.json")
    err = _err(capsys, "run", _plan(world, mixed, "mixed"), "--dry-run")
    assert str(mixed / "report.json") in err, err
