"""Command line: migrate, serve, and manage credentials.

    python -m server migrate
    python -m server serve [--host H] [--port P] [--processes N]
    python -m server credentials create --company NAME [--user NAME]
    python -m server credentials ensure --file FILE --company NAME [--user NAME]
    python -m server credentials list
    python -m server credentials revoke ACCESS_KEY
    python -m server rollups refresh [--since TIME | --every SECONDS]
    python -m server companies list
    python -m server companies set COMPANY [--workers N] [--metric-keys N] [--reports-per-second R] [--burst B]
    python -m server companies unset COMPANY [--workers] [--metric-keys] [--reports-per-second] [--burst]
    python -m server grafana-role create --company COMPANY --role NAME [--password-env VAR]
    python -m server grafana-role drop --role NAME
    python -m server grafana-role list
    python -m server demo-fleet [--workers N] [--period S] [--url URL] [--credentials FILE]
    python -m server import FILE
    python -m server openapi
"""

import argparse
import logging
import os
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import orjson

from . import auth, background, demo, grafana, importer, openapi, serving
from .app import create_app
from .config import Settings
from .limits import company_limits
from .storage import credentials, db, registrations, rollups, statistics, tenants
from .storage import limits as company_overrides
from .storage.registrations import WorkerFilter

DEFAULT_USER_NAME = "admin"


def _run(coroutine) -> int:
    loop = serving.new_event_loop()
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
    done = await background.refresh_rollups(settings.db_dsn, settings)
    if done is None:
        print("another process is refreshing the rollups; try again", file=sys.stderr)
        return 1
    steps, compacted = done
    watermark = datetime.fromtimestamp(steps[-1].new_watermark, timezone.utc).isoformat()
    rebuilt = sum(step.regions for step in steps)
    print(f"rollups up to date to {watermark} ({len(steps)} step(s), {rebuilt} region(s) rebuilt); "
          f"compacted {compacted.hours} hour(s) of reports, {compacted.late} late report(s), "
          f"{compacted.merged} rollup period(s)")  # fmt: skip
    return 0


async def print_api_document(settings: Settings, args) -> None:
    sys.stdout.write(orjson.dumps(openapi.document(settings), option=orjson.OPT_INDENT_2).decode() + "\n")


def _limit(value: float) -> str:
    return "no limit" if not value else f"{value:g}"


def _limit_column(settings: Settings, override: asyncpg.Record | None, name: str) -> str:
    """A company's limit `name`, marked * when it is the company's own override."""
    own = override is not None and override[name] is not None
    return _limit(getattr(company_limits(settings, override), name)) + ("*" if own else "")


async def list_companies(settings: Settings, args) -> None:
    """Every company with its limits (* its own override, else the default) and its usage:
    live workers, distinct metric keys, reports per second over the last minute."""
    conn = await _connect(settings)
    try:
        overrides = await company_overrides.overrides(conn)
        rows = []
        for company in await tenants.companies(conn):
            override = overrides.get(company["id"])
            workers = await registrations.count(conn, company["id"], WorkerFilter())
            keys = len(await statistics.metric_keys(conn, company["id"], []))
            rate = await statistics.recent_reports(conn, company["id"], 60) / 60
            limit = {name: _limit_column(settings, override, name) for name in company_overrides.LIMIT_NAMES}
            rows.append((company["name"], company["id"], f"{workers} / {limit['workers']}",
                         f"{keys} / {limit['metric_keys']}", f"{rate:.1f} / {limit['reports_per_second']}",
                         limit["burst"]))  # fmt: skip
    finally:
        await conn.close()
    width = max([len("company"), *(len(row[0]) for row in rows)]) + 2
    print(f"{'company':<{width}}{'id':<34}{'workers':<18}{'metric keys':<18}{'reports/s':<20}burst")
    for name, company, workers, keys, rate, burst in rows:
        print(f"{name:<{width}}{company:<34}{workers:<18}{keys:<18}{rate:<20}{burst}")
    print("(usage / limit; * the company's own limit, else the default WORKERS_COMPANY_*)")


def _requested_limits(args) -> dict:
    return {name: getattr(args, name) for name in company_overrides.LIMIT_NAMES}


async def _change_overrides(settings: Settings, name_or_id: str, change) -> asyncpg.Record | None:
    """Run `change(conn, company id)` for the company with that id or name; its row, or None
    (told on stderr) when there is none."""
    conn = await _connect(settings)
    try:
        company = await tenants.find_company(conn, name_or_id)
        if company is None:
            print(f"no company with the id or name {name_or_id}", file=sys.stderr)
        else:
            await change(conn, company["id"])
    finally:
        await conn.close()
    return company


async def set_company_limits(settings: Settings, args) -> int:
    values = _requested_limits(args)
    if all(value is None for value in values.values()):
        print("nothing to set: give --workers, --metric-keys, --reports-per-second or --burst", file=sys.stderr)
        return 2
    company = await _change_overrides(
        settings, args.company, lambda conn, company: company_overrides.set_overrides(conn, company, values)
    )
    if company is None:
        return 1
    given = ", ".join(f"{name} {_limit(value)}" for name, value in values.items() if value is not None)
    print(f"{company['name']} ({company['id']}): {given}; every server applies it within "
          f"WORKERS_LIMITS_REFRESH_SECONDS ({settings.limits_refresh_seconds:g} s)")  # fmt: skip
    return 0


async def unset_company_limits(settings: Settings, args) -> int:
    chosen = {name for name, flag in _requested_limits(args).items() if flag}
    names = chosen or set(company_overrides.LIMIT_NAMES)
    company = await _change_overrides(
        settings, args.company, lambda conn, company: company_overrides.unset_overrides(conn, company, names)
    )
    if company is None:
        return 1
    print(f"{company['name']} ({company['id']}): back to the default for {', '.join(sorted(names))}")
    return 0


def _non_negative(kind):
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more: {text}")
        return value

    return parse


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

    companies = commands.add_parser("companies", help="the companies' limits and usage").add_subparsers(
        dest="companies_command", required=True
    )
    companies.add_parser("list", help="every company with its limits and current usage").set_defaults(
        action=list_companies
    )
    set_limits = companies.add_parser("set", help="override a company's limits (0: no limit)")
    set_limits.add_argument("company", help="company id or name")
    set_limits.add_argument("--workers", type=_non_negative(int), help="live registered workers")
    set_limits.add_argument("--metric-keys", type=_non_negative(int), help="distinct metric keys")
    set_limits.add_argument("--reports-per-second", type=_non_negative(float), help="stored status reports per second")
    set_limits.add_argument("--burst", type=_non_negative(float), help="reports the token bucket holds")
    set_limits.set_defaults(action=set_company_limits)
    unset_limits = companies.add_parser("unset", help="back to the defaults (all of them unless some are named)")
    unset_limits.add_argument("company", help="company id or name")
    for flag in ("--workers", "--metric-keys", "--reports-per-second", "--burst"):
        unset_limits.add_argument(flag, action="store_true")
    unset_limits.set_defaults(action=unset_company_limits)
    grafana.add_command(commands)
    demo.add_command(commands)
    importer.add_command(commands)
    commands.add_parser(
        "openapi", help="print the API description (OpenAPI 3.1, JSON), as served at /openapi.json"
    ).set_defaults(action=print_api_document)
    return parser


def _prepare_refresher(niceness: int) -> None:
    """In the refresher process before it runs Python: its niceness, and Ctrl-C ignored from
    the start (a terminal sends SIGINT to the whole group and `serve` stops the refresher
    itself; one that arrived while it still imported its modules would print a traceback)."""
    os.nice(niceness)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
        preexec_fn=lambda: _prepare_refresher(settings.rollup_refresh_nice),
    )
    try:
        serving.serve(lambda: create_app(settings), settings)
    finally:
        refresher.terminate()
        refresher.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
