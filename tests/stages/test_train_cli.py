"""`btm train-seed` / `train-expert` / `branch` / `merge`: the shared vocabulary and one-line errors
(argument and config errors only: nothing is trained here)."""
import pytest

from megatron_btm import cli


def _main(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("extra, message", [
    (["--weights", "1"], "--weights: 1 values for 2 --domains"),
    (["--set", "steps=ten"], "config: steps='ten': expected an integer"),
    (["--set", "optim.lr=fast"], "optim: lr='fast': expected a number"),
    (["--set", "recompute=maybe"], "config: recompute='maybe': expected true or false"),
])
def test_train_seed_errors_are_one_line(tmp_path, capsys, extra, message):
    rc, _, err = _main(capsys, "train-seed", "--data", tmp_path, "--output", tmp_path / "o",
                       "--domains", "a,b", *extra)
    assert rc == 2
    assert err == f"btm train-seed: error: {message}\n"


def test_weights_are_a_comma_list_of_numbers(tmp_path, capsys):
    assert cli.main(["train-seed", "--data", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--domains", "a,b", "--weights", "0.5,heavy"]) == 2
    assert "argument --weights: --weights='0.5,heavy': 'heavy' is not a number" in \
        capsys.readouterr().err


def test_yaml_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\n  lr: 1\n")
    rc, _, err = _main(capsys, "train-expert", "--config", bad, "--data", tmp_path, "--output",
                       tmp_path / "o", "--domain", "legal")
    assert rc == 2
    assert err.startswith(f"btm train-expert: error: {bad}: line 2, column ") and err.count("\n") == 1


def test_init_from_is_a_deprecated_spelling_of_checkpoint(tmp_path, capsys):
    parser = cli.build_parser("train-expert")
    argv = cli.cli_args.rewrite_deprecated("train-expert", ["train-expert", "--init-from", "b/x"])
    args = parser.parse_args(argv + ["--data", "d", "--output", "o", "--domain", "x"])
    assert args.checkpoint == "b/x"
    assert "--init-from is deprecated; use --checkpoint" in capsys.readouterr().err


def test_merge_runs_repeat_or_comma_list():
    parser = cli.build_parser("merge")
    args = parser.parse_args(["merge", "--forest", "f", "--run", "r1,r2", "--run", "r3", "r4"])
    assert args.runs == ["r1", "r2", "r3", "r4"]
    with pytest.raises(SystemExit):
        parser.parse_args(["merge", "--forest", "f", "--run", "r1", "--run", "r1"])
