"""Serving with gunicorn: one master and `processes` aiohttp worker processes (uvloop).

Every process runs the whole application, background tasks included: the expiry sweep is
an idempotent DELETE and retention takes an advisory lock, so several processes (or hosts)
share the work safely. On SIGTERM each process stops accepting, finishes its requests and
drains its report writer before it exits.
"""

from typing import Callable

from aiohttp import web
from gunicorn.app.base import BaseApplication

from .config import Settings

WORKER_CLASS = "aiohttp.GunicornUVLoopWebWorker"


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
    }


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
    _Server(make_app, gunicorn_options(settings)).run()
