#!/usr/bin/env bash
# The storage benchmark, in one command (see bench/storage.py, docs/storage-benchmark.md):
#
#   bench/storage.sh [--workers 100] [--hours 12] [--period 10] [--database workers_bench_storage] [--seed 1]
#
# Sets up .venv, starts the local TimescaleDB unless WORKERS_DB_DSN names a database (the
# benchmark recreates its own database, default workers_bench_storage, on that database's
# cluster), then runs python -m bench.storage.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prepare.sh"

# The command as typed, for the benchmark's header.
BENCH_COMMAND="bench/storage.sh"
[ $# -eq 0 ] || BENCH_COMMAND+="$(printf ' %q' "$@")"
export BENCH_COMMAND

exec "$python" -m bench.storage "$@"
