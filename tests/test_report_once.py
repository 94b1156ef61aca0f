"""A report sent again (its answer lost after the commit) is stored once, wherever it lands:
twice in two batches or in one, after its hour was packed into a block, or after `compacted`
moved past it; two different reports of the same worker and time are both kept. And the
tenants' find-or-create answers the loser of a race too."""

import asyncio
import math
import time

import asyncpg
from helpers import ok, refresh_rollups

from server.storage import raw, tenants
from server.storage.writer import Report, ReportWriter

HOUR = 3600


def _report(company: str, moment: float, cpu: float, **fields) -> Report:
    defaults = dict(
        company=company, worker="w", user_id="u", ip=None, timeout=600, time=moment, task=None, queue=None,
        queues=None, tags=None, system_tags=None, metrics={"cpu_usage": {"0": cpu, "1": cpu + 1}},
    )
    return Report(**{**defaults, **fields})


async def _stored(conn) -> int:
    return await conn.fetchval("SELECT (SELECT count(*) FROM recent_reports) + (SELECT count(*) FROM late_reports)")


async def _reports_rolled_up(conn) -> int:
    return await conn.fetchval("SELECT coalesce(sum(reports), 0) FROM worker_activity_1m WHERE worker = 'w'")


async def test_a_report_written_twice_is_one_row_whether_in_two_batches_or_one(dsn, db_conn):
    company = await tenants.company_named(db_conn, "once")
    writer = ReportWriter(dsn, gather=0.3)  # reports sent together wait for each other: one batch
    await writer.start()
    start = time.time() - 600
    try:
        await writer.write(_report(company, start, 10.0))
        await writer.write(_report(company, start, 10.0))  # a batch of its own
        assert await _stored(db_conn) == 1
        await asyncio.gather(*(writer.write(_report(company, start + 10, 20.0, task="t1")) for _ in range(3)))
        assert await _stored(db_conn) == 2
        # The same time and values with another task, or other values: other reports, kept.
        await asyncio.gather(
            writer.write(_report(company, start + 10, 20.0, task="t2")),
            writer.write(_report(company, start + 10, 20.0)),
            writer.write(_report(company, start + 10, 21.0, task="t1")),
        )
        assert await _stored(db_conn) == 5
    finally:
        await writer.close()


async def test_a_report_sent_again_counts_once_in_charts_and_rollups(make_client, dsn, db_conn):
    served, raw_only = await make_client(), await make_client(read_from_rollups=False)
    minute = math.floor(time.time() / 60) * 60 - 1200
    first = {"worker": "w", "timestamp": (minute + 5) * 1000, "machine_stats": {"cpu_usage": [10]}}
    second = {"worker": "w", "timestamp": (minute + 25) * 1000, "machine_stats": {"cpu_usage": [40]}}
    # An API client's whole seconds: a different report at the same time, kept.
    same_time = {"worker": "w", "timestamp": (minute + 25) * 1000, "machine_stats": {"cpu_usage": [70]}}
    await ok(served, "workers.status_report", first)
    await ok(served, "workers.status_report", first)
    await asyncio.gather(*(ok(served, "workers.status_report", second) for _ in range(3)))
    await ok(served, "workers.status_report", same_time)
    assert await _stored(db_conn) == 3

    body = {"from_date": minute, "to_date": minute + 59, "interval": 60,
            "items": [{"key": "cpu_usage", "aggregation": "avg"}, {"key": "cpu_usage", "aggregation": "max"}]}
    activity = {"from_date": minute, "to_date": minute + 59, "interval": 60}

    async def check(client) -> None:
        stats = (await ok(client, "workers.get_stats", body))["workers"][0]["metrics"][0]["stats"]
        assert stats[0]["values"] == [40.0]  # (10 + 40 + 70) / 3, not (10 * 2 + 40 * 3 + 70) / 6
        assert stats[1]["values"] == [70.0]
        report = await ok(client, "workers.get_activity_report", activity)
        assert report["total"]["counts"] == [1]

    await check(raw_only)
    await refresh_rollups(dsn)
    assert await _reports_rolled_up(db_conn) == 3
    await check(served)
    await check(raw_only)  # packed into its block by the refresh's compaction


async def test_a_copy_of_a_packed_report_does_not_double_its_block(make_client, dsn, db_conn):
    served, raw_only = await make_client(), await make_client(read_from_rollups=False)
    hour = math.floor(time.time() / HOUR) * HOUR - 5 * HOUR
    bodies = [{"worker": "w", "timestamp": (hour + 60 * n + 0.5) * 1000,
               "machine_stats": {"cpu_usage": [n, 2.5], "memory_used": n * 0.1}} for n in range(10)]
    for body in bodies:
        await ok(served, "workers.status_report", body)
    await refresh_rollups(dsn)  # packs them into their hour's block
    assert await db_conn.fetchval("SELECT reports FROM report_blocks") == 10
    assert await _reports_rolled_up(db_conn) == 10

    await ok(served, "workers.status_report", bodies[3])  # sent again: a late row beside the block
    await ok(served, "workers.status_report", {**bodies[4], "machine_stats": {"cpu_usage": [99, 2.5], "memory_used": 0.4}})
    assert await db_conn.fetchval("SELECT count(*) FROM late_reports") == 2
    # What the refresh reads (every value): the copy once, the other report at the same time kept.
    points = await raw.read(db_conn, hour * 1_000_000, (hour + HOUR) * 1_000_000)
    assert len(points.report_times) == 11
    cpu = await db_conn.fetchval("SELECT id FROM stat_metrics WHERE name = 'cpu_usage'")
    assert sorted(points.values[points.metrics == cpu].tolist()) == sorted([*range(10), 99, *[2.5] * 11])

    await refresh_rollups(dsn)  # rolls the late reports up (the copy once), then merges them
    assert await db_conn.fetchval("SELECT count(*) FROM late_reports") == 0
    assert await db_conn.fetchval("SELECT reports FROM report_blocks") == 11
    assert await _reports_rolled_up(db_conn) == 11
    body = {"from_date": hour, "to_date": hour + HOUR - 1, "interval": HOUR,
            "items": [{"key": "cpu_usage", "aggregation": "avg"}]}
    want = (sum(range(10)) + 99 + 2.5 * 11) / 22
    for client in (served, raw_only):
        got = (await ok(client, "workers.get_stats", body))["workers"][0]["metrics"][0]["stats"][0]["values"]
        assert math.isclose(got[0], want)


async def test_a_copy_sent_after_compacted_moved_past_its_report_is_not_stored(dsn, db_conn):
    """The first copy is still a row of recent_reports (its hour not packed yet) when the
    second, now behind `compacted`, would go to late_reports."""
    company = await tenants.company_named(db_conn, "once")
    hour = math.floor(time.time() / HOUR) * HOUR - 3 * HOUR
    await db_conn.execute("UPDATE rollup_watermark SET compacted = to_timestamp($1)", hour)
    writer = ReportWriter(dsn)
    await writer.start()
    try:
        await writer.write(_report(company, hour + 100, 5.0))
        await db_conn.execute("UPDATE rollup_watermark SET compacted = to_timestamp($1)", hour + HOUR)
        await writer.write(_report(company, hour + 100, 5.0))
        await writer.write(_report(company, hour + 100, 6.0))  # another report: late, kept
    finally:
        await writer.close()
    assert await db_conn.fetchval("SELECT count(*) FROM recent_reports") == 1
    assert await db_conn.fetchval("SELECT count(*) FROM late_reports") == 1


async def test_the_loser_of_a_race_to_create_a_company_or_user_gets_the_winners_id(dsn):
    winner, loser = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        async with winner.transaction():
            company = await tenants.company_named(winner, "raced")
            # The loser's insert waits for the winner's transaction, then inserts nothing.
            losing = asyncio.create_task(tenants.company_named(loser, "raced"))
            await asyncio.sleep(0.3)
            assert not losing.done()
        assert await losing == company
        async with winner.transaction():
            user = await tenants.user_named(winner, company, "racer")
            losing = asyncio.create_task(tenants.user_named(loser, company, "racer"))
            await asyncio.sleep(0.3)
            assert not losing.done()
        assert await losing == user
    finally:
        await winner.close()
        await loser.close()
