"""`btm` error handling: each error is one line on stderr with its exit status; a traceback only
with --debug / BTM_DEBUG=1; Ctrl-C is exit 130 with one line."""
from __future__ import annotations

import importlib.machinery
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from megatron_btm import cli, errors

REPO = Path(__file__).resolve().parents[1]

RAISES = {
    "value": lambda: ValueError("--steps=ten: expected an integer"),
    "config": lambda: errors.ConfigError("optim.lr='fast': expected a float"),
    "missing": lambda: FileNotFoundError("--data /nope: not found"),
    "exists": lambda: errors.OutputExists("--output o: exists; pass --overwrite"),
    "permission": lambda: PermissionError(13, "Permission denied", "/srv/forest/forest.json"),
    "isadir": lambda: IsADirectoryError(21, "Is a directory", "/srv/prior.json"),
    "diverged": lambda: errors.DivergedError("loss is nan at step 7"),
    "job": lambda: errors.JobFailedError("expert legal exited 1; log runs/legal.log"),
    "timeout": lambda: TimeoutError("forest/.lock: could not lock the forest within 600 s"),
    "interrupt": lambda: KeyboardInterrupt(),
    "bug": lambda: RuntimeError("list index out of range\nsecond line"),
}


@pytest.fixture
def fake_command(monkeypatch):
    """A `btm fake --raise KIND` command that raises RAISES[KIND]."""
    mod = types.ModuleType("_btm_fake_cmd")
    mod.__spec__ = importlib.machinery.ModuleSpec("_btm_fake_cmd", None)
    mod.add_arguments = lambda p: p.add_argument("--raise", dest="kind", choices=RAISES)

    def run(args):
        raise RAISES[args.kind]()
    mod.run = run
    monkeypatch.setitem(sys.modules, "_btm_fake_cmd", mod)
    monkeypatch.setitem(cli.COMMANDS, "fake", "_btm_fake_cmd")
    monkeypatch.delenv("BTM_DEBUG", raising=False)


@pytest.mark.parametrize("kind, code, message", [
    ("value", 2, "--steps=ten: expected an integer"),
    ("config", 2, "optim.lr='fast': expected a float"),
    ("missing", 2, "--data /nope: not found"),
    ("exists", 2, "--output o: exists; pass --overwrite"),
    ("permission", 2, "/srv/forest/forest.json: Permission denied"),
    ("isadir", 2, "/srv/prior.json: Is a directory"),
    ("diverged", 3, "loss is nan at step 7"),
    ("job", 3, "expert legal exited 1; log runs/legal.log"),
    ("timeout", 3, "forest/.lock: could not lock the forest within 600 s"),
])
def test_user_errors_are_one_line_with_their_exit_status(fake_command, capsys, kind, code, message):
    assert cli.main(["fake", "--raise", kind]) == code
    out, err = capsys.readouterr()
    assert err == f"btm fake: error: {message}\n"
    assert out == ""


def test_interrupt_and_bug(fake_command, capsys):
    assert cli.main(["fake", "--raise", "interrupt"]) == 130
    assert capsys.readouterr().err == "btm fake: interrupted\n"
    assert cli.main(["fake", "--raise", "bug"]) == 1  # not a user error: type named, hint given
    assert capsys.readouterr().err == ("btm fake: error: RuntimeError: list index out of range "
                                       "second line (rerun with --debug for the traceback)\n")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_traceback_only_when_asked(fake_command, capsys, monkeypatch, how):
    argv = ["fake", "--raise", "config"]
    if how == "flag":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("BTM_DEBUG", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.endswith("btm fake: error: optim.lr='fast': expected a float\n")


def test_hierarchy_keeps_builtin_catches():
    for cls in (errors.ConfigError, errors.DataError, errors.TokenizerError, errors.ForestError,
                errors.CheckpointError):
        assert issubclass(cls, ValueError) and issubclass(cls, errors.BTMError)
    assert issubclass(errors.InputNotFound, FileNotFoundError)
    assert issubclass(errors.OutputExists, FileExistsError)
    assert errors.DivergedError("x").exit_code == errors.JobFailedError("x").exit_code == 3


def _holds_open(pid: int, path: Path) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd_dir / fd) == str(path) for fd in os.listdir(fd_dir))
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see the child wait")
def test_sigint_is_one_line_exit_130(tmp_path):
    """Ctrl-C while `btm forest rm` waits for the forest lock that this test holds."""
    sys.path.insert(0, str(REPO / "tests" / "forest"))
    from forest_testutil import make_checkpoint

    from megatron_btm.forest import Forest, ForestLock
    root = tmp_path / "forest"
    f = Forest.create(root, seed_checkpoint=make_checkpoint(tmp_path / "s", 0), seed_meta={})
    f.add_expert("e1", domain="legal", checkpoint_dir=make_checkpoint(tmp_path / "e", 1),
                 parents=[("seed", 1.0)], cycle=1, steps=1, tokens=1, config={})
    env = dict(os.environ, PYTHONPATH=str(REPO), BTM_DEBUG="0")
    with ForestLock(root):
        proc = subprocess.Popen([sys.executable, "-m", "megatron_btm.cli", "forest", "rm",
                                 "--forest", str(root), "e1", "--yes"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not _holds_open(proc.pid, root / ".lock"):  # it is inside main(), waiting
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "btm forest rm never reached the lock"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert err == "btm forest: interrupted\n"
    assert "Traceback" not in err
    assert Forest.open(root).get("e1").id == "e1"  # nothing removed
