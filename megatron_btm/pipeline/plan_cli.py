"""`btm plan cost PLAN`: the GPU-hour accounting of a BTM plan (per stage, total, dense baseline)
and, with --interconnect, the communication model's updates/s ratio of experts vs dense DP."""
from __future__ import annotations

import argparse

HELP = "inspect a BTM plan: `btm plan cost PLAN` prints its GPU-hour accounting"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plan_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("cost", help="GPU-hours per stage, in total, and the compute-matched dense baseline")
    p.add_argument("plan", help="plan YAML (see examples/btm-64-domains.yaml)")
    p.add_argument("--interconnect", default=None, metavar="LINK",
                   help="also predict the updates/s ratio of independent experts vs dense data "
                        "parallelism for the paper's 125M-1.3B settings over this link: 100gbe, "
                        "ib-hdr, nvlink, 10gbe or custom:BW_GBIT_S,LATENCY_US (ring all-reduce "
                        "of fp32 gradients, no overlap; see docs/PIPELINE.md)")
    p.add_argument("--mfu", type=float, default=None,
                   help="model FLOPs utilisation for the compute time of the prediction (default 0.3)")
    from megatron_btm import cli_args
    cli_args.add_output(p, required=False, metavar="JSON", help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    from megatron_btm.pipeline import cost as C
    from megatron_btm.pipeline.plan import load_plan
    from megatron_btm.utils.io import atomic_write_json

    link = None if args.interconnect is None else C.parse_interconnect(args.interconnect)
    assume = C.CommAssumptions(**({} if args.mfu is None else {"mfu": args.mfu}))
    cost = C.plan_cost(load_plan(args.plan))
    print(C.format_cost(cost), end="")
    out = cost.to_dict()
    if link is not None:
        rows = C.paper_predictions(link, assume)
        print(C.format_comm(link, rows, assume), end="")
        out["communication"] = {"interconnect": vars(link), "assumptions": vars(assume), "paper": rows}
    if args.output:
        atomic_write_json(args.output, out)
    return 0
