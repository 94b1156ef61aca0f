"""The real `clearml-agent daemon --queue default` (3.0.3), beside a ClearML server, through
the shipped routing proxy; and the same daemon with `--dynamic-gpus` and with
`--services-mode`, which keep runtime properties here.

A real nginx, run by the test (as its user, no service) with a configuration generated from
`deploy/nginx/clearml-workers.conf` (only its listen port and its two upstream addresses
replaced; pid, log and temp paths added: nginx_proxy.py), sends `workers.*` to this service (a test server
on the test database, configured with the apiserver's token secret) and everything else to
a stand-in apiserver (`apiserver_standin.py`: login, queues, no task ever). The daemon logs
in at the stand-in, registers with its queue, its resource monitor reports this machine's
CPU and memory every 2 seconds, the dashboards' calls (with the apiserver's token, as the
web UI sends it) list and chart it, and on SIGTERM it unregisters.

Everything listens on 127.0.0.1; every wait is bounded; nginx and the daemon are started
in their own process groups and stopped (then killed) in teardown.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import psutil
import pytest
from apiserver_standin import ApiServer, create_app
from helpers import free_port
from nginx_proxy import eventually, running_nginx, stop

TOKEN_SECRET = "apiserver-token-secret-of-this-test"
WORKER = "e2e-host:cpu:0"
REPORT_SECONDS = 2
REPORTS = 3  # reports with statistics to wait for
# The agent's configuration: no update check (PyPI), no retry loops that outlast a test.
AGENT_CONFIG = """
agent { disable_agent_update_check: true }
api.http { wait_on_maintenance_forever: false, retries { total: 1 } }
"""


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
    async with running_nginx(tmp_path / "nginx", free_port(), f"127.0.0.1:{apiserver.server.port}",
                             [f"127.0.0.1:{workers.server.port}"]) as url:
        yield url


@pytest.fixture
async def start_daemon(tmp_path, apiserver):
    """`start_daemon(api_host, *arguments)`: the real daemon (`daemon --queue default` unless
    other arguments are given), in the foreground of its own process group, configured by
    environment only, with a HOME, config and TMPDIR of its own."""
    processes = []

    def start(api_host: str, *arguments: str) -> tuple[subprocess.Popen, Path]:
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
            [str(agent), "daemon", *(arguments or ("--queue", "default")), "--foreground"], cwd=home, env=env,
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


async def reports_arrive(db_conn, log: Path) -> list:
    """The daemon's first REPORTS status reports with statistics, once stored."""
    async def reports():
        rows = await db_conn.fetch(
            "SELECT extract(epoch FROM time)::float8 AS time, metrics FROM worker_stats "
            "WHERE worker = $1 AND metrics <> '{}' ORDER BY time", WORKER,
        )
        return rows if len(rows) >= REPORTS else None

    return await eventually(reports, f"{REPORTS} status reports", timeout=60, log=log)


async def listed_worker(session: aiohttp.ClientSession, proxy: str, token: str, apiserver: ApiServer) -> dict:
    """The daemon as the dashboards see it through the proxy: its queue (named by the
    apiserver), company, user and address."""
    [listed] = (await call(session, f"{proxy}/v2.31/workers.get_all", token, {"last_seen": 0}))["workers"]
    assert listed["id"] == WORKER
    assert listed["queues"] == [{"id": apiserver.queue["id"], "name": "default", "num_tasks": 0}], listed
    assert listed["company"]["id"] == apiserver.company and listed["user"]["id"] == apiserver.user
    assert listed["ip"] == "127.0.0.1"
    return listed


async def terminate_and_see_it_unregister(daemon, session, proxy: str, token: str, log: Path) -> None:
    """SIGTERM: the daemon unregisters and leaves get_all."""
    daemon.send_signal(signal.SIGTERM)

    async def exited():
        return daemon.poll() is not None

    await eventually(exited, "the daemon to exit", timeout=30, log=log)

    async def gone():
        return (await call(session, f"{proxy}/workers.get_all", token, {"last_seen": 0}))["workers"] == []

    await eventually(gone, "the worker to leave get_all", timeout=5, log=log)


def routed(tmp_path: Path) -> list[tuple[str, str, str, str]]:
    """nginx's log of the calls: (method, endpoint, status, upstream address)."""
    lines = (tmp_path / "nginx" / "access.log").read_text().splitlines()
    return [(method, path.rsplit("/", 1)[-1], status, upstream) for _, method, path, status, upstream in map(str.split, lines)]


async def test_daemon_through_the_proxy(apiserver, workers, proxy, start_daemon, db_conn, tmp_path):
    token = apiserver.token()  # what the web UI holds after logging in at the apiserver
    daemon, log = start_daemon(proxy)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        rows = await reports_arrive(db_conn, log)
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
        await listed_worker(session, proxy, token, apiserver)
        assert [(endpoint, sent) for endpoint, sent, _ in apiserver.lookups] == [("queues.get_all_ex", token)]

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

        await terminate_and_see_it_unregister(daemon, session, proxy, token, log)

    # nginx's log: every workers.* call went to this service, everything else to the apiserver.
    calls = routed(tmp_path)
    check_routing(calls, apiserver, workers)
    daemon_calls = {(method, endpoint) for method, endpoint, _, _ in calls}
    assert {("GET", "workers.register"), ("GET", "workers.status_report"), ("GET", "workers.unregister")} <= \
        daemon_calls, calls
    # The daemon reads its runtime properties (none: no `force` on or off) before it polls its queue.
    assert {status for _, endpoint, status, _ in calls if endpoint == "workers.get_runtime_properties"} == {"200"}


def check_routing(calls: list[tuple[str, str, str, str]], apiserver: ApiServer, workers) -> None:
    """Every workers.* call went to this service, everything else to the apiserver."""
    upstreams = {"workers": f"127.0.0.1:{workers.server.port}", "apiserver": f"127.0.0.1:{apiserver.server.port}"}
    for _, endpoint, _, upstream in calls:
        assert upstream == upstreams["workers" if endpoint.startswith("workers.") else "apiserver"], (endpoint, upstream)


def runtime_property_calls(calls: list[tuple[str, str, str, str]]) -> dict[str, set[str]]:
    """The statuses this service answered the daemon's runtime property calls with, by endpoint."""
    answered: dict[str, set[str]] = {}
    for _, endpoint, status, _ in calls:
        if "runtime_properties" in endpoint:
            answered.setdefault(endpoint, set()).add(status)
    return answered


async def test_dynamic_gpus_daemon_keeps_its_gpus_in_runtime_properties(
    apiserver, workers, proxy, start_daemon, db_conn, tmp_path
):
    """`--dynamic-gpus --gpus 0,1 --queue default=1`: the daemon sets `available_gpus` before
    it registers (without the endpoint it exits: "Dynamic GPU allocation is not supported by
    your ClearML-server"), registers, reports and polls, reading its properties back; this
    machine has no GPU, and the agent needs none to start (it then reports no GPU metrics)."""
    token = apiserver.token()
    daemon, log = start_daemon(proxy, "--dynamic-gpus", "--gpus", "0,1", "--queue", "default=1")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await reports_arrive(db_conn, log)
        assert daemon.poll() is None, log.read_text()
        await listed_worker(session, proxy, token, apiserver)

        # Its properties, as its user reads them (the web UI's token of the same company and user).
        properties = await call(session, f"{proxy}/workers.get_runtime_properties", token, {"worker": WORKER})
        [gpus] = properties["runtime_properties"]
        assert gpus["key"] == "available_gpus" and gpus["expiry"] is None, gpus
        assert sorted(entry.split("_")[0] for entry in gpus["value"].split(",")) == ["0", "1"], gpus

        # Another company's token sees none of them.
        stranger = ApiServer(TOKEN_SECRET, access_key="OTHER", secret_key="other-secret").token()
        assert await call(session, f"{proxy}/workers.get_runtime_properties", stranger, {"worker": WORKER}) == {
            "runtime_properties": []
        }

        await terminate_and_see_it_unregister(daemon, session, proxy, token, log)

    assert "not supported" not in log.read_text()
    calls = routed(tmp_path)
    check_routing(calls, apiserver, workers)
    assert runtime_property_calls(calls) == {
        "workers.set_runtime_properties": {"200"}, "workers.get_runtime_properties": {"200"},
    }, calls
    # Set before it registered, and again when its polling loop started.
    endpoints = [endpoint for _, endpoint, _, _ in calls]
    assert endpoints.index("workers.set_runtime_properties") < endpoints.index("workers.register"), endpoints
    assert endpoints.count("workers.set_runtime_properties") >= 2, endpoints


async def test_services_mode_daemon_keeps_its_instance_limit(apiserver, workers, proxy, start_daemon, db_conn, tmp_path):
    """`--services-mode 2`: the daemon stores its limit of 2 instances as `max_num_instances`
    (without the endpoint it warns "Maximum number of service instance not supported, removing
    limit"), registers, reports, and unregisters on SIGTERM."""
    token = apiserver.token()
    daemon, log = start_daemon(proxy, "--services-mode", "2", "--queue", "default")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await reports_arrive(db_conn, log)
        assert daemon.poll() is None, log.read_text()
        await listed_worker(session, proxy, token, apiserver)
        properties = await call(session, f"{proxy}/workers.get_runtime_properties", token, {"worker": WORKER})
        assert properties == {"runtime_properties": [{"key": "max_num_instances", "value": "2", "expiry": None}]}
        await terminate_and_see_it_unregister(daemon, session, proxy, token, log)

    text = log.read_text()
    assert "running in services mode" in text and "not supported" not in text, text[-3000:]
    calls = routed(tmp_path)
    check_routing(calls, apiserver, workers)
    assert runtime_property_calls(calls) == {
        "workers.set_runtime_properties": {"200"}, "workers.get_runtime_properties": {"200"},
    }, calls
