#!/usr/bin/env bash
# Set everything up on this machine and run the test suite against a real TimescaleDB.
# Database: WORKERS_TEST_DSN if set, else a testcontainers TimescaleDB when a Docker
# engine answers, else the local cluster of scripts/local-timescaledb.sh (provisioned
# here first, so that its progress is visible), and that cluster's standby for the tests
# of read replicas. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/scripts/setup-venv.sh" test | tail -n1)"

# tests/test_compose.py checks the compose files with Debian's docker-compose (no engine needed);
# tests/test_daemon_e2e.py runs Debian's nginx, unprivileged, as the routing proxy;
# tests/test_fleet_page.py drives Debian's Chromium through its chromedriver;
# tests/test_import.py runs the ClearML export's jq program (docs/bulk-import.md).
missing=""
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing="$missing nginx"
command -v jq >/dev/null 2>&1 || missing="$missing jq"
if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing$missing (apt-get)" >&2
    { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends $missing; } >&2 \
        || echo "could not install$missing: the tests that need them will fail" >&2
    # The tests start their own nginx; the system service that the package starts is not needed.
    case "$missing" in *nginx*) $sudo systemctl disable --now nginx >/dev/null 2>&1 || true ;; esac
fi

if [ -z "${WORKERS_TEST_DSN:-}" ] && ! docker info >/dev/null 2>&1; then
    "$root/scripts/local-timescaledb.sh" start >/dev/null
fi
# tests/test_replicas.py reads from a streaming standby of the local cluster (made and started
# by the script; the test starts it too, so this is only to show its progress here).
"$root/scripts/local-timescaledb.sh" standby start >/dev/null
cd "$root"
exec "$python" -m pytest "$@"
