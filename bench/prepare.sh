# Sourced by the benchmarks' commands (bench/*.sh): from the project root, sets up .venv
# ($python) and starts the local TimescaleDB unless WORKERS_DB_DSN names a database;
# install_wrk installs wrk (apt-get) for the benchmarks that send with it.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="$(scripts/setup-venv.sh | tail -n1)"

if [ -z "${WORKERS_DB_DSN:-}" ]; then
    WORKERS_DB_DSN="$(scripts/local-timescaledb.sh start | tail -n1)"
    export WORKERS_DB_DSN
fi

install_wrk() {
    command -v wrk >/dev/null 2>&1 && return 0
    echo "installing wrk (apt-get)" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk >&2 || {
        $sudo apt-get update >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk >&2
    }
}
