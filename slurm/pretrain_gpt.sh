#!/usr/bin/env bash
# GPT pretraining on Slurm: sbatch [sbatch options] slurm/pretrain_gpt.sh CONFIG [--section.field=value ...]
#
# One srun task per node runs `bigmodel launch local`, which starts torchrun (c10d rendezvous on the
# first node) and forwards stop signals to the workers. Preempted or near its time limit, the job saves
# one checkpoint, exits with the config's checkpoint.requeue_exit_code (85 unless changed; the pre-flight
# prints it) and is requeued; the run directory is keyed by the run name, so the requeued job resumes
# where it stopped. Resources below are defaults: override them on the sbatch command line.
#SBATCH --job-name=bigmodel-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
MAX_REQUEUES=${BIGMODEL_MAX_REQUEUES:-20}         # a job that keeps stopping is not requeued forever
MODE=${BIGMODEL_SLURM_MODE:-torchrun}             # torchrun: one task per node | tasks: one task per GPU

cd "${SLURM_SUBMIT_DIR:-.}"
# Environment hook: modules, a virtualenv or a container set-up, sourced on the batch node.
if [[ -n "${BIGMODEL_ENV_HOOK:-}" ]]; then
    source "$BIGMODEL_ENV_HOOK"
elif [[ -f .venv/bin/activate ]]; then
    source .venv/bin/activate
fi
[[ $# -ge 1 ]] || { echo "bigmodel: error: no config; usage: sbatch slurm/pretrain_gpt.sh CONFIG [overrides]" >&2; exit 2; }

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
NPROC_PER_NODE=${BIGMODEL_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
export MASTER_ADDR MASTER_PORT NPROC_PER_NODE

# All checks live in Python: versions, node list, config, GPUs per node. Exit 2 = do not retry.
# Its one line of output is the config's checkpoint.requeue_exit_code.
REQUEUE_EXIT_CODE=$(python -m launcher.slurm preflight "$@") || exit $?

if [[ "$MODE" == tasks ]]; then   # ranks from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS
    srun --ntasks-per-node="$NPROC_PER_NODE" --label python -m launcher.cli train "$@" &
else
    srun --ntasks-per-node=1 --label bash -c 'exec python -m launcher.cli launch local "$@" \
        --nproc-per-node="$NPROC_PER_NODE" --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID" \
        --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"' bigmodel "$@" &
fi
STEP_PID=$!
# srun forwards USR1/TERM to every task; `cmd & wait` lets this shell run the trap at once.
trap 'echo "batch: got USR1, asking training to stop" >&2; kill -USR1 $STEP_PID' USR1
trap 'echo "batch: got TERM, asking training to stop" >&2; kill -TERM $STEP_PID' TERM
while :; do
    wait "$STEP_PID"; CODE=$?          # > 128 when a trapped signal interrupted the wait
    kill -0 "$STEP_PID" 2>/dev/null || break
done
if [[ $CODE -gt 128 ]]; then           # the step ended right after the signal: collect its real status
    wait "$STEP_PID"; LAST=$?; [[ $LAST -ne 127 ]] && CODE=$LAST
fi

if [[ $CODE -eq $REQUEUE_EXIT_CODE ]]; then
    if [[ ${SLURM_RESTART_COUNT:-0} -lt $MAX_REQUEUES ]]; then
        echo "batch: training saved and stopped; requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})" >&2
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "batch: requeue limit $MAX_REQUEUES reached; not requeueing" >&2
    fi
fi
exit "$CODE"
