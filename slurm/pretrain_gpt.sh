#!/usr/bin/env bash
# GPT pretraining on Slurm: sbatch [sbatch options] slurm/pretrain_gpt.sh CONFIG [--section.field=value ...]
#
# First `bigmodel check` on every node (resilience.health_check); then one srun task per node runs
# `bigmodel launch local`, which starts torchrun (c10d rendezvous on the first node) and forwards stop
# signals to the workers. Preempted or near its time limit, the job saves one checkpoint, exits with the
# config's checkpoint.requeue_exit_code (85 unless changed) and is requeued; a hang (86) or a bad node
# (87) is requeued too, excluding the suspect nodes when the partition has others to spare. The codes
# come from the config through the pre-flight. The run directory is keyed by the run name, so the
# requeued job resumes where it stopped. Resources below are defaults: override them on the sbatch line.
#
# Elastic (BIGMODEL_ELASTIC_MIN_NODES=M, submitted with `sbatch --no-kill`): torchrun's elastic
# rendezvous over M..SLURM_NNODES nodes; when a node fails, the others restart their workers on the
# smaller world from the newest checkpoint (BIGMODEL_MAX_RESTARTS, default 3) and the job keeps its
# allocation. Slurm cannot add nodes to a running job: it grows back only when requeued. The first node
# hosts the rendezvous: losing it ends the step (then the job is requeued like any failure).
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
MIN_NODES=${BIGMODEL_ELASTIC_MIN_NODES:-}         # elastic below SLURM_NNODES (torchrun mode only)

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
NNODES=$SLURM_NNODES; SRUN_ELASTIC=()
if [[ -n "$MIN_NODES" && "$MODE" == torchrun ]]; then   # a failed node's task ends alone, the step goes on
    NNODES="$MIN_NODES:$SLURM_NNODES"; SRUN_ELASTIC=(--no-kill --kill-on-bad-exit=0)
fi
export MASTER_ADDR MASTER_PORT NPROC_PER_NODE NNODES
# One id for this attempt on every node: the run's markers name it, so no launcher takes a marker of an
# earlier attempt (or of another job on the same run) for its own.
export BIGMODEL_LAUNCH_ID="slurm-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}"

# All checks live in Python: versions, node list, config, GPUs per node. Exit 2 = do not retry.
# Its one line of output: the config's requeue, hang and bad-node exit codes, whether to run the
# health check (1/0), and the run directory.
PREFLIGHT=$(python -m launcher.slurm preflight "$@") || exit $?
read -r REQUEUE_EXIT_CODE HANG_EXIT_CODE BAD_NODE_EXIT_CODE HEALTH_CHECK RUN_DIR <<< "$PREFLIGHT"
# Whoever names a bad or hung node appends it here (shared file system, one file per attempt).
export BIGMODEL_SUSPECT_NODES_FILE="$RUN_DIR/logs/suspect-nodes-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}.txt"

STEP_PID=""; STOP_SIGNAL=""; CANCELLED=""
# srun forwards USR1/TERM to every task; `cmd & wait` lets this shell run the trap at once. A signal
# during the health check is remembered: no training then, and the job asks to be requeued.
# `scancel`, a preemption, `scontrol requeue` and the time limit all send TERM, and `scontrol show job`
# says COMPLETING for each. What tells them apart is slurmstepd's line in the job's stderr, written
# before the TERM: "*** JOB N ON host CANCELLED AT time DUE TO PREEMPTION|JOB REQUEUE|TIME LIMIT ***",
# and no "DUE TO" for a user's scancel, which must end the job (after saving), never requeue it.
# USR1 is the time-limit warning (--signal=B:USR1@...): save and requeue.
job_cancelled() {
    local err
    err=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdErr=[^ ]*' | cut -d= -f2-)
    [[ -n "$err" && -r "$err" ]] && grep -q "JOB $SLURM_JOB_ID ON .* CANCELLED AT [^ ]* \*\*\*" "$err"
}
stop() {
    [[ $1 == TERM ]] && job_cancelled && CANCELLED=1
    echo "batch: got $1${CANCELLED:+ (scancel)}, asking training to stop" >&2
    STOP_SIGNAL=$1; [[ -z $STEP_PID ]] || kill -"$1" "$STEP_PID"
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM

CODE=0
if [[ "$HEALTH_CHECK" == 1 ]]; then   # one task per node; its own rendezvous port
    HEALTH_PORT=$((40000 + SLURM_JOB_ID % 20000)); export HEALTH_PORT
    srun --ntasks-per-node=1 --label bash -c 'exec python -m launcher.cli check "$@" \
        --nproc-per-node="$NPROC_PER_NODE" --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID" \
        --master-addr="$MASTER_ADDR" --master-port="$HEALTH_PORT"' bigmodel "$@"
    CODE=$?
    [[ $CODE -eq 0 ]] || echo "batch: node health check failed (exit $CODE); not training" >&2
fi
if [[ -n "$STOP_SIGNAL" && $CODE -eq 0 ]]; then
    echo "batch: $STOP_SIGNAL before training started: nothing to save; exit $REQUEUE_EXIT_CODE asks to requeue" >&2
    CODE=$REQUEUE_EXIT_CODE
elif [[ $CODE -eq 0 ]]; then
    if [[ "$MODE" == tasks ]]; then   # ranks from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS
        srun --ntasks-per-node="$NPROC_PER_NODE" --label python -m launcher.cli train "$@" &
    else
        srun --ntasks-per-node=1 "${SRUN_ELASTIC[@]}" --label bash -c 'exec python -m launcher.cli launch local "$@" \
            --nproc-per-node="$NPROC_PER_NODE" --nnodes="$NNODES" --node-rank="$SLURM_NODEID" \
            --max-restarts="${BIGMODEL_MAX_RESTARTS:-3}" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"' \
            bigmodel "$@" &
    fi
    STEP_PID=$!
    while :; do
        wait "$STEP_PID"; CODE=$?          # > 128 when a trapped signal interrupted the wait
        kill -0 "$STEP_PID" 2>/dev/null || break
    done
    if [[ $CODE -gt 128 ]]; then           # the step ended right after the signal: collect its real status
        wait "$STEP_PID"; LAST=$?; [[ $LAST -ne 127 ]] && CODE=$LAST
    fi
fi

if [[ -n "$CANCELLED" ]] || job_cancelled; then   # also when only the steps got the TERM
    echo "batch: job $SLURM_JOB_ID cancelled (scancel): saved what was new, not requeueing; submit the same" \
        "command again to resume" >&2
elif [[ $CODE -eq $REQUEUE_EXIT_CODE || $CODE -eq $HANG_EXIT_CODE || $CODE -eq $BAD_NODE_EXIT_CODE ]]; then
    if [[ ${SLURM_RESTART_COUNT:-0} -lt $MAX_REQUEUES ]]; then
        EXCLUDE=""   # a hang or a bad node: the suspects to avoid, if the partition can spare them
        [[ $CODE -eq $REQUEUE_EXIT_CODE ]] || EXCLUDE=$(python -m launcher.slurm exclude "$BIGMODEL_SUSPECT_NODES_FILE")
        echo "batch: exit $CODE; requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})" >&2
        trap '' TERM USR1   # the requeue TERMs the job; ignored here and by the scontrol calls below
        scontrol requeue "$SLURM_JOB_ID"
        # A running job's ExcNodeList cannot change; a requeued one's can, until it starts again.
        for TRY in 1 2 3 4 5; do
            [[ -n "$EXCLUDE" ]] || break
            scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$EXCLUDE" && break
            [[ $TRY -lt 5 ]] && sleep 1 || echo "batch: could not set ExcNodeList=$EXCLUDE" >&2
        done
    else
        echo "batch: requeue limit $MAX_REQUEUES reached; not requeueing" >&2
    fi
fi
exit "$CODE"
