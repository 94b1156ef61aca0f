"""The bare-handler ceiling: parse the JSON body, answer the envelope, store nothing.

Served by the same gunicorn machinery (`server.serving.serve`: uvloop aiohttp workers,
same options) and process count as the real server, so that the benchmark compares the
real handler with the cheapest possible one under identical conditions:

    python -m bench.bare_app [--host 127.0.0.1] [--port 8009] [--processes 1]
"""

import argparse
import sys

import orjson
from aiohttp import web

from server import serving
from server.config import Settings
from server.protocol import API_VERSION, envelope


async def handle(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    if not isinstance(body, dict):
        raise web.HTTPBadRequest()
    return envelope(request.path.lstrip("/"), API_VERSION, {})


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handle)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8009)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    settings = Settings.from_env(host=args.host, port=args.port, processes=args.processes, log_level=args.log_level)
    serving.serve(create_app, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
