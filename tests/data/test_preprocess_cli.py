"""`btm preprocess`: prints the report table; bad input → exit 2 with file and line."""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_btm import cli
from megatron_btm.data import cli as data_cli

REPO = Path(__file__).resolve().parents[2]


def _table_rows(out: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    rows = {}
    for m in re.finditer(r"^(\S+)\s+(train|valid|test)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)", out, re.M):
        rows[m.group(1), m.group(2)] = tuple(int(g.replace(",", "")) for g in m.group(3, 4, 5))
    return rows


def test_prints_report_table_matching_report_json(corpus_slice, tokenizer_path, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["preprocess", "--corpus", str(corpus_slice), "--output", str(out),
                   "--tokenizer", str(tokenizer_path), "--max-docs", "6", "--workers", "1",
                   "--splits", "train,valid", "--no-progress"])
    assert rc == 0
    printed = _table_rows(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    expected = {(d, s): (e["documents"], e["tokens"], e["skipped_lines"])
                for d, splits in report["domains"].items() for s, e in splits.items()}
    assert printed == expected and len(printed) == 4
    assert all(docs == 6 for docs, _, _ in printed.values())


def test_bad_line_exits_2_naming_file_and_line(tmp_path, tokenizer_path, capsys):
    (tmp_path / "c" / "d").mkdir(parents=True)
    f = tmp_path / "c" / "d" / "train.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "fine"}\n{"text": 3}\n')
    rc = cli.main(["preprocess", "--corpus", str(tmp_path / "c"), "--output",
                   str(tmp_path / "o"), "--tokenizer", str(tokenizer_path), "--splits", "train",
                   "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"btm preprocess: error: {f}: line 3: " in err and "--skip-bad-lines" in err


def test_every_option_has_help():
    p = argparse.ArgumentParser()
    data_cli.add_arguments(p)
    for action in p._actions:
        assert action.help, action.dest


@pytest.mark.slow
def test_acceptance_preprocess_bible_train(tmp_path, corpora):
    """Issue #2 acceptance: the whole bible train split; prints documents/tokens."""
    src = corpora / "bible" / "train.jsonl"
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"),
                           "--corpus", str(corpora), "--domains", "bible", "--splits", "train",
                           "--output", str(tmp_path / "bible"), "--vocab-size", "8192",
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout, f"wall {time.time() - t0:.1f} s")
    n_lines = sum(1 for line in open(src, "rb") if line.strip())
    docs, tokens, skipped = _table_rows(proc.stdout)["bible", "train"]
    assert docs == n_lines and skipped == 0
    assert tokens == (tmp_path / "bible" / "bible" / "train.bin").stat().st_size // 2


@pytest.mark.parametrize("domains, message", [
    ("bible,,novels", "--domains='bible,,novels': empty item"),
    ("bible,bible", "--domains='bible,bible': bible given twice"),
    (",", "--domains=',': empty list"),
])
def test_domain_lists_refuse_empty_items_and_duplicates(tmp_path, capsys, domains, message):
    assert cli.main(["preprocess", "--corpus", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--domains", domains]) == 2
    assert f"btm preprocess: error: argument --domains: {message}" in capsys.readouterr().err


def test_old_spellings_still_work_with_a_warning(corpus_slice, tokenizer_path, tmp_path, capsys):
    rc = cli.main(["preprocess", "--corpus-dir", str(corpus_slice), f"--output-dir={tmp_path / 'o'}",
                   "--tokenizer", str(tokenizer_path), "--max-docs", "2", "--workers", "1",
                   "--domains", "bible", "--splits", "train", "--no-progress"])
    assert rc == 0 and (tmp_path / "o" / "bible" / "train.idx").is_file()
    err = capsys.readouterr().err
    assert "btm preprocess: warning: --corpus-dir is deprecated; use --corpus" in err
    assert "--output-dir is deprecated; use --output" in err
