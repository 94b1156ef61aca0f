"""The provisioned Grafana dashboards, run without Grafana: every panel's SQL is expanded the
way Grafana expands it (bench/grafana_sql.py) and run against reports sent through the API,
for time ranges of 1 hour, 24 hours and 30 days.

In the two hours from BASE: `gpu-1` (two cores, two GPUs, a task in the first half hour)
reports every minute; `cpu-1` (three cores) every 30 s in the first hour and every 5 minutes
in the second, so that buckets combining rollup rows of unequal counts show whether averages
are re-bucketed exactly; `idle-1` (one core) in the first ten minutes only, and is then
unregistered. The expected rows are computed from the same reports.
"""

import asyncio
import json
import re
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from bench.grafana_sql import ALERTING, alert_rules, dashboards, expand, panels, rule_queries
from helpers import health_fleet, now_ms, ok, refresh_rollups
from server.config import Settings
from server.grafana import role_name
from server.keys import SETTINGS
from server.storage import rollups

ROOT = Path(__file__).resolve().parents[1]
BASE = 1_699_999_200  # 2023-11-14 22:00:00 UTC, a multiple of 7200
HOUR, DAY = 3600, 86400
RETENTION = rollups.Retention(raw_days=100_000, tier_days={"1m": 100_000, "10m": 100_000, "1h": 100_000})


def machine_stats(worker: str, minute: float) -> dict:
    if worker == "gpu-1":
        return {
            "cpu_usage": [10 + minute / 2, 30 + minute / 4],
            "gpu_usage": [50 + minute % 7, 20],
            "gpu_memory_used": [1000 + minute, 2000],
            "gpu_memory_free": [3000 - minute, 2000],
            "memory_used": 4096 + minute,
            "memory_free": 1024,
            "network_rx": 1.5 + minute / 10,
            "network_tx": 0.5,
        }
    if worker == "cpu-1":
        return {"cpu_usage": [40, 60, 90 - minute / 2], "memory_used": 8192 - minute, "memory_free": 2048}
    return {"cpu_usage": [5], "memory_used": 512}


def report_times(worker: str) -> list[int]:
    if worker == "gpu-1":
        return list(range(BASE + 5, BASE + 2 * HOUR, 60))
    if worker == "cpu-1":
        return list(range(BASE + 5, BASE + HOUR, 30)) + list(range(BASE + HOUR + 5, BASE + 2 * HOUR, 300))
    return list(range(BASE + 5, BASE + 600, 60))


# Each worker's `queues` and `queue` (docs/queues.md); idle-1 names one queue both ways.
QUEUES = {"gpu-1": (["gpu", "default"], None), "cpu-1": (None, "default"), "idle-1": (["cpu"], "cpu")}


def queues_of(worker: str) -> set[str]:
    listed, queue = QUEUES[worker]
    return set(listed or []) | ({queue} if queue else set())


def task(worker: str, moment: int) -> str | None:
    return "t1" if worker == "gpu-1" and moment < BASE + 1800 else None


# (worker, time, machine_stats, task) of every report sent
REPORTS = [
    (worker, moment, machine_stats(worker, (moment - BASE) / 60), task(worker, moment))
    for worker in ("gpu-1", "cpu-1", "idle-1")
    for moment in report_times(worker)
]


def window(span: float) -> tuple[float, float]:
    """A time range of `span` seconds centred on the reported hours."""
    return BASE + HOUR - span / 2, BASE + HOUR + span / 2


def tier_seconds(span: float) -> int:
    """The rollup tier the dashboards read for a time range (their SQL says the same)."""
    return 60 if span <= 6 * HOUR else 600 if span <= 3 * DAY else 3600


# --- what each panel should answer ----------------------------------------------------------


def shown(span: float, interval: float):
    """(bucket, report) of every report a panel shows for that time range and interval: those
    in the tier's buckets that start in the range, in buckets of the interval or the tier,
    whichever is longer."""
    tier = tier_seconds(span)
    width, (low, high) = max(interval, tier), window(span)
    for report in REPORTS:
        moment = report[1]
        if low <= moment - moment % tier <= high:
            yield moment - moment % width, report


def values(span: float, interval: float, metrics: tuple[str, ...], label, worker: str | None = None) -> dict:
    """{(bucket, label(worker, metric, variant)): [every value shown]}"""
    found = defaultdict(list)
    for bucket, (reporter, _, stats, _) in shown(span, interval):
        if worker not in (None, reporter):
            continue
        for metric in metrics:
            items = stats.get(metric)
            if items is None:
                continue
            items = {str(i): v for i, v in enumerate(items)} if isinstance(items, list) else {"total": items}
            for variant, value in items.items():
                found[(bucket, label(reporter, metric, variant))].append(value)
    return found


def by_worker(worker, metric, variant):
    return worker


def by_gpu(worker, metric, variant):
    return f"GPU {variant}"


def by_gpu_memory(worker, metric, variant):
    return f"GPU {variant} {metric.removeprefix('gpu_memory_')}"


def by_suffix(worker, metric, variant):
    return metric.split("_", 1)[1]  # memory_used: used


def averages(metrics, label, worker=None):
    def expected(span, interval):
        found = values(span, interval, metrics, label, worker)
        return [(bucket, name, sum(v) / len(v)) for (bucket, name), v in found.items()]

    return expected


def cpu_average_and_max(span, interval):
    found = values(span, interval, ("cpu_usage",), by_worker, "gpu-1")
    return [(bucket, sum(v) / len(v), max(v)) for (bucket, _), v in found.items()]


def activity(span, interval):
    reporting, busy = defaultdict(set), defaultdict(set)
    for bucket, (worker, _, _, task) in shown(span, interval):
        reporting[bucket].add(worker)
        if task:
            busy[bucket].add(worker)
    return [(bucket, len(workers), len(busy[bucket])) for bucket, workers in reporting.items()]


def queue_workers(busy_only: bool):
    """Per bucket and queue: the workers listening to it (busy_only: of those, the busy ones)."""

    def expected(span, interval):
        listening, busy = defaultdict(set), defaultdict(set)
        for bucket, (worker, _, _, task) in shown(span, interval):
            for queue in queues_of(worker):
                listening[(bucket, queue)].add(worker)
                if task:
                    busy[(bucket, queue)].add(worker)
        counted = busy if busy_only else listening
        return [(bucket, queue, len(counted[(bucket, queue)])) for bucket, queue in listening]

    return expected


# (dashboard file, panel title) -> its rows for a time range and interval; the worker
# dashboard shows gpu-1.
EXPECTED = {
    ("fleet-overview.json", "Reporting and busy workers"): activity,
    ("fleet-overview.json", "CPU usage per worker"): averages(("cpu_usage",), by_worker),
    ("fleet-overview.json", "GPU usage per worker"): averages(("gpu_usage",), by_worker),
    ("fleet-overview.json", "Memory used per worker"): averages(("memory_used",), by_worker),
    ("worker-detail.json", "CPU usage"): cpu_average_and_max,
    ("worker-detail.json", "GPU usage"): averages(("gpu_usage",), by_gpu, "gpu-1"),
    ("worker-detail.json", "GPU memory"): averages(("gpu_memory_used", "gpu_memory_free"), by_gpu_memory, "gpu-1"),
    ("worker-detail.json", "Memory"): averages(("memory_used", "memory_free"), by_suffix, "gpu-1"),
    ("worker-detail.json", "Network"): averages(("network_rx", "network_tx"), by_suffix, "gpu-1"),
    ("queues.json", "Workers listening per queue"): queue_workers(busy_only=False),
    ("queues.json", "Busy workers per queue"): queue_workers(busy_only=True),
}


def normal(rows) -> list[tuple]:
    """Rows as sorted tuples, times in epoch seconds, floats rounded."""
    result = []
    for row in rows:
        items = [item.timestamp() if isinstance(item, datetime) else item for item in row]
        result.append(tuple(round(item, 6) if isinstance(item, float) else item for item in items))
    return sorted(result)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
async def fleet(client, db_conn):
    """The reports above, sent through the API and rolled up; returns the company id."""
    bodies = [
        {
            "worker": worker, "timestamp": moment * 1000, "machine_stats": stats, **({"task": task} if task else {}),
            **({"queues": QUEUES[worker][0]} if QUEUES[worker][0] else {}),
            **({"queue": QUEUES[worker][1]} if QUEUES[worker][1] else {}),
        }  # fmt: skip
        for worker, moment, stats, task in REPORTS
    ]
    await asyncio.gather(*(ok(client, "workers.status_report", body) for body in bodies))
    await ok(client, "workers.unregister", {"worker": "idle-1"})
    await refresh_rollups(client.app[SETTINGS].db_dsn, RETENTION)
    return client.credentials.company_id


def run(sql: str, company: str, times: tuple[float, float], interval: float = 60) -> str:
    """`sql` as Grafana sends it for that company, worker gpu-1, time range and interval."""
    variables = {"company": company, "worker": "gpu-1"}
    return expand(sql, time_from=times[0], time_to=times[1], interval_seconds=interval, variables=variables)


def variable_queries(dashboard: dict) -> dict[str, str]:
    found = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found[variable["name"]] = query["rawSql"] if isinstance(query, dict) else query
    return found


# --- the panels -------------------------------------------------------------------------------


def test_every_panel_is_checked():
    shown = {(name, title) for name, dashboard in dashboards().items() for title, _ in panels(dashboard)}
    assert shown == set(EXPECTED)


# (time range, Grafana's $__interval): intervals equal to the tier's, finer (24 h: 2 minutes
# on the 10-minute tier) and coarser (1-minute and hourly tiers re-bucketed).
@pytest.mark.parametrize(
    "span, interval", [(HOUR, 60), (HOUR, 300), (DAY, 120), (30 * DAY, 7200)], ids=["1h", "1h-5m", "24h", "30d-2h"]
)
async def test_every_panel_answers_what_was_reported(fleet, db_conn, span, interval):
    for name, dashboard in dashboards().items():
        for title, sql in panels(dashboard):
            rows = await db_conn.fetch(run(sql, fleet, window(span), interval))
            assert rows, (name, title)
            times = [row["time"] for row in rows]
            assert times == sorted(times), f"{title}: Grafana needs the rows in time order"
            assert normal(rows) == normal(EXPECTED[(name, title)](span, interval)), (name, title)


async def test_a_worker_panel_decodes_the_lanes_of_that_worker_alone(fleet, db_conn):
    """The worker detail's CPU panel over a day (the 10-minute tier) calls rollup_group_lanes
    once per block of cpu_usage that holds gpu-1, not for every worker of those blocks:
    migrations/009 declares the function's cost, so the planner keeps the block's worker
    asked for before decoding (it used to decode them all and join stat_workers after)."""
    sql = dict(panels(dashboards()["worker-detail.json"]))["CPU usage"]
    since, until = window(DAY)
    groups = await db_conn.fetchrow(
        """SELECT count(*) FILTER (WHERE w.id = ANY(b.workers)) AS mine, sum(cardinality(b.workers)) AS every
           FROM rollup_10m b JOIN stat_metrics m ON m.id = b.metric
           JOIN stat_workers w ON w.company = b.company AND w.worker = 'gpu-1'
           WHERE b.company = $1 AND m.name = 'cpu_usage'
             AND b.start > to_timestamp($2) - interval '1 day' AND b.start <= to_timestamp($3)""",
        fleet, since, until,
    )
    assert 0 < groups["mine"] < groups["every"]  # other workers' lanes share those blocks
    await db_conn.execute("ANALYZE")  # as autovacuum leaves a database in service: small estimates
    async with db_conn.transaction():
        await db_conn.execute("SET LOCAL track_functions = 'pl'")
        assert await db_conn.fetch(run(sql, fleet, (since, until)))
        calls = await db_conn.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions WHERE funcname = 'rollup_group_lanes'"
        )
    assert calls == groups["mine"]


async def test_sessions_of_the_database_plan_without_jit(db_conn):
    """Grafana's connection is a plain session: the database's own setting keeps PostgreSQL
    from compiling the panels' plans at every run (migrations/009)."""
    assert await db_conn.fetchval("SHOW jit") == "off"


async def test_variables_list_the_companies_and_the_workers_with_data(fleet, db_conn):
    for dashboard in dashboards().values():
        company = await db_conn.fetch(run(variable_queries(dashboard)["company"], fleet, window(HOUR)))
        assert [tuple(row) for row in company] == [("default", fleet)]
    worker = variable_queries(dashboards()["worker-detail.json"])["worker"]
    for span in (HOUR, DAY, 30 * DAY):
        rows = await db_conn.fetch(run(worker, fleet, (BASE, BASE + span)))
        assert [row["worker"] for row in rows] == ["cpu-1", "gpu-1", "idle-1"]
    # A day later nothing was reported: only the registered workers.
    rows = await db_conn.fetch(run(worker, fleet, (BASE + DAY, BASE + DAY + HOUR)))
    assert [row["worker"] for row in rows] == ["cpu-1", "gpu-1"]


async def test_only_the_tier_for_the_range_is_read(fleet, db_conn):
    """The other tiers' branches are dropped when planning, or stand behind a filter that is
    false before the query runs: no scan of their chunks runs (every tier has chunks in each
    range)."""
    chunks = dict(await db_conn.fetch("SELECT chunk_name, hypertable_name FROM timescaledb_information.chunks"))
    queries = [(title, sql) for dashboard in dashboards().values() for title, sql in panels(dashboard)]
    queries.append(("worker variable", variable_queries(dashboards()["worker-detail.json"])["worker"]))
    tiers = {
        HOUR: "1m",
        6 * HOUR: "1m",
        6 * HOUR + 60: "10m",
        DAY: "10m",
        3 * DAY: "10m",
        3 * DAY + 60: "1h",
        30 * DAY: "1h",
    }
    for span, tier in tiers.items():
        for title, sql in queries:
            plan = json.loads(await db_conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + run(sql, fleet, window(span))))
            tables = {chunks.get(name, name) for name in relations(plan[0]["Plan"])}
            planned = {match[1] for table in tables if (match := re.fullmatch(r"rollup_(1m|10m|1h)", table))}
            # A variant's minutes are read from the raw reports (the 1-minute tier keeps none).
            if tables & {"report_blocks", "recent_reports", "late_reports"}:
                planned.add("1m")
            assert planned == {tier}, (span, title, sorted(tables))


def relations(node: dict) -> set[str]:
    """The relations the plan scanned (a node never executed has no loops)."""
    found = {node["Relation Name"]} if "Relation Name" in node and node.get("Actual Loops", 1) else set()
    for child in node.get("Plans", []):
        found |= relations(child)
    return found


# --- the alert rules ------------------------------------------------------------------------


def alert_sql(rule: dict) -> str:
    (query,) = rule_queries(rule)
    return expand(query[1], time_from=time.time() - 600, time_to=time.time(), interval_seconds=60, variables={})


async def test_the_alert_rules_find_the_silent_workers_and_idle_gpus(make_client, db_conn):
    """Run as Grafana runs them, against a fleet where `dead` stopped reporting and three GPUs
    idled for 35 minutes (helpers.health_fleet), beside a company whose worker is fine."""
    client = await make_client(company="acme")
    other = await make_client(company="other")
    await health_fleet(client, db_conn)
    await ok(other, "workers.status_report", {"worker": "dead", "timestamp": now_ms(), "machine_stats": {"gpu_usage": [0]}})
    rules = {rule["title"]: rule for rule in alert_rules()}
    assert set(rules) == {"Silent worker", "Idle GPU"}

    silent = await db_conn.fetch(alert_sql(rules["Silent worker"]))
    assert [(row["company"], row["worker"]) for row in silent] == [("acme", "dead")]
    assert 5 * 60 <= silent[0]["seconds_since_report"] < 5 * 60 + 30
    idle = await db_conn.fetch(alert_sql(rules["Idle GPU"]))
    assert sorted((row["company"], row["worker"], row["gpu"]) for row in idle) == [
        ("acme", "busy", "1"), ("acme", "idle", "0"), ("acme", "idle", "1"),
    ]  # fmt: skip
    assert all(35 <= row["idle_minutes"] < 36 for row in idle)
    # What Grafana makes an alert of: text columns as its labels, one number as its value
    for rule, rows in ((rules["Silent worker"], silent), (rules["Idle GPU"], idle)):
        for row in rows:
            kinds = [type(value) for value in row.values()]
            assert kinds.count(float) == 1 and kinds.count(str) == len(kinds) - 1
        for text in rule["annotations"].values():
            assert set(re.findall(r"\$labels\.(\w+)", text)) <= set(rows[0].keys())


def test_the_alert_rules_are_provisioned_as_grafana_reads_them():
    provisioning = ROOT / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "workers.yml").read_text())["datasources"]
    assert ALERTING.parent == provisioning  # mounted with it: test_provisioning_points_the_dashboards_...
    (document,) = [yaml.safe_load(path.read_text()) for path in ALERTING.glob("*.yml")]
    assert document["apiVersion"] == 1
    rules = alert_rules()
    assert len({rule["uid"] for rule in rules}) == len(rules) == 2
    defaults = Settings()
    for rule in rules:
        data = {item["refId"]: item for item in rule["data"]}
        assert rule["condition"] in data
        condition = data[rule["condition"]]
        assert condition["datasourceUid"] == "__expr__" and condition["model"]["type"] == "threshold"
        (query_id, sql), = rule_queries(rule)
        assert condition["model"]["expression"] == query_id
        query = data[query_id]
        assert query["datasourceUid"] == query["model"]["datasource"]["uid"] == source["uid"]
        assert query["model"]["format"] == "table" and query["relativeTimeRange"]["from"] > 0
        assert rule["noDataState"] == "OK"  # no row: nobody silent, no GPU idle
        # The rules say the settings' defaults, as their comment says
        assert f"health({defaults.silent_periods:g}, {defaults.idle_gpu_minutes:g})" in sql


# --- provisioning -----------------------------------------------------------------------------


def test_provisioning_points_the_dashboards_at_the_compose_database():
    provisioning = ROOT / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "workers.yml").read_text())["datasources"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "workers.yml").read_text())["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]

    assert source["type"] == "grafana-postgresql-datasource"
    assert source["url"] == "db:5432" and "db" in compose
    # A read-only role of one company (`grafana-role create`), its password from the environment.
    assert source["user"] == "workers_grafana" and role_name(source["user"])
    assert source["secureJsonData"]["password"] == "$GRAFANA_DB_PASSWORD"
    assert "GRAFANA_DB_PASSWORD" in compose["grafana"]["environment"]
    assert source["jsonData"]["database"] == compose["db"]["environment"]["POSTGRES_DB"]
    assert source["jsonData"]["timescaledb"] is True  # expand()'s $__timeGroup assumes it
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in compose["grafana"]["volumes"]}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]

    for name, dashboard in dashboards().items():
        users = dashboard["panels"] + dashboard["templating"]["list"]
        users += [target for panel in dashboard["panels"] for target in panel.get("targets", [])]
        assert {item["datasource"]["uid"] for item in users if "datasource" in item} == {source["uid"]}, name
    assert len({dashboard["uid"] for dashboard in dashboards().values()}) == len(dashboards())


# --- expand() against Grafana's own examples ----------------------------------------------


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def grafana(sql: str, *, time_from=utc("2018-04-12T18:00:00"), time_to=utc("2018-04-12T18:05:00"), **options) -> str:
    """expand() for Grafana's test time range, a 1-minute interval and no TimescaleDB unless told."""
    arguments = {"interval_seconds": 60, "variables": {}, "timescaledb": False, **options}
    return expand(sql, time_from=time_from, time_to=time_to, **arguments)


def test_expand_macros_like_grafana():
    # The cases of Grafana's pkg/tsdb/grafana-postgresql-datasource/macros_test.go
    assert grafana("WHERE $__timeFilter(time_column)") == (
        "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'"
    )
    assert grafana("select $__timeFrom(), $__timeTo()") == "select '2018-04-12T18:00:00Z', '2018-04-12T18:05:00Z'"
    assert grafana("SELECT $__timeGroup(time_column,'5m')") == "SELECT floor(extract(epoch from time_column)/300)*300"
    assert grafana("SELECT $__timeGroupAlias(time_column , '5m')") == (
        'SELECT floor(extract(epoch from time_column)/300)*300 AS "time"'
    )
    assert grafana("SELECT $__timeGroup(time_column,'5m'), value") == (
        'SELECT floor(extract(epoch from time_column)/300)*300 AS "time", value'
    )
    assert grafana("GROUP BY $__timeGroup(time_column , '12d')", timescaledb=True) == (
        "GROUP BY time_bucket('1036800.000s',time_column)"
    )
    assert grafana("select $__unixEpochFilter(time)") == "select time >= 1523556000 AND time <= 1523556300"
    assert grafana("SELECT $__unixEpochGroupAlias(time_column+time_adjustment,'5m')") == (
        'SELECT floor((time_column+time_adjustment)/300)*300 AS "time"'
    )
    fraction = grafana(
        "WHERE $__timeFilter(t)", time_from=utc("1960-02-01T07:00:00.5"), time_to=utc("1980-02-03T08:00:00.5")
    )
    assert fraction == "WHERE t BETWEEN '1960-02-01T07:00:00.5Z' AND '1980-02-03T08:00:00.5Z'"
    # The data source's globals, and an interval written as Grafana writes it
    assert grafana("$__unixEpochFrom() $__unixEpochTo()") == "1523556000 1523556300"
    intervals = grafana("$__timeGroupAlias(t, $__interval) '$__interval' $__interval_ms", interval_seconds=120)
    assert intervals == """floor(extract(epoch from t)/120)*120 AS "time" '2m' 120000"""
    with pytest.raises(ValueError):
        grafana("$__nonsense(t)")


def test_expand_variables_like_grafana():
    # A single value goes in with its quotes doubled (the SQL quotes it), several values as a
    # quoted list; `sqlstring` always quotes, `raw` never escapes.
    variables = {"name": "it's", "many": ["a", "b'c"]}
    assert grafana("x = '$name' AND y = '${name}' AND z = '[[name]]'", variables=variables) == (
        "x = 'it''s' AND y = 'it''s' AND z = 'it''s'"
    )
    assert grafana("x IN ($many)", variables=variables) == "x IN ('a','b''c')"
    assert grafana("${name:sqlstring} ${many:sqlstring} ${name:raw}", variables=variables) == "'it''s' 'a','b''c' it's"
    assert grafana("$unknown $1", variables=variables) == "$unknown $1"
