"""SQL of Grafana's read-only login roles: each reads one company's statistics (the
`grafana_roles` mapping and the row-level security of migration 010).

Roles belong to the PostgreSQL cluster, `grafana_roles` to this database. Role names come
from the operator: every statement that names one has it quoted by PostgreSQL's `format()`.
"""

import asyncpg

READERS_GROUP = "workers_grafana_readers"  # migration 010: what a reader may SELECT
TENANT_VIEWS_OWNER = "workers_tenant_views"  # migration 010: reads the hypertables for the views

_SET_UP = "SELECT grafana_access_setup()"

# The role's attributes, when it exists: whether migration 010's policies restrict it
# (`reader` is NULL where the group role is missing).
_ROLE = """
SELECT rolsuper OR rolbypassrls AS unrestricted,
       pg_has_role(oid, (SELECT oid FROM pg_roles WHERE rolname = $2), 'MEMBER') AS reader
FROM pg_roles WHERE rolname = $1
"""

_MAPPING = """
SELECT g.role, g.company, c.name AS company_name, r.oid IS NOT NULL AS role_exists
FROM grafana_roles AS g
JOIN companies AS c ON c.id = g.company
LEFT JOIN pg_roles AS r ON r.rolname = g.role
"""
_FIND = _MAPPING + " WHERE g.role = $1"
_LIST = _MAPPING + " ORDER BY c.name, g.role"

_MAP = "INSERT INTO grafana_roles (role, company) VALUES ($1, $2)"
_UNMAP = "DELETE FROM grafana_roles WHERE role = $1"

# Statements with %I (an identifier) and %L (a literal) filled in by format().
_CREATE_ROLE = (
    "CREATE ROLE %I LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
    f"PASSWORD %L IN ROLE {READERS_GROUP}"
)
_READ_ONLY = "ALTER ROLE %I IN DATABASE %I SET default_transaction_read_only = on"
_PASSWORD = "ALTER ROLE %I PASSWORD %L"
_DROP_ROLE = "DROP ROLE %I"


async def _run(conn, template: str, *values: str) -> None:
    statement = await conn.fetchval("SELECT format($1, VARIADIC $2::text[])", template, list(values))
    await conn.execute(statement)


async def set_up_access(conn) -> None:
    """Create the group roles if missing and grant what readers read (idempotent). Raises
    asyncpg.InsufficientPrivilegeError when this role may not (see migration 010)."""
    await conn.execute(_SET_UP)


async def role(conn, name: str) -> asyncpg.Record | None:
    """(unrestricted, reader) of the cluster's role `name`, None if there is none."""
    return await conn.fetchrow(_ROLE, name, READERS_GROUP)


async def find(conn, name: str) -> asyncpg.Record | None:
    """The mapping of role `name` in this database: role, company, company_name, role_exists."""
    return await conn.fetchrow(_FIND, name)


async def list_all(conn) -> list[asyncpg.Record]:
    return await conn.fetch(_LIST)


async def create(conn, name: str, company: str, password_verifier: str) -> None:
    """A new login role reading `company` alone: read-only by default in this database."""
    async with conn.transaction():
        await _run(conn, _CREATE_ROLE, name, password_verifier)
        await _run(conn, _READ_ONLY, name, await conn.fetchval("SELECT current_database()"))
        await conn.execute(_MAP, name, company)


async def set_password(conn, name: str, password_verifier: str) -> None:
    await _run(conn, _PASSWORD, name, password_verifier)


async def drop(conn, name: str, *, drop_role: bool) -> None:
    """Forget role `name`'s company (it reads nothing here any more) and, with `drop_role`,
    drop the role from the cluster; both or neither."""
    async with conn.transaction():
        await conn.execute(_UNMAP, name)
        if drop_role:
            await _run(conn, _DROP_ROLE, name)
