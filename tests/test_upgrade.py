"""Upgrading a database of the jsonb era (migrations 001-005): every stored value and every
rollup row reads back the same through the public views after migrations 006 and 007,
with no step but the migrations (what every server start applies)."""

import json
import math
import os

import asyncpg
import pytest
from helpers import with_database

from server.storage import db

BASE = 1_699_999_200  # a multiple of 3600
SPECIAL = [1e-300, 1e100, -1e100, 0.1 + 0.2, float(2**53 + 1), 99999999.999, 12.345, 0.0, -7.5, 5e-324, 123456789]


@pytest.fixture
async def legacy_dsn(database_dsn):
    """A database of its own, migrated to the jsonb era only."""
    name = f"workers_test_upgrade_{os.getpid()}"
    admin = await asyncpg.connect(with_database(database_dsn, "postgres"))
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_database(database_dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        await db.migrate(conn, until=5)
    finally:
        await conn.close()
    yield dsn
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def _load_legacy(conn) -> None:
    await conn.execute("INSERT INTO companies (id, name) VALUES ('c1', 'one'), ('c2', 'two')")
    rows = []
    for worker in range(3):
        for step in range(400):  # over two hours, with a gap and reports without values
            moment = BASE + step * 17 + worker * 0.125
            if 150 <= step < 170:
                continue
            metrics = {
                "cpu_usage": {str(core): round(10 + step * 0.137 + core * 3.001, 3) for core in range(2 + worker)},
                "memory_used": {"total": 1000 + step},
                "gpu_usage": {"0": SPECIAL[step % len(SPECIAL)], "2": step},  # a list with a null skipped
            }
            if step % 50 == 7:
                metrics = {}
            task = f"task-{step // 100}" if step % 3 else None
            rows.append((moment, "c1" if worker < 2 else "c2", f"w{worker}", task, metrics))
    await conn.executemany(
        "INSERT INTO worker_stats (time, company, worker, task, metrics) VALUES (to_timestamp($1), $2, $3, $4, $5::jsonb)",
        [(moment, company, worker, task, json.dumps(metrics)) for moment, company, worker, task, metrics in rows],
    )
    # Rollup rows as the jsonb era's refresh wrote them (any values will do: they are copied).
    for tier, seconds in (("1m", 60), ("10m", 600), ("1h", 3600)):
        await conn.execute(
            f"""INSERT INTO stats_{tier} (time, company, worker, metric, min, max, sum, count, variants, mins, maxs, sums, counts)
                SELECT to_timestamp($1 + n * $2), 'c1', 'w' || (n % 2), 'cpu_usage', n - 1.5, n + 0.25, 3 * n + 0.1 + 0.2, 7,
                       ARRAY['0', '1'], ARRAY[n - 1.5, n], ARRAY[n, n + 0.25], ARRAY[n + 0.1, 2 * n + 0.2], ARRAY[3, 4]
                FROM generate_series(0, 30) AS n""",
            BASE, seconds,
        )
        await conn.execute(
            f"""INSERT INTO stats_{tier} (time, company, worker, metric, min, max, sum, count)
                SELECT to_timestamp($1 + n * $2), 'c2', 'w2', 'memory_used', n, n * 1e100, n * 1e-300, 1
                FROM generate_series(0, 30) AS n""",
            BASE, seconds,
        )
        await conn.execute(
            f"""INSERT INTO activity_{tier} (time, company, worker, reports, busy)
                SELECT to_timestamp($1 + n * $2), 'c1', 'w' || (n % 2), n + 1, n % 3 = 0 FROM generate_series(0, 30) AS n""",
            BASE, seconds,
        )


VIEWS = {
    "worker_stat_points": "time, company, worker, task, category, metric, variant, value",
    "worker_stats": "time, company, worker, task, metrics::text",
    **{f"worker_metric_rollup_{tier}": "time, company, worker, category, metric, min, max, avg, sum, count"
       for tier in ("1m", "10m", "1h")},
    **{f"worker_stat_rollup_{tier}": "time, company, worker, category, metric, variant, min, max, avg, sum, count"
       for tier in ("10m", "1h")},
    **{f"worker_activity_{tier}": "time, company, worker, reports, busy" for tier in ("1m", "10m", "1h")},
}


async def _read(conn, view: str) -> list[tuple]:
    rows = [tuple(row) for row in await conn.fetch(f"SELECT {VIEWS[view]} FROM {view}")]
    if view == "worker_stats":  # jsonb's text of a number varies (12.0, 12): compare the numbers
        rows = [(*row[:4], json.loads(row[4])) for row in rows]
    return sorted(rows, key=repr)


def _same(before: list[tuple], after: list[tuple], view: str) -> None:
    """Equal rows: every value exactly; a rollup's sum and avg to 1e-12 relative (the jsonb
    era's sums were floats, kept as exact decimals where they are some)."""
    assert len(before) == len(after), view
    rounded = "rollup" in view
    for old, new in zip(before, after):
        for a, b in zip(old, new):
            if rounded and isinstance(a, float):
                assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300), (view, old, new)
            else:
                assert a == b, (view, old, new)


async def test_a_jsonb_era_database_upgrades_with_every_value_kept(legacy_dsn):
    conn = await asyncpg.connect(legacy_dsn)
    try:
        await _load_legacy(conn)
        before = {view: await _read(conn, view) for view in VIEWS}
        assert len(before["worker_stat_points"]) > 3000
        applied = await db.migrate(conn)
        assert applied == [path.name for version, path in db.migration_files() if version >= 6]
        assert applied[:2] == ["006_compact_storage.sql", "007_compact_legacy.py"]
        after = {view: await _read(conn, view) for view in VIEWS}
        for view in VIEWS:
            _same(before[view], after[view], view)
        # The values the jsonb era kept are all in blocks now; nothing legacy is left.
        assert await conn.fetchval("SELECT count(*) FROM report_blocks") > 0
        assert await conn.fetchval("SELECT count(*) FROM recent_reports") == 0
        assert not await conn.fetchval("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'legacy_%'")
    finally:
        await conn.close()
