"""Command line: `python -m server migrate` and `python -m server serve [--host H] [--port P]`."""

import argparse
import asyncio
import logging

import asyncpg
from aiohttp import web

from .app import create_app
from .config import Settings
from .storage import db

log = logging.getLogger("server")


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _migrate(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.db_dsn)
    try:
        applied = await db.migrate(conn)
    finally:
        await conn.close()
    print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "database is up to date")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply the migrations to WORKERS_DB_DSN")
    serve = commands.add_parser("serve", help="run the HTTP server (migrations are applied at start)")
    serve.add_argument("--host", help="address to listen on (default: WORKERS_HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port to listen on (default: WORKERS_PORT or 8008)")
    args = parser.parse_args(argv)

    overrides = {name: value for name in ("host", "port") if (value := getattr(args, name, None)) is not None}
    settings = Settings.from_env(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "migrate":
        loop = _event_loop()
        try:
            loop.run_until_complete(_migrate(settings))
        finally:
            loop.close()
    else:
        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            loop=_event_loop(),
            access_log=None,
            print=lambda _: log.info("listening on http://%s:%d", settings.host, settings.port),
        )


if __name__ == "__main__":
    main()
