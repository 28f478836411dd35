"""Edit a mixture-of-experts checkpoint.

    btm moe remove --checkpoint CKPT --expert ID --output OUT

`remove` (opt-out): drop one expert's FFN slice and router row; num_moe_experts becomes n-1
(top-k clamped to n-1 if needed, with a note), every other tensor is copied unchanged; meta.json
records the removed expert and the parent checkpoint. The shared (averaged) parameters still
hold the removed expert's share: for a complete opt-out, re-run `btm merge-moe --experts`.
"""
from __future__ import annotations

import argparse
import json

from megatron_btm import cli_args

HELP = "edit a mixture-of-experts checkpoint: remove an expert (opt-out)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("remove", help="drop one expert (FFN slice and router row)",
                       description="drop one expert (FFN slice and router row)")
    cli_args.add_checkpoint(p, required=True, help="MoE checkpoint folder (btm merge-moe)")
    p.add_argument("--expert", required=True, metavar="ID",
                   help="expert id (meta.json moe_merge.expert_ids) or index")
    cli_args.add_output(p, metavar="DIR", help="output checkpoint folder (absent or empty)")
    cli_args.add_no_progress(p)


def run(args: argparse.Namespace) -> int:
    from megatron_btm.moe.remove import remove_expert
    print(json.dumps(remove_expert(args.checkpoint, args.expert, args.output,
                                   progress=not args.no_progress), indent=2))
    return 0
