"""report.md, results.json and plots from synthetic run records; the random-split corpus; CLI."""
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from experiment_helpers import TRAIN, plan_dict, units  # noqa: E402

from megatron_btm.experiment import report  # noqa: E402
from megatron_btm.experiment.plan import ExperimentPlan  # noqa: E402
from megatron_btm.experiment.units import random_split_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def row_of(text: str, first_cell: str, after: str) -> list[str]:
    """Cells of the first markdown row starting with `first_cell` after the heading `after`."""
    body = text[text.index(after):]
    for line in body.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells[1:]
    raise AssertionError(f"no row {first_cell!r} after {after!r}")


def test_render_tables_and_claims_follow_the_records():
    u = units(dense=(3.0, 3.02), ens=3.1)
    text, summary = report.render(u, plan_dict(), {"command": "btm experiment x.yaml", "torch": "T"})
    cells = row_of(text, "alpha", "## 1.")
    assert cells == [f"{math.exp(3.0):.2f}", f"{math.exp(3.02):.2f}", f"{math.exp(3.01):.2f}",
                     f"{math.exp(2.95):.2f}", f"{math.exp(3.1):.2f}"]
    assert row_of(text, "mean (novel)", "## 1.")[0] == f"{math.exp(3.0):.2f}"
    claim = row_of(text, "ELMForest ensemble (cached prior) beats the compute-matched dense model "
                         "on training domains", "## Claims")
    assert claim[0] == "did not hold"
    assert claim[1] == f"{math.exp(3.01 - 3.1) - 1:+.2%}"
    removal = row_of(text, "alpha (removed)", "## 6.")
    assert removal[2] == f"{math.exp(0.5) - 1:+.2%}"
    assert row_of(text, "delta", "## 5.")[-1] == "alpha 0.70, beta 0.30"
    assert "`btm experiment x.yaml`" in text and "- torch: T" in text
    assert [c["verdict"] for c in summary["claims"]][0] == "did not hold"


def test_header_and_compute_table_say_the_expert_batch():
    u = units()
    same, _ = report.render(u, plan_dict(), {})
    assert "Every run trains with 8 sequences per step" in same
    assert row_of(same, "btm-f0.50", "## Compute")[1] == "seed 8, experts 8"
    text, _ = report.render(u, plan_dict(expert_global_batch_size=1), {})
    assert "every expert with 1, so an expert sees its 1/n of the tokens in 8× as many steps" in text
    assert row_of(text, "dense-s1", "## Compute")[1] == "8"
    assert row_of(text, "btm-f0.50", "## Compute")[1] == "seed 8, experts 1"
    assert row_of(text, "btm-f0.00", "## Compute")[1] == "experts 1"   # random init: no seed
    assert row_of(text, "removal-alpha", "## Compute")[1] == "–"


def test_write_report_files(tmp_path):
    (tmp_path / "runs").mkdir()
    for name, rec in units().items():
        (tmp_path / "runs" / f"{name}.json").write_text(json.dumps(rec))
    summary = report.write_report(tmp_path, plan=plan_dict(), environment={"command": "c"})
    for f in ("report.md", "results.json", "ppl_by_domain.png", "seed_fraction.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert (tmp_path / "ppl_by_domain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["units"]) == set(units())
    assert saved["summary"]["claims"][0]["verdict"] == summary["claims"][0]["verdict"]


def test_random_split_deals_the_same_documents(tmp_path):
    corpus = tmp_path / "corpus"
    docs = {}
    for d, n in (("a", 7), ("b", 5), ("c", 9)):
        (corpus / d).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            lines = [json.dumps({"text": f"{d}-{split}-{i}"}) for i in range(n)]
            docs[(d, split)] = lines
            (corpus / d / f"{split}.jsonl").write_text("\n".join(lines) + "\n\n")
    plan = ExperimentPlan(name="r", corpus=str(corpus), train_domains=["a", "b", "c"],
                          total_tokens=10 ** 6, topk=[1], max_docs=6)
    names = random_split_corpus(plan, tmp_path / "out")
    assert names == ["random0", "random1", "random2"]
    for split in ("train", "valid"):
        got = Counter(l for n in names for l in (tmp_path / "out" / n / f"{split}.jsonl").read_text().splitlines())
        want = Counter(l for d in "abc" for l in docs[(d, split)][:6])  # max_docs per domain
        assert got == want
        sizes = [len((tmp_path / "out" / n / f"{split}.jsonl").read_text().splitlines()) for n in names]
        assert max(sizes) - min(sizes) <= 1
    first = (tmp_path / "out" / "random0" / "train.jsonl").read_text()
    random_split_corpus(plan, tmp_path / "again")
    assert (tmp_path / "again" / "random0" / "train.jsonl").read_text() == first  # seeded
    mixed = {json.loads(l)["text"][0] for l in first.splitlines()}
    assert len(mixed) > 1  # a pseudo-domain mixes real domains


def btm(capsys, *args):
    """`btm experiment ...` through cli.main, in process (the exit-code/stderr contract)."""
    from megatron_btm.cli import main
    rc = main(["experiment", *map(str, args)])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def test_cli_check_and_errors(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    for d in ("a", "b"):
        (corpus / d).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            (corpus / d / f"{split}.jsonl").write_text('{"text": "x"}\n')
    plan = tmp_path / "p.yaml"
    plan.write_text(f"name: p\ncorpus: {corpus}\ntrain_domains: [a, b]\ntotal_tokens: 40960\n"
                    "model: {num_layers: 2, hidden_size: 32, num_attention_heads: 4, seq_length: 64}\n"
                    "topk: [1, 2]\n")
    ok = btm(capsys, plan, "--check")
    assert ok.returncode == 0, ok.stderr
    assert "seed fraction 50%: seed 40 steps, 20 per expert, dense 80" in ok.stdout
    bad = btm(capsys, plan, "--check", "--set", "topk=[1,3]")
    assert bad.returncode == 2 and "topk: k=3 > number of experts (2 train_domains)" in bad.stderr
    bad = btm(capsys, plan, "--check", "--set", "novel_domains=[c]")
    assert bad.returncode == 2 and "novel_domains: domain 'c' not found in corpus" in bad.stderr
    bad = btm(capsys, plan, "--check", "--corpus", tmp_path / "none")
    assert bad.returncode == 2 and "corpus:" in bad.stderr and "is not a folder" in bad.stderr


def test_publish_copies_the_report_not_the_checkpoints(tmp_path):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "work" / "forest").mkdir(parents=True)
    (out / "work" / "forest" / "big.distcp").write_bytes(b"x" * 100)
    with pytest.raises(FileNotFoundError, match="no report to publish"):
        report.publish(out, tmp_path / "pub")
    for name, rec in units().items():
        (out / "runs" / f"{name}.json").write_text(json.dumps(rec))
    report.write_report(out, plan=plan_dict(), environment={"command": "c"})
    copied = report.publish(out, tmp_path / "pub")
    got = sorted(str(p.relative_to(tmp_path / "pub")) for p in (tmp_path / "pub").rglob("*") if p.is_file())
    assert got == sorted(str(p.relative_to(tmp_path / "pub")) for p in copied)
    assert "report.md" in got and "runs/dense-s1.json" in got and "ppl_by_domain.png" in got
    assert not any("work" in g for g in got)
    assert (tmp_path / "pub" / "report.md").read_text() == (out / "report.md").read_text()


def test_render_a_plan_without_novel_domains_or_ablation():
    u = {k: v for k, v in units().items() if not k.startswith(("novel-", "random-"))}
    for rec in u.values():
        for d in list(rec["test"]):
            if d not in TRAIN:
                del rec["test"][d]
    text, summary = report.render(u, plan_dict(novel_domains=[], random_split=False), {})
    assert "## 5." not in text and "## 7." not in text and "mean (novel)" not in text
    assert not [c for c in summary["claims"] if c["claim"].startswith(("branching", "domain experts"))]
