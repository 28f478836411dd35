"""`btm forest`: create, list, inspect, verify and prune an ELMForest registry.

Run `btm forest ACTION --help` for each action. Experts are added by the merge stage
(`btm merge`), which calls `Forest.add_expert`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from megatron_btm import cli_args

HELP = "inspect and edit an ELMForest registry: init, ls, show, rm, verify, recover"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        cli_args.add_forest(p)
        return p

    p = action("init", "create a forest from a trained seed LM checkpoint")
    cli_args.add_checkpoint(p, required=True,
                            help="checkpoint folder of the seed LM (copied into <forest>/seed/)")
    p.add_argument("--seed-meta", default=None,
                   help="JSON object, or a JSON file, describing the seed (steps, tokens, config); "
                        "default: the checkpoint's own meta.json if it has one")
    p.add_argument("--domains-mix", default=None,
                   help="JSON object {domain: weight}, or a JSON file: the seed's training mixture")
    p.add_argument("--move", action="store_true",
                   help="move the seed checkpoint in instead of copying it")
    p = action("ls", "list the experts (id, domain, cycle, parents, steps, tokens, created)")
    cli_args.add_json(p, help="print the records as JSON on stdout")
    p = action("show", "show one expert's record, lineage back to the seed, and descendants")
    p.add_argument("id", help="expert id ('seed' for the seed LM)")
    p = action("rm", "remove an expert (warns if other experts descend from it)")
    p.add_argument("id", help="expert id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = action("verify", "check checkpoint files against their recorded sha256, the lineage, "
               "the tokenizer, and report leftovers of killed writers")
    p.add_argument("id", nargs="?", default=None, help="one expert (default: seed and all experts)")
    action("recover", "remove the leftovers of killed merges (every merge does this anyway)")


def _json_arg(value: str | None, flag: str) -> dict | None:
    """A JSON object given inline or as a path to a .json file."""
    from megatron_btm.errors import ConfigError, InputNotFound
    if value is None:
        return None
    text, where = value, f"{flag}"
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise InputNotFound(f"{flag} {value}: neither a JSON object nor an existing file")
        text, where = path.read_text(encoding="utf-8"), f"{flag} file {path}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") \
            from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: must be a JSON object, got {type(obj).__name__}")
    return obj


def _parents(rec: Any) -> str:
    return ", ".join(f"{p}:{w:.3g}" for p, w in rec.parents) or "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def run(args: argparse.Namespace) -> int:
    from megatron_btm.forest import Forest
    return _ACTIONS[args.action](args, Forest)  # ForestLockTimeout: one line, exit 3 (cli.main)


def _init(args: argparse.Namespace, Forest: Any) -> int:
    meta = _json_arg(args.seed_meta, "--seed-meta")
    if meta is None:
        own = Path(args.checkpoint) / "meta.json"
        meta = _json_arg(str(own), "--seed-meta") if own.is_file() else {}
    forest = Forest.create(Path(args.forest), seed_checkpoint=Path(args.checkpoint), seed_meta=meta,
                           domains_mix=_json_arg(args.domains_mix, "--domains-mix"),
                           copy=not args.move)
    seed = forest.seed()
    print(f"created forest {forest.root} (seed checkpoint sha256 {seed.checkpoint_sha256[:12]}…)")
    return 0


def _ls(args: argparse.Namespace, Forest: Any) -> int:
    forest = Forest.open(Path(args.forest))
    exps = forest.experts()
    if args.json:
        print(json.dumps([r.to_dict() for r in exps], indent=2))
        return 0
    seed = forest.seed()
    print(f"forest {forest.root}: seed ({seed.steps} steps, {seed.tokens} tokens), "
          f"{len(exps)} expert(s), {len(forest.removed())} removed")
    if not exps:
        print("no experts yet (merge one with `btm merge`)")
        return 0
    rows = [["ID", "DOMAIN", "CYCLE", "PARENTS", "STEPS", "TOKENS", "CREATED"]]
    rows += [[r.id, r.domain, str(r.cycle), _parents(r), str(r.steps), str(r.tokens),
              r.created[:19]] for r in exps]
    print(_table(rows))
    return 0


def _show(args: argparse.Namespace, Forest: Any) -> int:
    from megatron_btm.forest.lineage import format_tree
    forest = Forest.open(Path(args.forest))
    rec = forest.get(args.id)
    meta_path = forest.root / rec.path / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    info = {k: v for k, v in rec.to_dict().items() if k not in ("config", "extra")}
    info["checkpoint_format"] = meta.get("checkpoint_format", "?")
    info["checkpoint_files"] = len(meta.get("files", {}))
    print(json.dumps(info, indent=2))
    if rec.config:
        print("config: " + json.dumps(rec.config, sort_keys=True))
    if rec.extra:
        print("extra: " + json.dumps(rec.extra, sort_keys=True))
    print("lineage:")
    print(format_tree(f"{rec.id} (cycle {rec.cycle}, {rec.domain})", forest.lineage(rec.id)))
    desc = forest.descendants(rec.id)
    print(f"descendants: {', '.join(desc) if desc else 'none'}")
    return 0


def _rm(args: argparse.Namespace, Forest: Any) -> int:
    from megatron_btm.errors import ForestError
    forest = Forest.open(Path(args.forest))
    forest.get(args.id)  # unknown id: error before any prompt
    if not args.yes:
        desc = forest.descendants(args.id)
        if not sys.stdin.isatty():
            raise ForestError(f"refusing to remove expert {args.id!r} without confirmation; "
                             "pass --yes")
        note = f" ({len(desc)} expert(s) descend from it: {', '.join(desc)})" if desc else ""
        if input(f"remove expert {args.id!r}{note}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("not removed")
            return 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forest.remove(args.id)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"removed expert {args.id!r} from {forest.root}")
    return 0


def _verify(args: argparse.Namespace, Forest: Any) -> int:
    from megatron_btm.errors import ForestError
    forest = Forest.open(Path(args.forest))
    for node in forest.verify(args.id):
        print(f"ok  {node}")
    left = forest.leftovers() if args.id is None else []
    if left:
        raise ForestError(f"forest {forest.root}: {len(left)} leftover(s) of killed writers: "
                          f"{', '.join(str(p) for p in left[:5])}; `btm forest recover --forest "
                          f"{forest.root}` removes them")
    return 0


def _recover(args: argparse.Namespace, Forest: Any) -> int:
    forest = Forest.open(Path(args.forest))
    forest.recover()
    for old in forest.leftovers():  # .merge-* of older releases, beside the forest
        if old.name.startswith(".merge-"):
            shutil.rmtree(old, ignore_errors=True)
    print(f"forest {forest.root}: leftovers removed; {len(forest.leftovers())} remain")
    return 0


_ACTIONS = {"init": _init, "ls": _ls, "show": _show, "rm": _rm, "verify": _verify,
            "recover": _recover}
