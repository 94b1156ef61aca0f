"""SQL of the `credentials` and `token_signing_key` tables."""

import asyncpg

_CREATE = """
INSERT INTO credentials (access_key, secret_hash, company, user_id) VALUES ($1, $2, $3, $4)
"""

# One query per Basic-authenticated request: revocation takes effect at once.
_FIND_ACTIVE = """
SELECT k.secret_hash, k.company, c.name AS company_name, k.user_id, u.name AS user_name, u.role
FROM credentials AS k
JOIN companies AS c ON c.id = k.company
JOIN users AS u ON u.company = k.company AND u.id = k.user_id
WHERE k.access_key = $1 AND k.revoked_at IS NULL
"""

_LIST = """
SELECT k.access_key, c.name AS company_name, k.company, u.name AS user_name, k.user_id,
       k.created_at, k.revoked_at
FROM credentials AS k
JOIN companies AS c ON c.id = k.company
JOIN users AS u ON u.company = k.company AND u.id = k.user_id
ORDER BY c.name, u.name, k.created_at
"""

_REVOKE = """
UPDATE credentials SET revoked_at = now() WHERE access_key = $1 AND revoked_at IS NULL
RETURNING access_key
"""

_SIGNING_KEY = """
WITH created AS (
    INSERT INTO token_signing_key (secret) VALUES ($1) ON CONFLICT (id) DO NOTHING RETURNING secret
)
SELECT secret FROM created UNION ALL SELECT secret FROM token_signing_key LIMIT 1
"""
_STORED_SIGNING_KEY = "SELECT secret FROM token_signing_key"


async def create(db, access_key: str, secret_hash: str, company: str, user: str) -> None:
    await db.execute(_CREATE, access_key, secret_hash, company, user)


async def find_active(db, access_key: str) -> asyncpg.Record | None:
    return await db.fetchrow(_FIND_ACTIVE, access_key)


async def list_all(db) -> list[asyncpg.Record]:
    return await db.fetch(_LIST)


async def revoke(db, access_key: str) -> bool:
    """True when an active key was revoked."""
    return await db.fetchval(_REVOKE, access_key) is not None


async def signing_key(db, candidate: str) -> str:
    """The stored token signing key, storing `candidate` if there is none yet.

    Servers that start together on a new database race to store theirs: the statement of
    each loser waits for the winner's, then stores nothing and cannot see the winner's row
    either (its snapshot is older), so it reads the key again."""
    key = await db.fetchval(_SIGNING_KEY, candidate)
    return key if key is not None else await db.fetchval(_STORED_SIGNING_KEY)
