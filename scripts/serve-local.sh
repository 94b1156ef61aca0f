#!/usr/bin/env bash
# Set everything up on this machine and start the server on a local TimescaleDB:
# the Python environment, TimescaleDB itself (scripts/local-timescaledb.sh), the
# migrations and a first access key; then serve on WORKERS_PORT (default 8008) until
# interrupted. With WORKERS_DB_DSN set, that database is used instead of the local cluster.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/scripts/setup-venv.sh" | tail -n1)"

if [ -z "${WORKERS_DB_DSN:-}" ]; then
    WORKERS_DB_DSN="$("$root/scripts/local-timescaledb.sh" start | tail -n1)"
fi
export WORKERS_DB_DSN
cd "$root"
"$python" -m server migrate

# Credentials of company "local", user "admin": created on the first run, kept in
# .local/credentials (mode 0600) and shown again on later runs while they are valid.
credentials="$("$python" -m server credentials ensure --file "$root/.local/credentials" --company local)"
access_key="$(awk '$1 == "access_key" {print $2}' <<<"$credentials")"
secret_key="$(awk '$1 == "secret_key" {print $2}' <<<"$credentials")"

# One line per request in the log (never a credential); WORKERS_ACCESS_LOG=0 turns it off.
export WORKERS_ACCESS_LOG="${WORKERS_ACCESS_LOG:-1}"

port="${WORKERS_PORT:-8008}"
cat <<INFO

  Workers telemetry service
  listening on   http://127.0.0.1:${port}  (all interfaces: ${WORKERS_HOST:-0.0.0.0})
  database       ${WORKERS_DB_DSN}
  credentials    access_key ${access_key}
                 secret_key ${secret_key}
  fleet page     http://127.0.0.1:${port}/  (sign in with the access key and secret key)
  try            curl -s -u ${access_key}:${secret_key} http://127.0.0.1:${port}/workers.get_count
  API            http://127.0.0.1:${port}/openapi.json    metrics  /metrics    health  /healthz /readyz
  demo fleet     ${python} -m server demo-fleet --workers 12 --url http://127.0.0.1:${port}
                 (in another terminal: simulated daemons, registered and reporting until Ctrl-C)

INFO
exec "$python" -m server serve "$@"
