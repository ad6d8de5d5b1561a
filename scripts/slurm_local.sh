#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, in a temporary folder, for the tests
# (tests/reliability/test_slurm.py; docs/RELIABILITY.md, "SLURM").
#
#   bash scripts/slurm_local.sh start [DIR]   # prints DIR; `source DIR/env` sets SLURM_CONF for sbatch/srun/scancel
#   bash scripts/slurm_local.sh stop DIR      # cancels the jobs, stops the daemons, removes DIR
#
# Needs root and Debian's slurm-wlm and munge packages (apt-get install -y slurm-wlm munge). Everything
# lives in DIR: its own munge key and socket, slurm.conf on free ports, state, spool and logs; nothing
# in /etc is read or changed. One node, "localhost" (127.0.0.1), with ProctrackType=proctrack/linuxproc
# and TaskPlugin=task/none (no cgroups), and more CPUs than the machine has (config_overrides) so that
# several small test jobs run at once. Exit codes: 0 started; 3 a package is missing or not root;
# 1 a daemon did not come up (its log is printed).
set -euo pipefail

usage() { echo "usage: $0 start [DIR] | stop DIR" >&2; exit 2; }

stop() {
    local dir=$1
    [ -f "$dir/slurm.conf" ] || { echo "$dir: not a folder made by '$0 start'" >&2; exit 2; }
    SLURM_CONF="$dir/slurm.conf" scancel --full --quiet --signal=KILL --user=root 2>/dev/null || true
    local pidfile pid
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        if [ -f "$pidfile" ] && pid=$(cat "$pidfile") && [ -n "$pid" ]; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$dir"
}

start() {
    local missing=()
    for cmd in munged slurmctld slurmd sbatch srun scontrol sinfo; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "not installed: ${missing[*]} (apt-get install -y slurm-wlm munge)" >&2
        exit 3
    fi
    [ "$(id -u)" = 0 ] || { echo "needs root (munged and slurmd run as root)" >&2; exit 3; }
    local dir=${1:-}
    if [ -z "$dir" ]; then dir=$(mktemp -d "${TMPDIR:-/tmp}/slurm_local.XXXXXX"); else mkdir -p "$dir"; fi
    dir=$(cd "$dir" && pwd)
    chmod 700 "$dir"
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
    chmod 700 "$dir/munge"

    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --log-file="$dir/munge/munged.log" --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed"

    # Two free TCP ports for slurmctld and slurmd (asked of the kernel, then released).
    local ports
    ports=$(python3 -c 'import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
    local ctld_port=${ports% *} slurmd_port=${ports#* }
    local cpus
    cpus=$(( $(nproc) < 8 ? 8 : $(nproc) ))

    cat > "$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=600
KillWait=10
InactiveLimit=0
NodeName=localhost NodeHostname=$(hostname) NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    echo "export SLURM_CONF=$dir/slurm.conf" > "$dir/env"

    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N localhost
    local state=""
    for _ in $(seq 150); do
        state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
        [ "$state" = idle ] && break
        sleep 0.2
    done
    if [ "$state" != idle ]; then
        echo "the local SLURM did not come up (node state '${state:-none}'); logs in $dir:" >&2
        tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" "$dir/munge/munged.log" >&2 2>/dev/null || true
        exit 1
    fi
    echo "$dir"
}

case "${1:-}" in
    start) start "${2:-}" ;;
    stop) [ $# -eq 2 ] || usage; stop "$2" ;;
    *) usage ;;
esac
