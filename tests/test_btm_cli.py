"""`btm`: every command is listed and has --help; unknown commands list the valid ones."""
import subprocess
import sys

import pytest

from megatron_btm import cli


def run(*args):
    return subprocess.run([sys.executable, "-m", "megatron_btm.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_every_command_without_importing_megatron():
    proc = subprocess.run([sys.executable, "-c",
                           "import sys; from megatron_btm import cli; cli.build_parser(); "
                           "print(sorted(m for m in sys.modules if m.startswith(('megatron.', 'torch'))))"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # command modules import heavy things inside run()
    out = run("--help").stdout
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_has_help(name):
    proc = run(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"usage: btm {name}" in proc.stdout


def test_unknown_command_names_valid_ones():
    proc = run("trian-seed")
    assert proc.returncode == 2
    assert "unknown command 'trian-seed'; valid commands: preprocess, train-seed" in proc.stderr
