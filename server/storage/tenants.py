"""SQL of the `companies` and `users` tables."""

import uuid

# Find by name, or create with a new id; safe when two callers create the same name at once.
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


async def company_named(db, name: str) -> str:
    """The id of the company called `name`, created if missing."""
    return await db.fetchval(_COMPANY_ID, uuid.uuid4().hex, name)


async def user_named(db, company: str, name: str, role: str = "user") -> str:
    """The id of the company's user called `name`, created if missing."""
    return await db.fetchval(_USER_ID, company, uuid.uuid4().hex, name, role)
