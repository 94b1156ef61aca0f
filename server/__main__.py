"""Command line: migrate, serve, and manage credentials.

    python -m server migrate
    python -m server serve [--host H] [--port P] [--processes N]
    python -m server credentials create --company NAME [--user NAME]
    python -m server credentials ensure --file FILE --company NAME [--user NAME]
    python -m server credentials list
    python -m server credentials revoke ACCESS_KEY
    python -m server rollups refresh [--since TIME | --every SECONDS]
    python -m server demo-fleet [--workers N] [--period S] [--url URL] [--credentials FILE]
"""

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
from . import auth, background, demo, serving
from .app import create_app
from .config import Settings
from .storage import credentials, db, rollups, tenants

DEFAULT_USER_NAME = "admin"


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run(coroutine) -> int:
    loop = _event_loop()
    try:
        return loop.run_until_complete(coroutine) or 0
    finally:
        loop.close()


async def _connect(settings: Settings, *, migrate: bool = True) -> asyncpg.Connection:
    conn = await asyncpg.connect(settings.db_dsn)
    if migrate:
        await db.migrate(conn)
    return conn


async def migrate(settings: Settings, args) -> None:
    conn = await _connect(settings, migrate=False)
    try:
        applied = await db.migrate(conn)
    finally:
        await conn.close()
    print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "database is up to date")


async def _new_credentials(conn: asyncpg.Connection, company_name: str, user_name: str) -> dict[str, str]:
    """Create the company and user if missing, and a new access key of that user."""
    async with conn.transaction():
        company = await tenants.company_named(conn, company_name)
        user = await tenants.user_named(conn, company, user_name)
        access_key, secret = auth.new_access_key(), auth.new_secret()
        await credentials.create(conn, access_key, auth.hash_secret(secret), company, user)
    return {
        "company": f"{company_name} ({company})",
        "user": f"{user_name} ({user})",
        "access_key": access_key,
        "secret_key": secret,
    }


def _format(fields: dict[str, str]) -> str:
    return "".join(f"{name:<12}{value}\n" for name, value in fields.items())


async def create_credentials(settings: Settings, args) -> None:
    conn = await _connect(settings)
    try:
        created = await _new_credentials(conn, args.company, args.user)
    finally:
        await conn.close()
    print(_format(created), end="")
    print("The secret is shown only now: keep it.", file=sys.stderr)


async def ensure_credentials(settings: Settings, args) -> None:
    """Print the credentials saved in FILE while they still work; else create and save new ones."""
    path = Path(args.file)
    saved = dict(line.split(None, 1) for line in path.read_text().splitlines() if " " in line) if path.exists() else {}
    conn = await _connect(settings)
    try:
        row = await credentials.find_active(conn, saved["access_key"]) if "access_key" in saved else None
        if row is None or not auth.verify_secret(saved.get("secret_key", ""), row["secret_hash"]):
            saved = await _new_credentials(conn, args.company, args.user)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(_format(saved))
    finally:
        await conn.close()
    print(_format(saved), end="")


async def list_credentials(settings: Settings, args) -> None:
    conn = await _connect(settings)
    try:
        rows = await credentials.list_all(conn)
    finally:
        await conn.close()
    print(f"{'access_key':<22}{'company':<24}{'user':<20}{'created':<22}status")
    for row in rows:
        created = row["created_at"].strftime("%Y-%m-%d %H:%M:%S")
        status = f"revoked {row['revoked_at']:%Y-%m-%d %H:%M:%S}" if row["revoked_at"] else "active"
        print(f"{row['access_key']:<22}{row['company_name']:<24}{row['user_name']:<20}{created:<22}{status}")


async def revoke_credentials(settings: Settings, args) -> int:
    conn = await _connect(settings)
    try:
        revoked = await credentials.revoke(conn, args.access_key)
    finally:
        await conn.close()
    if not revoked:
        print(f"no active access key {args.access_key}", file=sys.stderr)
        return 1
    print(f"revoked {args.access_key}")
    return 0


def _moment(text: str) -> float:
    """Epoch seconds, from epoch seconds or an ISO-8601 date-time (UTC unless it says)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not epoch seconds nor an ISO-8601 date-time: {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


async def refresh_rollups(settings: Settings, args) -> int:
    """Bring every rollup tier up to date now (all of it since --since, after a bulk import),
    or with --every, again and again (the refresher process of `serve`)."""
    if args.every is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches `serve`, which stops this process
        await background.refresh_rollups_forever(replace(settings, rollup_refresh_seconds=args.every))
        return 0
    conn = await _connect(settings)
    try:
        if args.since is not None:
            await rollups.invalidate_since(conn, args.since)
    finally:
        await conn.close()
    steps = await background.refresh_rollups(settings.db_dsn, settings)
    if steps is None:
        print("another process is refreshing the rollups; try again", file=sys.stderr)
        return 1
    watermark = datetime.fromtimestamp(steps[-1].new_watermark, timezone.utc).isoformat()
    rebuilt = sum(step.regions for step in steps)
    print(f"rollups up to date to {watermark} ({len(steps)} step(s), {rebuilt} region(s) rebuilt)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server", description="Workers telemetry service.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply the migrations to WORKERS_DB_DSN").set_defaults(action=migrate)

    serve = commands.add_parser("serve", help="run the HTTP server (migrations are applied at start)")
    serve.add_argument("--host", help="address to listen on (default: WORKERS_HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port to listen on (default: WORKERS_PORT or 8008)")
    serve.add_argument("--processes", type=int, help="server processes (default: WORKERS_PROCESSES or 1)")
    serve.set_defaults(action=None)

    keys = commands.add_parser("credentials", help="create, list or revoke access keys").add_subparsers(
        dest="credentials_command", required=True
    )
    create = keys.add_parser("create", help="new access key for a company's user (both created if missing)")
    create.add_argument("--company", required=True, help="company name")
    create.add_argument("--user", default=DEFAULT_USER_NAME, help=f"user name (default: {DEFAULT_USER_NAME})")
    create.set_defaults(action=create_credentials)
    ensure = keys.add_parser("ensure", help="print the credentials saved in FILE, creating and saving them if needed")
    ensure.add_argument("--file", required=True, help="where the credentials are kept (mode 0600)")
    ensure.add_argument("--company", required=True, help="company name, for new credentials")
    ensure.add_argument("--user", default=DEFAULT_USER_NAME, help=f"user name (default: {DEFAULT_USER_NAME})")
    ensure.set_defaults(action=ensure_credentials)
    keys.add_parser("list", help="every access key, active or revoked").set_defaults(action=list_credentials)
    revoke = keys.add_parser("revoke", help="revoke an access key: it stops working at once")
    revoke.add_argument("access_key")
    revoke.set_defaults(action=revoke_credentials)

    tiers = commands.add_parser("rollups", help="the rollup tiers of the statistics").add_subparsers(
        dest="rollups_command", required=True
    )
    refresh = tiers.add_parser("refresh", help="bring every rollup tier up to date now")
    refresh.add_argument(
        "--since",
        type=_moment,
        help="first rebuild everything from this time on (epoch seconds or ISO-8601): after a bulk import",
    )
    refresh.add_argument("--every", type=float, help="refresh every SECONDS until the parent process exits")
    refresh.set_defaults(action=refresh_rollups)
    demo.add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {
        name: value for name in ("host", "port", "processes") if (value := getattr(args, name, None)) is not None
    }
    settings = Settings.from_env(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.action is not None:
        return _run(args.action(settings, args))
    # The rollup refresher, at a lower CPU priority: rolling up can wait while the server is
    # busy taking reports (reads stay exact meanwhile: see storage/charts.py).
    refresher = subprocess.Popen(
        [sys.executable, "-m", "server", "rollups", "refresh", "--every", str(settings.rollup_refresh_seconds)],
        preexec_fn=lambda: os.nice(settings.rollup_refresh_nice),
    )
    try:
        serving.serve(lambda: create_app(settings), settings)
    finally:
        refresher.terminate()
        refresher.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
