"""The shipped routing proxy (`deploy/nginx/clearml-workers.conf`) run by a test: Debian's
nginx as the test's user, in its own process group, with the shipped configuration's listen
port and upstream addresses replaced; and the bounded waits and stops those tests share."""

import asyncio
import contextlib
import getpass
import grp
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ROOT

SHIPPED_CONFIG = ROOT / "deploy" / "nginx" / "clearml-workers.conf"
# The shipped `server workers:8008 ...;` line of the workers_service upstream: its parameters
# (passive health) are kept for every address that replaces it.
WORKERS_SERVER = re.compile(r"^(\s*)server workers:8008( [^;]*)?;", re.MULTILINE)


def nginx_config(tmp: Path, listen: int, apiserver: str, workers: list[str]) -> str:
    """The shipped configuration in a minimal nginx.conf: listening on 127.0.0.1:`listen`,
    the apiserver at `apiserver` and this service's hosts at `workers` ("HOST:PORT" each)."""
    routing = SHIPPED_CONFIG.read_text()
    for placeholder, value in (("listen 8008;", f"listen 127.0.0.1:{listen};"),
                               ("server apiserver:8008;", f"server {apiserver};")):
        assert routing.count(placeholder) == 1, placeholder
        routing = routing.replace(placeholder, value)
    assert len(WORKERS_SERVER.findall(routing)) == 1, "the workers_service server line"
    routing = WORKERS_SERVER.sub(
        lambda line: "\n".join(f"{line[1]}server {address}{line[2] or ''};" for address in workers), routing
    )
    # As root, the worker processes would switch to `nobody`, who cannot enter tmp_path.
    user = f"user {getpass.getuser()} {grp.getgrgid(os.getgid()).gr_name};" if os.geteuid() == 0 else ""
    temp_paths = "".join(f"    {kind}_temp_path {tmp / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                             "uwsgi", "scgi"))
    return (
        f"{user}\nworker_processes 1;\ndaemon off;\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'} info;\n"
        f"events {{ worker_connections 128; }}\n"
        f"http {{\n    log_format routed '$msec $request_method $uri $status $upstream_addr';\n"
        f"    access_log {tmp / 'access.log'} routed;\n{temp_paths}{routing}}}\n"
    )


@contextlib.asynccontextmanager
async def running_nginx(folder: Path, port: int, apiserver: str, workers: list[str]):
    """nginx with `nginx_config` in `folder` (its logs there: access.log, error.log), until
    the block ends; yields its base URL."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.access(nginx, os.X_OK), "nginx is missing: scripts/test.sh installs it (apt-get install nginx)"
    folder.mkdir()
    (folder / "nginx.conf").write_text(nginx_config(folder, port, apiserver, workers))
    process = subprocess.Popen(
        [nginx, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(folder / "nginx.conf")],
        stdout=subprocess.DEVNULL, stderr=open(folder / "stderr.log", "w"), start_new_session=True,
    )
    try:
        async def listening():
            assert process.poll() is None, (folder / "stderr.log").read_text() + (folder / "error.log").read_text()
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        await eventually(listening, "nginx to listen", timeout=10)
        yield f"http://127.0.0.1:{port}"
    finally:
        await stop(process, signal.SIGQUIT, grace=5)


async def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15) -> None:
    """Signal a process we started; kill its process group if it is not gone within `grace`.
    The event loop keeps serving meanwhile (a daemon unregisters through the test servers)."""
    if process.poll() is None:
        process.send_signal(sig)
        deadline = time.monotonic() + grace
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # what is left of its group (nginx's worker, ...)
    except ProcessLookupError:
        pass
    process.wait(5)


async def eventually(check, what: str, timeout: float = 30, log: Path | None = None):
    """Poll `check()` (a coroutine function) until it returns a true value, at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            pytest.fail(f"timed out waiting for {what}\n{tail}")
        await asyncio.sleep(0.25)
    return result
