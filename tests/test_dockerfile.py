"""The Dockerfile, checked statically (no Docker engine here): pinned NGC base, no network
fetches besides pip, the package installed with csrc built, `btm` as the entrypoint, and a
build context that holds everything the Dockerfile copies."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)          # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_base_is_an_ngc_pytorch_image_pinned_by_tag():
    froms = [rest for op, rest in _instructions() if op == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", image), image  # not :latest


def test_no_network_fetch_other_than_pip():
    for op, rest in _instructions():
        assert op != "ADD" or not re.search(r"https?://", rest), f"ADD from a URL: {rest}"
        if op == "RUN":
            for cmd in rest.split("&&"):
                words = shlex.split(cmd)
                assert not words or words[0] not in ("curl", "wget", "git", "apt-get", "apt", "conda"), cmd
            assert "git+" not in rest and "http" not in rest, rest


def test_pip_keeps_the_base_torch_apex_and_te():
    runs = " ".join(rest for op, rest in _instructions() if op == "RUN")
    for pkg in ("torch", "apex", "transformer-engine", "transformer_engine"):
        assert not re.search(rf"pip install[^&]*\b{pkg}\b", runs), pkg
    assert "grep -vE '^(torch|" in runs            # the CPU torch pin is filtered out
    assert "PIP_CONSTRAINT=" not in runs            # the base's constraint stays in force


def test_installs_package_builds_csrc_and_entrypoint_is_btm():
    ins = _instructions()
    copies = [rest.split()[0] for op, rest in ins if op == "COPY"]
    assert {"requirements.txt", "setup.py", "csrc", "megatron_btm"} <= set(copies)
    runs = [rest for op, rest in ins if op == "RUN"]
    assert any("pip install --no-build-isolation" in r and " . " in r + " " for r in runs)
    ep = [rest for op, rest in ins if op == "ENTRYPOINT"]
    assert ep and json.loads(ep[-1]) == ["btm"]
    # setup.py declares the console script the entrypoint relies on
    assert "btm=megatron_btm.cli:main" in (REPO / "setup.py").read_text()


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for src in [rest.split()[0] for op, rest in _instructions() if op == "COPY"]:
        assert (REPO / src).exists(), src
        assert not any(fnmatch.fnmatch(src, p) for p in patterns), f"{src} is excluded by .dockerignore"
    assert ".venv" in patterns and ".git" in patterns
