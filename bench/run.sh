#!/usr/bin/env bash
# The status-report ingest benchmark, in one command (see bench/ingest.py):
#
#   bench/run.sh [--processes N] [--rounds 3] [--seconds 10] [--connections 64] [--workers 2000] [--fault] [--url URL]
#   bench/run.sh --fairness [--processes N] [--seconds 20] ...   (see bench/fairness.py)
#
# Sets up .venv, starts the local TimescaleDB unless WORKERS_DB_DSN names a database,
# installs wrk if it is missing (apt-get), then runs python -m bench.ingest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prepare.sh"

install_wrk

if [ "${1:-}" = "--fairness" ]; then
    shift
    exec "$python" -m bench.fairness "$@"
fi
exec "$python" -m bench.ingest "$@"
