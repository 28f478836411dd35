import os
from pathlib import Path

import pytest

# Keep tests offline and quiet; W&B runs offline when a test enables it.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _corpora_root() -> Path:
    """The real corpora: $BTM_CORPORA, else shared/corpora next to or inside the checkout."""
    if os.environ.get("BTM_CORPORA"):
        return Path(os.environ["BTM_CORPORA"])
    for candidate in (REPO.parent / "shared" / "corpora", REPO / "shared" / "corpora"):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "corpora"


@pytest.fixture(scope="session")
def corpora_root() -> Path:
    """Where the real corpora are looked for (may not exist: for tests with a fallback)."""
    return _corpora_root()


@pytest.fixture(scope="session")
def corpora(corpora_root) -> Path:
    """The real corpora (<domain>/{train,valid,test}.jsonl). Missing: skip, but fail under CI=true
    (CI must not pass by skipping the tests that read real text)."""
    if not corpora_root.is_dir():
        why = f"real corpora not found at {corpora_root} (set BTM_CORPORA)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{why}; CI=true needs them")
        pytest.skip(why)
    return corpora_root


@pytest.hookimpl(tryfirst=True)   # before xdist's hook, which turns the groups into node ids
def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (selected alone by `pytest -m gpu`) skip where CUDA is absent.

    Under pytest-xdist (`--dist loadgroup`, as tools/run_tests.sh runs it) a test file is one
    group, so its module fixtures are built once, and every `slurm` test is in one group: they
    share the local cluster's 16 nodes and some need all of them free. That group, the
    longest, is collected first."""
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
    # the slurm group is the longest one: first, so the other worker runs everything else beside it
    items.sort(key=lambda item: not item.get_closest_marker("slurm"))
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)
