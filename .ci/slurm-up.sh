#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine for the workflow's Slurm test (DESIGN.md section 7).
#
#   .ci/slurm-up.sh [--install]
#   .ci/slurm-down.sh               stops the daemons it started (by their pid files)
#
# --install: apt-get the Debian packages first (slurmctld slurmd slurm-client munge,
# --no-install-recommends; needs root). The config goes to /etc/slurm/slurm.conf (Slurm's default
# path: the Snakemake jobstep plugin drops SLURM_CONF from the job environment, so a config elsewhere
# is not found inside jobs); a config that this script did not write is never replaced. State, logs and
# pid files live in $GMR_SLURM_DIR (default /tmp/gmr-slurm). No slurmdbd: the workflow's Slurm profile
# polls with squeue, not sacct.
set -euo pipefail

DIR=${GMR_SLURM_DIR:-/tmp/gmr-slurm}

if [[ "${1:-}" == "--install" ]]; then
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    fi
fi
for cmd in slurmctld slurmd sbatch squeue munged; do
    command -v "$cmd" >/dev/null || { echo "slurm-up: $cmd not found; run with --install (root)" >&2; exit 1; }
done

mkdir -p "$DIR"/{state,spool,log}
CONF=/etc/slurm/slurm.conf
MARK="# one-node test cluster written by .ci/slurm-up.sh"
if [[ -e "$CONF" ]] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
    echo "slurm-up: $CONF exists and was not written by this script; not replacing it" >&2
    exit 1
fi
mkdir -p /etc/slurm
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))

cat > "$CONF" <<EOF
$MARK
ClusterName=gmrci
SlurmctldHost=localhost
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# finished jobs stay visible to squeue for 10 minutes (the profile's status command)
MinJobAge=600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
# munge: the Debian package creates the key; start the daemon unless one runs already
if ! munge -n >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    /etc/init.d/munge start >/dev/null
    touch "$DIR/munge-started"
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n >/dev/null || { echo "slurm-up: munge does not work" >&2; exit 1; }

slurmctld -f "$CONF"
slurmd -f "$CONF" -N localhost
for _ in $(seq 100); do
    if sinfo -h -o %t 2>/dev/null | grep -q idle; then
        echo "slurm-up: one-node cluster up ($CPUS CPUs, $MEM_MB MB), config $CONF" >&2
        exit 0
    fi
    sleep 0.2
done
echo "slurm-up: the node did not become idle; logs in $DIR/log:" >&2
tail -n 20 "$DIR"/log/*.log >&2 || true
exit 1
