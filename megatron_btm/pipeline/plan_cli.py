"""`btm plan cost PLAN`: the GPU-hour accounting of a BTM plan (per stage, total, dense baseline)."""
from __future__ import annotations

import argparse

HELP = "inspect a BTM plan: `btm plan cost PLAN` prints its GPU-hour accounting"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plan_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("cost", help="GPU-hours per stage, in total, and the compute-matched dense baseline")
    p.add_argument("plan", help="plan YAML (see examples/btm-64-domains.yaml)")
    from megatron_btm import cli_args
    cli_args.add_output(p, required=False, metavar="JSON", help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    from megatron_btm.pipeline.cost import format_cost, plan_cost
    from megatron_btm.pipeline.plan import load_plan
    from megatron_btm.utils.io import atomic_write_json

    cost = plan_cost(load_plan(args.plan))
    print(format_cost(cost), end="")
    if args.output:
        atomic_write_json(args.output, cost.to_dict())
    return 0
