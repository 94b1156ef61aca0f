#!/usr/bin/env bash
# The read benchmark, in one command (see bench/reads.py):
#
#   bench/reads.sh [--workers 200] [--days 1] [--period 10] [--runs 5] [--reload] [--database NAME]
#
# Sets up .venv, starts the local TimescaleDB unless WORKERS_DB_DSN names a database (the
# benchmark keeps its own database, default workers_bench_reads, on that database's cluster), then
# runs python -m bench.reads.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="$(scripts/setup-venv.sh | tail -n1)"

if [ -z "${WORKERS_DB_DSN:-}" ]; then
    WORKERS_DB_DSN="$(scripts/local-timescaledb.sh start | tail -n1)"
    export WORKERS_DB_DSN
fi

exec "$python" -m bench.reads "$@"
