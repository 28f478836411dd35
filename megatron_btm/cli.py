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
import os
import sys
import traceback

from megatron_btm import cli_args

# name -> module; the order is the order of `btm --help` (the BTM pipeline's order).
COMMANDS: dict[str, str] = {
    "preprocess": "megatron_btm.data.cli",
    "train-seed": "megatron_btm.stages.train_cli_seed",
    "train-expert": "megatron_btm.stages.train_cli_expert",
    "train-moe": "megatron_btm.stages.train_cli_moe",
    "forest": "megatron_btm.forest.cli",
    "branch": "megatron_btm.stages.branch_cli",
    "merge": "megatron_btm.stages.merge_cli",
    "cycle": "megatron_btm.stages.cycle_cli",
    "run": "megatron_btm.pipeline.run_cli",
    "status": "megatron_btm.pipeline.status_cli",
    "resume": "megatron_btm.pipeline.resume_cli",
    "node": "megatron_btm.pipeline.node_cli",
    "average": "megatron_btm.averaging.cli",
    "merge-moe": "megatron_btm.moe.cli",
    "moe": "megatron_btm.moe.moe_cli",
    "prior": "megatron_btm.routing.cli",
    "cluster": "megatron_btm.cluster.cli",
    "eval": "megatron_btm.inference.eval_cli",
    "generate": "megatron_btm.inference.generate_cli",
    "import-hf": "megatron_btm.hf.cli",
    "export-hf": "megatron_btm.export.cli",
    "demo": "megatron_btm.demo",
    "plan": "megatron_btm.pipeline.plan_cli",
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


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (the usage is one `--help` away), exit 2, like every error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="btm", description="Branch-Train-Merge on Megatron-Core: train, merge and use an ELMForest.")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (also BTM_DEBUG=1); before COMMAND")
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
    """Run one command; user errors are one line on stderr (exit 2, 3 for a failed run, 130 for
    Ctrl-C). `--debug` before the command, or BTM_DEBUG=1, adds the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("BTM_DEBUG", "0") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    command = argv[0] if argv and not argv[0].startswith("-") else None
    if command is not None and command not in _available():
        known = ", ".join(_available())
        print(f"btm: unknown command {command!r}; valid commands: {known}", file=sys.stderr)
        return 2
    argv = cli_args.rewrite_deprecated(command, argv)
    try:
        parser = build_parser(command)
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse printed the usage and its error (or the --help)
            return e.code if isinstance(e.code, int) else 2
        if not getattr(args, "_run", None):
            parser.print_help()
            return 0 if command is None else 2
        return int(args._run(args) or 0)
    except (Exception, KeyboardInterrupt) as e:  # SystemExit (argparse, --help) passes through
        return _report(e, f"btm {command}" if command else "btm", debug)


def _report(exc: BaseException, prog: str, debug: bool) -> int:
    """Print `exc` as one line (after its traceback with --debug); return the exit status."""
    from megatron_btm import errors
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    code = errors.exit_code(exc)
    if isinstance(exc, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
    elif code is None:  # not a user error: most likely a bug; say how to see where
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print(f"{prog}: error: {type(exc).__name__}: {errors.one_line(exc)}{hint}", file=sys.stderr)
        code = 1
    else:
        print(f"{prog}: error: {errors.one_line(exc)}", file=sys.stderr)
    sys.stderr.flush()
    return code

if __name__ == "__main__":
    sys.exit(main())
