#!/usr/bin/env bash
# Ray on Slurm: sbatch [sbatch options] slurm/ray_cluster.sh CONFIG [--section.field=value ...]
#
# Starts a Ray head on the allocation's first node and a Ray worker on every other node (one srun
# step each, `ray start --block`), waits until all nodes have joined, then submits the shared trainer
# with `ray job submit` (launcher.ray_job) and waits for it. The Ray processes end with their srun
# steps when the job ends. Worker count defaults to every GPU of the allocation; overrides win.
# Not requeued: Ray's FailureConfig restarts failed workers, and resubmitting the run name resumes.
#SBATCH --job-name=bigmodel-ray
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
if [[ -n "${BIGMODEL_ENV_HOOK:-}" ]]; then       # modules, a virtualenv or a container set-up
    source "$BIGMODEL_ENV_HOOK"
elif [[ -f .venv/bin/activate ]]; then
    source .venv/bin/activate
fi
[[ $# -ge 1 ]] || { echo "bigmodel: error: no config; usage: sbatch slurm/ray_cluster.sh CONFIG [overrides]" >&2; exit 2; }
CONFIG=$1; shift

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD" hostname -I | awk '{print $1}')
GCS_PORT=$((20000 + SLURM_JOB_ID % 20000))           # per job: nodes may be shared with other jobs
DASHBOARD_PORT=$((GCS_PORT + 1))
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-0}
CPUS_PER_NODE=${SLURM_CPUS_ON_NODE:-1}
JOIN_TIMEOUT_S=${BIGMODEL_RAY_JOIN_TIMEOUT_S:-300}
STEP_PIDS=()

stop_ray() {                                          # our srun steps only: they end their ray processes
    for pid in "${STEP_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    wait 2>/dev/null
}
trap stop_ray EXIT

echo "ray: head $HEAD ($HEAD_IP:$GCS_PORT), ${#NODES[@]} node(s) x $GPUS_PER_NODE GPU(s)" >&2
srun --nodes=1 --ntasks=1 -w "$HEAD" ray start --head --block --node-ip-address="$HEAD_IP" --port="$GCS_PORT" \
    --dashboard-host=0.0.0.0 --dashboard-port="$DASHBOARD_PORT" --num-cpus="$CPUS_PER_NODE" \
    --num-gpus="$GPUS_PER_NODE" --disable-usage-stats &
STEP_PIDS+=($!)
for node in "${NODES[@]:1}"; do
    sleep 5                                           # the head first; Ray retries joins for a while anyway
    srun --nodes=1 --ntasks=1 -w "$node" ray start --block --address="$HEAD_IP:$GCS_PORT" \
        --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" --disable-usage-stats &
    STEP_PIDS+=($!)
done

# Every node joined (or a clear error after JOIN_TIMEOUT_S).
python - "$HEAD_IP:$GCS_PORT" "${#NODES[@]}" "$JOIN_TIMEOUT_S" <<'EOF' || exit 2
import sys, time
address, wanted, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    try:
        import ray
        ray.init(address=address, logging_level="ERROR")
        alive = sum(node["Alive"] for node in ray.nodes())
        ray.shutdown()
    except Exception as exc:
        alive, error = 0, exc
    if alive >= wanted:
        print(f"ray: {alive} node(s) joined", file=sys.stderr)
        break
    if time.monotonic() > deadline:
        sys.exit(f"bigmodel: error: only {alive} of {wanted} Ray node(s) joined within {timeout:g}s; see this job's log")
    time.sleep(5)
EOF

WORKERS=$(( ${#NODES[@]} * (GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1) ))
USE_GPU=$([[ $GPUS_PER_NODE -gt 0 ]] && echo true || echo false)
# `bigmodel launch ray`: relative paths are resolved here, in the submit directory (the job itself runs
# in Ray's copy of it), and a stopped job's driver gets ray.stop_wait_s for its last checkpoint.
python -m launcher.cli launch ray "$CONFIG" --address "http://$HEAD_IP:$DASHBOARD_PORT" --ray.num_workers="$WORKERS" \
    --ray.use_gpu="$USE_GPU" --ray.address="$HEAD_IP:$GCS_PORT" "$@"
exit $?
