"""Serving with gunicorn: one master and `processes` aiohttp worker processes (uvloop).

Every process runs the whole application, background tasks included: the expiry sweep is
an idempotent DELETE and retention takes an advisory lock, so several processes (or hosts)
share the work safely. On SIGTERM each process stops accepting, finishes its requests and
drains its report writer before it exits.

Metrics: every process writes its samples to files in PROMETHEUS_MULTIPROC_DIR (a fresh
directory unless the operator names one), which `/metrics` sums (server/metrics.py); with
WORKERS_METRICS_BIND the master process serves that sum on its own address instead.
"""

import asyncio
import contextlib
import gc
import os
import shutil
import tempfile
from typing import Callable

from aiohttp import web
from aiohttp.worker import GunicornUVLoopWebWorker
from gunicorn.app.base import BaseApplication

from . import metrics
from .config import Settings

GC_YOUNG_THRESHOLD = 20_000


class Worker(GunicornUVLoopWebWorker):
    """aiohttp's uvloop worker, serving on the plain listening sockets.

    gunicorn hands its workers wrappers of their sockets. uvloop closes a listening socket's
    file descriptor itself when the server stops, then detaches a plain socket object but
    calls the wrapper's close(), which closes the descriptor again and logs "Error while
    closing socket [Errno 9] Bad file descriptor" at every shutdown."""

    def run(self) -> None:
        self.sockets = [getattr(listener, "sock", listener) for listener in self.sockets]
        super().run()


WORKER_CLASS = f"{__name__}.Worker"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (as the server processes run), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def gunicorn_options(settings: Settings) -> dict:
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.processes,
        "worker_class": WORKER_CLASS,
        # Daemons report every few seconds: keep their connections open between reports.
        "keepalive": 75,
        # Each worker listens on its own SO_REUSEPORT socket and the kernel spreads new
        # connections evenly. On one shared socket the first worker to wake takes every
        # pending connection, and kept-alive daemons then stay on it.
        "reuse_port": settings.processes > 1,
        "graceful_timeout": 30,
        "accesslog": None,
        "loglevel": settings.log_level.lower(),
        # gunicorn >= 25 opens a control socket at one fixed path: several servers on a
        # machine would collide on it.
        "control_socket_disable": True,
        "child_exit": lambda arbiter, worker: metrics.process_exited(worker.pid),
        "post_worker_init": lambda worker: _settle_garbage_collector(),
        "when_ready": lambda arbiter: _serve_metrics(settings.metrics_bind) if settings.metrics_bind else None,
    }


def _settle_garbage_collector() -> None:
    """Each request makes hundreds of short-lived objects: collecting the youngest generation
    every 700 allocations (the default) runs the collector about once per request. The
    objects made while starting (modules, the application) are moved out of its sight."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _serve_metrics(bind: str) -> None:
    """Serve every process's metrics on `bind` (HOST:PORT) from the master, in a thread."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    host, _, port = bind.rpartition(":")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)


@contextlib.contextmanager
def _metrics_directory():
    """PROMETHEUS_MULTIPROC_DIR for the server processes, empty at start."""
    named = os.environ.get(metrics.MULTIPROCESS_DIR)
    directory = named or tempfile.mkdtemp(prefix="workers-metrics-")
    if named:
        os.makedirs(named, exist_ok=True)
        for entry in os.scandir(named):  # samples of an earlier run would be summed in
            if entry.name.endswith(".db"):
                os.remove(entry.path)
    os.environ[metrics.MULTIPROCESS_DIR] = directory
    try:
        yield
    finally:
        if not named:
            shutil.rmtree(directory, ignore_errors=True)


class _Server(BaseApplication):
    def __init__(self, make_app: Callable[[], web.Application], options: dict):
        self._make_app = make_app
        self._options = options
        super().__init__()

    def load_config(self):
        for name, value in self._options.items():
            if name in self.cfg.settings:  # options this gunicorn version knows
                self.cfg.set(name, value)

    def load(self):
        return self._make_app()


def serve(make_app: Callable[[], web.Application], settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; `make_app` is called in each worker process."""
    with _metrics_directory():
        _Server(make_app, gunicorn_options(settings)).run()
