"""The routes beside the API: its description, the metrics, and the health checks.

    GET /openapi.json   the OpenAPI document (server/openapi.py), without credentials
    GET /metrics        Prometheus text exposition (server/metrics.py)
    GET /healthz        the process answers
    GET /readyz         the database answers, the migrations are applied, the writer accepts
"""

import functools

import orjson
from aiohttp import web

from . import auth, metrics, openapi
from .config import Settings
from .errors import ApiError
from .keys import METRICS, POOL, SETTINGS, WRITER
from .protocol import API_VERSION, envelope
from .storage import db

READY_TIMEOUT = 2.0  # seconds for each database check of /readyz


def _json(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@functools.lru_cache(maxsize=8)
def _api_document(settings: Settings) -> bytes:
    """Built when first asked for (about 20 ms), not at every start."""
    return orjson.dumps(openapi.document(settings))


async def api_document(request: web.Request) -> web.Response:
    return web.Response(body=_api_document(request.app[SETTINGS]), content_type="application/json")


async def metrics_exposition(request: web.Request) -> web.Response:
    if request.app[SETTINGS].metrics_credentials:
        try:
            await auth.identify(request)
        except ApiError as error:  # 401, as for an API call
            return envelope("metrics", API_VERSION, {}, (error.result_code, error.result_subcode), error.message)
    return metrics.text_response(metrics.exposition(request.app[METRICS]))


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _database_checks(request: web.Request) -> dict[str, str]:
    try:
        async with request.app[POOL].acquire(timeout=READY_TIMEOUT) as conn:
            await conn.fetchval("SELECT 1", timeout=READY_TIMEOUT)
            pending = await db.pending_migrations(conn)
    except Exception as error:
        return {"database": f"unavailable: {error!r}", "migrations": "unknown"}
    return {
        "database": "ok",
        "migrations": f"pending: {', '.join(pending)}" if pending else "ok",
    }


async def readyz(request: web.Request) -> web.Response:
    checks = await _database_checks(request)
    refusal = request.app[WRITER].refusal()
    checks["writer"] = f"refusing reports: {refusal}" if refusal else "ok"
    ready = all(state == "ok" for state in checks.values())
    return _json({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)


def setup(app: web.Application, settings: Settings) -> None:
    """Add the routes (before the API's catch-all route)."""
    app.router.add_get("/openapi.json", api_document)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if settings.metrics and not settings.metrics_bind:
        app.router.add_get("/metrics", metrics_exposition)
