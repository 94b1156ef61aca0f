#!/usr/bin/env bash
# The status-report ingest benchmark, in one command (see bench/ingest.py):
#
#   bench/run.sh [--processes N] [--rounds 3] [--seconds 10] [--connections 64] [--workers 2000] [--fault] [--url URL]
#   bench/run.sh --fairness [--processes N] [--seconds 20] ...   (see bench/fairness.py)
#
# Sets up .venv, installs wrk if it is missing (apt-get), starts the local TimescaleDB
# unless WORKERS_DB_DSN names a database, then runs python -m bench.ingest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="$(scripts/setup-venv.sh | tail -n1)"

if ! command -v wrk >/dev/null 2>&1; then
    echo "installing wrk (apt-get)" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk >&2 || {
        $sudo apt-get update >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk >&2
    }
fi

if [ -z "${WORKERS_DB_DSN:-}" ]; then
    WORKERS_DB_DSN="$(scripts/local-timescaledb.sh start | tail -n1)"
    export WORKERS_DB_DSN
fi

if [ "${1:-}" = "--fairness" ]; then
    shift
    exec "$python" -m bench.fairness "$@"
fi
exec "$python" -m bench.ingest "$@"
