"""Migrations, the migrate command, retention, and the Grafana view."""

import asyncio
import os
import subprocess
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from conftest import ROOT
from helpers import now_ms, ok

from server import background
from server.keys import POOL, SETTINGS
from server.storage import db
from server.storage.rollups import Retention

DAY = 24 * 3600


@pytest.fixture
async def empty_database(database_dsn):
    """A database with nothing in it, on the same server as the test database."""
    parts = urlsplit(database_dsn)
    name = f"{parts.path.lstrip('/')}_empty"
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(parts._replace(path=f"/{name}"))
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_concurrent_migrators_apply_each_migration_once(empty_database):
    connections = [await asyncpg.connect(empty_database) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(db.migrate(conn) for conn in connections))
        expected = [path.name for _, path in db.migration_files()]
        assert sorted(applied, key=len, reverse=True) == [expected, [], []]
        versions = await connections[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [row["version"] for row in versions] == [version for version, _ in db.migration_files()]
        is_hypertable = await connections[0].fetchval(
            "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = 'report_blocks'"
        )
        assert is_hypertable == 1
    finally:
        for conn in connections:
            await conn.close()


def _migrate_command(dsn: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "server", "migrate"],
        cwd=ROOT,
        env={**os.environ, "WORKERS_DB_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_migrate_command_applies_then_finds_nothing_to_do(empty_database):
    names = [path.name for _, path in db.migration_files()]
    assert names[0] == "001_initial.sql"
    assert f"applied {len(names)} migration(s): {', '.join(names)}" in _migrate_command(empty_database)
    assert "database is up to date" in _migrate_command(empty_database)


async def test_retention_drops_old_statistics_and_metric_keys(client, db_conn):
    old = (time.time() - 40 * DAY) * 1000
    await ok(client, "workers.status_report", {"worker": "w1", "timestamp": old, "machine_stats": {"disk_read": 1}})
    await ok(client, "workers.status_report", {"worker": "w1", "timestamp": now_ms(), "machine_stats": {"cpu_usage": 2}})
    retention = Retention(raw_days=30, tier_days={"1m": 30, "10m": 30, "1h": 30})
    settings = client.app[SETTINGS]
    await background.refresh_rollups(settings.db_dsn, settings)  # the old report packed into its day's chunk
    dropped = await background.apply_retention(client.app[POOL], retention)
    assert dropped >= 1
    rows = await db_conn.fetch("SELECT metric FROM worker_stat_points")
    assert [row["metric"] for row in rows] == ["cpu_usage"]
    keys = await ok(client, "workers.get_metric_keys", {})
    assert keys == {"categories": [{"name": "cpu", "metric_keys": ["cpu_usage"]}]}


async def test_grafana_view_exposes_every_value_as_a_point(client, db_conn):
    moment = 1_700_000_000
    await ok(
        client,
        "workers.status_report",
        {
            "worker": "w1",
            "timestamp": moment,
            "task": "t1",
            "machine_stats": {"cpu_usage": [1.5, None, 3], "memory_used": 1024, "gpu_fraction": None},
        },
    )
    rows = await db_conn.fetch(
        """SELECT extract(epoch FROM time)::bigint AS t, company, worker, task, category, metric, variant, value
           FROM worker_stat_points ORDER BY metric, variant"""
    )
    company = client.credentials.company_id
    assert [tuple(row) for row in rows] == [
        (moment, company, "w1", "t1", "cpu", "cpu_usage", "0", 1.5),
        (moment, company, "w1", "t1", "cpu", "cpu_usage", "2", 3.0),
        (moment, company, "w1", "t1", "memory", "memory_used", "total", 1024.0),
    ]
    column_types = await db_conn.fetch(
        """SELECT column_name, data_type FROM information_schema.columns
           WHERE table_name = 'worker_stat_points' ORDER BY ordinal_position"""
    )
    assert [tuple(row) for row in column_types] == [
        ("time", "timestamp with time zone"),
        ("company", "text"),
        ("worker", "text"),
        ("task", "text"),
        ("category", "text"),
        ("metric", "text"),
        ("variant", "text"),
        ("value", "double precision"),
    ]
