"""SQL of the `company_limits` table (per-company overrides of the limits' defaults), and the
advisory lock that serialises the admissions of a company's new workers and metric keys."""

import asyncpg

COMPANY_LOCK = 0x574B524C  # an arbitrary advisory lock class; the key within it is the company's hash

_OVERRIDES = "SELECT company, workers, metric_keys, reports_per_second, burst FROM company_limits"

# Only the limits given (not NULL) change; the others keep their override or default.
_SET = """
INSERT INTO company_limits AS l (company, workers, metric_keys, reports_per_second, burst)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (company) DO UPDATE SET
    workers = coalesce(EXCLUDED.workers, l.workers),
    metric_keys = coalesce(EXCLUDED.metric_keys, l.metric_keys),
    reports_per_second = coalesce(EXCLUDED.reports_per_second, l.reports_per_second),
    burst = coalesce(EXCLUDED.burst, l.burst),
    updated_at = now()
"""

# $2..$5 true: that override is removed (back to the default).
_UNSET = """
UPDATE company_limits SET
    workers = CASE WHEN $2 THEN NULL ELSE workers END,
    metric_keys = CASE WHEN $3 THEN NULL ELSE metric_keys END,
    reports_per_second = CASE WHEN $4 THEN NULL ELSE reports_per_second END,
    burst = CASE WHEN $5 THEN NULL ELSE burst END,
    updated_at = now()
WHERE company = $1
"""

_LOCK_COMPANY = "SELECT pg_advisory_xact_lock($1, hashtext($2))"

LIMIT_NAMES = ("workers", "metric_keys", "reports_per_second", "burst")


async def overrides(db) -> dict[str, asyncpg.Record]:
    """Every company's overrides, by company id (a NULL column: the default)."""
    return {row["company"]: row for row in await db.fetch(_OVERRIDES)}


async def set_overrides(db, company: str, values: dict) -> None:
    """Override the limits named in `values` (see LIMIT_NAMES); None leaves one as it is."""
    await db.execute(_SET, company, *(values.get(name) for name in LIMIT_NAMES))


async def unset_overrides(db, company: str, names: set[str]) -> None:
    await db.execute(_UNSET, company, *(name in names for name in LIMIT_NAMES))


async def lock_company(conn, company: str) -> None:
    """Hold the company's admission lock until the transaction ends."""
    await conn.execute(_LOCK_COMPANY, COMPANY_LOCK, company)
