"""The wire protocol (SPEC §1): path parsing, body decoding, the meta/data envelope and error mapping.

Every request enters through `dispatch`: it resolves `/[vX.Y/]service.action` to an endpoint,
decodes the JSON body, identifies the caller, runs the endpoint and wraps what it returns
(or the error it raised) in the envelope.
"""

import functools
import logging
import re
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import asyncpg
import orjson
from aiohttp import web

from . import __version__, auth, errors, metrics
from .config import Settings
from .errors import ApiError
from .keys import ENDPOINTS, METRICS, REQUEST_OBSERVER, SETTINGS
from .storage.db import UNAVAILABLE_ERRORS

API_VERSION = "2.30"
SERVER_VERSION = __version__

log = logging.getLogger(__name__)

# On 503 the real daemon's HTTP client waits this long before it retries (on 429, as long
# as the error's retry_after says).
_RETRY_LATER_SECONDS = 1

METHODS = frozenset({"GET", "POST", "PUT"})
_PATH = re.compile(r"/(?:v(?P<version>\d+\.\d+)/)?(?P<endpoint>[A-Za-z_]\w*\.[A-Za-z_]\w*)/?", re.ASCII)


@dataclass(slots=True)
class Call:
    """One API call as an endpoint sees it."""

    endpoint: str
    body: dict
    identity: auth.Identity
    request: web.Request

    @property
    def settings(self) -> Settings:
        return self.request.app[SETTINGS]


Endpoint = Callable[[Call], Awaitable[dict]]


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


@functools.lru_cache(maxsize=64)
def _actual_version(requested: str) -> str:
    return min(requested, API_VERSION, key=_version_tuple)


def envelope(
    endpoint: str,
    requested_version: str,
    data: Any,
    code: tuple[int, int] = (200, 0),
    message: str = "OK",
    error_stack: str | None = None,
    retry_after: int | None = None,
    allow: frozenset[str] = frozenset(),
) -> web.Response:
    if retry_after is None and code[0] == 503:
        retry_after = _RETRY_LATER_SECONDS
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if allow:
        headers["Allow"] = ", ".join(sorted(allow))
    call_id = uuid.uuid4().hex
    meta = {
        "id": call_id,
        "trx": call_id,
        "endpoint": {
            "name": endpoint,
            "requested_version": requested_version,
            "actual_version": _actual_version(requested_version),
        },
        "result_code": code[0],
        "result_subcode": code[1],
        "result_msg": message,
        "error_stack": error_stack,
        "error_data": {},
    }
    return web.Response(
        body=orjson.dumps({"meta": meta, "data": data}),
        status=code[0],
        content_type="application/json",
        headers=headers or None,
    )


def client_ip(request: web.Request, trust_proxy_headers: bool) -> str | None:
    """The peer address, or the proxy's X-Real-IP / first X-Forwarded-For when those are trusted."""
    if trust_proxy_headers:
        real_ip = request.headers.get("X-Real-IP", "").strip()
        if real_ip:
            return real_ip
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        if forwarded:
            return forwarded
    return request.remote


def decode_body(raw: bytes) -> dict:
    if not raw:  # SPEC §1: an empty body means {} (whitespace alone is not JSON)
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ApiError(errors.VALIDATION_ERROR, f"Validation error: malformed JSON body: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(errors.VALIDATION_ERROR, "Validation error: the request body must be a JSON object")
    return body


async def _methods_of_other_routes(request: web.Request) -> frozenset[str]:
    """The methods that the routes beside the API (/healthz, the page, ...) take at this
    path, for a request that came to the API's catch-all route with another method (none
    when no such route has this path). The router passes over a route whose path matches but
    not its method; only the catch-all route resolves."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        match, methods = await resource.resolve(request)
        if match is None:
            allowed |= methods
    return frozenset(allowed)


def _payload_problem(error: web.RequestPayloadError) -> str:
    """What aiohttp found wrong with a body, on one line ("Can not decode content-encoding: gzip")."""
    text = getattr(error.__cause__, "message", "") or str(error)
    return " ".join(text.split())


def _give_up_the_body(request: web.Request) -> None:
    """After a body that could not be decoded: aiohttp's parser has stopped on it, so the
    connection takes no further request and `dispatch` closes it after the answer. Its end is
    marked here, else aiohttp would read on to the body's end after the answer, meet the
    same error and log it as an unhandled exception, with its traceback, at ERROR."""
    request.content.feed_eof()


async def dispatch(request: web.Request) -> web.Response:
    started = time.perf_counter()
    match = _PATH.fullmatch(request.path)
    endpoint_name = match["endpoint"] if match else request.path.lstrip("/")
    version = (match and match["version"]) or API_VERSION
    response = await _answer(request, match, endpoint_name, version)
    if request.content.exception() is not None:  # a body it could not read: see _give_up_the_body
        response.force_close()
    observer = request.app[REQUEST_OBSERVER]
    if observer is not None:
        observer.observe(endpoint_name, response.status, started)
    return response


async def _answer(request: web.Request, match: re.Match | None, endpoint_name: str, version: str) -> web.Response:
    try:
        endpoint = request.app[ENDPOINTS].get(endpoint_name) if match else None
        if endpoint is None:
            if allowed := await _methods_of_other_routes(request):
                raise ApiError(
                    errors.METHOD_NOT_ALLOWED,
                    f"method {request.method} is not allowed on {request.path}: use {' or '.join(sorted(allowed))}",
                    allow=allowed,
                )
            raise ApiError(errors.ENDPOINT_NOT_SUPPORTED, f"endpoint is not supported: {endpoint_name}")
        if request.method not in METHODS:
            raise ApiError(
                errors.METHOD_NOT_ALLOWED, f"method {request.method} is not allowed: use GET, POST or PUT", allow=METHODS
            )
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = request.app[SETTINGS].max_body_bytes
            raise ApiError(errors.BODY_TOO_LARGE, f"request body is larger than {limit} bytes") from None
        except web.RequestPayloadError as error:  # e.g. a Content-Encoding it is not in
            _give_up_the_body(request)
            problem = _payload_problem(error)
            log.info("unreadable request body of %s from %s: %s", endpoint_name, request.remote, problem)
            raise ApiError(errors.VALIDATION_ERROR, f"Validation error: unreadable request body: {problem}") from None
        identity = await auth.identify(request)
        data = await endpoint(Call(endpoint_name, decode_body(raw), identity, request))
        return envelope(endpoint_name, version, data)
    except ApiError as error:
        code = (error.result_code, error.result_subcode)
        return envelope(endpoint_name, version, {}, code, error.message, retry_after=error.retry_after, allow=error.allow)
    except asyncpg.ForeignKeyViolationError:
        # Only a valid token for a company deleted since (or from a recreated database with
        # the same WORKERS_AUTH_SECRET) can name a company that does not exist.
        return envelope(
            endpoint_name, version, {}, errors.INVALID_TOKEN, "Invalid token: its company no longer exists"
        )
    except UNAVAILABLE_ERRORS as error:
        log.warning("database unavailable during %s: %r", endpoint_name, error)
        metrics.count_database_error(request.app[METRICS], "unavailable")
        return envelope(
            endpoint_name, version, {}, errors.DATABASE_UNAVAILABLE, "database temporarily unavailable, retry later"
        )
    except Exception as error:
        log.exception("unexpected error in %s", endpoint_name)
        if isinstance(error, asyncpg.PostgresError):
            metrics.count_database_error(request.app[METRICS], "statement")
        stack = traceback.format_exc() if request.app[SETTINGS].debug else None
        return envelope(endpoint_name, version, {}, errors.INTERNAL_ERROR, "internal server error", stack)
