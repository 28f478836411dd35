"""The `corpora` fixture (tests/conftest.py): missing real corpora skip a test locally but fail
it under CI=true, so CI cannot pass by skipping every test that reads real text."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_probe(corpora):
    """Run on its own by the test below; in the suite, it checks the corpora are a folder of
    domains when present."""
    assert any(p.is_dir() for p in corpora.iterdir())


@pytest.mark.parametrize("ci, outcome", [("true", "1 error"), ("", "1 skipped")])
def test_missing_corpora_fail_under_ci_and_skip_otherwise(tmp_path, ci, outcome):
    env = dict(os.environ, BTM_CORPORA=str(tmp_path / "none"), CI=ci)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{Path(__file__).relative_to(REPO)}::test_probe"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert outcome in r.stdout, r.stdout[-2000:]
    if ci:
        assert "CI=true needs them" in r.stdout
