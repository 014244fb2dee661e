#!/usr/bin/env bash
# A single-node SLURM on this machine from Debian's packages (slurmctld + slurmd + munge), for trying the
# slurm profile and for tests/test_slurm.py. Needs root and apt. No slurmdbd: with accounting_storage/none
# `sacct` asks slurmctld, which keeps finished jobs for MinJobAge seconds (the executor plugin reads job
# states that way). Idempotent: `start` (default) installs what is missing, writes /etc/slurm/slurm.conf
# and (re)starts the daemons; `stop` stops them. The node gets this machine's CPUs and 90% of its memory.
set -euo pipefail
action=${1:-start}

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    pkill -x munged 2>/dev/null || true
    sleep 1
}

if [[ $action == stop ]]; then stop; exit 0; fi
[[ $(id -u) == 0 ]] || { echo "local_slurm.sh: needs root (apt, daemons)" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q slurm-wlm munge >/dev/null
fi

stop
host=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MinJobAge=3600
KillWait=10
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
runuser -u munge -- munged --force
slurmctld
slurmd
for _ in $(seq 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "local_slurm.sh: partition 'local' up on $host ($cpus CPUs, $mem MB)"
        exit 0
    fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "local_slurm.sh: the node did not come up; see /var/log/slurm/slurmd.log and slurmctld.log" >&2
exit 1
