"""`btm demo --corpus DIR --domains ...` runs the whole pipeline and writes table, plots, report."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_on_a_corpus_subset(corpora, tmp_path):
    CORPORA = corpora
    corpus = tmp_path / "corpus"
    for d in ("bible", "code_c", "legal"):
        (corpus / d).mkdir(parents=True)
        for split, n in (("train", 40), ("valid", 6), ("test", 6)):
            lines = (CORPORA / d / f"{split}.jsonl").read_text().splitlines()[:n]
            (corpus / d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "megatron_btm.cli", "demo", "--corpus", str(corpus),
           "--domains", "bible,code_c", "--output", str(out), "--total-steps", "24",
           "--num-layers", "2", "--hidden-size", "32", "--seq-length", "32", "--vocab-size", "512",
           "--eval-blocks", "4", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["domains"] == ["bible", "code_c"]  # legal is in the corpus but not chosen
    assert sorted(results["experts"]) == ["bible", "code_c"]
    for d in ("bible", "code_c"):
        rows = results["table"][d]
        for row in ("dense (compute-matched)", "expert/bible", "expert/code_c", "uniform ensemble",
                    "cached-prior ensemble", "top-1 (cached prior)", "top-2 (cached prior)",
                    "uniform average", "posterior average"):
            assert rows[row]["ppl"] > 1.0 and rows[row]["tokens"] > 0, (d, row)
        # the cached prior of a domain is a distribution over the experts
        assert sum(results["priors"][d]) == pytest.approx(1.0, abs=1e-6)
    s = results["summary"]
    assert s["dense_tokens"] == s["seed_tokens"] + s["expert_tokens"]  # compute-matched
    for name in ("report.md", "ppl_by_domain.png", "posterior_heatmap.png"):
        assert (out / name).stat().st_size > 0
    assert "| cached-prior ensemble |" in (out / "report.md").read_text()
    # bad input: a domain the corpus does not have
    bad = subprocess.run(cmd[:6] + ["--domains", "bible,klingon", "--output", str(tmp_path / "bad")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "['klingon'] not in" in bad.stderr


def test_explanation_follows_the_table_and_eval_split_is_checked():
    from megatron_btm.demo import report
    from megatron_btm.demo.pipeline import DemoConfig

    def cell(ppl):
        import math
        return {"ppl": ppl, "nll": math.log(ppl), "tokens": 100}
    rows = lambda dense, ens, own, other: {  # noqa: E731
        report.DENSE: cell(dense), "expert/a": cell(own), "expert/b": cell(other),
        report.ENSEMBLE: cell(ens), report.UNIFORM_AVG: cell(90.0), report.POSTERIOR_AVG: cell(45.0)}
    table = {"a": rows(50.0, 40.0, 41.0, 80.0), "b": rows(50.0, 40.0, 42.0, 70.0)}
    text = report.explanation(table, ["a", "b"])
    assert "cached-prior ensemble beats dense (compute-matched) by 25.0%" in text
    assert "best expert on it in 1 of 2 domains" in text   # b's own expert (70) is not the best
    table["a"][report.ENSEMBLE] = cell(60.0)
    table["b"][report.ENSEMBLE] = cell(60.0)
    assert "ensemble trails dense" in report.explanation(table, ["a", "b"])
    with pytest.raises(ValueError, match="eval_split"):
        DemoConfig(eval_split="train")
