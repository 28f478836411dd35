"""Helpers of the integrity tests (tests/test_integrity_*.py, tests/pipeline/test_integ_*.py):
a small slice of the shared corpora, and a CLI call that must fail as bad input."""
from __future__ import annotations

from pathlib import Path

from megatron_btm import cli


def corpus_slice(corpora: Path, dst: Path, sources: dict[str, str], rows: int) -> Path:
    """dst/<domain>/{train,valid,test}.jsonl: the first `rows` documents of corpora/<source>."""
    for domain, source in sources.items():
        (dst / domain).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            lines = (corpora / source / f"{split}.jsonl").read_text().splitlines()
            (dst / domain / f"{split}.jsonl").write_text("\n".join(lines[:rows]) + "\n")
    return dst


def btm_err(capsys, *args) -> str:
    """stderr of `btm ARGS` in-process, which must exit 2 (bad input)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    return err
