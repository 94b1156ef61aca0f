"""Test fixtures: a real TimescaleDB, a fresh schema per session, clean tables per test.

Where the database comes from, in order:
1. `WORKERS_TEST_DSN`: an existing database (its tables are wiped by the tests);
2. a testcontainers TimescaleDB, when a Docker engine answers;
3. the local cluster of `scripts/local-timescaledb.sh` (provisioned and started if needed),
   in which the database `WORKERS_TEST_DATABASE` (default `workers_test`) is recreated.
A test that needs the database and cannot reach it fails; nothing is skipped.
"""

import asyncio
import os
import subprocess
from urllib.parse import urlsplit

import asyncpg
import pytest
from helpers import ROOT, Credentials, basic_auth, with_database

from server import auth
from server.app import create_app
from server.config import Settings
from server.storage import credentials, db, tenants

TIMESCALEDB_IMAGE = "timescale/timescaledb:2.19.3-pg17"
TABLES = (
    "worker_registrations, worker_metric_keys, worker_runtime_properties, credentials, users, companies, rollup_invalidations, "
    "stat_workers, stat_metrics, report_layouts, recent_reports, late_reports, report_blocks, "
    "rollup_1m, rollup_10m, rollup_1h"
)

# Settings the tests run the server with unless a test says otherwise: charts without the
# 40 s floor so that buckets can be small, a fast expiry sweep, and a retention long enough
# for reports at fixed past times (the retention sweep runs when a server starts), and no
# report rate limit: tests replay hours of a fleet's reports in seconds (tests/test_limits.py
# sets the default rate where it tests it).
TEST_SETTINGS = {
    "min_chart_interval": 1,
    "expiry_sweep_seconds": 0.2,
    "company_reports_per_second": 0,
    **{f"{tier}_retention_days": 100_000 for tier in ("raw", "rollup_1m", "rollup_10m", "rollup_1h")},
}


def _docker_engine_running() -> bool:
    try:
        import docker

        docker.from_env().ping()
    except Exception:
        return False
    return True


async def _recreate_database(admin_dsn: str, database: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


async def _migrate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_dsn():
    """A migrated TimescaleDB database for this test session."""
    if os.environ.get("WORKERS_TEST_DSN"):
        dsn = os.environ["WORKERS_TEST_DSN"]
        asyncio.run(_migrate(dsn))
        yield dsn
        return
    if _docker_engine_running():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer(TIMESCALEDB_IMAGE, driver=None) as container:
            dsn = container.get_connection_url()
            asyncio.run(_migrate(dsn))
            yield dsn
        return
    started = subprocess.run(
        [str(ROOT / "scripts" / "local-timescaledb.sh"), "start"], check=True, stdout=subprocess.PIPE, text=True
    )
    admin_dsn = started.stdout.strip().splitlines()[-1]
    dsn = with_database(admin_dsn, os.environ.get("WORKERS_TEST_DATABASE", "workers_test"))
    asyncio.run(_recreate_database(admin_dsn, urlsplit(dsn).path.lstrip("/")))
    asyncio.run(_migrate(dsn))
    yield dsn


@pytest.fixture
async def dsn(database_dsn):
    """The test database, its tables emptied before the test."""
    await empty_tables(database_dsn)
    return database_dsn


async def empty_tables(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"TRUNCATE {TABLES} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def db_conn(dsn):
    """A direct connection, to check what is stored."""
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


async def create_credentials(
    dsn: str, company: str, user: str, access_key: str | None = None, secret: str | None = None
) -> Credentials:
    """What `python -m server credentials create` makes, made directly (with this key and
    secret, when given)."""
    conn = await asyncpg.connect(dsn)
    try:
        company_id = await tenants.company_named(conn, company)
        user_id = await tenants.user_named(conn, company_id, user)
        access_key, secret = access_key or auth.new_access_key(), secret or auth.new_secret()
        await credentials.create(conn, access_key, auth.hash_secret(secret), company_id, user_id)
    finally:
        await conn.close()
    return Credentials(access_key, secret, company, company_id, user, user_id)


@pytest.fixture
def make_client(aiohttp_client, dsn):
    """`await make_client(company=..., user=..., **settings)`: a test client of a server with
    those settings, sending Basic credentials of that company's user (created here) with
    every request; `client.credentials` tells which. `authenticated=False`: no credentials."""

    async def make(*, company: str = "default", user: str = "tester", authenticated: bool = True, **overrides):
        settings = Settings(db_dsn=dsn, **{**TEST_SETTINGS, **overrides})
        caller = await create_credentials(dsn, company, user)
        headers = {"Authorization": basic_auth(caller.access_key, caller.secret)} if authenticated else {}
        client = await aiohttp_client(create_app(settings), headers=headers)
        client.credentials = caller
        return client

    return make


@pytest.fixture
async def client(make_client):
    return await make_client()
