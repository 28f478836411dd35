"""One BTM pipeline: a run plan (plan.py) becomes one stage graph (graph.py) whose nodes run
through one runner with one set of rules (nodes.py), on three executors: in-process and local
subprocesses (executors.py), SLURM (sbatch.py, slurm_executor.py, slurm.py). cost.py: the
GPU-hour accounting of a plan."""
