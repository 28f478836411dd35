"""Resume a BTM run: rerun only the nodes that are not done (failed, cancelled, never run).

The same as `btm run PLAN` on an existing run_dir: finished nodes are skipped, an interrupted
expert continues from its latest checkpoint, a failed expert's cycle is merged once it
succeeds. With SLURM, queued or running jobs are kept and the rest is resubmitted after them.
"""
from megatron_btm.pipeline import run_cli

HELP = "rerun only what is not done in a BTM run (failed, cancelled or never run nodes)"


def add_arguments(parser):
    run_cli.add_arguments(parser)


def run(args):
    return run_cli.run(args, resume=True)
