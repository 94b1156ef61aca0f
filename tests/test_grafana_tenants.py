"""Grafana's read-only roles keep companies apart (migration 010, `python -m server grafana-role`).

Two companies, `alpha` and `beta`, report through the API: hours of history rolled up and
packed into blocks, late reports of those hours (late_reports) and reports of the open hour
(recent_reports), so that every table behind the public views holds rows of both. Each has a
worker called `shared`. A role reading alpha then reads, through every relation it may SELECT
and every set-returning function of the views, exactly alpha's rows, and cannot write
anything; every provisioned dashboard panel answers it alpha's rows, and nothing for beta. A
reader mapped to no company reads nothing.
"""

import asyncio
import base64
import os
import subprocess
import sys
import time
from urllib.parse import urlsplit

import asyncpg
import pytest
from helpers import ROOT, now_ms, ok, pass_time, refresh_rollups, with_database

from bench.grafana_sql import alert_rules, dashboards, expand, panels, rule_queries
from server.grafana import scram_sha256_verifier
from server.storage import db, grafana_roles

BASE = 1_699_999_200  # 2023-11-14 22:00:00 UTC
HOUR, DAY = 3600, 86400
PASSWORD = "reader-password-1"
WORKERS = {"alpha": ("shared", "alpha-1"), "beta": ("shared", "beta-1")}

# Every relation a reader may SELECT (besides PostgreSQL's and TimescaleDB's catalogs), and
# every set-returning function of the views with a time range.
READABLE = {
    "companies", "worker_registrations", "stat_workers", "stat_metrics", "report_layouts", "late_reports",
    "grafana_roles",
    "tenant_recent_reports", "tenant_report_blocks", "tenant_rollup_1m", "tenant_rollup_10m", "tenant_rollup_1h",
    "rollup_block_groups", "rollup_metric_rows", "rollup_variant_rows", "rollup_activity_rows", "rollup_queue_rows",
    "worker_stat_points", "worker_stats",
    *(f"worker_{kind}_{tier}" for kind in ("stat_rollup", "metric_rollup", "activity", "queue") for tier in ("1m", "10m", "1h")),
}  # fmt: skip
RANGE_FUNCTIONS = {"worker_stat_points"} | {
    f"worker_{kind}_{tier}" for kind in ("stat_rollup", "metric_rollup", "activity", "queue") for tier in ("1m", "10m", "1h")
}


def machine_stats(worker: str, minute: float) -> dict:
    return {
        "cpu_usage": [10 + minute % 50, 20 + len(worker)],
        "gpu_usage": [minute % 90],
        "gpu_memory_used": [100 + minute],
        "gpu_memory_free": [900 - minute],
        "memory_used": 1000 + minute + 7 * len(worker),
        "memory_free": 500,
        "network_rx": 0.5 + minute / 100,
        "network_tx": 0.25,
    }


def report(worker: str, moment: float) -> dict:
    minute = (moment - BASE) / 60
    body = {"worker": worker, "timestamp": int(moment * 1000), "machine_stats": machine_stats(worker, minute),
            "queues": ["shared-queue", f"{worker}-queue"]}  # fmt: skip
    return {**body, "task": f"{worker}-task"} if minute < 30 else body


async def send(client, company: str, moments) -> None:
    bodies = [report(worker, moment) for worker in WORKERS[company] for moment in moments]
    await asyncio.gather(*(ok(client, "workers.status_report", body) for body in bodies))


@pytest.fixture
async def fleets(make_client, dsn, db_conn) -> dict[str, str]:
    """Both companies' reports in every table; their ids by name."""
    clients = {name: await make_client(company=name) for name in WORKERS}
    for name, client in clients.items():
        for worker in WORKERS[name]:
            await ok(client, "workers.register", {"worker": worker, "timeout": 3600, "tags": [name]})
        await send(client, name, range(BASE, BASE + 2 * HOUR, 120))
    await refresh_rollups(dsn)
    for name, client in clients.items():
        await send(client, name, range(BASE + 61, BASE + 2 * HOUR, 600))  # late: their hours are packed
        await send(client, name, [time.time() - 1])  # the open hour
    companies = {name: client.credentials.company_id for name, client in clients.items()}
    for table in ("recent_reports", "late_reports", "report_blocks"):
        owners = await db_conn.fetch(
            f"SELECT DISTINCT w.company FROM {table} AS r JOIN stat_workers AS w ON w.id = r.worker"
        )
        assert {row["company"] for row in owners} == set(companies.values()), table
    for table in ("rollup_1m", "rollup_10m", "rollup_1h"):
        owners = await db_conn.fetch(f"SELECT DISTINCT company FROM {table}")
        assert {row["company"] for row in owners} == set(companies.values()), table
    return companies


def role_names(dsn: str) -> dict[str, str]:
    """Roles of this test database (roles are the cluster's: others' tests run beside)."""
    database = urlsplit(dsn).path.lstrip("/").lower()
    return {who: f"{database}_{who}"[:63] for who in ("alpha", "beta", "nobody")}


async def drop_roles(conn, names) -> None:
    for name in names:
        await conn.execute("DELETE FROM grafana_roles WHERE role = $1", name)
        if await grafana_roles.role(conn, name) is not None:
            await conn.execute(f'DROP ROLE "{name}"')


@pytest.fixture
async def readers(fleets, dsn, db_conn):
    """Login roles reading alpha and beta, and `nobody`: a reader whose company mapping is gone.
    Yields a function connecting as one of them."""
    names = role_names(dsn)
    await drop_roles(db_conn, names.values())  # left by an interrupted run
    for who, name in names.items():
        await grafana_roles.create(db_conn, name, fleets["alpha" if who == "nobody" else who], verifier())
    await grafana_roles.drop(db_conn, names["nobody"], drop_role=False)
    connections = []

    async def connect(who: str) -> asyncpg.Connection:
        conn = await asyncpg.connect(dsn, user=names[who], password=PASSWORD)
        connections.append(conn)
        return conn

    yield connect
    for conn in connections:
        await conn.close()
    await drop_roles(db_conn, names.values())


def verifier() -> str:
    return scram_sha256_verifier(PASSWORD)


# --- what a reader reaches ----------------------------------------------------------------------

_READABLE_RELATIONS = """
SELECT c.oid::regclass::text AS name, c.relkind::text AS relkind
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT EXISTS (SELECT FROM pg_depend AS d  -- TimescaleDB's catalog: its extension's members
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
  AND has_schema_privilege(n.oid, 'USAGE')
  AND (has_table_privilege(c.oid, 'SELECT') OR has_any_column_privilege(c.oid, 'SELECT'))
"""

_RANGE_FUNCTIONS = """
SELECT p.proname FROM pg_proc AS p
WHERE p.pronamespace = current_schema()::regnamespace AND p.proretset
  AND pg_get_function_identity_arguments(p.oid) = 'since timestamp with time zone, until timestamp with time zone'
"""

_COLUMNS = "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped"


async def of_company(db_conn, relation: str) -> str:
    """The condition on `relation`'s rows that are company $1's (grafana_roles: role $1's)."""
    columns = {row["attname"] for row in await db_conn.fetch(_COLUMNS, relation)}
    if relation == "companies":
        return "id = $1"
    if relation == "grafana_roles":
        return "role = $1"
    if "company" in columns:
        return "company = $1"
    if relation == "report_layouts":
        return "metrics <@ ARRAY(SELECT id FROM stat_metrics WHERE company = $1)"
    assert "worker" in columns, relation
    return "worker IN (SELECT id FROM stat_workers WHERE company = $1)"


def rows_of(source: str, condition: str = "true") -> str:
    return f"SELECT coalesce(array_agg(t::text ORDER BY t::text), '{{}}') FROM {source} AS t WHERE {condition}"


async def test_a_reader_may_select_the_views_and_the_tables_behind_them_alone(readers, db_conn):
    reader = await readers("alpha")
    found = {row["name"]: row["relkind"] for row in await reader.fetch(_READABLE_RELATIONS)}
    assert set(found) == READABLE
    # Not a chunk of a hypertable: TimescaleDB gives chunks the hypertable's grants and not its
    # row-level security, so readers hold no grant on a hypertable.
    chunks = await db_conn.fetch("SELECT chunk_schema || '.' || chunk_name AS name FROM timescaledb_information.chunks")
    assert chunks
    for chunk in chunks:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.fetch(f"SELECT * FROM {chunk['name']} LIMIT 1")
    for table in ("recent_reports", "report_blocks", "rollup_1m", "rollup_10m", "rollup_1h", "credentials", "users"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.fetch(f"SELECT * FROM {table} LIMIT 1")
    # Nor the planner's statistics of another company's values.
    await db_conn.execute("ANALYZE")
    statistics = await reader.fetch(
        "SELECT schemaname, tablename FROM pg_stats "
        "WHERE schemaname = current_schema() OR tablename LIKE '\\_hyper\\_%'"
    )
    assert statistics == []
    # Nor the role that reads the hypertables for the views.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await reader.execute(f"SET ROLE {grafana_roles.TENANT_VIEWS_OWNER}")


async def assert_reads_company_alone(reader, db_conn, company: str, role: str) -> None:
    """Through every relation `reader` may SELECT, it reads the rows of `company` alone, and
    there are others' rows to hide."""
    for relation in sorted(READABLE):
        condition = await of_company(db_conn, relation)
        owner = role if relation == "grafana_roles" else company
        seen = await reader.fetchval(rows_of(f"public.{relation}"))
        assert seen == await db_conn.fetchval(rows_of(relation, condition), owner), relation
        assert seen, relation
        others = await db_conn.fetchval(rows_of(relation, f"NOT ({condition})"), owner)
        assert others, f"{relation}: no other company's rows to hide"


async def test_a_reader_reads_its_company_alone_through_every_relation(readers, fleets, db_conn, dsn):
    names = role_names(dsn)
    for who in ("alpha", "beta"):
        await assert_reads_company_alone(await readers(who), db_conn, fleets[who], names[who])


async def test_a_reader_cannot_stand_in_tables_of_its_own_for_the_policies(readers, fleets, db_conn, dsn):
    """Temporary tables come first in a search path that lists pg_temp first: the policies'
    functions bound their tables when created, so these change nothing."""
    reader = await readers("alpha")
    await reader.execute("SET default_transaction_read_only = off")
    await reader.execute("CREATE TEMP TABLE grafana_roles (role text, company text, created_at timestamptz)")
    await reader.execute("INSERT INTO grafana_roles VALUES (current_user, $1, now())", fleets["beta"])
    await reader.execute("CREATE TEMP TABLE stat_workers (id integer, company text, worker text)")
    await reader.execute("INSERT INTO stat_workers SELECT i, $1, 'w' FROM generate_series(1, 1000) AS i", fleets["alpha"])
    await reader.execute("SET search_path = pg_temp, public")
    await assert_reads_company_alone(reader, db_conn, fleets["alpha"], role_names(dsn)["alpha"])


async def test_a_reader_reads_its_company_alone_through_every_function(readers, fleets, db_conn):
    functions = {row["proname"] for row in await db_conn.fetch(_RANGE_FUNCTIONS)}
    assert functions == RANGE_FUNCTIONS
    since, until = BASE - DAY, time.time() + HOUR
    for who in ("alpha", "beta"):
        reader = await readers(who)
        for function in sorted(functions):
            call = f"{function}(to_timestamp($1), to_timestamp($2))"
            seen = await reader.fetchval(rows_of(call), since, until)
            everything = await db_conn.fetchval(rows_of(call), since, until)
            mine = await db_conn.fetchval(rows_of(call, "company = $3"), since, until, fleets[who])
            assert seen == mine and mine and len(everything) > len(mine), function


async def test_a_reader_writes_nothing(readers, fleets, db_conn):
    reader = await readers("alpha")
    # Read-only by default (`grafana-role create`); below, privileges alone are tested.
    assert await reader.fetchval("SHOW default_transaction_read_only") == "on"
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await reader.execute("DELETE FROM companies")
    await reader.execute("SET default_transaction_read_only = off")

    tables = await db_conn.fetch(
        """SELECT c.oid::regclass::text AS name, c.relkind::text AS relkind,
                  (SELECT attname FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped
                   AND attidentity = '' AND attgenerated = '' ORDER BY attnum LIMIT 1) AS first_column,
                  pg_relation_is_updatable(c.oid, false) > 0 AS updatable
           FROM pg_class AS c
           WHERE c.relkind IN ('r', 'p', 'v')
             AND (c.relnamespace = current_schema()::regnamespace
                  OR c.oid IN (SELECT format('%I.%I', chunk_schema, chunk_name)::regclass
                               FROM timescaledb_information.chunks))"""
    )
    assert {row["name"] for row in tables} >= READABLE
    statements = ("INSERT INTO {} DEFAULT VALUES", "UPDATE {} SET {} = {}", "DELETE FROM {}", "TRUNCATE {}")
    for table in tables:
        name, column = table["name"], table["first_column"]
        for statement in statements:
            sql = statement.format(name, column, column)
            if table["relkind"] == "v" and statement.startswith("TRUNCATE"):
                refused = asyncpg.WrongObjectTypeError  # a view is no table to truncate
            elif table["updatable"] or table["relkind"] != "v":  # a table, or a simple view
                refused = asyncpg.InsufficientPrivilegeError
            else:
                refused = asyncpg.ObjectNotInPrerequisiteStateError  # nor updatable when not simple
            with pytest.raises(refused):
                await reader.execute(sql)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await reader.execute("CREATE TABLE mine (x integer)")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await reader.execute("SELECT grafana_access_setup()")
    assert await db_conn.fetchval("SELECT count(*) FROM companies") == 2


async def test_a_reader_mapped_to_no_company_reads_nothing(readers, fleets):
    reader = await readers("nobody")
    for relation in sorted(READABLE):
        assert await reader.fetchval(rows_of(relation)) == [], relation
    for function in sorted(RANGE_FUNCTIONS):
        call = f"{function}(to_timestamp($1), to_timestamp($2))"
        assert await reader.fetchval(rows_of(call), BASE - DAY, time.time() + HOUR) == [], function


# --- the dashboards -----------------------------------------------------------------------------


def expanded(sql: str, company: str, span: float) -> str:
    since = BASE + HOUR - span / 2
    variables = {"company": company, "worker": "shared"}
    return expand(sql, time_from=since, time_to=since + span, interval_seconds=max(60, span / 300), variables=variables)


def normal(rows) -> list[tuple]:
    """Rows as tuples, floats to 9 significant digits (sums may be added in another order)."""
    return [tuple(float(f"{item:.9g}") if isinstance(item, float) else item for item in row) for row in rows]


def dashboard_queries() -> list[tuple[str, str]]:
    found = []
    for name, dashboard in dashboards().items():
        found += [(f"{name}: {title}", sql) for title, sql in panels(dashboard)]
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["query"]
                found.append((f"{name}: ${variable['name']}", query["rawSql"] if isinstance(query, dict) else query))
    return found


@pytest.mark.parametrize("span", [HOUR, DAY, 30 * DAY], ids=["1h", "24h", "30d"])
async def test_every_panel_answers_a_reader_its_company_alone(readers, fleets, db_conn, span):
    """(The company picker has its own test below.)"""
    reader, nobody = await readers("alpha"), await readers("nobody")
    for title, sql in dashboard_queries():
        if title.endswith("$company"):
            continue
        mine = await reader.fetch(expanded(sql, fleets["alpha"], span))
        assert mine, title
        assert normal(mine) == normal(await db_conn.fetch(expanded(sql, fleets["alpha"], span))), title
        assert await reader.fetch(expanded(sql, fleets["beta"], span)) == [], title
        assert await db_conn.fetch(expanded(sql, fleets["beta"], span)), title  # there is beta's to hide
        assert await nobody.fetch(expanded(sql, fleets["alpha"], span)) == [], title


async def test_the_company_picker_lists_the_readers_company_alone(readers, fleets):
    picker = next(sql for title, sql in dashboard_queries() if title.endswith("$company"))
    for who in ("alpha", "beta"):
        reader = await readers(who)
        assert [tuple(row) for row in await reader.fetch(picker)] == [(who, fleets[who])]


async def test_the_alert_rules_answer_a_reader_its_company_alone(readers, fleets, make_client, db_conn):
    """Each company gets a worker whose GPU has idled for 31 minutes (time passing for it alone);
    the fleets' other workers are silent by now (their reports came milliseconds apart)."""
    for name in WORKERS:
        client = await make_client(company=name)
        for minute in range(32):
            if minute:
                await pass_time(db_conn, 60, [f"{name}-idle"])
            body = {"worker": f"{name}-idle", "timestamp": now_ms(), "machine_stats": {"gpu_usage": [0]}}
            await ok(client, "workers.status_report", body)
    expected = {
        "Silent worker": {("alpha", "shared"), ("alpha", "alpha-1")},
        "Idle GPU": {("alpha", "alpha-idle", "0")},
    }
    reader, nobody = await readers("alpha"), await readers("nobody")
    for rule in alert_rules():
        ((_, sql),) = rule_queries(rule)
        sql = expand(sql, time_from=time.time() - 600, time_to=time.time(), interval_seconds=60, variables={})
        labels = lambda rows: {tuple(v for v in row.values() if isinstance(v, str)) for row in rows}  # noqa: E731
        assert labels(await reader.fetch(sql)) == expected[rule["title"]], rule["title"]
        every = labels(await db_conn.fetch(sql))
        assert {row[0] for row in every} == {"alpha", "beta"}, rule["title"]  # there is beta's to hide
        assert await nobody.fetch(sql) == [], rule["title"]


# --- the migration and the command ----------------------------------------------------------------


def cli(dsn: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", "grafana-role", *args],
        cwd=ROOT, env={**os.environ, "WORKERS_DB_DSN": dsn, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


async def stored_verifier(db_conn, role: str) -> str:
    return await db_conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)


async def verifier_like_stored(db_conn, role: str, password: str) -> str:
    """scram_sha256_verifier() of `password` with the salt and iterations stored for `role`."""
    iterations, salt = (await stored_verifier(db_conn, role)).split("$")[1].split(":")
    return scram_sha256_verifier(password, salt=base64.b64decode(salt), iterations=int(iterations))


async def test_the_verifier_is_the_one_postgresql_makes(db_conn, dsn):
    """The command sends PostgreSQL the SCRAM-SHA-256 verifier of the password, not the password:
    the same that PostgreSQL computes itself from the password, salt and iterations."""
    name = role_names(dsn)["alpha"] + "_scram"
    await db_conn.execute(f'DROP ROLE IF EXISTS "{name}"')
    try:
        async with db_conn.transaction():
            await db_conn.execute("SET LOCAL password_encryption = 'scram-sha-256'")
            await db_conn.execute(f"CREATE ROLE \"{name}\" PASSWORD '{PASSWORD}'")
        assert await stored_verifier(db_conn, name) == await verifier_like_stored(db_conn, name, PASSWORD)
    finally:
        await db_conn.execute(f'DROP ROLE IF EXISTS "{name}"')


async def test_the_command_creates_changes_lists_and_drops_a_role(make_client, dsn, db_conn):
    alpha = (await make_client(company="alpha")).credentials.company_id
    await make_client(company="beta")
    name = role_names(dsn)["alpha"]
    await drop_roles(db_conn, [name])
    try:
        made = cli(dsn, "create", "--company", "alpha", "--role", name, "--password-env", "PW", PW=PASSWORD)
        assert made.returncode == 0, made.stderr
        assert f"{name}: created, reads alpha ({alpha}) alone" in made.stdout and PASSWORD not in made.stdout
        assert (await grafana_roles.find(db_conn, name))["company"] == alpha
        assert (await grafana_roles.role(db_conn, name))["reader"]
        first = await stored_verifier(db_conn, name)
        assert first == await verifier_like_stored(db_conn, name, PASSWORD)

        # Again, with no password given: a new one, printed once; by id this time.
        again = cli(dsn, "create", "--company", alpha, "--role", name)
        assert again.returncode == 0, again.stderr
        assert "password changed" in again.stdout
        password = dict(line.split(None, 1) for line in again.stdout.splitlines()[1:])["password"]
        assert await stored_verifier(db_conn, name) != first
        assert await stored_verifier(db_conn, name) == await verifier_like_stored(db_conn, name, password)

        listed = cli(dsn, "list")
        assert listed.returncode == 0 and f"{name}  alpha ({alpha})" in listed.stdout

        dropped = cli(dsn, "drop", "--role", name)
        assert dropped.returncode == 0, dropped.stderr
        assert await grafana_roles.find(db_conn, name) is None
        assert await grafana_roles.role(db_conn, name) is None
        gone = cli(dsn, "drop", "--role", name)
        assert gone.returncode == 1 and f"no Grafana role {name}" in gone.stderr
    finally:
        await drop_roles(db_conn, [name])


async def test_the_command_refuses_bad_input_and_changes_nothing(make_client, dsn, db_conn):
    await make_client(company="alpha")
    await make_client(company="beta")
    name = role_names(dsn)["alpha"]
    await drop_roles(db_conn, [name])
    superuser = await db_conn.fetchval("SELECT current_user")
    cases = [
        (["--company", "alpha", "--role", "Bad-Name"], {}, 2, "--role"),
        (["--company", "alpha", "--role", "pg_reader"], {}, 2, "--role"),
        (["--company", "alpha", "--role", grafana_roles.READERS_GROUP], {}, 2, "--role"),
        (["--company", "nobody's", "--role", name], {}, 1, "--company: no company with the id or name nobody's"),
        (["--company", "alpha", "--role", superuser], {}, 1, f"--role: a role {superuser} exists already"),
        (["--company", "alpha", "--role", name, "--password-env", "NOT_SET_HERE"], {}, 2, "NOT_SET_HERE is not set"),
        (["--company", "alpha", "--role", name, "--password-env", "PW"], {"PW": "naïve"}, 2, "PW must hold printable"),
    ]
    try:
        for args, env, code, message in cases:
            os.environ.pop("NOT_SET_HERE", None)
            done = cli(dsn, "create", *args, **env)
            assert (done.returncode, message in done.stderr) == (code, True), (args, done.stderr)
        assert await grafana_roles.role(db_conn, name) is None
        assert await db_conn.fetchval("SELECT count(*) FROM grafana_roles") == 0

        assert cli(dsn, "create", "--company", "alpha", "--role", name).returncode == 0
        other = cli(dsn, "create", "--company", "beta", "--role", name)
        assert other.returncode == 1 and f"--role: {name} reads alpha" in other.stderr
        assert (await grafana_roles.find(db_conn, name))["company_name"] == "alpha"
    finally:
        await drop_roles(db_conn, [name])


@pytest.fixture
async def limited_database(database_dsn):
    """A database owned and migrated by a role that may not create roles nor give views to
    workers_tenant_views (the extension made by a superuser first, as it must be)."""
    names = role_names(database_dsn)
    owner, database = names["alpha"] + "_owner", urlsplit(database_dsn).path.lstrip("/") + "_limited"
    admin = await asyncpg.connect(with_database(database_dsn, "postgres"))
    await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    await admin.execute(f'DROP ROLE IF EXISTS "{owner}"')
    await admin.execute(f"CREATE ROLE \"{owner}\" LOGIN PASSWORD '{PASSWORD}'")
    await admin.execute(f'CREATE DATABASE "{database}" OWNER "{owner}"')
    superuser_dsn = with_database(database_dsn, database)
    conn = await asyncpg.connect(superuser_dsn)
    await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    await conn.close()
    parts = urlsplit(superuser_dsn)
    owner_dsn = parts._replace(netloc=f"{owner}:{PASSWORD}@{parts.hostname}:{parts.port}").geturl()
    yield owner_dsn, superuser_dsn
    await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    await admin.execute(f'DROP ROLE IF EXISTS "{owner}"')
    await admin.close()


async def test_without_the_right_to_set_up_readers_the_migration_says_so_and_grants_nothing(limited_database, dsn):
    owner_dsn, superuser_dsn = limited_database
    conn = await asyncpg.connect(owner_dsn)
    notices = []
    conn.add_log_listener(lambda _, message: notices.append(message.message))
    try:
        applied = await db.migrate(conn)
        assert "010_grafana_readers.sql" in applied  # (later migrations may follow it)
        assert any(notice.startswith("Grafana reader roles not set up") for notice in notices), notices
        # Nothing granted (but each role's own row of grafana_roles): the tenant_* views are
        # the owner's, who bypasses the policies.
        granted = await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
            "AND relname <> 'grafana_roles' AND has_table_privilege($1, oid, 'SELECT')", grafana_roles.READERS_GROUP,
        )  # fmt: skip
        assert granted == 0
        await conn.execute("INSERT INTO companies (id, name) VALUES ('c1', 'one')")
    finally:
        await conn.close()

    name = role_names(dsn)["alpha"] + "_limited"
    refused = cli(owner_dsn, "create", "--company", "one", "--role", name)
    assert refused.returncode == 1 and "run this command once with a superuser" in refused.stderr, refused.stderr
    made = cli(superuser_dsn, "create", "--company", "one", "--role", name, "--password-env", "PW", PW=PASSWORD)
    try:
        assert made.returncode == 0, made.stderr
        reader = await asyncpg.connect(with_database(dsn, urlsplit(superuser_dsn).path.lstrip("/")), user=name,
                                       password=PASSWORD)  # fmt: skip
        try:
            assert [tuple(row) for row in await reader.fetch("SELECT * FROM companies")] == [("c1", "one")]
        finally:
            await reader.close()
        # The owner may now make readers itself, but not new roles: it says what it lacks.
        again = cli(owner_dsn, "create", "--company", "one", "--role", name + "_2")
        assert again.returncode == 1 and f"may not create {name}_2" in again.stderr, again.stderr
    finally:
        admin = await asyncpg.connect(superuser_dsn)
        await drop_roles(admin, [name, name + "_2"])
        await admin.close()
