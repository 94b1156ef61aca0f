"""Connections to TimescaleDB and the migrations that shape it."""

import asyncio
import importlib.util
import logging
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
MIGRATIONS_LOCK = 0x574B5253  # an arbitrary advisory lock key: one migrator at a time

# Errors that mean "the database cannot be reached right now": the client should retry (503).
UNAVAILABLE_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # A connection that the server closed (e.g. shutting down) while asyncpg was between
    # two of its messages refuses the next statement with this: the connection is lost.
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    # SQLSTATE 55000, e.g. the database does not allow connections now (ALLOW_CONNECTIONS
    # false during maintenance); 55P03: a lock not available.
    asyncpg.exceptions.ObjectNotInPrerequisiteStateError,
    asyncpg.exceptions.InsufficientResourcesError,
)


async def create_pool(
    dsn: str,
    *,
    statement_timeout: float = 30.0,
    connect_timeout: float = 30.0,
    max_size: int = 10,
    attempt_timeout: float = 60.0,
) -> asyncpg.Pool:
    """Open a pool, retrying while the database is still starting (as under docker compose).

    The database cancels a statement after `statement_timeout` seconds (a chart read too
    heavy to answer); the client gives up a little later, when the server does not answer.
    Each attempt to connect gives up after `attempt_timeout` seconds (asyncpg's default).
    """
    deadline = asyncio.get_running_loop().time() + connect_timeout
    while True:
        try:
            return await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max_size,
                timeout=attempt_timeout,
                command_timeout=statement_timeout + 30,
                server_settings={
                    "statement_timeout": str(int(statement_timeout * 1000)),
                    # Measured on chart reads of ~30,000 rows: JIT compiling a plan costs
                    # 100 ms and more, and starting parallel workers 20-40 ms, more than
                    # either saves (and parallel workers take cores from the ingest path).
                    "jit": "off",
                    "max_parallel_workers_per_gather": "0",
                },
            )
        except UNAVAILABLE_ERRORS as error:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            log.warning("database not reachable yet (%r), retrying", error)
            await asyncio.sleep(1)


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    """`NNN_name.sql` and `NNN_name.py` files in version order. A Python migration is a
    module with `async def migrate(conn)`: for data that SQL alone cannot convert."""
    found = []
    for path in [*directory.glob("*.sql"), *directory.glob("*.py")]:
        version, _, _ = path.name.partition("_")
        if version.isdigit():
            found.append((int(version), path))
    return sorted(found)


async def _apply(conn: asyncpg.Connection, path: Path) -> None:
    if path.suffix == ".sql":
        await conn.execute(path.read_text())
        return
    spec = importlib.util.spec_from_file_location(f"migration_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    await module.migrate(conn)


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR, until: int | None = None) -> list[str]:
    """Apply the migrations not applied yet (up to version `until`), each once and in its own
    transaction.

    An advisory lock serialises servers that start together; the others wait, then find
    nothing left to do. Returns the names of the files applied.
    """
    applied_now = []
    await conn.execute("SET statement_timeout = 0")  # a migration may take long; RESET ALL on release
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, path in migration_files(directory):
            if version in done or (until is not None and version > until):
                continue
            async with conn.transaction():
                await _apply(conn, path)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name
                )
            log.info("applied migration %s", path.name)
            applied_now.append(path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATIONS_LOCK)
    return applied_now


async def pending_migrations(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """The migration files not applied to this database yet."""
    applied = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    return [path.name for version, path in migration_files(directory) if version not in applied]
