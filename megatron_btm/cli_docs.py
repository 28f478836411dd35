"""docs/CLI.md from the argparse parsers: the shared vocabulary and every option of every command.

    python -m megatron_btm.cli_docs          # rewrite docs/CLI.md
    python -m megatron_btm.cli_docs --check  # exit 1 if docs/CLI.md is stale (tests do this)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_btm import cli, cli_args

DOC = Path(__file__).resolve().parents[1] / "docs" / "CLI.md"

# Commands not built from cli_args, left out of the document and of its test: none.
NOT_CONVERTED: tuple[str, ...] = ()

# The meaning of each shared option, whatever the command (cli_args builds all of them).
VOCABULARY = {
    "--forest": "a forest folder (forest.json, seed/, experts/)",
    "--data": "a preprocessed data folder (`btm preprocess` output: tokenizer.json, "
              "<domain>/<split>.bin/.idx)",
    "--corpus": "a folder of <domain>/<split>.jsonl",
    "--output": "what the command writes (a folder or a JSON file: see the command)",
    "--domains": "domains, a comma-separated list (no empty items, no duplicates)",
    "--domain": "one domain",
    "--config": "a training YAML (a `train:` section is used when present)",
    "--set": "KEY=VALUE override of the config (YAML value; 3e-4 is a number), repeatable",
    "--checkpoint": "a checkpoint folder; where several are taken: repeat it or give a comma list",
    "--json": "print the result as JSON on stdout",
    "--no-progress": "hide the progress bars",
}


def _escape(text: str) -> str:
    """One line, safe in a Markdown table cell (`|` and `<tag>`-like text escaped)."""
    text = " ".join(str(text).split())
    return text.replace("|", "\\|").replace("<", "\\<").replace(">", "\\>")


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(`btm <command> [<action>]`, parser) for every converted command and sub-action."""
    out = []
    for name in cli.COMMANDS:
        if name in NOT_CONVERTED:
            continue
        top = cli.build_parser(name)
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        stack = [(name, sub.choices[name])]
        while stack:
            label, p = stack.pop(0)
            out.append((label, p))
            for a in p._actions:
                if isinstance(a, argparse._SubParsersAction):
                    stack += [(f"{label} {n}", sp) for n, sp in a.choices.items()]
    return out


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The optional arguments of one parser (not -h, not positionals, not sub-commands)."""
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def _row(a: argparse.Action) -> str:
    default = a.default
    shown = "" if default in (None, False, [], argparse.SUPPRESS) or a.required \
        else f" (default: {','.join(map(str, default)) if isinstance(default, list) else default})"
    req = " **required**" if a.required else ""
    flags = ", ".join(f"`{s}`" for s in a.option_strings)
    return f"| {flags} | {_escape((a.help or '') + shown)}{req} |"


def render() -> str:
    parsers = _parsers()
    users: dict[str, list[str]] = {}
    for label, p in parsers:
        for a in options(p):
            for s in a.option_strings:
                users.setdefault(s, [])
                if label not in users[s]:
                    users[s].append(label)
    lines = ["# `btm` command line", "",
             "Generated from the parsers by `python -m megatron_btm.cli_docs`; a test fails when "
             "this file is stale. `btm --debug COMMAND ...` (or BTM_DEBUG=1) prints the traceback "
             "of an error; otherwise an error is one line on stderr and the exit status is 2 "
             "(bad input), 3 (a run that failed: NaN loss, failed job) or 130 (Ctrl-C).", "",
             "Not listed yet (their options are not built from `megatron_btm/cli_args.py`): "
             + ", ".join(f"`btm {n}`" for n in NOT_CONVERTED) + ".", "",
             "## Shared vocabulary", "", "| option | meaning | commands |", "|---|---|---|"]
    for flag, meaning in VOCABULARY.items():
        cmds = ", ".join(f"`{c}`" for c in users.get(flag, []))
        lines.append(f"| `{flag}` | {_escape(meaning)} | {cmds} |")
    lines += ["", "Old spellings still accepted, with a warning on stderr:", "",
              "| command | old | use |", "|---|---|---|"]
    lines += [f"| `{cmd}` | `{old}` | `{new}` |" for cmd, table in cli_args.DEPRECATED.items()
              for old, new in table.items()]
    for label, p in parsers:
        opts = options(p)
        if not opts:
            continue
        lines += ["", f"## btm {label}", "", _escape(p.description.strip().splitlines()[0])
                  if p.description else "", "", "| option | meaning |", "|---|---|"]
        lines += [_row(a) for a in opts]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    text = render()
    if check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is stale: run python -m megatron_btm.cli_docs", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
