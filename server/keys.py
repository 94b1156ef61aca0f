"""Typed keys of what the application holds for its handlers (aiohttp's AppKey), and of what
a request carries from one part of the server to another."""

import asyncpg
from aiohttp import web

from .config import Settings
from .limits import Limits
from .readers import Readers
from .storage.writer import ReportWriter

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
WRITER = web.AppKey("writer", ReportWriter)
ENDPOINTS = web.AppKey("endpoints", dict)
SIGNING_KEY = web.AppKey("signing_key", str)
LIMITS = web.AppKey("limits", Limits)
READERS = web.AppKey("readers", Readers)
METRICS = web.AppKey("metrics", object)  # metrics.Metrics, or None when metrics are off
REQUEST_OBSERVER = web.AppKey("request_observer", object)  # metrics.RequestObserver, or None
APISERVER = web.AppKey("apiserver", object)  # apiserver.Apiserver, or None without WORKERS_APISERVER_URL
REPLICAS = web.AppKey("replicas", object)  # replicas.Replicas of this process, or None without WORKERS_READ_DSN


def _request_key(name: str, kind: type):
    """aiohttp's typed request key from 3.14 on; a string key before it."""
    return web.RequestKey(name, kind) if hasattr(web, "RequestKey") else name


IDENTITY = _request_key("identity", object)  # auth.Identity of the caller, once identified
REQUEST_STARTED = _request_key("started", float)  # time.perf_counter() (with the access log)
