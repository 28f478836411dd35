"""Launching a BTM run: a validated plan (plan.py), its stage commands (commands.py), sbatch
scripts and their dependency graph (sbatch.py), submission / status / resume on SLURM
(slurm.py, state.py), a one-machine launcher without SLURM (local.py), GPU-hour accounting
(cost.py)."""
