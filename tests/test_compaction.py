"""Compaction (storage/compaction.py): every value sent reads back exactly before and after
its hour is packed; packed hours give their chunks back; late reports join their blocks; a
period's small rollup blocks become one; a read meanwhile sees each report once; a refresh
killed in the middle of rolling up or of packing loses nothing and repeats nothing."""

import asyncio
import math
import os
import signal
import struct
import subprocess
import sys
import time

import asyncpg
from helpers import ROOT, ok, refresh_rollups

from server.background import REFRESHER_NAME

from server.storage import compaction

HOUR = 3600
EXACT = [1e-300, 1e100, -1e100, -0.0, 0.0, 0.1 + 0.2, float(2**53 + 1), 99999999.999, 12.345, 0.001, 5e-324,
         123456789.123456, 7, 1.5, -2.25, 1e-5, 33.333]


def bits(value: float) -> bytes:
    return struct.pack(">d", value)


async def points(conn, worker: str) -> list[tuple]:
    """(time in µs, metric, variant, value's bits) of every stored value of the worker."""
    rows = await conn.fetch(
        """SELECT (extract(epoch FROM time) * 1000000)::bigint AS micros, metric, variant, value
           FROM worker_stat_points WHERE worker = $1""",
        worker,
    )
    return sorted((row["micros"], row["metric"], row["variant"], bits(row["value"])) for row in rows)


def expected_points(reports: list[dict]) -> list[tuple]:
    found = []
    for body in reports:
        micros = round(body["timestamp"] / 1000 * 1_000_000)
        for metric, value in body["machine_stats"].items():
            if isinstance(value, list):
                found += [(micros, metric, str(index), bits(float(v))) for index, v in enumerate(value)]
            else:
                found.append((micros, metric, "total", bits(float(value))))
    return sorted(found)


def special_reports(start: float, count: int) -> list[dict]:
    """Reports every 10 s from `start` carrying every value of EXACT, in lists and scalars."""
    return [
        {
            "worker": "exact",
            "timestamp": round((start + 10 * n + 0.125) * 1000),
            "machine_stats": {
                "cpu_usage": [EXACT[(n + k) % len(EXACT)] for k in range(4)],
                "cpu_temperature": [round(40 + (n * 17 + k * 5) % 400 / 7, 3) for k in range(2)],
                "memory_used": EXACT[n % len(EXACT)],
                "gpu_usage": [n % 101, (n * 7) % 101],
                "network_rx": round(n * 0.137, 3),
            },
        }
        for n in range(count)
    ]


async def pretend_compacted_at(conn, moment: float) -> None:
    """Move where packed hours end back to `moment`, so that reports after it are stored in
    recent_reports, as those of the open hour are."""
    await conn.execute("UPDATE rollup_watermark SET compacted = to_timestamp($1)", moment)


async def test_every_value_reads_back_exactly_before_and_after_its_hour_is_packed(client, dsn, db_conn):
    start = math.floor(time.time() / HOUR) * HOUR - 3 * HOUR
    await pretend_compacted_at(db_conn, start)
    reports = special_reports(start, 700)  # two hours of reports, in recent_reports
    await asyncio.gather(*(ok(client, "workers.status_report", body) for body in reports))
    assert await db_conn.fetchval("SELECT count(*) FROM recent_reports") == 700
    before = await points(db_conn, "exact")
    assert before == expected_points(reports)
    chunks = await db_conn.fetchval(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'recent_reports'")
    assert chunks >= 2

    await refresh_rollups(dsn)
    assert await db_conn.fetchval("SELECT count(*) FROM recent_reports") == 0
    assert await db_conn.fetchval(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'recent_reports'") == 0
    assert await db_conn.fetchval("SELECT count(*) FROM report_blocks") == 2  # one block per worker-hour
    assert await points(db_conn, "exact") == before
    # Every report kept, with its task, in the jsonb-era view too.
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stats WHERE worker = 'exact'") == 700


async def test_charts_of_packed_hours_equal_the_raw_computation(make_client, dsn, db_conn):
    served, raw_only = await make_client(), await make_client(read_from_rollups=False)
    start = math.floor(time.time() / HOUR) * HOUR - 3 * HOUR
    await pretend_compacted_at(db_conn, start)
    reports = special_reports(start, 700)
    await asyncio.gather(*(ok(served, "workers.status_report", body) for body in reports))
    await refresh_rollups(dsn)
    for interval, split in ((60, False), (600, True), (3600, False), (3600, True), (45, False)):
        body = {"from_date": start, "to_date": start + 2 * HOUR, "interval": interval, "split_by_variant": split,
                "items": [{"key": key, "aggregation": aggregation}
                          for key in ("cpu_usage", "cpu_temperature", "gpu_usage", "network_rx")
                          for aggregation in ("min", "max", "avg")]}
        got, want = await ok(served, "workers.get_stats", body), await ok(raw_only, "workers.get_stats", body)
        assert [w["worker"] for w in got["workers"]] == ["exact"]
        for got_metric, want_metric in zip(got["workers"][0]["metrics"], want["workers"][0]["metrics"], strict=True):
            assert got_metric["dates"] == want_metric["dates"]
            for got_stat, want_stat in zip(got_metric["stats"], want_metric["stats"], strict=True):
                if got_stat["aggregation"] == "avg":
                    # Sums of 1e100 and -1e100 beside small values cancel: no float sum of them
                    # is exact, and two orders of adding give different ones. The decimals' are.
                    if got_metric["metric"] != "cpu_usage":
                        assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got_stat["values"], want_stat["values"]))
                else:  # float64 equality: the min of 0.0 and -0.0 may be either
                    assert got_stat["values"] == want_stat["values"]


async def test_a_late_report_joins_its_hours_block(client, dsn, db_conn):
    start = math.floor(time.time() / HOUR) * HOUR - 5 * HOUR
    reports = special_reports(start, 30)
    await asyncio.gather(*(ok(client, "workers.status_report", body) for body in reports))
    assert await db_conn.fetchval("SELECT count(*) FROM late_reports") == 30  # hours already packed
    await refresh_rollups(dsn)
    assert await db_conn.fetchval("SELECT count(*) FROM late_reports") == 0
    later = special_reports(start + 1000.5, 3)
    for body in later:
        body["machine_stats"]["memory_used"] = -0.0
    await asyncio.gather(*(ok(client, "workers.status_report", body) for body in later))
    await refresh_rollups(dsn)
    assert await db_conn.fetchval("SELECT count(*) FROM report_blocks") == 1
    assert await db_conn.fetchval("SELECT reports FROM report_blocks") == 33
    assert await points(db_conn, "exact") == expected_points(reports + later)


async def test_tasks_read_the_same_before_and_after_packing(client, dsn, db_conn):
    """A report's task reads back the same from rows and from blocks; an empty task is no
    task (SPEC: what get_activity_report counts as active), wherever the report is."""
    start = math.floor(time.time() / HOUR) * HOUR - 3 * HOUR
    await pretend_compacted_at(db_conn, start)
    tasks = ["t-1", "", None, "t-2", "t-2", ""]
    for n, task in enumerate(tasks):
        body = {"worker": "tasks", "timestamp": round((start + 10 * n) * 1000), "machine_stats": {"cpu_usage": [n]}}
        if task is not None:
            body["task"] = task
        await ok(client, "workers.status_report", body)

    async def stored() -> list:
        rows = await db_conn.fetch("SELECT time, task FROM worker_stats WHERE worker = 'tasks' ORDER BY time")
        return [row["task"] for row in rows]

    assert await stored() == ["t-1", None, None, "t-2", "t-2", None]
    await refresh_rollups(dsn)
    assert await db_conn.fetchval("SELECT count(*) FROM report_blocks") == 1
    assert await stored() == ["t-1", None, None, "t-2", "t-2", None]


async def test_a_periods_small_rollup_blocks_become_one(client, dsn, db_conn):
    start = math.floor(time.time() / HOUR) * HOUR - 3 * HOUR
    await pretend_compacted_at(db_conn, start)
    await db_conn.execute("UPDATE rollup_watermark SET watermark = to_timestamp($1), materialized = to_timestamp($1)", start)
    await asyncio.gather(*(ok(client, "workers.status_report", body) for body in special_reports(start, 700)))
    # Refreshed a little at a time, as the refresher does: many small blocks, then merged.
    conn = await asyncpg.connect(dsn)
    try:
        from server.storage.refresh import Refresher
        from server.storage.rollups import Retention

        refresher = Refresher(Retention(100_000, {"1m": 100_000, "10m": 100_000, "1h": 100_000}), lag=0, max_step=300)
        await refresher.refresh(conn)
        small = await conn.fetchval("SELECT count(*) FROM rollup_1m")
        assert small > 20
        await compaction.compact(conn)
        per_period = await conn.fetch(
            """SELECT time_bucket('1 hour', start) AS hour, metric, count(*) FROM rollup_1m
               WHERE start < to_timestamp($1) GROUP BY 1, 2""", start + 2 * HOUR)
        assert per_period and all(row["count"] == 1 for row in per_period)
    finally:
        await conn.close()


async def test_a_read_meanwhile_sees_each_report_once(client, dsn, db_conn):
    start = math.floor(time.time() / HOUR) * HOUR - 3 * HOUR
    await pretend_compacted_at(db_conn, start)
    await asyncio.gather(*(ok(client, "workers.status_report", body) for body in special_reports(start, 200)))
    reader = await asyncpg.connect(dsn)
    try:
        async with reader.transaction(isolation="repeatable_read", readonly=True):
            from server.storage import raw

            first = await raw.read(reader, start * 1_000_000, (start + 3 * HOUR) * 1_000_000)
            packing = asyncio.create_task(refresh_rollups(dsn))
            await asyncio.sleep(1)
            second = await raw.read(reader, start * 1_000_000, (start + 3 * HOUR) * 1_000_000)
            assert len(first.report_times) == len(second.report_times) == 200
        await packing
        after = await raw.read(reader, start * 1_000_000, (start + 3 * HOUR) * 1_000_000)
        assert sorted(after.report_times.tolist()) == sorted(first.report_times.tolist())
        assert await db_conn.fetchval("SELECT count(*) FROM recent_reports") == 0
    finally:
        await reader.close()


async def killed_while_writing(dsn: str, db_conn, table: str) -> None:
    """Run `python -m server rollups refresh`, hold it on a lock of `table` (in the middle of
    its transaction, having read what it rolls up or packs), then SIGKILL it."""
    env = {**os.environ, "WORKERS_DB_DSN": dsn, "WORKERS_ROLLUP_LAG_SECONDS": "0",
           **{f"WORKERS_{name}_RETENTION_DAYS": "100000" for name in ("RAW", "ROLLUP_1M", "ROLLUP_10M", "ROLLUP_1H")}}
    blocker = await asyncpg.connect(dsn)
    process = None
    try:
        async with blocker.transaction():
            await blocker.execute(f"LOCK TABLE {table} IN SHARE MODE")
            process = subprocess.Popen([sys.executable, "-m", "server", "rollups", "refresh"], cwd=ROOT, env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while not await db_conn.fetchval(
                    """SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()
                                      AND application_name = $1 AND wait_event_type = 'Lock')""",
                    REFRESHER_NAME):
                assert process.poll() is None and time.monotonic() < deadline, "the refresh never waited on the lock"
                await asyncio.sleep(0.05)
            process.send_signal(signal.SIGKILL)
            process.wait()
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        await blocker.close()
    # The killed session's backend goes once PostgreSQL notices; its transaction is rolled back.
    while await db_conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1)",
            REFRESHER_NAME):
        await asyncio.sleep(0.05)


async def test_a_refresh_killed_midway_loses_and_repeats_nothing(make_client, dsn, db_conn):
    served, raw_only = await make_client(), await make_client(read_from_rollups=False)
    start = math.floor(time.time() / HOUR) * HOUR - 3 * HOUR
    await pretend_compacted_at(db_conn, start)
    await db_conn.execute("UPDATE rollup_watermark SET watermark = to_timestamp($1), materialized = to_timestamp($1)", start)
    reports = special_reports(start, 700)
    await asyncio.gather(*(ok(served, "workers.status_report", body) for body in reports))

    await killed_while_writing(dsn, db_conn, "rollup_1m")  # rolling up
    assert await db_conn.fetchval("SELECT extract(epoch FROM materialized) FROM rollup_watermark") == start
    assert await db_conn.fetchval("SELECT count(*) FROM rollup_1m") == 0
    await killed_while_writing(dsn, db_conn, "report_blocks")  # the rollups done; packing an hour
    assert await db_conn.fetchval("SELECT count(*) FROM rollup_1m") > 0
    assert await db_conn.fetchval("SELECT count(*) FROM recent_reports") == 700
    assert await db_conn.fetchval("SELECT count(*) FROM report_blocks") == 0

    await refresh_rollups(dsn)
    assert await db_conn.fetchval("SELECT count(*) FROM recent_reports") == 0
    assert await db_conn.fetchval("SELECT count(*) FROM report_blocks") == 2
    assert await points(db_conn, "exact") == expected_points(reports)
    body = {"from_date": start, "to_date": start + 2 * HOUR, "interval": 600,
            "items": [{"key": key, "aggregation": aggregation} for key in ("cpu_temperature", "gpu_usage", "network_rx")
                      for aggregation in ("min", "max", "avg")]}
    got, want = await ok(served, "workers.get_stats", body), await ok(raw_only, "workers.get_stats", body)
    for got_metric, want_metric in zip(got["workers"][0]["metrics"], want["workers"][0]["metrics"], strict=True):
        for got_stat, want_stat in zip(got_metric["stats"], want_metric["stats"], strict=True):
            assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(got_stat["values"], want_stat["values"], strict=True))
