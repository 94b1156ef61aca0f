"""SQL of the `worker_runtime_properties` table: every statement that touches it is here.

Properties are keyed by company, user and worker. Times are the database's clock (`now()`),
so several servers agree on expiry. A row whose `expires_at` has passed is treated as absent
by every read, before the sweep deletes it.
"""

import asyncpg

_LIVE = "(expires_at IS NULL OR expires_at > now())"

# $4/$5/$6: keys, values and expiries (seconds; NULL: none), one entry per key. An expired
# row not swept yet is overwritten like a live one.
_SET = """
INSERT INTO worker_runtime_properties AS p (company, user_id, worker, key, value, expires_at)
SELECT $1, $2, $3, s.key, s.value, now() + make_interval(secs => s.expiry)
FROM unnest($4::text[], $5::text[], $6::integer[]) AS s (key, value, expiry)
ORDER BY s.key
ON CONFLICT (company, user_id, worker, key) DO UPDATE SET
    value = EXCLUDED.value,
    expires_at = EXCLUDED.expires_at
"""

_REMOVE = """
DELETE FROM worker_runtime_properties
WHERE company = $1 AND user_id = $2 AND worker = $3 AND key = ANY($4::text[])
"""

# The seconds left, rounded up: a live property never shows 0 (which, sent back, removes it).
_GET = f"""
SELECT key, value, ceil(extract(epoch FROM expires_at - now()))::integer AS expiry
FROM worker_runtime_properties
WHERE company = $1 AND user_id = $2 AND worker = $3 AND {_LIVE}
ORDER BY key
"""

_COUNT = f"""
SELECT count(*) FROM worker_runtime_properties
WHERE company = $1 AND user_id = $2 AND worker = $3 AND {_LIVE}
"""

_DELETE_EXPIRED = "DELETE FROM worker_runtime_properties WHERE expires_at <= now()"


async def set_many(db, company: str, user: str, worker: str, properties: dict[str, tuple[str, int | None]]) -> None:
    """Store `properties` (key → (value, expiry seconds or None)), replacing those of the same keys."""
    keys = list(properties)
    values = [properties[key][0] for key in keys]
    expiries = [properties[key][1] for key in keys]
    await db.execute(_SET, company, user, worker, keys, values, expiries)


async def remove(db, company: str, user: str, worker: str, keys: list[str]) -> None:
    await db.execute(_REMOVE, company, user, worker, keys)


async def get(db, company: str, user: str, worker: str) -> list[asyncpg.Record]:
    """The live properties, sorted by key: key, value, expiry (seconds left, or None)."""
    return await db.fetch(_GET, company, user, worker)


async def count(db, company: str, user: str, worker: str) -> int:
    return await db.fetchval(_COUNT, company, user, worker)


async def delete_expired(db) -> int:
    status = await db.execute(_DELETE_EXPIRED)
    return int(status.split()[-1])
