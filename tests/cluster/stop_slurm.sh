#!/usr/bin/env bash
# Stop the test cluster that tests/cluster/start_slurm.sh started; its base dir stays for inspection.
#
# Daemons are found by their pid files only, and a pid is signalled only while it still runs the
# expected program. Jobs still on this cluster are cancelled first, so none outlives its slurmd.
set -uo pipefail

BASE=${BIGMODEL_SLURM_BASE:-/tmp/bigmodel-slurm}
RUN=$BASE/run
export SLURM_CONF=$BASE/etc/slurm.conf PATH=$PATH:/usr/sbin:/sbin

log() { echo "[stop_slurm +${SECONDS}s] $*" >&2; }
alive() { [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2" ]]; }   # alive PID COMM
running() { [[ -s $1 ]] && alive "$(cat "$1")" "$2"; }            # running PIDFILE COMM
stop() { # stop COMM PIDFILE...: TERM each live one, up to 10 s grace, then KILL
    local comm=$1 pids=() pid f left
    for f in "${@:2}"; do
        pid=$(cat "$f" 2>/dev/null)
        if [[ -n $pid ]] && alive "$pid" "$comm"; then pids+=("$pid"); fi
        rm -f "$f"   # a daemon removes its own pid file early in shutdown: watch the pids instead
    done
    ((${#pids[@]})) || return 0
    log "stopping $comm (pid ${pids[*]})"
    kill -TERM "${pids[@]}"
    for _ in {1..50}; do
        left=0
        for pid in "${pids[@]}"; do alive "$pid" "$comm" && left=1; done
        ((left)) || return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do
        if alive "$pid" "$comm"; then log "$comm (pid $pid) ignored TERM: KILL"; kill -KILL "$pid"; fi
    done
}

if running "$RUN/slurmctld.pid" slurmctld; then
    jobs=$(squeue -h -o %i 2>/dev/null | paste -sd' ')
    if [[ -n $jobs ]]; then
        log "cancelling jobs on the test cluster: $jobs"
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs
        for _ in {1..60}; do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
    fi
fi
shopt -s nullglob
stop slurmd "$RUN"/slurmd-*.pid
stop slurmctld "$RUN/slurmctld.pid"
stop munged "$RUN/munged.pid"
log "stopped; state and logs stay in $BASE"
exit 0
