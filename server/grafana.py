"""`python -m server grafana-role`: read-only database roles for Grafana, one company each.

    python -m server grafana-role create --company COMPANY --role NAME [--password-env VAR]
    python -m server grafana-role drop --role NAME
    python -m server grafana-role list

A role made here logs in (Grafana's PostgreSQL data source) and reads the public views of
one company alone; it writes nothing (docs/grafana.md).
"""

import argparse
import base64
import hashlib
import hmac
import os
import re
import secrets
import sys

import asyncpg

from .config import Settings
from .storage import db, grafana_roles, tenants

# Lower case, so that the name is the same quoted or not (Grafana's data source and psql
# take it as typed); `pg_` names are PostgreSQL's own.
_ROLE_NAME = re.compile(r"(?!pg_)[a-z_][a-z0-9_]{0,62}")
SCRAM_ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)


def role_name(text: str) -> str:
    if not _ROLE_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a role name: 1 to 63 lower-case letters, digits and _, not starting with a digit or pg_"
        )
    if text in (grafana_roles.READERS_GROUP, grafana_roles.TENANT_VIEWS_OWNER):
        raise argparse.ArgumentTypeError(f"{text!r} is one of the service's own group roles")
    return text


def scram_sha256_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """What PostgreSQL stores for a SCRAM-SHA-256 password (RFC 5802, 7677). Sent instead of
    the password, which thus never reaches the server's statement log. ASCII passwords only:
    PostgreSQL prepares others with SASLprep first."""
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("ascii"), salt, iterations)
    stored_key = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _password(variable: str | None) -> tuple[str, bool]:
    """(password, generated): from the environment variable named, else a new one."""
    if variable is None:
        return secrets.token_urlsafe(24), True
    password = os.environ.get(variable, "")
    if not password:
        raise ValueError(f"--password-env: the environment variable {variable} is not set or empty")
    if not (password.isascii() and password.isprintable()):
        raise ValueError(f"--password-env: {variable} must hold printable ASCII characters only")
    return password, False


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1


async def create_role(settings: Settings, args) -> int:
    try:
        password, generated = _password(args.password_env)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    conn = await asyncpg.connect(settings.db_dsn)
    try:
        await db.migrate(conn)
        try:
            await grafana_roles.set_up_access(conn)
        except asyncpg.InsufficientPrivilegeError as error:
            return _fail(
                f"Grafana's read-only access is not set up in this database and this role may not set it up "
                f"({error}): run this command once with a superuser in WORKERS_DB_DSN"
            )
        company = await tenants.find_company(conn, args.company)
        if company is None:
            return _fail(f"--company: no company with the id or name {args.company}")
        mapped = await grafana_roles.find(conn, args.role)
        if mapped is not None and mapped["company"] != company["id"]:
            return _fail(
                f"--role: {args.role} reads {mapped['company_name']} ({mapped['company']}); "
                f"drop it first (grafana-role drop --role {args.role})"
            )
        existing = await grafana_roles.role(conn, args.role)
        verifier = scram_sha256_verifier(password)
        try:
            if mapped is not None and existing is not None:
                await grafana_roles.set_password(conn, args.role, verifier)
                done = "password changed"
            elif existing is not None:
                return _fail(
                    f"--role: a role {args.role} exists already (roles are shared by every database of "
                    "the PostgreSQL cluster): choose another name"
                )
            else:
                if mapped is not None:  # its role was dropped (a restored database, say)
                    await grafana_roles.drop(conn, args.role, drop_role=False)
                await grafana_roles.create(conn, args.role, company["id"], verifier)
                done = "created"
        except asyncpg.InsufficientPrivilegeError as error:
            return _fail(
                f"this role may not create {args.role} or make it a member of {grafana_roles.READERS_GROUP} "
                f"({error}): use a superuser, or a role with CREATEROLE (and ADMIN on that group from PostgreSQL 16)"
            )
    finally:
        await conn.close()
    print(f"{args.role}: {done}, reads {company['name']} ({company['id']}) alone")
    if generated:
        print(f"password    {password}")
        print("The password is shown only now: keep it.", file=sys.stderr)
    return 0


async def drop_role(settings: Settings, args) -> int:
    conn = await asyncpg.connect(settings.db_dsn)
    try:
        await db.migrate(conn)
        mapped = await grafana_roles.find(conn, args.role)
        if mapped is None:
            return _fail(f"--role: no Grafana role {args.role} in this database")
        existing = await grafana_roles.role(conn, args.role)
        ours = existing is not None and existing["reader"] and not existing["unrestricted"]
        try:
            await grafana_roles.drop(conn, args.role, drop_role=ours)
        except (asyncpg.InsufficientPrivilegeError, asyncpg.DependentObjectsStillExistError) as error:
            return _fail(f"{args.role} not dropped: {error}")
    finally:
        await conn.close()
    if existing is not None and not ours:
        print(f"{args.role}: reads nothing here any more; the role is not a Grafana reader and is left as it is")
    else:
        print(f"{args.role}: dropped")
    return 0


async def list_roles(settings: Settings, args) -> None:
    conn = await asyncpg.connect(settings.db_dsn)
    try:
        await db.migrate(conn)
        rows = await grafana_roles.list_all(conn)
    finally:
        await conn.close()
    width = max([len("role"), *(len(row["role"]) for row in rows)]) + 2
    print(f"{'role':<{width}}company")
    for row in rows:
        missing = "" if row["role_exists"] else "  (no such role in the cluster)"
        print(f"{row['role']:<{width}}{row['company_name']} ({row['company']}){missing}")


def add_command(commands) -> None:
    roles = commands.add_parser(
        "grafana-role", help="read-only database roles for Grafana, one company each"
    ).add_subparsers(dest="grafana_role_command", required=True)
    create = roles.add_parser(
        "create", help="a login role that reads one company alone (or a new password for it)"
    )
    create.add_argument("--company", required=True, help="company id or name")
    create.add_argument("--role", required=True, type=role_name, help="role name (lower case)")
    create.add_argument(
        "--password-env", metavar="VAR", help="the environment variable holding the password (default: a new one, printed)"
    )
    create.set_defaults(action=create_role)
    drop = roles.add_parser("drop", help="drop a role made by create")
    drop.add_argument("--role", required=True, type=role_name, help="role name")
    drop.set_defaults(action=drop_role)
    roles.add_parser("list", help="every Grafana role of this database and its company").set_defaults(
        action=list_roles
    )
