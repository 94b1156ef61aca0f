#!/usr/bin/env bash
# The soak benchmark, in one command (see bench/soak.py):
#
#   bench/soak.sh [--workers 2000] [--period 5] [--minutes 10] [--warmup 60] [--reader-period 10]
#                 [--processes 1] [--database workers_bench_soak] [--tree PATH] [--seed 1]
#                 [--floor 60] [--replica DSN]
#
# Sets up .venv, starts the local TimescaleDB unless WORKERS_DB_DSN names a database (the
# benchmark recreates its own database, default workers_bench_soak, on that database's
# cluster), then runs python -m bench.soak.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prepare.sh"

exec "$python" -m bench.soak "$@"
