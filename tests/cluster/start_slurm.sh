#!/usr/bin/env bash
# Start a real two-node Slurm cluster on this machine for the tests; prints `export SLURM_CONF=...`.
#
#   eval "$(tests/cluster/start_slurm.sh)"      # root; installs munge + Slurm from Debian if missing
#
# munged, slurmctld and two slurmd ("n1", "n2") run from $BIGMODEL_SLURM_BASE (default
# /tmp/bigmodel-slurm). Every Slurm daemon gets its own UTS + mount namespace: its own hostname and a
# private hosts file naming ctl/n1/n2 as 127.0.10.{100,1,2}, so jobs see real node names
# (MASTER_ADDR=n1 works); slurmctld listens on loopback only (slurmd: see the README).
# No cgroups, no accounting database, fake GPUs (gpu:2 per node). Idempotent: a re-run starts only
# what is not running. Exactly one line goes to stdout; progress and errors go to stderr.
set -euo pipefail
exec 3>&1 1>&2    # stdout is reserved for the final export line

BASE=${BIGMODEL_SLURM_BASE:-/tmp/bigmodel-slurm}
READY_TIMEOUT=${BIGMODEL_SLURM_READY_TIMEOUT:-90}
CONF=$BASE/etc/slurm.conf
HOSTS=$BASE/etc/hosts
MUNGE_SOCKET=$BASE/run/munge.socket
NODES=(n1 n2)
CTLD_PORT=16940          # nodes use 16941, 16942; all below Linux's ephemeral port range
HERE=$(cd "$(dirname "$0")" && pwd)
export PATH=$PATH:/usr/sbin:/sbin
cd /    # daemons must not keep the caller's directory busy

log() { echo "[start_slurm +${SECONDS}s] $*"; }
die() { log "ERROR: $*"; exit 1; }
running() { # running PIDFILE COMM: the pid file names a live process with that command name
    [[ -s $1 ]] && [[ $(cat "/proc/$(cat "$1")/comm" 2>/dev/null) == "$2" ]]
}
[[ $(id -u) == 0 ]] || die "run as root (daemons, namespaces, apt)"

# --- 1. packages --------------------------------------------------------------------------------
POLICY=/usr/sbin/policy-rc.d
OUR_POLICY=0
trap 'if [[ $OUR_POLICY == 1 ]]; then rm -f "$POLICY"; fi' EXIT
missing=()
for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    if [[ ! -e $POLICY ]]; then   # no systemd: stop package scripts from starting system daemons
        printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod 755 "$POLICY" && OUR_POLICY=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get -q -o DPkg::Lock::Timeout=120 update
    apt-get -q -y -o DPkg::Lock::Timeout=120 install --no-install-recommends "${missing[@]}"
    if [[ $OUR_POLICY == 1 ]]; then rm -f "$POLICY"; OUR_POLICY=0; fi
fi

# --- 2. files: munge key, hosts file, slurm.conf, gres.conf, fake GPU devices -------------------
mkdir -p "$BASE"/{etc,log,run,state,dev,munge} "${NODES[@]/#/$BASE/spool/}"
chmod 700 "$BASE/munge" "$BASE/state"
chmod 755 "$BASE" "$BASE/run"   # munged: socket dir searchable by all, writable by root only
if [[ ! -s $BASE/munge/munge.key ]]; then
    (umask 077 && head -c 1024 /dev/urandom >"$BASE/munge/munge.key")
fi
for gpu in 0 1; do   # Slurm 22.05 drops GPUs without File=; /dev/null's numbers, never opened
    [[ -e $BASE/dev/nvidia$gpu ]] || mknod "$BASE/dev/nvidia$gpu" c 1 3
done
{ cat /etc/hosts; printf '127.0.10.100 ctl\n127.0.10.1 n1\n127.0.10.2 n2\n'; } >"$HOSTS.new"
printf 'AutoDetect=off\nNodeName=n[1-2] Name=gpu File=%s/dev/nvidia[0-1]\n' "$BASE" >"$BASE/etc/gres.conf.new"
cat >"$CONF.new" <<EOF
# Written by tests/cluster/start_slurm.sh: a two-node test cluster on one machine.
ClusterName=bigmodel-test
SlurmctldHost=ctl(127.0.10.100)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
# slurmctld binds to its hostname's address (ctl = loopback), not to 0.0.0.0. Not NoInAddrAny: slurmd
# answers srun at the source address of srun's connection (127.0.0.1), which srun would not listen on.
CommunicationParameters=NoCtldInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
# nodes advertise what is written here, not what the hardware has
SlurmdParameters=config_overrides
KillWait=5
GresTypes=gpu
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
NodeName=n1 NodeAddr=127.0.10.1 Port=$((CTLD_PORT + 1)) CPUs=2 RealMemory=4096 Gres=gpu:2 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.10.2 Port=$((CTLD_PORT + 2)) CPUs=2 RealMemory=4096 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF=$CONF
changed=()
for f in "$CONF" "$BASE/etc/gres.conf" "$HOSTS"; do
    if cmp -s "$f" "$f.new"; then rm "$f.new"; else changed+=("$f"); fi
done
if ((${#changed[@]})) && running "$BASE/run/slurmctld.pid" slurmctld; then
    log "configuration changed: restarting the cluster"
    "$HERE/stop_slurm.sh"
fi
for f in "${changed[@]}"; do mv "$f.new" "$f"; done

# --- 3. daemons ----------------------------------------------------------------------------------
launch() { # launch NAME CMD...: start a daemon cut off from our stdout/stderr, which callers read to EOF
    log "starting $1"
    "${@:2}" </dev/null >>"$BASE/log/daemons.out" 2>&1 3>&- \
        || die "$1 did not start: $(tail -n 3 "$BASE/log/daemons.out"); logs in $BASE/log"
}
as_host() { # as_host NAME CMD...: run CMD with hostname NAME and our hosts file, in new namespaces
    unshare --uts --mount sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"' \
        sh "$1" "$HOSTS" "${@:2}"
}

running "$BASE/run/munged.pid" munged \
    || launch munged munged --socket="$MUNGE_SOCKET" --key-file="$BASE/munge/munge.key" \
        --pid-file="$BASE/run/munged.pid" --seed-file="$BASE/munge/seed" --log-file="$BASE/log/munged.log"
running "$BASE/run/slurmctld.pid" slurmctld || launch slurmctld as_host ctl slurmctld -f "$CONF" -i
for node in "${NODES[@]}"; do
    running "$BASE/run/slurmd-$node.pid" slurmd \
        || launch "slurmd $node" as_host "$node" slurmd -f "$CONF" -N "$node"
done

# --- 4. wait until both nodes take jobs ------------------------------------------------------------
resumed=0 waited_from=$SECONDS
ready() { # every node takes jobs
    [[ $(sinfo -h -N -o %T 2>/dev/null | grep -cxE 'idle|mixed|allocated|completing') == "${#NODES[@]}" ]]
}
until ready; do
    if ((SECONDS - waited_from > READY_TIMEOUT)); then
        sinfo -N -l || true
        die "nodes not ready after ${READY_TIMEOUT}s; logs in $BASE/log"
    fi
    if ((SECONDS - waited_from >= 3)); then   # a daemon that died (bad config, port in use): fail now
        for daemon in munged slurmctld "${NODES[@]/#/slurmd-}"; do
            running "$BASE/run/$daemon.pid" "${daemon%-*}" \
                || die "$daemon is not running; see $BASE/log/$daemon.log"
        done
    fi
    # a node left down or drained by an earlier run stays so until resumed
    stuck=$(sinfo -h -N -t down,drain,fail -o '%N' 2>/dev/null | sort -u | paste -sd, || true)
    if ((!resumed && SECONDS - waited_from > 5)) && [[ -n $stuck ]]; then
        log "resuming $stuck"
        scontrol update nodename="$stuck" state=resume || true
        resumed=1
    fi
    sleep 0.5
done
log "ready: $(sinfo -h -N -o '%N=%T' | paste -sd' ')"
echo "export SLURM_CONF=$CONF" >&3
