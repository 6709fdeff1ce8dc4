#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/slurm (`make test-slurm`, CI's .ci/run).
#
#   sudo scripts/slurm_cluster.sh          # install (Debian/Ubuntu apt), configure, start; check
#   scripts/slurm_cluster.sh --check       # only check that it is up (exit 1 if not)
#   sudo scripts/slurm_cluster.sh --stop   # stop the daemons this script started
#
# Idempotent: when munge, slurmctld and slurmd answer and the node is usable, a second call
# only says so. Needs root to install and start (there is no systemd here: the daemons are
# started directly and run in the background). The config it writes, /etc/slurm/slurm.conf,
# is marked as ours; a slurm.conf written by someone else is never replaced (use that cluster).
# Every failure prints the daemons' log tails and exits non-zero: CI must see it.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by metacl scripts/slurm_cluster.sh"
LOGS=/var/log/slurm
PARTITION=debug

say() { echo "slurm_cluster: $*" >&2; }

fail() {
    say "FAILED: $*"
    for f in /var/log/munge/munged.log "$LOGS/slurmctld.log" "$LOGS/slurmd.log"; do
        [ -r "$f" ] && { echo "--- tail $f" >&2; tail -n 25 "$f" >&2; }
    done
    exit 1
}

# Up = munge round-trips a credential, the controller answers, our node is idle/mixed/allocated.
cluster_up() {
    command -v sinfo >/dev/null 2>&1 || return 1
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || return 1
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    sinfo -h -N -o "%t" 2>/dev/null | grep -qE "^(idle|mix|alloc|comp)" || return 1
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' postinst must not try to start services (no init system): a policy-rc.d
    # that refuses, for the time of the install, unless the machine has one already.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
        >/tmp/slurm_cluster_apt.log 2>&1 \
        || { apt-get update -qq >>/tmp/slurm_cluster_apt.log 2>&1 \
             && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client \
                munge >>/tmp/slurm_cluster_apt.log 2>&1; } \
        || { tail -n 30 /tmp/slurm_cluster_apt.log >&2; fail "apt-get install"; }
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        fail "$CONF exists and was not written by this script; not replacing it"
    fi
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # The node's memory as slurmd measures it (a larger RealMemory would drain the node).
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    [ -n "$mem" ] || fail "slurmd -C reported no RealMemory"
    mkdir -p /etc/slurm "$LOGS" /var/spool/slurmctld /var/spool/slurmd
    cat >"$CONF.tmp" <<EOF
$MARK
# One node, no accounting (sacct is unavailable; submitit warns and polls its result files).
ClusterName=metacl
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Batch jobs can be requeued (scontrol requeue, submitit's pre-emption/time-out handler).
JobRequeue=1
ReturnToService=2
# SIGTERM -> SIGKILL this many seconds later when a job is cancelled, requeued or timed out.
KillWait=30
MinJobAge=300
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    # --force: start over a stale socket left by a munged that died
    runuser -u munge -- /usr/sbin/munged --force || fail "munged did not start"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    fail "munge does not round-trip a credential"
}

# $1 = daemon name, then its options; starts it unless its pid file names a live process.
start_daemon() {
    local name=$1 pidfile="/run/$1.pid"
    shift
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        return
    fi
    "/usr/sbin/$name" "$@" || fail "$name did not start"
}

wait_until_up() {
    for _ in $(seq 100); do
        cluster_up && return
        sleep 0.2
    done
    # A node left DOWN/DRAIN by an earlier run of the daemons: bring it back once.
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    for _ in $(seq 50); do
        cluster_up && return
        sleep 0.2
    done
    sinfo -N -l >&2 || true
    fail "the cluster did not come up"
}

# $1 = pid file: TERM the daemon it names and wait (up to 10 s) until it is gone.
stop_daemon() {
    local pid
    [ -f "$1" ] && pid=$(cat "$1") && kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    say "stopped $(basename "$1" .pid)"
}

stop_cluster() {
    stop_daemon /run/slurmd.pid
    stop_daemon /run/slurmctld.pid
    stop_daemon /run/munge/munged.pid
}

main() {
    case "${1:-}" in
        --check) cluster_up && { say "up"; exit 0; }; say "not up"; exit 1 ;;
        --stop) stop_cluster; exit 0 ;;
        "") ;;
        *) say "usage: $0 [--check|--stop]"; exit 2 ;;
    esac
    if cluster_up; then
        say "already up ($(sinfo -h -N -o '%N %c CPUs %m MB %t'))"
        exit 0
    fi
    [ "$(id -u)" = 0 ] || fail "not up, and starting it needs root (run it with sudo)"
    install_packages
    write_config
    start_munge
    start_daemon slurmctld -c # -c: a test cluster starts without the jobs of an earlier life
    start_daemon slurmd
    wait_until_up
    say "up ($(sinfo -h -N -o '%N %c CPUs %m MB %t'))"
}

main "$@"
