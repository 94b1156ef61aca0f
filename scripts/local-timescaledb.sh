#!/usr/bin/env bash
# local-timescaledb.sh - a throwaway local PostgreSQL + TimescaleDB for dev and CI.
#
# Usage: scripts/local-timescaledb.sh start|stop|status
#        scripts/local-timescaledb.sh standby start|stop|status|remove
#
#   start   Installs TimescaleDB if it is missing (idempotent; quick when it is
#           already there), then starts a private cluster on 127.0.0.1 with
#           shared_preload_libraries=timescaledb, creates the database
#           "workers" with the timescaledb extension, and prints the DSN as
#           the LAST line of stdout:
#               DSN=$(scripts/local-timescaledb.sh start | tail -n1)
#           Running it while the cluster is already up is harmless.
#   stop    Stops the cluster (fast shutdown). Harmless when it is not running.
#   status  Says whether the cluster is running. When it is, the DSN is the
#           last line of stdout. Exit 0 when running, 3 when not.
#   provision  Only the install step of "start" (a non-root "start" runs this
#           through sudo).
#   standby start   A streaming hot standby of that cluster (started first if
#           needed): made once with pg_basebackup (its own data folder, a
#           replication slot "workers_standby" on the primary), then started on
#           its own port; prints the standby's DSN as the LAST line of stdout.
#           The primary needs nothing but PostgreSQL's defaults, which a fresh
#           "start" keeps (wal_level = replica, max_wal_senders, initdb's
#           "replication" lines in pg_hba.conf); "standby start" checks them on
#           the running primary and changes nothing there.
#   standby stop    Stops the standby (the slot keeps the primary's WAL for it).
#   standby status  As "status", for the standby.
#   standby remove  Stops it, deletes its data folder and drops its slot.
#
# Provisioning (needs root, or sudo when run as another user):
#   * A PostgreSQL 17/16/15 whose extension dir already has timescaledb is used.
#   * Debian 13 (trixie): apt-get install postgresql-17 postgresql-17-timescaledb.
#   * Debian 12 (bookworm): TimescaleDB 2.19.3 (Apache-2 edition) is built from
#     Debian trixie's source package against PostgreSQL 15. Only a deb-src entry
#     for trixie is added (its own file in /etc/apt/sources.list.d/), so no
#     binary package comes from trixie. Build output goes to $BUILD_LOG.
#   The only network used is Debian's apt archive.
#
# Environment overrides:
#   WORKERS_PGDATA  data folder   (default /var/tmp/workers-timescaledb/data)
#   WORKERS_PGPORT  TCP port      (default 55432)
#   WORKERS_STANDBY_PGDATA  the standby's data folder
#                   (default /var/tmp/workers-timescaledb-standby/data)
#   WORKERS_STANDBY_PGPORT  the standby's TCP port (default 55433)
# The unix socket and the server log (postgresql.log) live in the data
# folder's parent. When run as root the cluster belongs to the "postgres" OS
# user (PostgreSQL refuses to run as root); otherwise to the current user.
#
# Progress messages go to stderr; only results (the DSN) go to stdout.
set -euo pipefail

PGDATA_DIR="${WORKERS_PGDATA:-/var/tmp/workers-timescaledb/data}"
PGPORT_NUM="${WORKERS_PGPORT:-55432}"
STANDBY_PGDATA_DIR="${WORKERS_STANDBY_PGDATA:-/var/tmp/workers-timescaledb-standby/data}"
STANDBY_PGPORT_NUM="${WORKERS_STANDBY_PGPORT:-55433}"
STANDBY_SLOT="workers_standby"
DB_NAME="workers"
DB_SUPERUSER="postgres"

TSDB_SRC_VERSION="2.19.3+dfsg-1+deb13u1"
BUILD_DIR="/var/tmp/workers-timescaledb-build"
BUILD_LOG="/var/tmp/workers-timescaledb-build.log"
TRIXIE_SRC_LIST="/etc/apt/sources.list.d/workers-trixie-src.sources"

# Derived paths. Absolute (commands run from the parent folder), and without
# trailing slashes so dirname gives the real parent.
PGDATA_DIR="$(realpath -m -- "$PGDATA_DIR")"
STATE_DIR="$(dirname "$PGDATA_DIR")"
SOCKET_DIR="$STATE_DIR"
SERVER_LOG="$STATE_DIR/postgresql.log"
LOCK_FILE="$STATE_DIR.lock"

SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}")"
PG_BIN=""   # set by select_pg_bin / provision_timescaledb

STANDBY_PGDATA_DIR="$(realpath -m -- "$STANDBY_PGDATA_DIR")"

# ---------------------------------------------------------------- helpers ---

log() { echo "local-timescaledb: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

is_root() { [[ "$(id -u)" -eq 0 ]]; }

# The OS user owning the cluster: postgres when we are root, else ourselves.
cluster_user() {
    if is_root; then echo postgres; else id -un; fi
}

# Run a command as the cluster's OS user, from a folder that user can reach.
as_cluster_user() {
    if is_root; then
        (cd "$STATE_DIR" && runuser -u postgres -- "$@")
    else
        (cd "$STATE_DIR" && "$@")
    fi
}

# Run a noisy command with its output appended to $BUILD_LOG; on failure show
# the log's tail and stop.
run_logged() {
    echo "+ $*" >>"$BUILD_LOG"
    if ! "$@" >>"$BUILD_LOG" 2>&1; then
        log "command failed: $*"
        log "last lines of $BUILD_LOG:"
        tail -n 40 "$BUILD_LOG" >&2
        exit 1
    fi
}

dsn() { echo "postgresql://${DB_SUPERUSER}@127.0.0.1:${1:-$PGPORT_NUM}/${DB_NAME}"; }

apt_install() {
    run_logged env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

# ----------------------------------------------------------- provisioning ---

# Extension dir of PostgreSQL major version $1 (empty when not installed).
pg_extension_dir() {
    local v="$1" pg_config="/usr/lib/postgresql/$1/bin/pg_config"
    if [[ -x "$pg_config" ]]; then
        echo "$("$pg_config" --sharedir)/extension"
    elif [[ -d "/usr/share/postgresql/$v" ]]; then
        echo "/usr/share/postgresql/$v/extension"
    fi
}

# Print the newest PostgreSQL major version (17, 16, 15) that has both a
# server and timescaledb installed; fail when there is none.
find_pg_with_timescaledb() {
    local v ext_dir
    for v in 17 16 15; do
        ext_dir="$(pg_extension_dir "$v")"
        if [[ -n "$ext_dir" && -f "$ext_dir/timescaledb.control" \
              && -x "/usr/lib/postgresql/$v/bin/postgres" ]]; then
            echo "$v"
            return 0
        fi
    done
    return 1
}

os_codename() {
    # shellcheck disable=SC1091
    (. /etc/os-release && echo "${VERSION_CODENAME:-unknown}")
}

install_on_trixie() {
    log "installing postgresql-17 and postgresql-17-timescaledb (apt; log: $BUILD_LOG)"
    run_logged apt-get update
    apt_install postgresql-17 postgresql-17-timescaledb
}

# deb-src only: lets us fetch trixie's timescaledb source, changes no binaries.
add_trixie_deb_src() {
    local wanted
    wanted="$(cat <<'EOF'
# Added by scripts/local-timescaledb.sh: source packages only (no binaries),
# used to build TimescaleDB for PostgreSQL 15 on Debian 12.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
)"
    if [[ "$(cat "$TRIXIE_SRC_LIST" 2>/dev/null)" != "$wanted" ]]; then
        log "adding deb-src entry for Debian trixie: $TRIXIE_SRC_LIST"
        printf '%s\n' "$wanted" >"$TRIXIE_SRC_LIST"
    fi
}

build_on_bookworm() {
    local pg_config=/usr/lib/postgresql/15/bin/pg_config src_dir

    add_trixie_deb_src
    log "apt-get update and build dependencies (log: $BUILD_LOG)"
    run_logged apt-get update
    apt_install postgresql-15 postgresql-server-dev-15 cmake dpkg-dev \
        build-essential libssl-dev libkrb5-dev

    log "building TimescaleDB $TSDB_SRC_VERSION (Apache-2 edition) for PostgreSQL 15 in $BUILD_DIR"
    rm -rf "$BUILD_DIR"
    mkdir -p "$BUILD_DIR"
    (cd "$BUILD_DIR" && run_logged apt-get source "timescaledb=$TSDB_SRC_VERSION")

    src_dir="$(find "$BUILD_DIR" -mindepth 1 -maxdepth 1 -type d -name 'timescaledb-*' | head -n1)"
    [[ -n "$src_dir" ]] || die "apt-get source unpacked nothing into $BUILD_DIR (see $BUILD_LOG)"

    (
        cd "$src_dir"
        run_logged ./bootstrap -DAPACHE_ONLY=1 -DREGRESS_CHECKS=OFF \
            -DTAP_CHECKS=OFF -DPG_CONFIG="$pg_config"
        run_logged make -C build -j"$(nproc 2>/dev/null || echo 2)" install
    )
    log "TimescaleDB installed into $("$pg_config" --sharedir)/extension"
}

# Install PostgreSQL + TimescaleDB for this Debian release. Runs as root.
install_timescaledb() {
    local codename
    codename="$(os_codename)"
    : >>"$BUILD_LOG"
    case "$codename" in
        trixie)   install_on_trixie ;;
        bookworm) build_on_bookworm ;;
        *) die "no PostgreSQL with TimescaleDB found, and don't know how to install it on '$codename' (supported: Debian bookworm, trixie)" ;;
    esac
}

# Make sure a PostgreSQL with timescaledb exists; set PG_BIN to its bin dir.
# Installing needs root: a non-root caller re-runs this script through sudo.
provision_timescaledb() {
    local v
    if ! v="$(find_pg_with_timescaledb)"; then
        if is_root; then
            install_timescaledb
        elif command -v sudo >/dev/null 2>&1; then
            log "TimescaleDB is missing; installing it needs root, using sudo"
            sudo "$SCRIPT_PATH" provision
        else
            die "TimescaleDB is missing and installing it needs root, but you are not root and sudo is not available"
        fi
        v="$(find_pg_with_timescaledb)" \
            || die "TimescaleDB install finished but timescaledb.control is still missing (see $BUILD_LOG)"
    fi
    PG_BIN="/usr/lib/postgresql/$v/bin"
    log "using PostgreSQL $v with TimescaleDB ($PG_BIN)"
}

# ---------------------------------------------------------------- cluster ---

is_initialised() { [[ -f "$PGDATA_DIR/PG_VERSION" ]]; }

# For stop/status: the binaries matching an existing data folder.
select_pg_bin() {
    is_initialised || return 1
    PG_BIN="/usr/lib/postgresql/$(cat "$PGDATA_DIR/PG_VERSION")/bin"
    [[ -x "$PG_BIN/pg_ctl" ]] || die "data folder $PGDATA_DIR needs PostgreSQL $(cat "$PGDATA_DIR/PG_VERSION"), which is not installed"
}

is_running() {
    [[ -n "$PG_BIN" ]] && is_initialised \
        && as_cluster_user "$PG_BIN/pg_ctl" status -D "$PGDATA_DIR" >/dev/null 2>&1
}

# The port the running server actually listens on (line 4 of postmaster.pid).
running_port() {
    local port
    port="$(sed -n 4p "$PGDATA_DIR/postmaster.pid" 2>/dev/null || true)"
    echo "${port:-$PGPORT_NUM}"
}

# Serialise concurrent start/stop calls on the same cluster.
take_lock() {
    exec 9>>"$LOCK_FILE" || die "cannot open lock file $LOCK_FILE"
    chmod 0666 "$LOCK_FILE" 2>/dev/null || true
    flock 9
}

prepare_state_dir() {
    if [[ ! -d "$STATE_DIR" ]]; then
        mkdir -p "$STATE_DIR"
        if is_root; then chown postgres:postgres "$STATE_DIR"; fi
    fi
    if ! as_cluster_user test -w "$STATE_DIR" -a -x "$STATE_DIR"; then
        die "OS user '$(cluster_user)' cannot write to $STATE_DIR; choose another WORKERS_PGDATA (not under /root or /work)"
    fi
}

init_cluster() {
    log "initialising a new cluster in $PGDATA_DIR"
    # Trust auth is fine here: a throwaway dev/test cluster that only listens
    # on 127.0.0.1 and a private unix socket.
    as_cluster_user "$PG_BIN/initdb" -D "$PGDATA_DIR" -A trust \
        --username="$DB_SUPERUSER" -E UTF8 >/dev/null
    as_cluster_user sh -c "echo \"include_if_exists = 'workers-local.conf'\" >> \"\$1/postgresql.conf\"" \
        sh "$PGDATA_DIR"
}

# Our settings, rewritten on every start so port/socket overrides apply: the preloaded
# libraries ($1, default timescaledb) and the primary's or the standby's own lines ($2).
# fsync stays on (the default): durability is part of what gets tested.
write_local_conf() {
    local sock="${SOCKET_DIR//\'/\'\'}"
    as_cluster_user tee "$PGDATA_DIR/workers-local.conf" >/dev/null <<EOF
# Written by scripts/local-timescaledb.sh on every start; edits are lost.
shared_preload_libraries = '${1:-timescaledb}'
timescaledb.telemetry_level = off
listen_addresses = '127.0.0.1'
port = $PGPORT_NUM
unix_socket_directories = '$sock'
max_connections = 200
fsync = on
${2:-$PRIMARY_CONF}
EOF
}

# What a streaming standby ("standby start") needs of its primary: PostgreSQL's defaults,
# spelled out.
PRIMARY_CONF="wal_level = replica
max_wal_senders = 10
max_replication_slots = 10"

wait_until_ready() {
    local _
    for _ in $(seq 1 60); do
        if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$1" -d postgres; then
            return 0
        fi
        sleep 1
    done
    log "server on port $1 did not become ready; last lines of $SERVER_LOG:"
    tail -n 30 "$SERVER_LOG" >&2 || true
    exit 1
}

start_server() {
    log "starting PostgreSQL on 127.0.0.1:$PGPORT_NUM (log: $SERVER_LOG)"
    # 9>&-: the server must not inherit (and so keep holding) our lock.
    if ! as_cluster_user "$PG_BIN/pg_ctl" start -D "$PGDATA_DIR" -l "$SERVER_LOG" \
            -w -t 60 >/dev/null 9>&-; then
        log "pg_ctl start failed; last lines of $SERVER_LOG:"
        tail -n 30 "$SERVER_LOG" >&2 || true
        exit 1
    fi
}

psql_at() {
    local port="$1" db="$2"; shift 2
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" \
        -U "$DB_SUPERUSER" -d "$db" "$@"
}

ensure_database() {
    local port="$1"
    if [[ "$(psql_at "$port" postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]]; then
        log "creating database $DB_NAME"
        psql_at "$port" postgres -c "CREATE DATABASE $DB_NAME"
    fi
    # client_min_messages hides TimescaleDB's multi-line welcome banner.
    psql_at "$port" "$DB_NAME" -c "SET client_min_messages = error" \
        -c "CREATE EXTENSION IF NOT EXISTS timescaledb" >&2
    [[ "$(psql_at "$port" "$DB_NAME" -tAc "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")" == 1 ]] \
        || die "timescaledb extension is missing in database $DB_NAME"
}

# --------------------------------------------------------------- commands ---

cmd_start() {
    local port
    take_lock
    provision_timescaledb
    prepare_state_dir
    if is_initialised; then
        [[ "$PG_BIN" == "/usr/lib/postgresql/$(cat "$PGDATA_DIR/PG_VERSION")/bin" ]] \
            || die "$PGDATA_DIR was made by PostgreSQL $(cat "$PGDATA_DIR/PG_VERSION") but TimescaleDB is on $PG_BIN; remove the folder or set WORKERS_PGDATA"
    else
        init_cluster
    fi

    if is_running; then
        port="$(running_port)"
        log "already running on port $port"
        [[ "$port" == "$PGPORT_NUM" ]] \
            || log "note: running on port $port, not WORKERS_PGPORT=$PGPORT_NUM; stop it first to change the port"
    else
        write_local_conf
        start_server
        port="$PGPORT_NUM"
    fi
    wait_until_ready "$port"
    ensure_database "$port"
    log "ready"
    dsn "$port"
}

cmd_stop() {
    if ! select_pg_bin || ! is_running; then
        log "not running"
        return 0
    fi
    take_lock
    log "stopping PostgreSQL in $PGDATA_DIR"
    as_cluster_user "$PG_BIN/pg_ctl" stop -D "$PGDATA_DIR" -m fast -w -t 60 >/dev/null
    log "stopped"
}

cmd_status() {
    if select_pg_bin && is_running; then
        echo "running: data $PGDATA_DIR, port $(running_port)"
        dsn "$(running_port)"
        return 0
    fi
    echo "not running (data folder $PGDATA_DIR)"
    return 3
}

# ---------------------------------------------------------------- standby ---

PRIMARY_PORT=""

# From here on the cluster functions above act on the standby: its data folder, port, socket,
# log and lock (the primary's port is kept in PRIMARY_PORT).
use_standby() {
    PRIMARY_PORT="$PGPORT_NUM"
    PGDATA_DIR="$STANDBY_PGDATA_DIR"
    PGPORT_NUM="$STANDBY_PGPORT_NUM"
    STATE_DIR="$(dirname "$PGDATA_DIR")"
    SOCKET_DIR="$STATE_DIR"
    SERVER_LOG="$STATE_DIR/postgresql.log"
    LOCK_FILE="$STATE_DIR.lock"
}

# A standby streams the primary's WAL: wal_level replica (or logical) and a free WAL sender,
# both only set by a restart. The script's own "start" spells them out (write_local_conf);
# a primary started otherwise is told what to change, never restarted here.
check_primary_streams() {
    local wal_level senders
    wal_level="$(psql_at "$PRIMARY_PORT" postgres -tAc "SHOW wal_level")"
    senders="$(psql_at "$PRIMARY_PORT" postgres -tAc "SHOW max_wal_senders")"
    [[ "$wal_level" != minimal && "$senders" -gt 0 ]] \
        || die "the primary on port $PRIMARY_PORT has wal_level=$wal_level, max_wal_senders=$senders: a standby needs wal_level=replica and max_wal_senders > 0, which take a restart of the primary (its next \"start\" sets them)"
}

slot_query() {
    psql_at "$PRIMARY_PORT" postgres -tAc "$1"
}

# The standby's settings (the base backup copied the primary's workers-local.conf: rewritten).
# pg_stat_statements is preloaded here only, to watch which statements the standby serves.
# hot_standby_feedback: the primary keeps the row versions the standby's reads still see,
# rather than the standby cancelling those reads when it replays their removal.
write_standby_conf() {
    write_local_conf timescaledb,pg_stat_statements "hot_standby = on
hot_standby_feedback = on"
}

make_standby() {
    prepare_state_dir
    # A slot left by a standby whose folder is gone holds WAL for nothing: dropped.
    slot_query "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                WHERE slot_name = '$STANDBY_SLOT' AND NOT active" >/dev/null
    log "making a standby of port $PRIMARY_PORT in $PGDATA_DIR (pg_basebackup, slot $STANDBY_SLOT)"
    as_cluster_user "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U "$DB_SUPERUSER" \
        -D "$PGDATA_DIR" --write-recovery-conf --wal-method=stream --checkpoint=fast \
        --create-slot --slot="$STANDBY_SLOT" 9>&- \
        || die "pg_basebackup from port $PRIMARY_PORT failed"
}

# The standby has replayed the primary's WAL up to now (the database "workers" included).
wait_until_replayed() {
    local target _
    target="$(psql_at "$PRIMARY_PORT" postgres -tAc "SELECT pg_current_wal_lsn()")"
    for _ in $(seq 1 60); do
        if [[ "$(psql_at "$PGPORT_NUM" postgres -tAc "SELECT pg_last_wal_replay_lsn() >= '$target'::pg_lsn")" == t ]]; then
            return 0
        fi
        sleep 1
    done
    die "the standby on port $PGPORT_NUM did not replay the primary's WAL within 60 s (log: $SERVER_LOG)"
}

cmd_standby_start() {
    cmd_start >/dev/null   # the primary, provisioned and running; PG_BIN set
    PGPORT_NUM="$(running_port)"
    use_standby
    check_primary_streams
    take_lock
    is_initialised || make_standby
    if is_running; then
        log "standby already running on port $(running_port)"
    else
        write_standby_conf
        start_server
    fi
    wait_until_ready "$(running_port)"
    wait_until_replayed
    log "standby ready"
    dsn "$(running_port)"
}

cmd_standby_remove() {
    use_standby
    if select_pg_bin && is_running; then
        cmd_stop
    fi
    take_lock
    if [[ -d "$PGDATA_DIR" ]]; then
        log "removing $PGDATA_DIR"
        rm -rf -- "$PGDATA_DIR"
    fi
    PGDATA_DIR="$(realpath -m -- "${WORKERS_PGDATA:-/var/tmp/workers-timescaledb/data}")"
    if select_pg_bin && is_running; then
        slot_query "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                    WHERE slot_name = '$STANDBY_SLOT' AND NOT active" >/dev/null
        log "dropped the slot $STANDBY_SLOT"
    fi
}

cmd_standby() {
    case "${1:-}" in
        start)  cmd_standby_start ;;
        stop)   use_standby; cmd_stop ;;
        status) use_standby; cmd_status ;;
        remove) cmd_standby_remove ;;
        *) echo "usage: $0 standby start|stop|status|remove" >&2; exit 2 ;;
    esac
}

main() {
    case "${1:-}" in
        start)  cmd_start ;;
        provision) provision_timescaledb ;;  # internal: what start installs
        stop)   cmd_stop ;;
        status) cmd_status ;;
        standby) cmd_standby "${2:-}" ;;
        *) echo "usage: $0 start|stop|status|standby start|stop|status|remove" >&2; exit 2 ;;
    esac
}

main "$@"
