"""Slurm: `bigmodel launch slurm` (sbatch), what slurm/pretrain_gpt.sh runs on the batch node, and slurm/prepare.sh's array tasks."""
