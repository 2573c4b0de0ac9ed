#!/usr/bin/env bash
# A throwaway single-node Slurm 22.05 (Debian 12 packages) for tests, everything under DIR:
# config, state, spool, logs, pid files, the munge key and socket, MariaDB's datadir. Needs root.
#
#   scripts/slurm_cluster.sh up DIR     # prints `export SLURM_CONF=DIR/slurm.conf` (also in DIR/env.sh)
#   scripts/slurm_cluster.sh down DIR   # cancels the jobs, stops the daemons it started, by PID
#
# Accounting (slurmdbd + MariaDB) is on because submitit reads job states with `sacct`: without it
# a job that died reads UNKNOWN and submitit waits for it forever. The daemons listen on
# 0.0.0.0:6817-6819 (and DB_PORT, default 3307, on 127.0.0.1 only) but are only addressed on
# 127.0.0.1. `up` fails (exit 1, with the log's tail) rather than leave a half-working cluster.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DB_PORT=${DB_PORT:-3307}
SLURM_PORTS=(6817 6818 6819)

die() { echo "slurm_cluster: error: $*" >&2; exit 1; }
usage() { die "usage: $0 up|down DIR"; }

[[ $# -eq 2 ]] || usage
ACTION=$1
DIR=$(realpath -m "$2")
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
# name:pid-file, in start order; `down` stops them in reverse.
DAEMONS=(munged:$DIR/munge/munged.pid mariadbd:$DIR/db/mariadbd.pid slurmdbd:$DIR/run/slurmdbd.pid
         slurmctld:$DIR/run/slurmctld.pid slurmd:$DIR/run/slurmd.pid)

# The pid in FILE if that process is alive and is NAME (a stale file may name a reused pid).
alive() {
    local name=$1 file=$2 pid
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(</proc/$pid/comm) == "$name" ]] || return 1
    echo "$pid"
}

# wait_for SECONDS WHAT LOG CMD...: retry CMD until it succeeds; on timeout, fail with LOG's tail.
wait_for() {
    local seconds=$1 what=$2 log=$3; shift 3
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "slurm_cluster: $what not ready after ${seconds}s; last lines of $log:" >&2
            tail -n 20 "$log" >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.2
    done
}

# logged LOG CMD...: run CMD with its output appended to LOG; on failure show LOG's tail.
logged() {
    local log=$1; shift
    "$@" </dev/null >>"$log" 2>&1 && return 0
    echo "slurm_cluster: $1 failed; last lines of $log:" >&2
    tail -n 20 "$log" >&2
    return 1
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install_packages() {
    local missing=0 cmd
    for cmd in munged mungekey mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch srun sacct sacctmgr; do
        command -v "$cmd" >/dev/null || missing=1
    done
    ((missing)) || return 0
    echo "slurm_cluster: installing ${PACKAGES[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${PACKAGES[@]}" >"$DIR/log/apt.log" 2>&1 ||
        { apt-get update >>"$DIR/log/apt.log" 2>&1 &&
          apt-get install -y --no-install-recommends "${PACKAGES[@]}" >>"$DIR/log/apt.log" 2>&1; } ||
        { tail -n 20 "$DIR/log/apt.log" >&2; die "could not install ${PACKAGES[*]} (see $DIR/log/apt.log)"; }
}

write_configs() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # below what slurmd sees
    cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a single-node test cluster living in $DIR.
ClusterName=test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# Our own munge socket; short credential life, or a requeued job waits 120 s to start again.
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
KillWait=5
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# The munge socket for talking to slurmdbd (AuthInfo's socket= is not used for that connection).
AccountingStoragePass=$DIR/munge/munge.socket.2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    : >"$DIR/plugstack.conf"
    # slurmdbd finds slurmdbd.conf next to SLURM_CONF; it must be 0600 and owned by its SlurmUser.
    (umask 077; cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    )
}

start_munge() {
    install -d -o munge -g munge -m 755 "$DIR/munge"  # the socket's folder must be world-executable
    [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
    chown munge:munge "$DIR/munge/munge.key"; chmod 400 "$DIR/munge/munge.key"
    : >"$DIR/log/munged.log"; chown munge:munge "$DIR/log/munged.log"
    logged "$DIR/log/munged.log" runuser -u munge -- munged --socket="$DIR/munge/munge.socket.2" \
        --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    wait_for 10 munged "$DIR/log/munged.log" \
        bash -c "munge -n -S '$DIR/munge/munge.socket.2' | unmunge -S '$DIR/munge/munge.socket.2'"
}

start_mariadb() {
    local db=$DIR/db sql
    install -d -o mysql -g mysql -m 700 "$db"
    if [[ ! -d $db/data/mysql ]]; then
        logged "$DIR/log/mariadb-install.log" mariadb-install-db --no-defaults --user=mysql \
            --datadir="$db/data" --skip-test-db --auth-root-authentication-method=socket
    fi
    : >"$DIR/log/mariadb.log"; chown mysql:mysql "$DIR/log/mariadb.log"
    setsid mariadbd --no-defaults --user=mysql --datadir="$db/data" --socket="$db/mysqld.sock" \
        --pid-file="$db/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --innodb-log-file-size=64M \
        --log-error="$DIR/log/mariadb.log" </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadbd "$DIR/log/mariadb.log" mariadb-admin --no-defaults --socket="$db/mysqld.sock" ping
    wait_for 10 mariadbd "$DIR/log/mariadb.log" alive mariadbd "$db/mariadbd.pid"
    sql="CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    mariadb --no-defaults --socket="$db/mysqld.sock" -u root -e "$sql"
}

start_slurm() {
    export SLURM_CONF=$CONF
    logged "$DIR/log/slurmdbd.log" slurmdbd
    wait_for 30 slurmdbd "$DIR/log/slurmdbd.log" sacctmgr -n list cluster
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx test; then
        sacctmgr -i add cluster test >/dev/null
    fi
    logged "$DIR/log/slurmctld.log" slurmctld
    wait_for 30 slurmctld "$DIR/log/slurmctld.log" bash -c "scontrol ping | grep -q UP"
    logged "$DIR/log/slurmd.log" slurmd -N "$HOST"
    wait_for 30 "slurmd (node idle)" "$DIR/log/slurmd.log" \
        bash -c "sinfo -h -N -n '$HOST' -o %t | grep -qx idle"
}

up() {
    local running=0 entry port
    ((EUID == 0)) || die "must run as root (it starts munged/mariadbd as their users)"
    for entry in "${DAEMONS[@]}"; do alive "${entry%%:*}" "${entry#*:}" >/dev/null && running=$((running + 1)); done
    if ((running == ${#DAEMONS[@]})) && SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q UP; then
        echo "slurm_cluster: reusing the cluster already running in $DIR" >&2
        cat "$DIR/env.sh"; return 0
    fi
    ((running == 0)) || die "a partial cluster runs in $DIR ($running of ${#DAEMONS[@]} daemons); run: $0 down $DIR"
    # Unix socket paths are limited to 107 bytes.
    ((${#DIR} <= 80)) || die "DIR is too long for the munge/mariadb sockets (${#DIR} > 80 chars): $DIR"
    mkdir -p "$DIR"/{log,run,state,spool}
    install_packages
    chmod 755 "$DIR"  # munge and mysql must reach their folders in it
    runuser -u munge -- test -x "$DIR" || die "user munge cannot reach $DIR (a parent folder is private?)"
    for port in "${SLURM_PORTS[@]}" "$DB_PORT"; do
        ! port_busy "$port" || die "port $port is in use on 127.0.0.1 (another Slurm or database?)"
    done
    local t0=$SECONDS
    write_configs
    # Any failure from here (set -e) stops what was started, then fails.
    trap 'echo "slurm_cluster: error: could not bring up Slurm in $DIR (logs in $DIR/log)" >&2; down; exit 1' EXIT
    start_munge
    start_mariadb
    start_slurm
    trap - EXIT
    echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
    echo "slurm_cluster: up in $((SECONDS - t0))s: node $HOST, $(nproc) CPUs, logs in $DIR/log" >&2
    cat "$DIR/env.sh"
}

# SIGTERM, then SIGKILL after 15 s, the daemon NAME whose pid is in FILE; nothing if it is gone.
stop() {
    local name=$1 file=$2 pid i
    pid=$(alive "$name" "$file") || { rm -f "$file"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 75; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.2
    done
    if [[ -d /proc/$pid ]]; then
        echo "slurm_cluster: $name ($pid) ignored SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
    echo "slurm_cluster: stopped $name ($pid)" >&2
}

down() {
    local i entry pid
    export SLURM_CONF=$CONF
    # Jobs first, while slurmctld and slurmd can still end them (their slurmstepd outlive slurmd).
    if alive slurmctld "$DIR/run/slurmctld.pid" >/dev/null; then
        timeout 10 squeue -h -o %A 2>/dev/null | xargs -r timeout 10 scancel --quiet 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            [[ -z $(timeout 5 squeue -h -o %A 2>/dev/null || true) ]] && break
            sleep 0.2
        done
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        entry=${DAEMONS[i]}
        stop "${entry%%:*}" "${entry#*:}"
    done
    # A slurmstepd that slurmd left behind (it carries our SLURM_CONF in its environment).
    for pid in $(pgrep -x slurmstepd || true); do
        if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
            echo "slurm_cluster: killing leftover slurmstepd $pid" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    echo "slurm_cluster: down ($DIR)" >&2
}

case $ACTION in
    up) up ;;
    down) down ;;
    *) usage ;;
esac
