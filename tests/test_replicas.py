"""Chart reads served by a streaming replica (WORKERS_READ_DSN; server/replicas.py): a real hot
standby of the local cluster (`scripts/local-timescaledb.sh standby start`: pg_basebackup, its
own port). What the standby served is read on the standby itself (its pg_stat_statements,
which its configuration preloads), not inferred; the fallback to the primary when the
standby's replay is paused past the lag allowed and when it is stopped, each counted in
/metrics; and replica answers equal to the raw-only computation of the same snapshot."""

import asyncio
import subprocess
import time
from urllib.parse import urlsplit

import asyncpg
import pytest
from helpers import ROOT, ok, refresh_rollups, with_database
from test_metrics import scrape
from test_rollups import BASE, compare_charts, fleet_reports, send

from server import replicas

SCRIPT = str(ROOT / "scripts" / "local-timescaledb.sh")
# What each kind of read runs, as pg_stat_statements shows it: the chart's rollup watermark,
# the metric keys, and the registrations (get_all, get_count).
CHART = "%FROM rollup_invalidations WHERE company%"
METRIC_KEYS = "%FROM worker_metric_keys%"
REGISTRATIONS = "%FROM worker_registrations%"


def standby(command: str) -> str:
    """`local-timescaledb.sh standby <command>`; its last line (the DSN, for start)."""
    done = subprocess.run([SCRIPT, "standby", command], check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


async def _fetchval(dsn: str, query: str, *args):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def replayed(primary: str, standby_dsn: str, timeout: float = 60) -> None:
    """Wait until the standby has replayed everything the primary has written so far."""
    target = await _fetchval(primary, "SELECT pg_current_wal_lsn()::text")
    deadline = time.monotonic() + timeout
    while not await _fetchval(standby_dsn, "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", target):
        assert time.monotonic() < deadline, "the standby did not catch up"
        await asyncio.sleep(0.05)


async def served(standby_dsn: str, pattern: str) -> int:
    """Statements like `pattern` that the standby has run in the test database."""
    return await _fetchval(
        standby_dsn,
        """SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
           WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query ILIKE $1""",
        pattern,
    )


@pytest.fixture(scope="session")
def standby_dsn(database_dsn):
    """The test database on the standby of the local cluster, which must hold it."""
    standby_admin = standby("start")
    identities = [
        asyncio.run(_fetchval(dsn, "SELECT system_identifier FROM pg_control_system()"))
        for dsn in (database_dsn, standby_admin)
    ]
    if identities[0] != identities[1]:
        pytest.fail(
            f"the test database ({urlsplit(database_dsn).netloc}) is not on the local cluster that "
            "`scripts/local-timescaledb.sh standby start` replicates: run these tests on that cluster"
        )
    asyncio.run(_fetchval(database_dsn, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
    dsn = with_database(standby_admin, urlsplit(database_dsn).path.lstrip("/"))
    asyncio.run(replayed(database_dsn, dsn))
    return dsn


def fallbacks(found: dict, cause: str) -> float:
    return found[("workers_replica_fallbacks_total", (("cause", cause),))]


def replica_gauge(found: dict, name: str, standby_dsn: str) -> float:
    return found[(name, (("replica", replicas.label(standby_dsn)),))]


async def chart(client, **fields) -> dict:
    body = {"from_date": time.time() - 600, "to_date": time.time(), "interval": 60,
            "items": [{"key": "cpu_usage", "aggregation": "max"}], **fields}  # fmt: skip
    return await ok(client, "workers.get_stats", body)


def test_the_replica_settings():
    assert replicas.dsns(" postgresql://a:secret@db1:5433/w , ,postgresql://db2/w") == [
        "postgresql://a:secret@db1:5433/w",
        "postgresql://db2/w",
    ]
    assert replicas.label("postgresql://a:secret@db1:5433/w") == "db1:5433/w"  # no credentials
    assert replicas.dsns("") == []
    from server.endpoints import queues, workers

    assert replicas.served_by_replica(workers.stats) and replicas.served_by_replica(workers.activity)
    assert replicas.served_by_replica(queues.queues)
    assert not replicas.served_by_replica(workers.all_workers)


async def test_chart_reads_are_served_by_the_standby_and_registrations_by_the_primary(make_client, dsn, standby_dsn):
    client = await make_client(read_dsn=standby_dsn, raw_read_budget_worker_hours=10_000)
    raw_client = await make_client(read_from_rollups=False)  # the primary, raw reports only
    await send(client, [report | {"queues": ["default", "gpu"]} for report in fleet_reports(3 * 3600)])
    await refresh_rollups(dsn)
    await send(client, fleet_reports(1800, start=BASE + 3 * 3600 + 30, seed=2))  # after the watermark: raw
    await replayed(dsn, standby_dsn)

    before = {pattern: await served(standby_dsn, pattern) for pattern in (CHART, METRIC_KEYS, REGISTRATIONS)}
    assert [worker["id"] for worker in (await ok(client, "workers.get_all", {}))["workers"]]
    assert (await ok(client, "workers.get_count", {}))["count"] == 4
    assert await served(standby_dsn, REGISTRATIONS) == before[REGISTRATIONS]  # the primary's

    keys = await ok(client, "workers.get_metric_keys", {})
    assert {key for category in keys["categories"] for key in category["metric_keys"]} >= {"cpu_usage", "memory_used"}
    assert await served(standby_dsn, METRIC_KEYS) > before[METRIC_KEYS]

    # Equal to the raw-only computation on the primary, and read on the standby.
    await compare_charts(client, raw_client, BASE, BASE + 4 * 3600, 600)
    await compare_charts(client, raw_client, BASE + 30, BASE + 4 * 3600, 60)
    assert await served(standby_dsn, CHART) >= before[CHART] + 10

    # The queue view too: its "now" from the standby's registrations, its chart from its rollups.
    before = {pattern: await served(standby_dsn, pattern) for pattern in (CHART, REGISTRATIONS)}
    span = {"from_date": BASE, "to_date": BASE + 4 * 3600, "interval": 600}
    answer = await ok(client, "workers.get_queues", span)
    assert answer == await ok(raw_client, "workers.get_queues", span)
    assert {queue["queue"]: max(queue["chart"]["listening"]) for queue in answer["queues"]} == {"default": 4, "gpu": 4}
    assert await served(standby_dsn, CHART) > before[CHART]
    assert await served(standby_dsn, REGISTRATIONS) > before[REGISTRATIONS]

    found = await scrape(client)
    assert [fallbacks(found, cause) for cause in replicas.FALLBACK_CAUSES] == [0, 0, 0]
    assert replica_gauge(found, "workers_replica_up", standby_dsn) == 1
    assert 0 <= replica_gauge(found, "workers_replica_lag_seconds", standby_dsn) < 10


async def test_replica_reads_equal_the_raw_points_as_the_replica_sees_them(make_client, dsn, standby_dsn):
    """With late reports pending and the replica's replay paused behind a refresh, the replica's
    answers are those of its own snapshot: the rollups' `materialized` mark and invalidations
    read with the blocks they describe, never the primary's."""
    # Reads in the server process this time (the reader processes' path is above).
    on_standby = dict(read_dsn=standby_dsn, read_max_lag_seconds=3600, read_processes=0, raw_read_budget_worker_hours=10_000)
    client = await make_client(**on_standby)
    raw_on_standby = await make_client(**{**on_standby, "read_from_rollups": False})
    raw_client = await make_client(read_from_rollups=False)
    await send(client, fleet_reports(3 * 3600))
    await refresh_rollups(dsn)
    await send(client, fleet_reports(600, start=BASE + 3600 + 5, seed=3))  # late: invalidations pending
    await replayed(dsn, standby_dsn)
    await compare_charts(client, raw_client, BASE, BASE + 3 * 3600, 600)
    await compare_charts(client, raw_client, BASE, BASE + 3 * 3600, 3600)

    await _fetchval(standby_dsn, "SELECT pg_wal_replay_pause()")
    try:
        await refresh_rollups(dsn)  # on the primary: the invalidations taken, the tiers rebuilt
        await send(raw_client, fleet_reports(1200, start=BASE + 3 * 3600, seed=4))
        before = await served(standby_dsn, CHART)
        standby_view = await compare_charts(client, raw_on_standby, BASE, BASE + 4 * 3600, 600)
        await compare_charts(client, raw_on_standby, BASE, BASE + 4 * 3600, 3600)
        assert await served(standby_dsn, CHART) > before
        primary_view = await ok(raw_client, "workers.get_stats", {
            "from_date": BASE, "to_date": BASE + 4 * 3600, "interval": 600, "items": [{"key": "cpu_usage", "aggregation": "max"}],
        })  # fmt: skip
        assert primary_view["workers"][0]["metrics"][0]["stats"][0]["values"][18:] != [
            stat["values"][18:] for stat in standby_view["workers"][0]["metrics"][0]["stats"] if stat["aggregation"] == "max"
        ][0]  # the standby's answer is its own paused snapshot, without the reports sent since
    finally:
        await _fetchval(standby_dsn, "SELECT pg_wal_replay_resume()")
    await replayed(dsn, standby_dsn)
    await compare_charts(client, raw_client, BASE, BASE + 4 * 3600, 600)


async def test_reads_fall_back_to_the_primary_while_the_standby_lags(make_client, dsn, standby_dsn):
    client = await make_client(read_dsn=standby_dsn, read_max_lag_seconds=1)
    report = {"worker": "w", "timestamp": time.time() - 120, "machine_stats": {"cpu_usage": [10]}}
    await ok(client, "workers.status_report", report)
    await replayed(dsn, standby_dsn)
    before = await served(standby_dsn, CHART)
    assert (await chart(client))["workers"]
    assert await served(standby_dsn, CHART) > before
    assert fallbacks(await scrape(client), "lag") == 0

    await _fetchval(standby_dsn, "SELECT pg_wal_replay_pause()")
    try:
        hot = {"worker": "w", "timestamp": time.time() - 60, "machine_stats": {"cpu_usage": [77], "gpu_temperature": [50]}}
        await ok(client, "workers.status_report", hot)
        await asyncio.sleep(2.5)  # past the lag allowed, and the last check of the standby's lag
        before = await served(standby_dsn, CHART), await served(standby_dsn, METRIC_KEYS)
        answer = await chart(client)
        keys = await ok(client, "workers.get_metric_keys", {})
        # The primary's answers (the standby has not replayed the report), the standby untouched.
        assert 77 in answer["workers"][0]["metrics"][0]["stats"][0]["values"]
        assert "gpu_temperature" in {key for category in keys["categories"] for key in category["metric_keys"]}
        assert (await served(standby_dsn, CHART), await served(standby_dsn, METRIC_KEYS)) == before
        found = await scrape(client)
        assert fallbacks(found, "lag") == 2
        assert replica_gauge(found, "workers_replica_lag_seconds", standby_dsn) > 1
        assert replica_gauge(found, "workers_replica_up", standby_dsn) == 1
    finally:
        await _fetchval(standby_dsn, "SELECT pg_wal_replay_resume()")

    await replayed(dsn, standby_dsn)
    await asyncio.sleep(replicas.CHECK_SECONDS + 0.2)
    before = await served(standby_dsn, CHART)
    assert 77 in (await chart(client))["workers"][0]["metrics"][0]["stats"][0]["values"]
    assert await served(standby_dsn, CHART) > before  # back on the standby
    assert fallbacks(await scrape(client), "lag") == 2


async def test_reads_fall_back_to_the_primary_while_the_standby_is_down(make_client, dsn, standby_dsn):
    client = await make_client(read_dsn=standby_dsn)
    await ok(client, "workers.status_report", {"worker": "w", "timestamp": time.time() - 120, "machine_stats": {"cpu_usage": [10]}})
    await replayed(dsn, standby_dsn)
    assert (await chart(client))["workers"]  # the standby's pools are open
    standby("stop")
    try:
        assert (await chart(client))["workers"]
        assert (await ok(client, "workers.get_activity_report", {"from_date": time.time() - 600, "to_date": time.time(), "interval": 60}))
        assert (await ok(client, "workers.get_metric_keys", {}))["categories"]
        found = await scrape(client)
        assert fallbacks(found, "down") == 3
        assert replica_gauge(found, "workers_replica_up", standby_dsn) == 0
    finally:
        standby("start")

    deadline = time.monotonic() + replicas.DOWN_RETRY_SECONDS + 10
    before = await served(standby_dsn, CHART)
    while await served(standby_dsn, CHART) == before:  # tried again once DOWN_RETRY_SECONDS have passed
        assert time.monotonic() < deadline, "reads did not return to the standby"
        assert (await chart(client))["workers"]
        await asyncio.sleep(0.5)
    assert replica_gauge(await scrape(client), "workers_replica_up", standby_dsn) == 1
