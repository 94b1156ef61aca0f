"""Backup and restore as docs/backup.md gives them: its two command blocks run as written
(pg_dump, then a new database with the extension, timescaledb_pre_restore, pg_restore,
timescaledb_post_restore), with the PostgreSQL binaries of the test server's major version;
a server on the restored copy answers as the original did."""

import asyncio
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg
import pytest
from conftest import TEST_SETTINGS, create_credentials
from helpers import ROOT, basic_auth, call, ok, refresh_rollups, with_database

from server.app import create_app
from server.config import Settings
from server.storage import credentials

HOUR = 3600
# The blocks docs/backup.md marks as run by this test, in order: backup, restore.
DOC_BLOCK = re.compile(r"<!-- tests/test_backup\.py runs this block -->\n```sh\n(.*?)```", re.DOTALL)


def doc_blocks() -> list[str]:
    blocks = DOC_BLOCK.findall((ROOT / "docs" / "backup.md").read_text())
    assert len(blocks) == 2, "docs/backup.md: a backup block and a restore block"
    return blocks


async def postgresql_bin_dir(conn) -> Path:
    """The client binaries of the server's major version, where Debian keeps them beside a
    server (as scripts/local-timescaledb.sh finds its own), else the ones on PATH."""
    major = int(await conn.fetchval("SHOW server_version_num")) // 10_000
    beside = Path(f"/usr/lib/postgresql/{major}/bin")
    if (beside / "pg_restore").exists():
        return beside
    on_path = shutil.which("pg_restore")
    assert on_path, f"no pg_dump/pg_restore of PostgreSQL {major} (Debian: postgresql-client-{major})"
    return Path(on_path).parent


def run_block(block: str, cwd: Path, env: dict) -> None:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, f"{block}\n{done.stdout}\n{done.stderr}"


def libpq_environment(dsn: str) -> dict[str, str]:
    """PGHOST, PGPORT, PGUSER (and PGPASSWORD) of a DSN: the server the restore block uses."""
    parts = urlsplit(dsn)
    environment = {"PGHOST": parts.hostname or "localhost", "PGPORT": str(parts.port or 5432)}
    if parts.username:
        environment["PGUSER"] = unquote(parts.username)
    if parts.password:
        environment["PGPASSWORD"] = unquote(parts.password)
    return environment


async def drop_database(dsn: str, name: str) -> None:
    admin = await asyncpg.connect(with_database(dsn, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def restored_database(dsn):
    """The name of the database the restore makes (beside the test database, named after
    it), absent before the test and dropped after it."""
    name = urlsplit(dsn).path.lstrip("/") + "_restored"
    await drop_database(dsn, name)
    yield name
    await drop_database(dsn, name)


async def fill(client, dsn: str) -> dict:
    """What a backup must keep: registrations, reports of three hours (packed into blocks
    and rolled up), reports since (rows), access keys (one revoked), a token."""
    company = client.credentials
    start = (int(time.time()) // HOUR - 4) * HOUR
    workers = {"gpu-1": ["gpu", "rack-a"], "gpu-2": ["gpu", "rack-b"], "cpu-1": ["cpu"]}
    for worker, tags in workers.items():
        await ok(client, "workers.register", {"worker": worker, "tags": tags, "queues": ["default"]})

    async def report(second: int, index: int, worker: str) -> None:
        stats = {"cpu_usage": [(second % 97) + index, 50.5], "memory_used": 1024.0 + second % 13}
        if worker.startswith("gpu"):
            stats["gpu_usage"] = [(second % 89) / 2]
        task = f"task-{second // 1800}" if worker != "cpu-1" else None
        body = {"worker": worker, "timestamp": (start + second) * 1000, "task": task, "machine_stats": stats}
        await ok(client, "workers.status_report", body)

    conn = await asyncpg.connect(dsn)
    try:  # hours before `start` are packed: these reports are stored as rows of open hours
        await conn.execute("UPDATE rollup_watermark SET compacted = to_timestamp($1)", start)
    finally:
        await conn.close()
    for second in range(0, 3 * HOUR, 30):
        await asyncio.gather(*(report(second, index, worker) for index, worker in enumerate(workers)))
    await refresh_rollups(dsn)  # rollups of every tier, and the closed hours packed into blocks
    for second in range(3 * HOUR, 3 * HOUR + 600, 20):  # not rolled up yet: rows, read raw
        await asyncio.gather(*(report(second, index, worker) for index, worker in enumerate(workers)))
    token = (await ok(client, "auth.login"))["token"]
    revoked = await create_credentials(dsn, company.company, "former")
    conn = await asyncpg.connect(dsn)
    try:
        assert await credentials.revoke(conn, revoked.access_key)
        counts = await conn.fetch("SELECT count(*) FROM report_blocks UNION ALL SELECT count(*) FROM rollup_1h")
        assert all(row["count"] for row in counts), "the data set has report blocks and rollups"
    finally:
        await conn.close()
    return {"start": start, "token": token, "revoked": revoked, "workers": sorted(workers)}


async def answers(client, filled: dict) -> dict:
    """Every read a dashboard makes, over fixed past ranges."""
    start, workers = filled["start"], filled["workers"]
    reads = {
        "get_all": await ok(client, "workers.get_all", {}),
        "get_count": await ok(client, "workers.get_count", {"tags": ["gpu"]}),
        "get_metric_keys": await ok(client, "workers.get_metric_keys", {"worker_ids": workers}),
    }
    for name, (begin, end, interval) in {
        "3 h at 10 min": (start, start + 3 * HOUR, 600),
        "3 h 10 min at 1 min": (start, start + 3 * HOUR + 600, 60),
        "30 min at 40 s": (start + HOUR + 300, start + HOUR + 2100, 40),
    }.items():
        body = {"from_date": begin, "to_date": end, "interval": interval}
        items = [{"key": "cpu_usage", "aggregation": "max"}, {"key": "memory_used", "aggregation": "avg"},
                 {"key": "gpu_usage", "aggregation": "min"}]  # fmt: skip
        stats = {**body, "worker_ids": workers, "items": items, "split_by_variant": True}
        reads[f"get_stats {name}"] = await ok(client, "workers.get_stats", stats)
        reads[f"get_activity_report {name}"] = await ok(client, "workers.get_activity_report", body)
    return reads


async def table_counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_type = 'BASE TABLE' ORDER BY table_name"
        )
        return {row["table_name"]: await conn.fetchval(f'SELECT count(*) FROM "{row["table_name"]}"') for row in tables}
    finally:
        await conn.close()


async def test_a_dump_restored_as_documented_answers_the_same(make_client, aiohttp_client, dsn, restored_database,
                                                             tmp_path):  # fmt: skip
    original = await make_client(company="backed-up")
    company = original.credentials
    filled = await fill(original, dsn)
    before = await answers(original, filled)
    assert before["get_count"] == {"count": 2}
    charted = before["get_stats 3 h 10 min at 1 min"]["workers"]
    assert len(charted) == 3 and all(metric["stats"][0]["values"] for worker in charted for metric in worker["metrics"])
    assert max(before["get_activity_report 3 h at 10 min"]["active"]["counts"]) == 2  # the GPU workers' tasks

    conn = await asyncpg.connect(dsn)
    try:
        bin_dir = await postgresql_bin_dir(conn)
        version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    finally:
        await conn.close()
    backup, restore = doc_blocks()
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "WORKERS_DB_DSN": dsn}
    run_block(backup, tmp_path, environment)
    assert (tmp_path / "workers.dump.timescaledb").read_text().strip() == version
    run_block(restore, tmp_path, {**environment, **libpq_environment(dsn), "DATABASE": restored_database})

    restored_dsn = with_database(dsn, restored_database)
    assert await table_counts(restored_dsn) == await table_counts(dsn)
    conn = await asyncpg.connect(restored_dsn)
    try:
        assert await conn.fetchval("SHOW jit") == "off"  # the database's setting, set again
        assert await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'") == version
    finally:
        await conn.close()

    # A server on the copy: the same answers, the same credentials.
    settings = Settings(db_dsn=restored_dsn, **TEST_SETTINGS)
    headers = {"Authorization": basic_auth(company.access_key, company.secret)}
    copy = await aiohttp_client(create_app(settings), headers=headers)
    assert await answers(copy, filled) == before
    assert (await ok(copy, "auth.login"))["token"]
    bearer = {"Authorization": f"Bearer {filled['token']}"}
    assert await ok(copy, "workers.get_count", {}, headers=bearer) == {"count": 3}
    revoked = filled["revoked"]
    code, subcode, _, _ = await call(copy, "auth.login", headers={"Authorization": basic_auth(revoked.access_key,
                                                                                                revoked.secret)})
    assert (code, subcode) == (401, 22)
    # ... and it takes reports on, into the hypertables' chunks: TimescaleDB is out of its
    # restoring mode.
    body = {"worker": "gpu-1", "timestamp": int(time.time() * 1000), "machine_stats": {"cpu_usage": [1.5]}}
    await ok(copy, "workers.status_report", body)
    conn = await asyncpg.connect(restored_dsn)
    try:
        assert await conn.fetchval("SHOW timescaledb.restoring") == "off"
        assert await conn.fetchval("SELECT count(*) FROM recent_reports WHERE time > now() - interval '1 minute'") == 1
        assert await conn.fetchval("SELECT count(*) FROM ONLY recent_reports") == 0
    finally:
        await conn.close()
