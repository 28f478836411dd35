"""State of every node of a BTM run: done, failed (with the error), ready, waiting; for a
SLURM run also queued/running jobs and jobs cancelled because something upstream failed."""
HELP = "state of every node of a BTM run (names the failed ones)"


def add_arguments(parser):
    parser.add_argument("plan", help="run plan YAML")
    parser.add_argument("--json", action="store_true", help="print the states as JSON")


def run(args):
    import json

    from megatron_btm.pipeline.plan import load_plan
    from megatron_btm.pipeline.run import status
    text, rows = status(load_plan(args.plan))
    print(json.dumps(rows, indent=1) if args.json else text, end="" if not args.json else "\n")
    return 0
