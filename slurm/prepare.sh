#!/usr/bin/env bash
# Tokenise and pack a corpus on Slurm: sbatch [sbatch options] slurm/prepare.sh CONFIG [--section.field=value ...]
#
# This job plans (tokenizer trained or loaded once, shards counted), then submits this same script twice:
# a job array, one task per chunk of the incomplete shards (BIGMODEL_PREPARE_TASKS tasks, default one per
# shard), and a finalize job that runs after every task succeeded (--dependency=afterok, with
# --kill-on-invalid-dep) and writes meta.json. The shards and meta.json are byte for byte those of
# `bigmodel prepare CONFIG` on one machine. Submitting the same command again after a failure writes only
# the shards still incomplete; after success it submits nothing. Logic: launcher/slurm/prepare.py.
# Every path in the config must be on storage every node sees. Resources below are defaults for each
# job; partition, account, QOS, CPUs and memory given on the sbatch line are passed on to the others.
#SBATCH --job-name=bigmodel-prepare
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# Environment hook: modules, a virtualenv or a container set-up, sourced on the batch node.
if [[ -n "${BIGMODEL_ENV_HOOK:-}" ]]; then
    source "$BIGMODEL_ENV_HOOK"
elif [[ -f .venv/bin/activate ]]; then
    source .venv/bin/activate
fi
# "$0" is the copy of this script Slurm runs: the next jobs are submitted from it, #SBATCH lines included.
exec python -m launcher.slurm.prepare --script "$0" "$@"
