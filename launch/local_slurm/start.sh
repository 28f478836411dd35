#!/usr/bin/env bash
# Start the project's local SLURM cluster for tests: slurmctld + N slurmd on 127.0.0.1, fake GPUs,
# no systemd, as root. Idempotent: a previous instance under $SLURM_ROOT is stopped first.
# Afterwards every shell that calls sbatch/squeue needs: export SLURM_CONF=$SLURM_ROOT/etc/slurm.conf
#
# Knobs (env): SLURM_ROOT=/tmp/btm-slurm  SLURM_NODES=16  SLURM_FAKE_GPUS=4 (per node)
#   SLURM_FAKE_CPUS=8 (per node)  SLURM_CTLD_PORT=6817  SLURM_D_PORT=6818 (node i: D_PORT+i-1)
#   SLURM_CRED_EXPIRE=10  BTM_SLURM_NO_APT=1 (never apt-get; fail if the daemons are missing)
#
# Why 16 nodes x 4 GPUs: a GPU is never shared between jobs, and BTM runs 16 concurrent
# 4-GPU experts per cycle, so the test cluster must hold 64 GPUs in 16 node-sized pieces.
set -euo pipefail
T0=$(date +%s%N)
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${SLURM_ROOT:-/tmp/btm-slurm}
NNODES=${SLURM_NODES:-16}
NGPU=${SLURM_FAKE_GPUS:-4}
NCPU=${SLURM_FAKE_CPUS:-8}
CPORT=${SLURM_CTLD_PORT:-6817}
DPORT=${SLURM_D_PORT:-6818}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}   # also the hold before a requeued job restarts (default 120 s)
export PATH=$PATH:/usr/sbin:/sbin

# 1. Daemons: Debian's packages (munge comes with them). CI is a fresh Debian machine, as root.
missing=""
for b in slurmctld slurmd sinfo sbatch munged; do command -v "$b" >/dev/null || missing="$missing $b"; done
if [ -n "$missing" ]; then
  if [ "${BTM_SLURM_NO_APT:-0}" = 1 ] || [ "$(id -u)" != 0 ]; then
    echo "start.sh: missing$missing; install: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client" >&2
    exit 1
  fi
  echo "start.sh: installing slurmctld slurmd slurm-client (missing:$missing)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >&2
fi

# 2. Idempotent: stop whatever a previous start left running under the same root.
SLURM_ROOT=$ROOT bash "$HERE/stop.sh" >/dev/null 2>&1 || true

# 3. Fresh state. Fake GPUs must stat() as a device (a plain file is rejected), so symlinks to
#    /dev/null; the GPU index comes from the digits of the link name.
rm -rf "$ROOT/state" "$ROOT/spool" "$ROOT/log" "$ROOT/dev" "$ROOT/etc"
mkdir -p "$ROOT"/{etc,state,spool,log,run,dev,munge}
for i in $(seq 0 $((NGPU - 1))); do ln -s /dev/null "$ROOT/dev/nvidia$i"; done
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 / NNODES ))
[ "$MEM_MB" -lt 1000 ] && MEM_MB=1000   # fake: config_overrides lets it exceed the machine

# Several slurmd on one host ("multiple slurmd" mode): node names do not resolve, hence
# NodeAddr=127.0.0.1 (and MASTER_ADDR=127.0.0.1 in jobs).
NODELINES=""
for i in $(seq 1 "$NNODES"); do
  NODELINES+="NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((DPORT + i - 1)) CPUs=$NCPU Boards=1 SocketsPerBoard=1 CoresPerSocket=$NCPU ThreadsPerCore=1 RealMemory=$MEM_MB Gres=gpu:$NGPU"$'\n'
  mkdir -p "$ROOT/spool/node$i"   # slurmd does not create SlurmdSpoolDir itself
done

# DependencyParameters=kill_invalid_depend: a job whose afterok dependency failed is cancelled
# instead of pending forever (SchedulerParameters=kill_invalid_depend is silently ignored).
cat > "$ROOT/etc/slurm.conf" <<CONF
ClusterName=btmlocal
SlurmctldHost=localhost
SlurmctldPort=$CPORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$ROOT/munge/munge.socket,cred_expire=$CRED_EXPIRE
MailProg=/bin/true
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.txt
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
DependencyParameters=kill_invalid_depend
ReturnToService=2
MinJobAge=3600
MaxArraySize=10001
InactiveLimit=0
KillWait=5
SlurmdParameters=config_overrides
GresTypes=gpu
${NODELINES}
PartitionName=debug Nodes=node[1-$NNODES] Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
CONF
echo "NodeName=node[1-$NNODES] Name=gpu File=$ROOT/dev/nvidia[0-$((NGPU - 1))]" > "$ROOT/etc/gres.conf"
export SLURM_CONF="$ROOT/etc/slurm.conf"

# 4. A private munged (own key and socket; never touches a system one), then the daemons.
[ -f "$ROOT/munge/munge.key" ] || dd if=/dev/urandom of="$ROOT/munge/munge.key" bs=1024 count=1 status=none
chmod 755 "$ROOT/munge"; chmod 400 "$ROOT/munge/munge.key"
munged --force --key-file="$ROOT/munge/munge.key" --socket="$ROOT/munge/munge.socket" \
  --pid-file="$ROOT/run/munged.pid" --log-file="$ROOT/log/munged.log" --seed-file="$ROOT/munge/munged.seed"
slurmctld -c -f "$SLURM_CONF"   # -c: empty job state; forks, writes its pid file
for i in $(seq 1 "$NNODES"); do slurmd -c -N "node$i" -f "$SLURM_CONF"; done

# 5. Ready when every node is idle.
st=""
for _ in $(seq 1 400); do
  st=$(sinfo -h -o %T 2>/dev/null | sort -u | tr '\n' ' ' || true)
  [ "$st" = "idle " ] && break
  sleep 0.1
done
if [ "$st" != "idle " ]; then
  echo "start.sh: cluster not idle after 40 s (state: '$st')" >&2
  sinfo -N -o '%N %T %E' >&2 || true; tail -n 20 "$ROOT"/log/slurmctld.log >&2 || true
  exit 1
fi
echo "SLURM up: $NNODES nodes x $NGPU fake GPUs in $(( ($(date +%s%N) - T0) / 1000000 )) ms; export SLURM_CONF=$SLURM_CONF"
