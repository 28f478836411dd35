"""Bad input across every command: each exits 2 with ONE line on stderr that names the input,
never a traceback, and leaves no output behind. (Faults — SIGINT, NaN loss, failed nodes — are
in test_cli_errors.py, tests/pipeline/test_fault_injection.py and the integrity tests.)"""
from __future__ import annotations

import pytest

from megatron_btm import cli

PLAN = ("name: p\nrun_dir: run\ndata_dir: nodata\ntrain: {steps: 2}\n"
        "seed: {domains: [a], steps: 1}\ncycles: [{domains: [b]}]\n")

# (argv, a piece of the message that names the input or the rule, paths that must not appear)
CASES = [
    ("preprocess --corpus /nonexistent --output o", "/nonexistent: corpus folder not found", ["o"]),
    ("preprocess --corpus corpus --output o --vocab-size 10", "vocab_size=10: must be >= 257", ["o"]),
    ("preprocess --corpus corpus --output o --domains zz", "corpus/zz: domain folder not found", ["o"]),
    ("preprocess --corpus corpus --output o --splits nope", "nope", ["o"]),
    ("train-seed --data /nonexistent --domains a --output s", "/nonexistent/tokenizer.json", ["s"]),
    ("train-seed --data . --domains a --output s --set steps=ten", "steps='ten': expected an integer", ["s"]),
    ("train-seed --data . --domains a --output s --set optim.lr=fast", "lr='fast': expected a number", ["s"]),
    ("train-seed --data . --domains a --output s --set tensorboard=maybe", "tensorboard='maybe'", ["s"]),
    ("train-seed --data . --domains a --output s --set nokey=1", "nokey", ["s"]),
    ("train-seed --data . --domains a --output s --set steps", "--set 'steps': expected KEY=VALUE", ["s"]),
    ("train-seed --config missing.yaml --data . --domains a --output s", "missing.yaml: config file not found", ["s"]),
    ("train-seed --config bad.yaml --data . --domains a --output s", "bad.yaml: line 2, column 1", ["s"]),
    ("train-seed --data . --domains a --output s --set model.hidden_size=-1", "model.hidden_size=-1", ["s"]),
    ("train-seed --data . --domains , --output s", "--domains=',': empty list", ["s"]),
    ("train-seed --data . --domains a,a --output s", "--domains", ["s"]),
    ("train-seed --data . --domains a --output s --weights 1,2", "--weights", ["s"]),
    ("train-expert --data . --domain a/b --output e", "domain 'a/b' is not allowed", ["e"]),
    ("train-expert --data . --domain a --output e --resume sometimes", "--resume", ["e"]),
    ("forest ls --forest /nonexistent", "/nonexistent/forest.json: no forest here", []),
    ("forest verify --forest /nonexistent", "/nonexistent/forest.json: no forest here", []),
    ("branch --forest /nonexistent --data . --domains a --output b", "/nonexistent/forest.json", ["b"]),
    ("branch --forest /nonexistent --data . --domains a --output b --policy best", "--policy", ["b"]),
    ("merge --forest f --run /nonexistent", "/nonexistent/stage.json: not found", ["f"]),
    ("merge --forest f --seed --run a --run b", "--seed takes exactly one --run", ["f"]),
    ("cycle --forest /nonexistent --data . --domains a --output c", "/nonexistent/forest.json", ["c"]),
    ("average --checkpoint /nonexistent --output avg", "/nonexistent: no checkpoint here", ["avg"]),
    ("average --checkpoint a,b --weights x,y --output avg", "'x' is not a number", ["avg"]),
    ("prior --forest /nonexistent --data . --domains a --output pr", "/nonexistent/forest.json", ["pr"]),
    ("eval --forest /nonexistent --data . --domains a --output ev.json", "/nonexistent/forest.json", ["ev.json"]),
    ("eval --forest /nonexistent --data . --domains a --topk x --output ev.json", "--topk='x'", ["ev.json"]),
    ("generate --forest /nonexistent --tokenizer t.json --prompt hi", "t.json: tokenizer file not found", []),
    ("export-hf --checkpoint /nonexistent --tokenizer t.json --output hf", "/nonexistent: no checkpoint here", ["hf"]),
    ("export-hf --checkpoint /nonexistent --tokenizer t.json --output hf --dtype fp8", "--dtype", ["hf"]),
    ("import-hf /nonexistent --output imp", "/nonexistent: Hugging Face model folder not found", ["imp"]),
    ("run missing.yaml", "missing.yaml: plan file not found", ["run"]),
    ("run bad.yaml", "bad.yaml: line 2, column 1", ["run"]),
    ("run plan2.yaml", "plan key 'cluster': unknown key(s) ['partiton']", ["run"]),
    ("run plan.yaml", "plan key 'data_dir'", ["run"]),
    ("run plan.yaml --executor slurm --dry-run", "plan key 'data_dir'", ["run"]),
    ("run plan.yaml --no-check", "--no-check: only with --dry-run", ["run"]),
    ("run plan.yaml --parallel 0", "--parallel 0: must be >= 1", ["run"]),
    ("run plan.yaml --executor k8s", "--executor", ["run"]),
    ("status missing.yaml", "missing.yaml: plan file not found", []),
    ("resume plan.yaml", "nothing to resume in", ["run"]),
    ("node /nonexistent seed", "/nonexistent/graph/plan.json: no run here", []),
    ("plan cost missing.yaml", "missing.yaml: plan file not found", []),
    ("demo --corpus /nonexistent --output d", "--corpus /nonexistent: not a folder", ["d"]),
    ("experiment missing.yaml", "missing.yaml: plan file not found", []),
    ("cluster fit --corpus corpus --k 1 --output cl", "k=1: must be an integer from 2 to 128", ["cl"]),
    ("cluster assign --clusters /nonexistent --corpus corpus --output as", "/nonexistent: not a clusters folder", ["as"]),
    ("nosuchcommand", "unknown command 'nosuchcommand'", []),
    ("run", "the following arguments are required: plan", []),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "corpus" / "a").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (tmp_path / "corpus" / "a" / f"{split}.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    (tmp_path / "plan.yaml").write_text(PLAN)
    (tmp_path / "plan2.yaml").write_text(PLAN + "cluster: {partiton: x}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, names, outputs", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workdir, capsys, argv, names, outputs):
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    assert cli.main(argv.split()) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and names in lines[0], err
    assert lines[0].startswith("btm")
    for out in outputs:
        assert not (workdir / out).exists(), f"{argv}: left {out} behind"
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before, argv
