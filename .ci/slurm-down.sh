#!/usr/bin/env bash
# Stop the one-node Slurm cluster of .ci/slurm-up.sh: the daemons named by its pid files, and munge if
# slurm-up started it. Safe to run when nothing runs.
set -uo pipefail

DIR=${GMR_SLURM_DIR:-/tmp/gmr-slurm}

stop_pidfile() {
    local file=$1 pid
    [[ -f "$file" ]] || return 0
    pid=$(cat "$file")
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$file"
}

CONF=/etc/slurm/slurm.conf
MARK="# one-node test cluster written by .ci/slurm-up.sh"
OURS=0
[[ -f "$CONF" ]] && head -n 1 "$CONF" | grep -qF "$MARK" && OURS=1
if [[ $OURS == 1 && -f "$DIR/slurmctld.pid" ]] && command -v scancel >/dev/null; then
    timeout 20 scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
fi
stop_pidfile "$DIR/slurmd.pid"
stop_pidfile "$DIR/slurmctld.pid"
if [[ -f "$DIR/munge-started" ]]; then
    stop_pidfile /run/munge/munged.pid
    rm -f "$DIR/munge-started"
fi
[[ $OURS == 1 ]] && rm -f "$CONF"
echo "slurm-down: stopped" >&2
