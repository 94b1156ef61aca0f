#!/usr/bin/env bash
# Set everything up on this machine and start the server on a local TimescaleDB:
# the Python environment, TimescaleDB itself (scripts/local-timescaledb.sh), the
# migrations; then serve on WORKERS_PORT (default 8008) until interrupted.
# With WORKERS_DB_DSN set, that database is used instead of the local cluster.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/scripts/setup-venv.sh" | tail -n1)"

if [ -z "${WORKERS_DB_DSN:-}" ]; then
    WORKERS_DB_DSN="$("$root/scripts/local-timescaledb.sh" start | tail -n1)"
fi
export WORKERS_DB_DSN
"$python" -m server migrate

port="${WORKERS_PORT:-8008}"
cat <<INFO

  Workers telemetry service
  listening on   http://127.0.0.1:${port}  (all interfaces: ${WORKERS_HOST:-0.0.0.0})
  database       ${WORKERS_DB_DSN}
  credentials    none needed yet: every request acts as company "${WORKERS_DEFAULT_COMPANY:-default}"
  try            curl -s http://127.0.0.1:${port}/workers.get_count

INFO
cd "$root"
exec "$python" -m server serve "$@"
