"""Run nodes of a started BTM run (what every executor calls; done nodes are no-ops).

    btm node RUN_DIR cycle1-train-bible [NODE ...]

Reads the run's frozen plan (RUN_DIR/graph/plan.json). A node whose inputs are not done is
refused. Under torchrun/srun every rank runs the node; rank 0 writes its records; a torchrun
worker dies with its torchrun (PR_SET_PDEATHSIG).
"""
HELP = "run nodes of a started BTM run (used by the executors)"


def add_arguments(parser):
    parser.add_argument("run_dir", help="the run folder (plan's run_dir)")
    parser.add_argument("nodes", nargs="+", metavar="NODE",
                        help="node ids, run in this order, e.g. cycle1-train-bible")


def run(args):
    import os

    from megatron_btm.pipeline import graph as G
    if os.environ.get("TORCHELASTIC_RUN_ID"):   # a torchrun worker: die with torchrun
        from megatron_btm.utils.proc import die_with_parent
        die_with_parent()
    from megatron_btm.pipeline.nodes import load_frozen, run_nodes
    plan = load_frozen(args.run_dir)
    run_nodes(plan, G.build_graph(plan), args.nodes)
    return 0
