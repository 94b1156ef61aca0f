"""Typed keys of what the application holds for its handlers (aiohttp's AppKey)."""

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
