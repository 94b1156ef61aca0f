"""Rollups (SPEC §2 get_stats interval, §3 tiered retention): the refresh, late reports,
several refreshers at once, reads composed from tiers and raw reports, the interval rule,
the read timeout and each tier's retention. Every rollup-served answer is compared with
the same request answered from raw reports only (`read_from_rollups=False`)."""

import asyncio
import math
import random
import subprocess
import sys
import time

import asyncpg
import pytest
from conftest import ROOT
from helpers import call, ok, refresh_rollups, store_reports

from server import background
from server.keys import POOL
from server.storage import charts, rollups
from server.storage.charts import RAW, Segment
from server.storage.rollups import Invalidation, Retention

BASE = 1_699_999_200  # a multiple of 3600
DAY = 86400
KEEP_ALL = Retention(raw_days=100_000, tier_days={"1m": 100_000, "10m": 100_000, "1h": 100_000})
TIER_TABLES = ("rollup_1m", "rollup_10m", "rollup_1h")


def command_env(dsn: str) -> dict[str, str]:
    """The environment of a `python -m server` command on the test database, keeping what
    the tests send (at fixed past times)."""
    keep = {f"WORKERS_{tier.upper()}_RETENTION_DAYS": "100000" for tier in ("raw", "rollup_1m", "rollup_10m", "rollup_1h")}
    return {"WORKERS_DB_DSN": dsn, "PATH": "/usr/bin:/bin", **keep}


async def refresh(dsn: str, retention: Retention = KEEP_ALL, lag: float = 0):
    return await refresh_rollups(dsn, retention, lag)


def fleet_reports(seconds: int, workers: int = 4, period: float = 7.3, start: float = BASE, seed: int = 1):
    """Agent-shaped reports: per-core and per-GPU lists, scalars, some with a task."""
    rng = random.Random(seed)
    reports = []
    for number in range(workers):
        moment = start + number * 0.77
        while moment < start + seconds:
            stats = {
                "cpu_usage": [round(rng.uniform(0, 100), 3) for _ in range(2 + number % 3)],
                "memory_used": rng.randrange(1, 64_000),
                "gpu_usage": [rng.uniform(0, 100)] * (number % 2),
            }
            task = f"task-{number}" if (moment - start) % 900 < 400 and number % 2 else None
            reports.append({"worker": f"w{number}", "timestamp": moment, "machine_stats": stats, "task": task})
            moment += period
    return reports


async def send(client, reports: list[dict]) -> None:
    for start in range(0, len(reports), 50):
        await asyncio.gather(*(ok(client, "workers.status_report", body) for body in reports[start : start + 50]))


ITEMS = [{"key": key, "aggregation": aggregation} for key in ("cpu_usage", "memory_used", "gpu_usage") for aggregation in ("avg", "min", "max")]


def assert_same_answer(served, raw) -> None:
    """Equal answers: dates, counts, min and max exactly, avg to 1e-9 relative."""
    if isinstance(served, dict):
        assert served.keys() == raw.keys()
        if served.get("aggregation") == "avg":
            assert all(
                a is b if None in (a, b) else math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
                for a, b in zip(served["values"], raw["values"])
            )
            assert len(served["values"]) == len(raw["values"])
            return
        for key in served:
            assert_same_answer(served[key], raw[key])
    elif isinstance(served, list):
        assert len(served) == len(raw)
        for a, b in zip(served, raw):
            assert_same_answer(a, b)
    else:
        assert served == raw


async def clients(make_client):
    """A client reading rollups and one reading raw reports only, of the same company. The
    first may read raw reports for longer than by default, so that a chart split by variant
    at a multiple of 60 s that no tier with variants divides (the 1-minute tier has none)
    keeps its interval: the two answers then compare bucket by bucket."""
    return await make_client(raw_read_budget_worker_hours=10_000), await make_client(read_from_rollups=False)


async def compare_charts(served_client, raw_client, from_date, to_date, interval, **fields) -> dict:
    stats_body = {"from_date": from_date, "to_date": to_date, "interval": interval, "items": ITEMS, **fields}
    for split in (False, True):
        body = {**stats_body, "split_by_variant": split}
        served = await ok(served_client, "workers.get_stats", body)
        assert_same_answer(served, await ok(raw_client, "workers.get_stats", body))
    nulls = {**stats_body, "empty_buckets": "null"}
    assert_same_answer(await ok(served_client, "workers.get_stats", nulls), await ok(raw_client, "workers.get_stats", nulls))
    activity_body = {"from_date": from_date, "to_date": to_date, "interval": interval}
    served_activity = await ok(served_client, "workers.get_activity_report", activity_body)
    assert served_activity == await ok(raw_client, "workers.get_activity_report", activity_body)
    some = {**activity_body, "worker_ids": [worker["worker"] for worker in served["workers"][::2]]}
    served_some = await ok(served_client, "workers.get_activity_report", some)
    assert served_some == await ok(raw_client, "workers.get_activity_report", some)
    assert sum(served_some["total"]["counts"]) < sum(served_activity["total"]["counts"]) or len(served["workers"]) < 2
    return served


def values(answer: dict, worker: str, metric: str, aggregation: str) -> list:
    [entry] = [m for w in answer["workers"] if w["worker"] == worker for m in w["metrics"] if m["metric"] == metric]
    [stat] = [s for s in entry["stats"] if s["aggregation"] == aggregation]
    return stat["values"]


async def tier_rows(db_conn) -> dict[str, int]:
    return {table: await db_conn.fetchval(f"SELECT count(*) FROM {table}") for table in TIER_TABLES}


# --- planning -----------------------------------------------------------------------------


def test_segments_use_the_coarsest_tier_for_whole_buckets_and_raw_for_the_rest():
    start = BASE + 17.5  # inside a minute
    end = BASE + 3 * 3600 + 125  # 2 min 5 s into an hour
    assert charts.segments(start, end, 3600, exact_before=math.inf) == [
        Segment(RAW, start, BASE + 60),
        Segment(60, BASE + 60, BASE + 600),
        Segment(600, BASE + 600, BASE + 3600),
        Segment(3600, BASE + 3600, BASE + 3 * 3600),
        Segment(60, BASE + 3 * 3600, BASE + 3 * 3600 + 120),
        Segment(RAW, BASE + 3 * 3600 + 120, end),
    ]


def test_segments_read_raw_reports_after_the_watermark_and_never_tiers_that_do_not_divide():
    assert charts.segments(BASE, BASE + 7200, 1200, exact_before=BASE + 1830) == [
        Segment(600, BASE, BASE + 1800),
        Segment(RAW, BASE + 1800, BASE + 7200),
    ]
    assert charts.segments(BASE, BASE + 7200, 40, exact_before=math.inf) == [Segment(RAW, BASE, BASE + 7200)]


def test_interval_rule():
    now = BASE + 100 * DAY
    retention = Retention(raw_days=7, tier_days={"1m": 30, "10m": 90, "1h": 400})
    recent, month, season, year = now - DAY, now - 20 * DAY, now - 60 * DAY, now - 300 * DAY
    assert charts.choose_interval(40, recent, now, retention, raw_affordable=True) == 40
    assert charts.choose_interval(40, recent, now, retention, raw_affordable=False) == 60
    assert charts.choose_interval(600, recent, now, retention, raw_affordable=False) == 600
    assert charts.choose_interval(86, month, now, retention, raw_affordable=True) == 120
    assert charts.choose_interval(120, season, now, retention, raw_affordable=True) == 600
    assert charts.choose_interval(605, year, now, retention, raw_affordable=True) == 3600
    # Judged by the interval too: a week's chart at 1,000 points and its refresh of a few
    # minutes agree, as do a month's.
    retention = Retention(raw_days=7, tier_days={"1m": 8, "10m": 90, "1h": 400})
    for from_date in (now - 7 * DAY, now - 600):
        assert charts.choose_interval(604, from_date, now, retention, raw_affordable=False) == 660
        assert charts.choose_interval(2592, from_date, now, retention, raw_affordable=False) == 3000


def test_a_chart_of_the_last_days_of_raw_retention_starts_where_it_asks():
    """Raw reports are dropped by whole days: a chart of the last 7 days (7 days kept) still
    finds the reports of its first, partial bucket; one starting 8 days back reads it whole."""
    now = BASE + 100 * DAY + 4321.5
    retention = Retention(raw_days=7, tier_days={"1m": 8, "10m": 90, "1h": 400})
    week_ago = now - 7 * DAY - 0.25
    first = math.floor(week_ago / 3600) * 3600
    assert charts.read_range(week_ago, now, first, first + 169 * 3600, now, retention)[0] == week_ago
    eight_days_ago = now - 8 * DAY
    first = math.floor(eight_days_ago / 3600) * 3600
    assert charts.read_range(eight_days_ago, now, first, first + 193 * 3600, now, retention)[0] == first


def test_regions_rebuild_closed_buckets_and_invalidated_ones_without_overlap():
    late = [
        Invalidation("a", "w1", BASE + 70, BASE + 130),
        Invalidation("a", "w1", BASE + 100, BASE + 200),  # overlaps the first: merged
        Invalidation("a", "w2", BASE + 3000, BASE + 99_999),  # reaches past the old watermark: clipped
        Invalidation(None, None, BASE - 600, BASE - 500),  # every worker of every company
        Invalidation("b", "w9", BASE - 590, BASE - 530),  # inside the fleet-wide region: dropped
        Invalidation("a", "w3", BASE - 10**6, BASE - 10**6),  # past the horizon: dropped
    ]
    found = rollups.regions(60, BASE + 3600, BASE + 4000, ["a", "b"], late, horizon=BASE - 10_000)
    assert sorted(found, key=lambda r: (r[0], r[1] or "", r[2])) == [
        ("a", None, BASE - 600, BASE - 480),
        ("a", None, BASE + 3600, BASE + 3960),
        ("a", "w1", BASE + 60, BASE + 240),
        ("a", "w2", BASE + 3000, BASE + 3600),
        ("b", None, BASE - 600, BASE - 480),
        ("b", None, BASE + 3600, BASE + 3960),
    ]


# --- refresh and reads --------------------------------------------------------------------


async def test_rollup_served_charts_equal_raw_ones(make_client, dsn, db_conn):
    served_client, raw_client = await clients(make_client)
    await send(served_client, fleet_reports(3 * 3600))
    await refresh(dsn)
    rows = await tier_rows(db_conn)
    assert all(count > 0 for count in rows.values()), rows
    assert await db_conn.fetchval("SELECT count(*) FROM rollup_invalidations") == 0
    for from_date, to_date, interval in [
        (BASE, BASE + 3 * 3600, 3600),
        (BASE + 17.5, BASE + 3 * 3600 - 1, 600),
        (BASE + 1234.5, BASE + 9999, 120),
        (BASE - 600, BASE + 4 * 3600, 1200),
        (BASE + 100, BASE + 2000, 40),
    ]:
        await compare_charts(served_client, raw_client, from_date, to_date, interval)
    await compare_charts(served_client, raw_client, BASE, BASE + 3 * 3600, 600, worker_ids=["w1", "w3"])


async def test_charts_read_the_rollups(make_client, dsn, db_conn):
    """A change made to a tier directly shows in the answer: the tier served it."""
    client = await make_client()
    await send(client, fleet_reports(3600, workers=2))
    await refresh(dsn)
    body = {"from_date": BASE, "to_date": BASE + 3600, "interval": 3600, "items": [{"key": "memory_used", "aggregation": "max"}]}
    before = await ok(client, "workers.get_stats", body)
    assert [w["worker"] for w in before["workers"]] == ["w0", "w1"]
    # One worker's lanes taken out of the hourly block of memory_used: only the other is charted.
    await db_conn.execute(
        """UPDATE rollup_1h SET workers = workers[2:], offsets = offsets[2:]
           WHERE metric = (SELECT id FROM stat_metrics WHERE name = 'memory_used')"""
    )
    after = await ok(client, "workers.get_stats", body)
    assert [w["worker"] for w in after["workers"]] == ["w1"] and after["workers"][0] == before["workers"][1]
    activity = {"from_date": BASE, "to_date": BASE + 3600, "interval": 3600}
    assert (await ok(client, "workers.get_activity_report", activity))["total"]["counts"] == [2]
    await db_conn.execute("UPDATE rollup_1h SET workers = workers[2:], offsets = offsets[2:] WHERE metric = 0")
    assert (await ok(client, "workers.get_activity_report", activity))["total"]["counts"] == [1]


async def test_a_late_report_is_exact_at_once_and_rolled_up_by_the_next_refresh(make_client, dsn, db_conn):
    served_client, raw_client = await clients(make_client)
    await send(served_client, fleet_reports(2 * 3600, workers=2))
    await refresh(dsn)
    late = {"worker": "w0", "timestamp": BASE + 1800.5, "machine_stats": {"memory_used": 10**9, "cpu_usage": [-5]}, "task": "late"}
    await ok(served_client, "workers.status_report", late)
    assert await db_conn.fetchval("SELECT count(*) FROM rollup_invalidations WHERE worker = 'w0'") == 1
    served = await compare_charts(served_client, raw_client, BASE, BASE + 2 * 3600, 3600)
    assert values(served, "w0", "memory_used", "max") == [10**9, values(served, "w0", "memory_used", "max")[1]]
    await refresh(dsn)
    assert await db_conn.fetchval("SELECT count(*) FROM rollup_invalidations") == 0
    assert await db_conn.fetchval("SELECT max(max) FROM worker_metric_rollup_1h WHERE metric = 'memory_used'") == 10**9
    await compare_charts(served_client, raw_client, BASE, BASE + 2 * 3600, 3600)
    await compare_charts(served_client, raw_client, BASE + 30, BASE + 2 * 3600, 60)


async def test_refresh_up_to_now_with_reports_arriving_in_several_processes_at_once(make_client, dsn, db_conn):
    """Reports around the watermark while three refresh commands run at once, repeatedly:
    afterwards every tier equals a rollup computed from the raw reports."""
    served_client, raw_client = await clients(make_client)
    start = math.floor(time.time() / 60) * 60 - 180
    reports = fleet_reports(240, workers=3, period=1.9, start=start, seed=7)
    random.Random(3).shuffle(reports)
    command = [sys.executable, "-m", "server", "rollups", "refresh"]
    env = {**command_env(dsn), "WORKERS_ROLLUP_LAG_SECONDS": "0"}
    outcomes = []
    for part in range(4):
        refreshers = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
        await send(served_client, reports[part::4])
        outcomes += [await asyncio.to_thread(process.wait) for process in refreshers]
    assert 0 in outcomes and set(outcomes) <= {0, 1}
    await refresh(dsn)
    latest = math.floor(time.time() / 60) * 60
    await compare_charts(served_client, raw_client, start - 60, latest, 60)
    await compare_charts(served_client, raw_client, start - 600, latest + 600, 600)
    # Read whole from the tiers: equal to a rollup of the raw reports.
    from_tier = await db_conn.fetch("SELECT time, worker, metric, min, max, count FROM worker_metric_rollup_1m ORDER BY 1, 2, 3")
    from_raw = await db_conn.fetch(
        """SELECT time_bucket('1 minute', time) AS time, worker, metric, min(value), max(value), count(*)
           FROM worker_stat_points WHERE time < (SELECT watermark FROM rollup_watermark)
           GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"""
    )
    assert [tuple(row) for row in from_tier] == [tuple(row) for row in from_raw]


async def test_refresh_command_since_rebuilds_a_bulk_import(make_client, dsn, db_conn):
    """Reports stored without the writer (so not in the invalidation log), as a restore
    would: `--since` rolls them up."""
    client = await make_client()
    await store_reports(db_conn, client.credentials.company_id, [
        (BASE + n * 10, "imported", None, {"cpu_usage": {"0": float(n)}}) for n in range(360)
    ])
    body = {"from_date": BASE, "to_date": BASE + 3600, "interval": 3600, "items": [{"key": "cpu_usage", "aggregation": "max"}]}
    assert (await ok(client, "workers.get_stats", body))["workers"] == []  # behind the watermark, never invalidated
    done = subprocess.run(
        [sys.executable, "-m", "server", "rollups", "refresh", "--since", "2023-11-14T22:00:00Z"],
        cwd=ROOT, env=command_env(dsn), capture_output=True, text=True, check=True,
    )
    assert "rollups up to date" in done.stdout
    data = await ok(client, "workers.get_stats", body)
    assert data["workers"][0]["metrics"][0]["stats"][0]["values"] == [359]


# --- the interval rule, the read timeout, retention ---------------------------------------


async def test_interval_is_raised_to_a_tier_past_the_raw_retention(make_client, dsn):
    client = await make_client(raw_retention_days=1, rollup_1m_retention_days=100_000)
    old = time.time() - 3 * DAY
    start = math.floor(old / 3600) * 3600
    await send(client, fleet_reports(1800, workers=1, start=start))
    await refresh(dsn)
    body = {"from_date": start + 5, "to_date": start + 1800, "interval": 45, "items": [{"key": "memory_used", "aggregation": "max"}]}
    [entry] = (await ok(client, "workers.get_stats", body))["workers"][0]["metrics"]
    assert [date // 1000 - start for date in entry["dates"]] == list(range(0, 1800, 60))
    assert all(value > 0 for value in entry["stats"][0]["values"])


async def test_a_chart_split_by_variant_is_raised_to_a_tier_with_variants(make_client):
    """The 1-minute tier keeps no variants: a split chart at 120 s beyond the raw read budget
    is answered at 600 s, from the 10-minute tier; without the split, at 120 s."""
    client = await make_client(raw_read_budget_worker_hours=1)
    await ok(client, "workers.status_report", {"worker": "w1", "timestamp": BASE + 1, "machine_stats": {"cpu_usage": [1, 2]}})
    for split, spacing in ((True, 600_000), (False, 120_000)):
        body = {"from_date": BASE, "to_date": BASE + 7200, "interval": 120, "split_by_variant": split,
                "items": [{"key": "cpu_usage"}]}
        entry = (await ok(client, "workers.get_stats", body))["workers"][0]["metrics"][0]
        assert entry["dates"][1] - entry["dates"][0] == spacing


async def test_interval_is_raised_beyond_the_raw_read_budget(make_client):
    client = await make_client(raw_read_budget_worker_hours=1)
    await ok(client, "workers.status_report", {"worker": "w1", "timestamp": BASE + 1, "machine_stats": {"memory_used": 1}})
    def body(worker_ids):
        return {"from_date": BASE, "to_date": BASE + 7200, "interval": 40, "worker_ids": worker_ids,
                "items": [{"key": "memory_used"}]}
    [entry] = (await ok(client, "workers.get_stats", body(["w1"])))["workers"][0]["metrics"]
    assert entry["dates"][1] - entry["dates"][0] == 60_000  # 1,000 buckets of 40 s: 11.1 worker-hours > 1
    client = await make_client(raw_read_budget_worker_hours=12)
    [entry] = (await ok(client, "workers.get_stats", body(["w1"])))["workers"][0]["metrics"]
    assert entry["dates"][1] - entry["dates"][0] == 40_000


async def test_a_read_past_the_read_timeout_is_a_clear_400(make_client, db_conn):
    client = await make_client(read_from_rollups=False, read_timeout_seconds=0.1)
    await store_reports(db_conn, client.credentials.company_id, [
        (BASE + n * 0.01, f"w{n % 50}", None, {"cpu_usage": {str(i): float(n) for i in range(4)}}) for n in range(200_000)
    ])
    body = {"from_date": BASE, "to_date": BASE + 2001, "interval": 60, "items": [{"key": "cpu_usage"}]}
    code, subcode, message, _ = await call(client, "workers.get_stats", body)
    assert (code, subcode) == (400, 16)
    assert "WORKERS_READ_TIMEOUT_SECONDS" in message and "temporarily unavailable" not in message


async def test_each_tier_keeps_its_own_retention(client, dsn, db_conn):
    now = time.time()
    for days_ago in (5, 20, 60, 200):
        start = math.floor((now - days_ago * DAY) / 3600) * 3600
        await ok(client, "workers.status_report", {"worker": "w1", "timestamp": start + 10, "machine_stats": {"memory_used": days_ago}})
    await refresh(dsn)
    retention = Retention(raw_days=10, tier_days={"1m": 30, "10m": 90, "1h": 400})
    await background.apply_retention(client.app[POOL], retention)
    kept = {
        tier: sorted(round(row[0]) for row in await db_conn.fetch(f"SELECT max FROM worker_metric_rollup_{tier}"))
        for tier in ("1m", "10m", "1h")
    }
    raw = sorted(row[0] for row in await db_conn.fetch("SELECT value FROM worker_stat_points"))
    # Whole chunks are dropped: a tier keeps at least its retention, at most one chunk more.
    assert raw == [5]
    assert kept["1m"] == [5, 20]
    assert kept["10m"] == [5, 20, 60]
    assert kept["1h"] == [5, 20, 60, 200]


async def test_extreme_values_roll_up_exactly(make_client, dsn):
    served_client, raw_client = await clients(make_client)
    for offset, value in [(1, 1e100), (2, -1e100), (3, 12345678901234567890), (4, 0.1), (65, 1e-100)]:
        await ok(served_client, "workers.status_report", {"worker": "w1", "timestamp": BASE + offset, "machine_stats": {"memory_used": value}})
    await refresh(dsn)
    served = await compare_charts(served_client, raw_client, BASE, BASE + 3600, 60)
    assert values(served, "w1", "memory_used", "max")[:2] == [1e100, 1e-100]
    assert values(served, "w1", "memory_used", "min")[:2] == [-1e100, 1e-100]


def test_refresher_passes_as_soon_as_a_minute_can_be_rolled_up():
    next_refresh_delay, WATERMARK_MARGIN = background.next_refresh_delay, background.WATERMARK_MARGIN
    minute = 1_800_000_000  # a minute boundary
    # 10 s after a minute closed, with a lag of 10 s: the watermark can move now.
    assert next_refresh_delay(minute + 10 - 0.1, every=30, lag=10) == pytest.approx(0.1 + WATERMARK_MARGIN)
    # Just after it moved: the next chance is a minute later, but `every` comes first.
    assert next_refresh_delay(minute + 10 + WATERMARK_MARGIN, every=30, lag=10) == 30
    assert next_refresh_delay(minute + 45, every=30, lag=10) == pytest.approx(25 + WATERMARK_MARGIN)
    assert next_refresh_delay(minute + 45, every=10, lag=10) == 10
