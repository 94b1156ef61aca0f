#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it, with the extras named as
# arguments (e.g. "test"). Prints the venv's python on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${WORKERS_VENV:-$root/.venv}"
extras="$(IFS=,; echo "$*")"
target="$root"
[ -z "$extras" ] || target="$root[$extras]"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtual environment $venv" >&2
    python3 -m venv "$venv"
fi
stamp="$venv/.installed-$(echo "$extras" | tr ',' '-')"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    echo "installing the project${extras:+ with [$extras]} into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target" >&2
    touch "$stamp"
fi
echo "$venv/bin/python"
