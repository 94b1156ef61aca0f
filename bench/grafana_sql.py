"""The SQL of the provisioned Grafana dashboards and alert rules, expanded the way Grafana
expands it.

Grafana cannot run here, so the tests and the benchmark run the panels' SQL themselves.
A panel's query goes through two expansions before it reaches PostgreSQL:
1. in the browser, dashboard variables (`$var`, `${var}`, `${var:format}`, `[[var]]`) and
   `$__interval`/`$__interval_ms`/`$__from`/`$__to`; a single value is inserted with its
   quotes doubled but unquoted (the SQL writes `'$var'`), several values as a quoted
   comma list (`'a','b'`);
2. in the PostgreSQL data source (pkg/tsdb/grafana-postgresql-datasource/macros.go), the
   `$__unixEpochFrom()`-style globals, then every `$__macro(args)`.
"""

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

GRAFANA = Path(__file__).resolve().parents[1] / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
ALERTING = GRAFANA / "provisioning" / "alerting"

_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+)(?::(\w+))?\]\]|\$\{(\w+)(?::([^}]+))?\}")
_MACRO = re.compile(r"\$(\w+)\(([^)]*)\)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def dashboards() -> dict[str, dict]:
    """File name -> dashboard of every dashboard kept in grafana/dashboards/."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def alert_rules() -> list[dict]:
    """Every alert rule of the provisioning files in grafana/provisioning/alerting/."""
    import yaml

    found = []
    for path in sorted(ALERTING.glob("*.y*ml")):
        for group in yaml.safe_load(path.read_text()).get("groups", []):
            found.extend(group["rules"])
    return found


def rule_queries(rule: dict) -> list[tuple[str, str]]:
    """(refId, raw SQL) of each of a rule's data source queries (not its expressions)."""
    return [(item["refId"], item["model"]["rawSql"]) for item in rule["data"] if item["model"].get("rawSql")]


def panels(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, raw SQL) of every SQL query of every panel, rows' panels included."""
    found = []
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            if target.get("rawSql") and not target.get("hide"):
                found.append((panel.get("title", ""), target["rawSql"]))
        found.extend(panels(panel))  # a collapsed row holds its panels
    return found


def expand(
    sql: str,
    *,
    time_from: float,
    time_to: float,
    interval_seconds: float,
    variables: dict[str, str | list[str]],
    timescaledb: bool = True,
) -> str:
    """`sql` as Grafana sends it to PostgreSQL for that time range (epoch seconds), interval
    and variable values; `timescaledb`: the data source's TimescaleDB option (ours is on)."""
    builtins = {
        "__interval": _format_interval(interval_seconds),
        "__interval_ms": str(int(interval_seconds * 1000)),
        "__from": str(int(time_from * 1000)),
        "__to": str(int(time_to * 1000)),
    }

    def variable(match: re.Match) -> str:
        name = match[1] or match[2] or match[4]
        if name in builtins:
            return builtins[name]
        if name not in variables:
            return match[0]  # not a variable: Grafana leaves it (macros, typos) as written
        return _format_value(variables[name], match[3] or match[5])

    sql = _VARIABLE.sub(variable, sql)

    # The data source's global substitutions ($__interval is already done), then its macros.
    sql = sql.replace("$__unixEpochFrom()", str(math.floor(time_from)))
    sql = sql.replace("$__unixEpochTo()", str(math.floor(time_to)))

    def macro(match: re.Match) -> str:
        name, args = match[1], [arg.strip() for arg in match[2].split(",")]
        # Like Grafana: `$__timeGroup(...)` directly followed by a comma gets the alias.
        if name == "__timeGroup" and match.string[match.end() : match.end() + 1] == ",":
            name = "__timeGroupAlias"
        return _macro(name, args, time_from, time_to, timescaledb)

    return _MACRO.sub(macro, sql)


def _macro(name: str, args: list[str], time_from: float, time_to: float, timescaledb: bool) -> str:
    column = args[0]
    if name == "__time":
        return f'{column} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {column}) as "time"'
    if name == "__timeFilter":
        return f"{column} BETWEEN '{_rfc3339(time_from)}' AND '{_rfc3339(time_to)}'"
    if name == "__timeFrom":
        return f"'{_rfc3339(time_from)}'"
    if name == "__timeTo":
        return f"'{_rfc3339(time_to)}'"
    if name in ("__timeGroup", "__timeGroupAlias"):
        if len(args) < 2:
            raise ValueError(f"${name} needs a time column and an interval")
        seconds = _parse_interval(args[1].strip("'"))
        # A third argument (fill) changes how Grafana fills the result, not the SQL.
        if timescaledb:
            group = f"time_bucket('{seconds:.3f}s',{column})"
        else:
            group = f"floor(extract(epoch from {column})/{_go_number(seconds)})*{_go_number(seconds)}"
        return group + (' AS "time"' if name == "__timeGroupAlias" else "")
    if name == "__unixEpochFilter":
        return f"{column} >= {math.floor(time_from)} AND {column} <= {math.floor(time_to)}"
    if name in ("__unixEpochGroup", "__unixEpochGroupAlias"):
        seconds = _go_number(_parse_interval(args[1].strip("'")))
        group = f"floor(({column})/{seconds})*{seconds}"
        return group + (' AS "time"' if name == "__unixEpochGroupAlias" else "")
    raise ValueError(f"unknown or unsupported macro ${name}")


def _format_value(value: str | list[str], form: str | None) -> str:
    values = [value] if isinstance(value, str) else list(value)
    if form in ("raw", "csv"):
        return ",".join(values)
    quoted = ",".join("'" + item.replace("'", "''") + "'" for item in values)
    if form == "sqlstring":
        return quoted
    if form is not None:
        raise ValueError(f"variable format {form!r} is not supported here")
    return value.replace("'", "''") if isinstance(value, str) else quoted


def _rfc3339(moment: float) -> str:
    """Go's time.RFC3339Nano in UTC: no fraction when whole, trailing zeros dropped."""
    text = datetime.fromtimestamp(round(moment, 6), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return text.rstrip("0").rstrip(".") + "Z"


def _format_interval(seconds: float) -> str:
    """How Grafana writes an interval (`$__interval`): its largest whole unit, truncated."""
    for unit, size in (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(1, int(seconds * 1000))}ms"


def _parse_interval(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", text.strip())
    if not match:
        raise ValueError(f"cannot parse the interval {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def _go_number(seconds: float) -> str:
    """A float as Go's %v prints it: 300, 0.5."""
    return str(int(seconds)) if seconds == int(seconds) else repr(seconds)
