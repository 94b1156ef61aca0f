"""SQL of the `companies` and `users` tables."""

_ENSURE_COMPANY = """
INSERT INTO companies (id, name) VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name WHERE companies.name <> EXCLUDED.name
"""

_ENSURE_USER = """
INSERT INTO users (company, id, name) VALUES ($1, $2, $3)
ON CONFLICT (company, id) DO UPDATE SET name = EXCLUDED.name WHERE users.name <> EXCLUDED.name
"""


async def ensure_company(db, company: str, name: str) -> None:
    await db.execute(_ENSURE_COMPANY, company, name)


async def ensure_user(db, company: str, user: str, name: str) -> None:
    await db.execute(_ENSURE_USER, company, user, name)
