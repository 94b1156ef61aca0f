"""SQL of the `companies` and `users` tables."""

import uuid

import asyncpg

# Find by name, or create with a new id. When two callers create the same name at once, the
# loser's statement waits for the winner's, inserts nothing and cannot see the winner's row
# either (its snapshot is older): it reads the row again (_NAMED_*), in a statement of its own.
_COMPANY_ID = """
WITH created AS (
    INSERT INTO companies (id, name) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING id
)
SELECT id FROM created UNION ALL SELECT id FROM companies WHERE name = $2 LIMIT 1
"""

_USER_ID = """
WITH created AS (
    INSERT INTO users (company, id, name, role) VALUES ($1, $2, $3, $4)
    ON CONFLICT (company, name) DO NOTHING RETURNING id
)
SELECT id FROM created UNION ALL SELECT id FROM users WHERE company = $1 AND name = $3 LIMIT 1
"""
_NAMED_COMPANY = "SELECT id FROM companies WHERE name = $1"
_NAMED_USER = "SELECT id FROM users WHERE company = $1 AND name = $2"


async def company_named(db, name: str) -> str:
    """The id of the company called `name`, created if missing."""
    found = await db.fetchval(_COMPANY_ID, uuid.uuid4().hex, name)
    return found if found is not None else await db.fetchval(_NAMED_COMPANY, name)


async def user_named(db, company: str, name: str, role: str = "user") -> str:
    """The id of the company's user called `name`, created if missing."""
    found = await db.fetchval(_USER_ID, company, uuid.uuid4().hex, name, role)
    return found if found is not None else await db.fetchval(_NAMED_USER, company, name)


# Companies and users of apiserver tokens keep the apiserver's ids. A name already taken by
# another id (our own `local` company, say) is stored as "name (id)": the id is the tenant,
# the name only a label, and the unique name index stays what credentials rely on.
_ENSURE_COMPANY = """
WITH named AS (
    INSERT INTO companies (id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING id
)
INSERT INTO companies (id, name) SELECT $1, $2 || ' (' || $1 || ')' WHERE NOT EXISTS (SELECT FROM named)
ON CONFLICT DO NOTHING
"""

_ENSURE_USER = """
WITH named AS (
    INSERT INTO users (company, id, name, role) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING id
)
INSERT INTO users (company, id, name, role) SELECT $1, $2, $3 || ' (' || $2 || ')', $4
WHERE NOT EXISTS (SELECT FROM named)
ON CONFLICT DO NOTHING
"""


async def ensure_company(db, company: str, name: str) -> None:
    """Create the company `company` called `name` unless it exists (idempotent, race-free)."""
    await db.execute(_ENSURE_COMPANY, company, name)


async def ensure_user(db, company: str, user: str, name: str, role: str) -> None:
    """Create the company's user `user` unless it exists (idempotent, race-free)."""
    await db.execute(_ENSURE_USER, company, user, name, role)


_FIND_COMPANY = "SELECT id, name FROM companies WHERE id = $1 OR name = $1 ORDER BY id = $1 DESC LIMIT 1"

_COMPANIES = "SELECT id, name FROM companies ORDER BY name"


async def find_company(db, name_or_id: str) -> asyncpg.Record | None:
    """The company with that id or, failing that, that name (id, name); None if neither."""
    return await db.fetchrow(_FIND_COMPANY, name_or_id)


async def companies(db) -> list[asyncpg.Record]:
    return await db.fetch(_COMPANIES)
