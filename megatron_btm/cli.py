"""`btm`: the command line. Thin: parse, validate, call a library function.

Each command lives in its own module, imported only when that command runs (so `btm --help` does
not pay Megatron-Core's import). A command module provides:

    HELP = "one line for `btm --help`"
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int | None
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> module; the order is the order of `btm --help` (the BTM pipeline's order).
COMMANDS: dict[str, str] = {
    "preprocess": "megatron_btm.data.cli",
    "train-seed": "megatron_btm.stages.train_cli_seed",
    "train-expert": "megatron_btm.stages.train_cli_expert",
    "forest": "megatron_btm.forest.cli",
    "branch": "megatron_btm.stages.branch_cli",
    "merge": "megatron_btm.stages.merge_cli",
    "cycle": "megatron_btm.stages.cycle_cli",
    "average": "megatron_btm.averaging.cli",
    "prior": "megatron_btm.routing.cli",
    "cluster": "megatron_btm.cluster.cli",
    "eval": "megatron_btm.inference.eval_cli",
    "generate": "megatron_btm.inference.generate_cli",
    "export-hf": "megatron_btm.export.cli",
    "demo": "megatron_btm.demo",
    "launch": "megatron_btm.launch.cli",
    "plan": "megatron_btm.launch.plan_cli",
    "experiment": "megatron_btm.experiment.cli",
}


def _available() -> dict[str, str]:
    """Commands whose module exists in this installation."""
    import importlib.util
    out = {}
    for name, mod in COMMANDS.items():
        try:
            if importlib.util.find_spec(mod) is not None:
                out[name] = mod
        except ModuleNotFoundError:
            pass
    return out


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="btm", description="Branch-Train-Merge on Megatron-Core: train, merge and use an ELMForest.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod_name in _available().items():
        if command is not None and name != command:
            sub.add_parser(name)  # placeholder: keeps the list of choices complete
            continue
        mod = importlib.import_module(mod_name)
        p = sub.add_parser(name, help=getattr(mod, "HELP", None), description=mod.__doc__,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and not argv[0].startswith("-") else None
    if command is not None and command not in _available():
        known = ", ".join(_available())
        print(f"btm: unknown command {command!r}; valid commands: {known}", file=sys.stderr)
        return 2
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if command is None else 2
    try:
        rc = args._run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"btm {command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
