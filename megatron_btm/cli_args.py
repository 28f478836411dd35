"""The `btm` vocabulary: one helper per shared option, so every command spells it the same way.

    --forest ROOT        a forest folder (forest.json)          add_forest
    --data DIR           a preprocessed data folder              add_data
    --corpus DIR         a folder of <domain>/<split>.jsonl      add_corpus
    --output PATH        what the command writes                 add_output
    --domains a,b        domains, a comma list (parsed once)     add_domains / name_list
    --domain NAME        one domain                              add_domain
    --config + --set     a YAML config and KEY=VALUE overrides   add_config, add_set / load_train_config
    --checkpoint C       a checkpoint folder; where several are taken, repeat it or give a
                         comma list (`--checkpoint a,b --checkpoint c`)   add_checkpoint
    --json               print the result as JSON on stdout      add_json
    --no-progress        hide progress bars                      add_no_progress

Comma lists everywhere: `comma_list(...)` is the argparse type (empty items and duplicates are
refused). Old spellings still accepted, with a warning, are in DEPRECATED (cli.main rewrites
them before parsing); delete an entry once nothing passes the old spelling.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

# command -> {old option: new option}; rewritten by cli.main with a warning on stderr
DEPRECATED: dict[str, dict[str, str]] = {
    "preprocess": {"--corpus-dir": "--corpus", "--output-dir": "--output"},
    # the first release spelled it --init-from
    "train-expert": {"--init-from": "--checkpoint"},
    # the first release spelled it --checkpoints A B C
    "average": {"--checkpoints": "--checkpoint"},
}


def rewrite_deprecated(command: str | None, argv: list[str], warn=None) -> list[str]:
    """`argv` with the DEPRECATED spellings of `command` replaced (also `--old=value`)."""
    table = DEPRECATED.get(command or "", {})
    if not table:
        return argv
    out = []
    for arg in argv:
        if arg == "--":
            out += argv[len(out):]
            break
        flag, eq, value = arg.partition("=")
        if flag in table:
            print(f"btm {command}: warning: {flag} is deprecated; use {table[flag]}",
                  file=warn or sys.stderr)
            arg = table[flag] + eq + value
        out.append(arg)
    return out


# --- comma lists -----------------------------------------------------------------------------

def split_items(text: str, flag: str, *, unique: bool = True) -> list[str]:
    """'a,b,c' -> ['a', 'b', 'c']; refuses an empty list, empty items and (unique) duplicates."""
    items = [s.strip() for s in str(text).split(",")]
    if not any(items):
        raise ValueError(f"{flag}={text!r}: empty list; give comma-separated values, e.g. a,b")
    if not all(items):
        raise ValueError(f"{flag}={text!r}: empty item in the comma-separated list")
    if unique:
        dups = sorted({s for s in items if items.count(s) > 1})
        if dups:
            raise ValueError(f"{flag}={text!r}: {', '.join(dups)} given twice")
    return items


def name_list(text: str, flag: str = "--domains") -> list[str]:
    """A comma list of distinct names (domains, splits, modes)."""
    return split_items(text, flag)


def comma_list(flag: str, item: Callable[[str], Any] = str, *, unique: bool = True,
               what: str = "value"):
    """argparse `type=` for a comma list: each item converted by `item`; errors name the flag."""
    def parse(text: str) -> list[Any]:
        try:
            items = split_items(text, flag, unique=unique)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        out = []
        for s in items:
            try:
                out.append(item(s))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag}={text!r}: {s!r} is not {what}") from None
        return out
    parse.__name__ = "comma list"  # argparse names the type in its messages
    return parse


class ExtendUnique(argparse.Action):
    """Repeatable option whose values are comma lists: all items in one list, duplicates refused."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        for chunk in values:  # nargs="+" of comma lists: a list of lists
            for v in chunk:
                if v in items:
                    parser.error(f"argument {option_string}: {v} given twice")
                items.append(v)
        setattr(namespace, self.dest, items)


# --- the shared options ----------------------------------------------------------------------

def add_forest(p: argparse.ArgumentParser, *, required: bool = True,
               help: str = "forest folder (holds forest.json)", group=None) -> None:
    (group or p).add_argument("--forest", required=required and group is None, metavar="ROOT",
                              help=help)


def add_data(p: argparse.ArgumentParser, *, required: bool = True,
             help: str = "preprocessed data folder (from `btm preprocess`)") -> None:
    p.add_argument("--data", required=required, metavar="DIR", help=help)


def add_corpus(p: argparse.ArgumentParser, *, required: bool = True,
               help: str = "folder with one subfolder per domain holding <split>.jsonl") -> None:
    p.add_argument("--corpus", required=required, metavar="DIR", help=help)


def add_output(p: argparse.ArgumentParser, *, required: bool = True, help: str,
               metavar: str = "PATH", default: str | None = None) -> None:
    p.add_argument("--output", required=required and default is None, default=default,
                   metavar=metavar, help=help)


def add_domains(p: argparse.ArgumentParser, *, required: bool = True,
                help: str = "comma-separated domains, e.g. bible,legal", default=None) -> None:
    p.add_argument("--domains", required=required, default=default, metavar="A,B",
                   type=comma_list("--domains"), help=help)


def add_domain(p: argparse.ArgumentParser, *, required: bool = True, help: str = "one domain",
               default=None) -> None:
    p.add_argument("--domain", required=required, default=default, metavar="NAME", help=help)


def add_config(p: argparse.ArgumentParser, *,
               help: str = "training YAML (model, parallel, optim, steps, batch sizes, logging); a "
                           "`train:` section is used when present. Defaults apply without it",
               set_help: str | None = None) -> None:
    p.add_argument("--config", default=None, metavar="YAML", help=help)
    add_set(p, help=set_help)


def add_set(p: argparse.ArgumentParser, *, help: str | None = None) -> None:
    """`--set KEY=VALUE`, repeatable, into args.overrides (apply with utils.config.apply_overrides)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=help or "override a config value (YAML; 3e-4 is a number), e.g. "
                                "--set steps=200 --set model.num_layers=4")


def add_list_option(p: argparse.ArgumentParser, flag: str, *, dest: str, help: str,
                    metavar: str = "PATH", required: bool = False, group=None) -> None:
    """A repeatable option of comma lists: `FLAG a,b FLAG c` and `FLAG a b c` give [a, b, c]."""
    (group or p).add_argument(flag, dest=dest, nargs="+", action=ExtendUnique,
                              type=comma_list(flag, unique=False), metavar=metavar, default=None,
                              required=required and group is None,
                              help=help + " (repeatable; or a comma-separated list)")


def add_checkpoint(p: argparse.ArgumentParser, *, multiple: bool = False, required: bool = False,
                   help: str, metavar: str = "C", group=None) -> None:
    """`--checkpoint`: one folder (args.checkpoint), or with `multiple` a list (args.checkpoints)."""
    if multiple:
        add_list_option(p, "--checkpoint", dest="checkpoints", help=help, metavar=metavar,
                        required=required, group=group)
    else:
        (group or p).add_argument("--checkpoint", required=required and group is None,
                                  default=None, metavar=metavar, help=help)


def add_json(p: argparse.ArgumentParser, *, help: str = "print the result as JSON on stdout") -> None:
    p.add_argument("--json", action="store_true", help=help)


def add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def load_train_config(args: argparse.Namespace):
    """TrainConfig from --config and --set (and --no-progress where the command has it)."""
    from megatron_btm.training.config import TrainConfig
    overrides = list(args.overrides)
    if getattr(args, "no_progress", False):
        overrides.append("progress=false")
    return TrainConfig.from_yaml(args.config, overrides)
