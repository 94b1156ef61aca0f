#!/usr/bin/env bash
# The read benchmark, in one command (see bench/reads.py):
#
#   bench/reads.sh [--workers 200] [--days 1] [--period 10] [--runs 5] [--reload] [--database NAME]
#
# Sets up .venv, starts the local TimescaleDB unless WORKERS_DB_DSN names a database (the
# benchmark keeps its own database, default workers_bench_reads, on that database's cluster), then
# runs python -m bench.reads.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prepare.sh"

exec "$python" -m bench.reads "$@"
