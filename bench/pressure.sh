#!/usr/bin/env bash
# Reads beside ingest, in one command (see bench/pressure.py):
#
#   bench/pressure.sh [--clients 0,1,2,8] [--seconds 20] [--connections 8] [--get-all 8000]
#                     [--runs 10] [--writer-gather-ms 0] [--against-env NAME=VALUE ...]
#                     [--workers 200] [--days 1]
#
# Sets up .venv, starts the local TimescaleDB unless WORKERS_DB_DSN names a database,
# installs wrk if it is missing (apt-get), then runs python -m bench.pressure. The history
# is the reads benchmark's (bench/reads.sh), loaded in its database when missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prepare.sh"
install_wrk

exec "$python" -m bench.pressure "$@"
