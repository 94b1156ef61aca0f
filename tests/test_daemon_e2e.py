"""The real `clearml-agent daemon --queue default` (3.0.3), beside a ClearML server, through
the shipped routing proxy.

A real nginx, run by the test (as its user, no service) with a configuration generated from
`deploy/nginx/clearml-workers.conf` (only its listen port and its two upstream addresses
replaced; pid, log and temp paths added), sends `workers.*` to this service (a test server
on the test database, configured with the apiserver's token secret) and everything else to
a stand-in apiserver (`apiserver_standin.py`: login, queues, no task ever). The daemon logs
in at the stand-in, registers with its queue, its resource monitor reports this machine's
CPU and memory every 2 seconds, the dashboards' calls (with the apiserver's token, as the
web UI sends it) list and chart it, and on SIGTERM it unregisters.

Everything listens on 127.0.0.1; every wait is bounded; nginx and the daemon are started
in their own process groups and stopped (then killed) in teardown.
"""

import asyncio
import getpass
import grp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest
from apiserver_standin import ApiServer, create_app
from helpers import ROOT, free_port

SHIPPED_CONFIG = ROOT / "deploy" / "nginx" / "clearml-workers.conf"
TOKEN_SECRET = "apiserver-token-secret-of-this-test"
WORKER = "e2e-host:cpu:0"
REPORT_SECONDS = 2
REPORTS = 3  # reports with statistics to wait for
# The agent's configuration: no update check (PyPI), no retry loops that outlast a test.
AGENT_CONFIG = """
agent { disable_agent_update_check: true }
api.http { wait_on_maintenance_forever: false, retries { total: 1 } }
"""


def nginx_config(tmp: Path, listen: int, apiserver: int, workers: int) -> str:
    """The shipped configuration with its placeholders replaced, in a minimal nginx.conf."""
    routing = SHIPPED_CONFIG.read_text()
    for placeholder, value in (
        ("listen 8008;", f"listen 127.0.0.1:{listen};"),
        ("server apiserver:8008;", f"server 127.0.0.1:{apiserver};"),
        ("server workers:8008;", f"server 127.0.0.1:{workers};"),
    ):
        assert routing.count(placeholder) == 1, placeholder
        routing = routing.replace(placeholder, value)
    # As root, the worker processes would switch to `nobody`, who cannot enter tmp_path.
    user = f"user {getpass.getuser()} {grp.getgrgid(os.getgid()).gr_name};" if os.geteuid() == 0 else ""
    temp_paths = "".join(f"    {kind}_temp_path {tmp / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                             "uwsgi", "scgi"))
    return (
        f"{user}\nworker_processes 1;\ndaemon off;\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'} info;\n"
        f"events {{ worker_connections 128; }}\n"
        f"http {{\n    log_format routed '$request_method $uri $status $upstream_addr';\n"
        f"    access_log {tmp / 'access.log'} routed;\n{temp_paths}{routing}}}\n"
    )


async def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15) -> None:
    """Signal a process we started; kill its process group if it is not gone within `grace`.
    The event loop keeps serving meanwhile: the daemon unregisters through the test servers."""
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


@pytest.fixture
async def apiserver(aiohttp_server):
    standin = ApiServer(TOKEN_SECRET, access_key="DAEMONKEY", secret_key="daemon-secret")
    standin.server = await aiohttp_server(create_app(standin), host="127.0.0.1")
    return standin


@pytest.fixture
async def workers(make_client, apiserver):
    """This service, accepting the apiserver's tokens, behind a proxy, asking the apiserver
    directly (as inside the deployment) for the names get_all shows."""
    return await make_client(apiserver_token_secret=TOKEN_SECRET, trust_proxy_headers=True,
                             apiserver_url=f"http://127.0.0.1:{apiserver.server.port}")


@pytest.fixture
async def proxy(tmp_path, apiserver, workers):
    """A real nginx running the shipped routing rules; yields its base URL."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.access(nginx, os.X_OK), "nginx is missing: scripts/test.sh installs it (apt-get install nginx)"
    folder = tmp_path / "nginx"
    folder.mkdir()
    port = free_port()
    (folder / "nginx.conf").write_text(nginx_config(folder, port, apiserver.server.port, workers.server.port))
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


@pytest.fixture
async def start_daemon(tmp_path, apiserver):
    """`start_daemon(api_host)`: the real daemon, in the foreground of its own process group,
    configured by environment only, with a HOME, config and TMPDIR of its own."""
    processes = []

    def start(api_host: str) -> tuple[subprocess.Popen, Path]:
        home = tmp_path / "agent"
        (home / "tmp").mkdir(parents=True)
        (home / "clearml.conf").write_text(AGENT_CONFIG)
        env = {name: value for name, value in os.environ.items() if not name.startswith(("CLEARML_", "TRAINS_"))}
        env.update(
            HOME=str(home), TMPDIR=str(home / "tmp"), CLEARML_CONFIG_FILE=str(home / "clearml.conf"),
            CLEARML_API_HOST=api_host, CLEARML_API_ACCESS_KEY=apiserver.access_key,
            CLEARML_API_SECRET_KEY=apiserver.secret_key, CLEARML_WORKER_ID=WORKER,
            CLEARML_AGENT_STATUS_REPORT_FREQ_SEC=str(REPORT_SECONDS), CLEARML_AGENT_QUEUE_POLL_FREQ_SEC="1",
            PYTHONUNBUFFERED="1",
        )
        log = home / "daemon.log"
        agent = Path(sys.executable).with_name("clearml-agent")
        process = subprocess.Popen(
            [str(agent), "daemon", "--queue", "default", "--foreground"], cwd=home, env=env,
            stdin=subprocess.DEVNULL, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        processes.append(process)
        return process, log

    yield start
    for process in processes:
        await stop(process)


async def call(session: aiohttp.ClientSession, url: str, token: str, body: dict) -> dict:
    """A dashboard's call through the proxy, with the apiserver's token; returns its data."""
    async with session.get(url, data=json.dumps(body), headers={"Authorization": f"Bearer {token}",
                                                                "Content-Type": "application/json"}) as response:
        envelope = await response.json()
    assert response.status == 200, envelope["meta"]
    return envelope["data"]


async def test_the_proxy_compresses_large_answers_for_clients_that_accept_them(apiserver, workers, proxy):
    token = apiserver.token()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for number in range(60):
            await call(session, f"{proxy}/workers.register", token, {"worker": f"gzip-{number}", "timeout": 600})
        answers = {}
        for accepted in ("gzip", "identity"):
            async with session.post(f"{proxy}/workers.get_all", data="{}", headers={**headers, "Accept-Encoding": accepted}) as response:
                answers[accepted] = (response.headers.get("Content-Encoding"), await response.json())
        small_encoding = None
        async with session.post(f"{proxy}/workers.get_count", data="{}", headers={**headers, "Accept-Encoding": "gzip"}) as response:
            small_encoding = response.headers.get("Content-Encoding")
    assert answers["gzip"][0] == "gzip" and answers["identity"][0] is None
    assert len(answers["gzip"][1]["data"]["workers"]) == 60
    assert answers["gzip"][1]["data"] == answers["identity"][1]["data"]
    assert small_encoding is None  # under gzip_min_length


async def test_daemon_through_the_proxy(apiserver, workers, proxy, start_daemon, db_conn, tmp_path):
    token = apiserver.token()  # what the web UI holds after logging in at the apiserver
    daemon, log = start_daemon(proxy)

    async def reports():
        rows = await db_conn.fetch(
            "SELECT extract(epoch FROM time)::float8 AS time, metrics FROM worker_stats "
            "WHERE worker = $1 AND metrics <> '{}' ORDER BY time", WORKER,
        )
        return rows if len(rows) >= REPORTS else None

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        rows = await eventually(reports, f"{REPORTS} status reports", timeout=60, log=log)
        assert daemon.poll() is None, log.read_text()

        # This machine's figures, every REPORT_SECONDS.
        total_mb = psutil.virtual_memory().total / 2**20
        for row in rows:
            metrics = json.loads(row["metrics"])
            assert all(0 <= value <= 100 for value in metrics["cpu_usage"].values()), metrics
            used, free = metrics["memory_used"]["total"], metrics["memory_free"]["total"]
            assert 0 < used < total_mb and 0 < free < total_mb and used + free <= total_mb * 1.01, metrics
        gaps = [later["time"] - earlier["time"] for earlier, later in zip(rows, rows[1:])]
        assert all(REPORT_SECONDS - 1 <= gap <= REPORT_SECONDS + 4 for gap in gaps), gaps

        # The daemon's calls went to the apiserver, except workers.* (to this service).
        endpoints = {endpoint for _, endpoint in apiserver.calls}
        assert {"auth.login", "queues.get_all", "queues.get_next_task"} <= endpoints, apiserver.calls
        assert not any(endpoint.startswith("workers.") for endpoint in endpoints), apiserver.calls

        # The dashboards see it with its queue, named by the apiserver, through the proxy, with
        # the apiserver's token (which this service sent the apiserver for the names).
        [listed] = (await call(session, f"{proxy}/v2.31/workers.get_all", token, {"last_seen": 0}))["workers"]
        assert listed["id"] == WORKER
        assert listed["queues"] == [{"id": apiserver.queue["id"], "name": "default", "num_tasks": 0}], listed
        assert [(endpoint, sent) for endpoint, sent, _ in apiserver.lookups] == [("queues.get_all_ex", token)]
        assert listed["company"]["id"] == apiserver.company and listed["user"]["id"] == apiserver.user
        assert listed["ip"] == "127.0.0.1"

        first, last = int(rows[0]["time"]), int(rows[-1]["time"])
        chart = await call(session, f"{proxy}/workers.get_stats", token, {
            "from_date": first, "to_date": last + 1, "interval": 1, "worker_ids": [WORKER],
            "items": [{"key": "cpu_usage", "aggregation": "avg"}],
        })
        [series] = chart["workers"]
        [cpu] = [metric for metric in series["metrics"] if metric["metric"] == "cpu_usage"]
        charted = dict(zip(cpu["dates"], cpu["stats"][0]["values"]))
        for row in rows:
            second = int(row["time"])
            values = json.loads(row["metrics"])["cpu_usage"].values()
            assert charted[second * 1000] == pytest.approx(sum(values) / len(values))  # dates in ms

        # SIGTERM: the daemon unregisters and leaves get_all.
        daemon.send_signal(signal.SIGTERM)

        async def exited():
            return daemon.poll() is not None

        await eventually(exited, "the daemon to exit", timeout=30, log=log)

        async def gone():
            return (await call(session, f"{proxy}/workers.get_all", token, {"last_seen": 0}))["workers"] == []

        await eventually(gone, "the worker to leave get_all", timeout=5, log=log)

    # nginx's log: every workers.* call went to this service, everything else to the apiserver
    # (workers.get_runtime_properties too: this service answers it 400/1, and the agent then
    # treats runtime properties as unsupported by the server, as with an older apiserver).
    routed = [line.split() for line in (tmp_path / "nginx" / "access.log").read_text().splitlines()]
    upstreams = {"workers": f"127.0.0.1:{workers.server.port}", "apiserver": f"127.0.0.1:{apiserver.server.port}"}
    for _, path, _, upstream in routed:
        endpoint = path.rsplit("/", 1)[-1]
        assert upstream == upstreams["workers" if endpoint.startswith("workers.") else "apiserver"], (path, upstream)
    daemon_calls = {(method, path.rsplit("/", 1)[-1]) for method, path, _, _ in routed}
    assert {("GET", "workers.register"), ("GET", "workers.status_report"), ("GET", "workers.unregister")} <= \
        daemon_calls, routed
