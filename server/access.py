"""The access log (WORKERS_ACCESS_LOG): one line per answered request, at INFO on the logger
`server.access`, as the answer goes out:

    127.0.0.1 POST /workers.status_report 200 2.4 ms company=4f0c9a...

the client's address (the proxy's X-Real-IP or X-Forwarded-For when they are trusted),
the method, the path without its query, the status, the milliseconds from the request to
its answer's headers and the caller's company id when the request was authenticated (`-`
otherwise). Nothing else of the request is written: no query, header, cookie or body, so
no credential or token.
"""

import logging
import time

from aiohttp import web

from .keys import IDENTITY, REQUEST_STARTED, SETTINGS
from .protocol import client_ip

log = logging.getLogger("server.access")


@web.middleware
async def _note_the_start(request: web.Request, handler) -> web.StreamResponse:
    request[REQUEST_STARTED] = time.perf_counter()
    return await handler(request)


async def _log_the_answer(request: web.Request, response: web.StreamResponse) -> None:
    """On the answer's way out, when its status is final (a static file's 404 or 304 is
    decided then, and aiohttp's answers to exceptions pass here too)."""
    started = request.get(REQUEST_STARTED)
    identity = request.get(IDENTITY)
    log.info(
        "%s %s %s %s %s ms company=%s",
        client_ip(request, request.app[SETTINGS].trust_proxy_headers),
        request.method,
        request.rel_url.raw_path,
        response.status,
        f"{(time.perf_counter() - started) * 1000:.1f}" if started is not None else "-",
        identity.company if identity is not None else "-",
    )


def setup(app: web.Application) -> None:
    app.middlewares.append(_note_the_start)
    app.on_response_prepare.append(_log_the_answer)
