#!/usr/bin/env bash
# Set everything up on this machine and run the test suite against a real TimescaleDB.
# Database: WORKERS_TEST_DSN if set, else a testcontainers TimescaleDB when a Docker
# engine answers, else the local cluster of scripts/local-timescaledb.sh (provisioned
# here first, so that its progress is visible). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/scripts/setup-venv.sh" test | tail -n1)"

if [ -z "${WORKERS_TEST_DSN:-}" ] && ! docker info >/dev/null 2>&1; then
    "$root/scripts/local-timescaledb.sh" start >/dev/null
fi
cd "$root"
exec "$python" -m pytest "$@"
