#!/usr/bin/env bash
# A throw-away single-node SLURM cluster (with accounting) on this machine, for CI and for
# trying the SLURM profile locally. Debian/Ubuntu, run as root, no systemd needed.
#
#   .ci/slurm-cluster.sh start    install what is missing, (re)start every daemon, wait for `idle`
#   .ci/slurm-cluster.sh stop     stop the daemons started by `start` (by their pid files)
#   .ci/slurm-cluster.sh status   show what runs
#
# Both subcommands are safe to run twice: `start` first stops an earlier cluster and deletes
# its state folder, so every start begins from a clean slate (no drained node, no old queue).
#
# Daemons, in start order: munged (authentication), MariaDB (accounting database), slurmdbd
# (accounting daemon; without it `sacct` fails and the snakemake SLURM plugin hangs),
# slurmctld (controller), slurmd (the one compute node: this machine).
#
# Everything lives in $SLURM_CI_STATE (default /tmp/slurm-ci): SLURM's state and spool, pid
# files, logs, the database. Written outside it: /etc/slurm/{slurm,slurmdbd,gres}.conf (where
# every SLURM command looks; marked as ours, and never overwriting a file without the mark),
# /etc/munge/munge.key if the package made none, and the runtime folders /run/munge, /run/mysqld.
# If `start` fails, the daemons it started keep running for inspection; `stop` ends them.
#
# The node advertises 2 fake GPUs (gres `gpu`, backed by /dev/null and /dev/zero), so jobs that
# ask for `--gpus=1` are scheduled like on a GPU cluster; they get CUDA_VISIBLE_DEVICES but no
# real device (PyTorch then falls back to the CPU). Set SLURM_CI_FAKE_GPUS=0 to leave them out.
set -euo pipefail

STATE=${SLURM_CI_STATE:-/tmp/slurm-ci}
CLUSTER=${SLURM_CI_CLUSTER:-ci}
FAKE_GPUS=${SLURM_CI_FAKE_GPUS:-2}
MARK="# written by .ci/slurm-cluster.sh"
ETC=/etc/slurm
MYSQL_SOCKET=/run/mysqld/mysqld.sock

say() { echo "[slurm-cluster] $*"; }
die() {
    echo "[slurm-cluster] ERROR: $*" >&2
    exit 1
}

# --- stop ------------------------------------------------------------------------------------

# Stop the daemon whose pid is in file $2 (name $1): SIGTERM, then SIGKILL after 10 s.
stop_pidfile() {
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        say "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name ignored SIGTERM; sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

stop() {
    # reverse start order; only daemons this script started have pid files in $STATE
    stop_pidfile slurmd "$STATE/slurmd.pid"
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
    stop_pidfile slurmdbd "$STATE/slurmdbd.pid"
    stop_pidfile mariadbd "$STATE/mysql/mariadbd.pid"
    stop_pidfile munged "$STATE/munge/munged.pid"
    say "stop: done (state and logs stay in $STATE until the next start)"
}

# --- start -----------------------------------------------------------------------------------

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
        || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    if ((${#missing[@]} == 0)); then
        say "packages present: slurm-wlm munge slurmdbd mariadb-server"
        return
    fi
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]} (apt-get)"
    # Keep the packages' init scripts from starting daemons of their own during installation:
    # this script starts every daemon itself. (policy-rc.d is Debian's standard switch.)
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        created_policy=1
    fi
    local rc=0
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    } >"/tmp/slurm-cluster-apt.log" 2>&1 || rc=$?
    ((created_policy)) && rm -f "$policy"
    ((rc == 0)) || {
        tail -n 30 /tmp/slurm-cluster-apt.log >&2
        die "apt-get failed (full log: /tmp/slurm-cluster-apt.log)"
    }
}

# Write a config file under /etc/slurm unless a file not written by this script is there.
write_conf() {
    local path=$1 mode=$2 content=$3
    if [[ -e $path ]] && ! grep -qF "$MARK" "$path"; then
        die "$path exists and was not written by this script; not overwriting it (move it away first)"
    fi
    printf '%s\n%s\n' "$MARK" "$content" >"$path"
    chmod "$mode" "$path"
}

write_configs() {
    local host cpus mem gres_line=""
    host=$(hostname -s)
    cpus=$(nproc)
    # RealMemory as slurmd measures it, less 1 GB for the system (SLURM drains a node that
    # reports less memory than configured).
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem > 2048 ? mem - 1024 : mem))
    mkdir -p "$ETC"

    local gres_conf="" i
    if ((FAKE_GPUS > 0)); then
        gres_line=" Gres=gpu:$FAKE_GPUS"
        local files=(/dev/null /dev/zero /dev/full /dev/random /dev/urandom)
        ((FAKE_GPUS <= ${#files[@]})) || die "SLURM_CI_FAKE_GPUS must be at most ${#files[@]}"
        for ((i = 0; i < FAKE_GPUS; i++)); do
            gres_conf+="NodeName=$host Name=gpu File=${files[$i]}"$'\n'
        done
    fi
    write_conf "$ETC/gres.conf" 644 "$gres_conf"

    write_conf "$ETC/slurm.conf" 644 "ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# no cgroups here: plain process tracking, no task confinement
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# finished jobs stay visible to squeue for 5 minutes
MinJobAge=300
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# accounting through slurmdbd: sacct works, and keeps each job's --comment (the plugin puts
# the rule name there)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoreFlags=job_comment
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem$gres_line State=UNKNOWN
PartitionName=$CLUSTER Nodes=ALL Default=YES MaxTime=INFINITE State=UP"

    write_conf "$ETC/slurmdbd.conf" 600 "AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db"
}

# Wait up to $1 seconds for command "${@:2}" to succeed.
wait_for() {
    local seconds=$1
    shift
    for _ in $(seq $((seconds * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

# Fail with the tail of a daemon's log.
fail_with_log() {
    local what=$1 log=$2
    [[ -f $log ]] && tail -n 20 "$log" >&2
    die "$what (log: $log)"
}

start_munge() {
    # reuse a munged that already answers (e.g. the system's own); else start ours
    if [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already running; using it"
        return
    fi
    [[ -s /etc/munge/munge.key ]] || {
        say "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
    }
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    # munged runs as the munge user: its pid file and log sit in a folder that user owns
    install -d -o munge -g munge -m 700 "$STATE/munge"
    say "starting munged"
    runuser -u munge -- munged --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
        || fail_with_log "munged did not start" "$STATE/munge/munged.log"
    wait_for 10 bash -c 'munge -n </dev/null | unmunge' || fail_with_log "munge does not answer" "$STATE/munge/munged.log"
}

start_mariadb() {
    if [[ -S $MYSQL_SOCKET ]] && mariadb-admin --socket="$MYSQL_SOCKET" ping >/dev/null 2>&1; then
        die "a MariaDB not started by this script answers on $MYSQL_SOCKET; stop it first"
    fi
    say "creating an empty accounting database in $STATE/mysql"
    install -d -o mysql -g mysql -m 700 "$STATE/mysql"
    mariadb-install-db --user=mysql --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
        --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
        || fail_with_log "mariadb-install-db failed" "$STATE/log/mariadb-install.log"
    install -d -o mysql -g mysql -m 755 /run/mysqld
    say "starting mariadbd (socket $MYSQL_SOCKET, no TCP)"
    # mariadbd stays in the foreground: detach it (setsid, no inherited stdio). It runs as the
    # mysql user, so its pid file and log sit in its own folder.
    setsid mariadbd --user=mysql --datadir="$STATE/mysql" --socket="$MYSQL_SOCKET" --skip-networking \
        --pid-file="$STATE/mysql/mariadbd.pid" --log-error="$STATE/mysql/mariadb.log" </dev/null >/dev/null 2>&1 &
    wait_for 30 mariadb-admin --socket="$MYSQL_SOCKET" ping || fail_with_log "MariaDB did not start" "$STATE/mysql/mariadb.log"
}

start_slurm() {
    say "starting slurmdbd"
    slurmdbd || fail_with_log "slurmdbd did not start" "$STATE/log/slurmdbd.log"
    # registering the cluster also proves slurmdbd answers
    wait_for 30 sacctmgr -i add cluster "$CLUSTER" \
        || sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" \
        || fail_with_log "slurmdbd does not answer" "$STATE/log/slurmdbd.log"
    # an account for root, as on a real cluster (jobs may then name it with -A)
    sacctmgr -i add account "$CLUSTER" Description="CI jobs" Organization=ci >/dev/null
    sacctmgr -i add user root Account="$CLUSTER" DefaultAccount="$CLUSTER" >/dev/null
    say "registered cluster '$CLUSTER' and account '$CLUSTER' (user root) in the accounting database"
    say "starting slurmctld"
    slurmctld -i || fail_with_log "slurmctld did not start" "$STATE/log/slurmctld.log"
    say "starting slurmd"
    slurmd || fail_with_log "slurmd did not start" "$STATE/log/slurmd.log"
    say "waiting for the node to be idle"
    # shellcheck disable=SC2016  # expanded by the inner bash, on each try
    wait_for 60 bash -c '[[ $(sinfo -h -o %t) == idle ]]' || {
        sinfo -N -l >&2 || true
        fail_with_log "node not idle after 60 s" "$STATE/log/slurmctld.log"
    }
}

start() {
    local t0=$SECONDS
    ((EUID == 0)) || die "run as root (installs packages, starts daemons)"
    stop
    install_packages
    say "fresh state folder $STATE"
    rm -rf "$STATE"
    install -d -m 755 "$STATE" "$STATE/log" "$STATE/slurmctld" "$STATE/slurmd"
    write_configs
    start_munge
    start_mariadb
    start_slurm
    sinfo
    say "cluster '$CLUSTER' ready in $((SECONDS - t0)) s; logs in $STATE/log; stop with: $0 stop"
}

status() {
    local name pidfile pid
    for name in munge/munged mysql/mariadbd slurmdbd slurmctld slurmd; do
        pidfile=$STATE/$name.pid
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            say "${name#*/} running (pid $pid)"
        else
            say "${name#*/} not running"
        fi
    done
    if command -v sinfo >/dev/null; then
        timeout 5 sinfo 2>&1 || true
    fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
