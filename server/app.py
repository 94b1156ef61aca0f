"""The aiohttp application: the routes beside the API (routes.py, page.py), one catch-all
route into the protocol, and the resources they need."""

import asyncio
import contextlib
import secrets

from aiohttp import web

from . import access, background, metrics, page, replicas, routes
from .config import Settings
from .endpoints import ENDPOINTS
from .limits import Limits
from .apiserver import Apiserver
from .keys import APISERVER, LIMITS, METRICS, POOL, READERS, REPLICAS, REQUEST_OBSERVER, SETTINGS, SIGNING_KEY, WRITER
from .keys import ENDPOINTS as ENDPOINTS_KEY
from .protocol import dispatch
from .readers import Readers
from .storage import credentials, db
from .storage.writer import ReportWriter


async def _database(app: web.Application):
    settings = app[SETTINGS]
    pool = await db.create_pool(
        settings.db_dsn, statement_timeout=settings.read_timeout_seconds, max_size=settings.db_pool_size
    )
    async with pool.acquire() as conn:
        await db.migrate(conn)
        app[SIGNING_KEY] = settings.auth_secret or await credentials.signing_key(conn, secrets.token_urlsafe(48))
        await app[LIMITS].refresh(conn)
    writer = ReportWriter(
        settings.db_dsn,
        connections=settings.writer_connections,
        batch_size=settings.writer_batch_size,
        gather=settings.writer_gather_ms / 1000,
        queue_limit=settings.writer_queue_limit,
        answer_timeout=settings.writer_answer_timeout,
        metrics=app[METRICS],
        idle_gpu_percent=settings.idle_gpu_percent,
        utilisation_seconds=settings.utilisation_minutes * 60,
    )
    await writer.start()
    app[POOL], app[WRITER] = pool, writer
    app[REPLICAS] = replicas.from_settings(settings, pool_size=4)
    app[READERS] = Readers(settings, app[METRICS], app[REPLICAS])
    yield
    app[READERS].close()
    if app[REPLICAS] is not None:
        await app[REPLICAS].close()
    await writer.close()
    await pool.close()


async def _apiserver(app: web.Application):
    """The client of the ClearML apiserver that names get_all's tasks and queues, when its
    address is set."""
    settings = app[SETTINGS]
    apiserver = Apiserver(settings, app[METRICS]) if settings.apiserver_url else None
    if apiserver is not None:
        await apiserver.start()
    app[APISERVER] = apiserver
    yield
    if apiserver is not None:
        await apiserver.close()


async def _background(app: web.Application):
    tasks = background.start(app[POOL], app[SETTINGS], app[METRICS], app[LIMITS])
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[ENDPOINTS_KEY] = ENDPOINTS
    app[LIMITS] = Limits(settings)
    app[METRICS] = metrics.create(ENDPOINTS, settings.metrics_per_company) if settings.metrics else None
    app[REQUEST_OBSERVER] = metrics.RequestObserver(app[METRICS], ENDPOINTS) if settings.metrics else None
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_background)
    app.cleanup_ctx.append(_apiserver)
    if settings.access_log:
        access.setup(app)
    routes.setup(app, settings)
    page.setup(app)
    app.router.add_route("*", r"/{path:[\s\S]*}", dispatch)  # any path, newlines included
    return app
