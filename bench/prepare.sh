# Sourced by the benchmarks' commands (bench/*.sh): from the project root, sets up .venv
# ($python) and starts the local TimescaleDB unless WORKERS_DB_DSN names a database.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="$(scripts/setup-venv.sh | tail -n1)"

if [ -z "${WORKERS_DB_DSN:-}" ]; then
    WORKERS_DB_DSN="$(scripts/local-timescaledb.sh start | tail -n1)"
    export WORKERS_DB_DSN
fi
