#!/usr/bin/env bash
# Stop the cluster started by start.sh: cancel all jobs first (job processes outlive slurmd),
# then stop slurmd(s), slurmctld and munged by their pid files only (never by process name).
ROOT=${SLURM_ROOT:-/tmp/btm-slurm}
export SLURM_CONF="$ROOT/etc/slurm.conf"
export PATH=$PATH:/usr/sbin:/sbin
stop() {  # $1 = pid file
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then echo "pid $pid ($1) ignored SIGTERM; SIGKILL"; kill -KILL "$pid"; fi
  fi
  rm -f "$1"
}
if [ -f "$ROOT/run/slurmctld.pid" ] && kill -0 "$(cat "$ROOT/run/slurmctld.pid")" 2>/dev/null; then
  scancel --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 1 150); do squeue -h 2>/dev/null | grep -q . || break; sleep 0.1; done
  left=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "$left" ]; then   # last resort: the job processes slurmd knows about, by pid
    echo "jobs still present after scancel: $left" >&2
    for p in $(scontrol listpids 2>/dev/null | awk 'NR>1 && $1 ~ /^[0-9]+$/ {print $1}'); do kill -KILL "$p" 2>/dev/null; done
  fi
fi
shopt -s nullglob
for f in "$ROOT"/run/slurmd-*.pid "$ROOT/run/slurmctld.pid"; do stop "$f" & done; wait
stop "$ROOT/run/munged.pid"
echo "stopped"
