"""One `btm` vocabulary: every converted command spells the shared options the same way (read
from its argparse parser), and docs/CLI.md lists every option of every command."""
from __future__ import annotations

import argparse

import pytest

from megatron_btm import cli, cli_args, cli_docs

EXCLUDED: set[str] = set()   # every command speaks the shared vocabulary
RETIRED = ["--root", "--corpus-dir", "--output-dir", "--init-from", "--checkpoints",
           "--average-checkpoint", "--seed-checkpoint", "--corpus_dir", "--output_dir"]

PARSERS = cli_docs._parsers()


def test_exclusions_are_the_named_ones():
    assert set(cli_docs.NOT_CONVERTED) == EXCLUDED
    documented = {label.split()[0] for label, _ in PARSERS}
    assert documented == set(cli.COMMANDS) - EXCLUDED


@pytest.mark.parametrize("label, parser", PARSERS, ids=[label for label, _ in PARSERS])
def test_no_retired_spelling_and_shared_options_built_alike(label, parser):
    flags = {s for a in cli_docs.options(parser) for s in a.option_strings}
    assert not flags & set(RETIRED), f"btm {label}: retired spelling {sorted(flags & set(RETIRED))}"
    for a in cli_docs.options(parser):
        flag = a.option_strings[0]
        assert a.help, f"btm {label} {flag}: no help"
        if flag == "--domains":  # a comma list, parsed once
            assert getattr(a.type, "__name__", "") == "comma list", f"btm {label} --domains"
        if flag in ("--forest", "--data", "--corpus"):
            assert a.metavar == {"--forest": "ROOT"}.get(flag, "DIR"), f"btm {label} {flag}"
        if flag == "--checkpoint":  # one folder, or a repeatable comma list into args.checkpoints
            assert (a.dest, a.nargs) in (("checkpoint", None), ("checkpoints", "+")), label
            if a.nargs == "+":
                assert isinstance(a, cli_args.ExtendUnique)
        if flag in ("--json", "--no-progress"):
            assert isinstance(a, argparse._StoreTrueAction), f"btm {label} {flag}: a switch"


def test_deprecated_spellings_map_to_current_ones():
    current = {s for _, p in PARSERS for a in cli_docs.options(p) for s in a.option_strings}
    for command, table in cli_args.DEPRECATED.items():
        assert command in cli.COMMANDS
        for old, new in table.items():
            assert old in RETIRED and new in current


def test_docs_cli_md_is_current_and_lists_every_option():
    text = cli_docs.DOC.read_text(encoding="utf-8")
    assert text == cli_docs.render(), "docs/CLI.md is stale: run python -m megatron_btm.cli_docs"
    sections = {s.split("\n", 1)[0]: s for s in text.split("\n## btm ")[1:]}
    for label, parser in PARSERS:
        opts = cli_docs.options(parser)
        if not opts:
            continue
        assert label in sections, f"docs/CLI.md: no section for btm {label}"
        for a in opts:
            assert f"`{a.option_strings[0]}`" in sections[label], f"btm {label} {a.option_strings[0]}"
    for flag in cli_docs.VOCABULARY:
        assert f"| `{flag}` |" in text


def _readme_commands() -> list[list[str]]:
    import shlex
    text = (cli_docs.DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    block = text.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True)[1:]
            for line in block.replace("\\\n", " ").splitlines() if line.startswith("btm ")]


def test_readme_using_it_commands_parse():
    commands = _readme_commands()
    assert [c[0] for c in commands][:3] == ["preprocess", "train-seed", "merge"]
    for argv in commands:
        parser = cli.build_parser(argv[0])
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"README: `btm {' '.join(argv)}` does not parse (exit {e.code})")
    prior = next(c for c in commands if c[0] == "prior")
    evaluated = next(c for c in commands if c[0] == "eval")
    domains = lambda argv: set(argv[argv.index("--domains") + 1].split(","))  # noqa: E731
    assert domains(evaluated) <= domains(prior), "btm eval --priors needs every domain's prior"
