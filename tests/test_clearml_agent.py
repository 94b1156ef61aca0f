"""The real worker daemon's client, `clearml-agent` 3.0.3, works unchanged against this server.

No stub and no re-implementation: the agent's own `Session` (the class its daemon runs with)
logs in with Basic credentials and decodes our token's claims; its v2.5 request classes
register, list and unregister a worker; and its `ResourceMonitor` thread samples this machine
with psutil and sends status reports exactly as the daemon does (GET `/workers.status_report`,
no version in the path, timestamp in milliseconds, float statistics, `tags: null`,
`is_daemon: true`, and a last report without statistics when it stops). Every report must be
stored at its own time, and be readable through `get_metric_keys` and `get_stats`.
A wrong or revoked secret makes the agent's login fail with its `LoginError`.

The agent is synchronous (requests): it runs in threads while the event loop serves it.
"""

import asyncio
import json
import os
import time
from datetime import datetime, timedelta, timezone

import pytest
from clearml_agent.backend_api.services import workers as agent_workers
from clearml_agent.backend_api.session.session import LoginError
from clearml_agent.backend_api.session.token_manager import TokenManager
from clearml_agent.helper.resource_monitor import ResourceMonitor
from clearml_agent.session import Session
from helpers import ok

from server import protocol
from server.storage import credentials

WORKER = "agent-host:cpu:0"
QUEUES = ["default", "cpu"]
TAGS = ["fleet-a"]
REPORTS = 2  # reports with statistics, before the monitor's last one, without

# The agent's only configuration: its retry loops end rather than hang on a misbehaving server.
AGENT_CONFIG = "api.http { wait_on_maintenance_forever: false, retries { total: 1 } }\n"


@pytest.fixture
def agent_env(tmp_path, monkeypatch):
    """Nothing from this machine's ClearML configuration or environment reaches the agent."""
    for name in list(os.environ):
        if name.startswith(("CLEARML_", "TRAINS_")):
            monkeypatch.delenv(name)
    config = tmp_path / "clearml.conf"
    config.write_text(AGENT_CONFIG)
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(config))
    monkeypatch.setenv("HOME", str(tmp_path))  # the agent creates its cache folders there
    # What the agent's Session (cpu_only, as `--cpu-only`) writes to os.environ, restored afterwards.
    for name, value in (("NVIDIA_VISIBLE_DEVICES", "none"), ("CUDA_VISIBLE_DEVICES", "none"),
                        ("CUDA_DEVICE_ORDER", "PCI_BUS_ID")):
        monkeypatch.setenv(name, value)


def agent_session(client, access_key: str, secret: str) -> Session:
    """The daemon's session; constructing it logs in (GET /auth.login)."""
    return Session(
        host=str(client.make_url("")), api_key=access_key, secret_key=secret, initialize_logging=False, cpu_only=True
    )


async def send(session, request):
    """Send one of the agent's request objects; it must succeed."""
    result = await asyncio.to_thread(session.send, request)
    assert result.ok(), result.meta
    return result


def record_requests(session) -> list[dict]:
    """Every request the session sends from now on, as sent, with the HTTP status it got."""
    calls, send_request = [], session.send_request

    def recording(service, action, version=None, method=None, json=None, **kwargs):
        response = send_request(service, action, version=version, method=method, json=json, **kwargs)
        calls.append({"endpoint": f"{service}.{action}", "version": version, "method": method, "body": json,
                      "status": response.status_code})
        return response

    session.send_request = recording
    return calls


def run_monitor(session, calls: list[dict]) -> None:
    """The daemon's resource monitor, reporting every second, until it sent REPORTS reports."""
    monitor = ResourceMonitor(
        session, WORKER, sample_frequency_per_sec=10, report_frequency_sec=1, first_report_sec=1, report_daemon=True
    )
    monitor.set_report(ResourceMonitor.StatusReport(queues=QUEUES))
    monitor.start()
    try:
        deadline = time.monotonic() + 30
        while sum(c["endpoint"] == "workers.status_report" for c in calls) < REPORTS and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        monitor.stop()  # sends a last report, without statistics
        monitor._thread.join(10)


def stored_form(machine_stats: dict | None) -> dict:
    """A report's statistics as `worker_stats.metrics` holds them: {metric: {variant: value}}."""
    return {
        key: {str(i): v for i, v in enumerate(value)} if isinstance(value, list) else {"total": value}
        for key, value in (machine_stats or {}).items()
    }


async def test_agent_registers_reports_and_unregisters(make_client, agent_env, db_conn):
    client = await make_client(company="acme", user="daemon")
    me = client.credentials

    session = await asyncio.to_thread(agent_session, client, me.access_key, me.secret)
    claims = TokenManager.get_decoded_token(session.token, verify=False)
    assert Session.api_version == claims["api_version"] == protocol.API_VERSION
    assert Session.feature_set == "basic"
    assert Session.user_id == me.user_id and claims["identity"]["company"] == me.company_id
    assert claims["exp"] - time.time() > 29 * 24 * 3600  # far beyond the agent's 12 h re-login threshold

    calls = record_requests(session)
    # v2.5's RegisterRequest has no `tags`; the agent sends extra fields when told to.
    register = agent_workers.RegisterRequest(worker=WORKER, queues=QUEUES, _allow_extra_fields_=True, tags=TAGS)
    await send(session, register)
    await asyncio.to_thread(run_monitor, session, calls)

    reports = [call for call in calls if call["endpoint"] == "workers.status_report"]
    assert len(reports) == REPORTS + 1, calls
    for report in reports:
        assert (report["version"], report["method"], report["status"]) == (None, "get", 200), report
        body = report["body"]
        assert (body["worker"], body["queues"], body["tags"], body["is_daemon"]) == (WORKER, QUEUES, None, True)
        assert body["timestamp"] > 10**12 and body["timestamp"] % 1000 == 0  # whole seconds, in ms
    with_stats = [report["body"] for report in reports[:-1]]
    assert reports[-1]["body"]["machine_stats"] is None
    for body in with_stats:
        stats = body["machine_stats"]
        assert isinstance(stats["cpu_usage"], list) and isinstance(stats["memory_used"], float), stats

    result = await send(session, agent_workers.GetAllRequest(last_seen=0))
    [worker] = result.response.workers
    assert worker.id == WORKER
    assert (worker.user.id, worker.company.id) == (me.user_id, me.company_id)
    assert [queue.id for queue in worker.queues] == QUEUES
    now = datetime.now(timezone.utc)
    assert now - timedelta(minutes=1) < worker.register_time <= worker.last_report_time <= now  # parsed datetimes
    assert result.response_data["workers"][0]["tags"] == TAGS  # kept: the reports sent `tags: null`

    # Every report, the last one too, is stored at its own time (ms -> s), each value as sent.
    rows = await db_conn.fetch(
        "SELECT extract(epoch FROM time)::float8 AS time, metrics FROM worker_stats WHERE worker = $1", WORKER
    )
    stored = [(row["time"], json.loads(row["metrics"])) for row in rows]
    expected = [(r["body"]["timestamp"] / 1000, stored_form(r["body"]["machine_stats"])) for r in reports]
    assert sorted(stored, key=repr) == sorted(expected, key=repr)

    # ... and the dashboards' API reads them back.
    keys = await ok(client, "workers.get_metric_keys", {"worker_ids": [WORKER]})
    assert sorted(key for c in keys["categories"] for key in c["metric_keys"]) == sorted(with_stats[0]["machine_stats"])
    seconds = [body["timestamp"] // 1000 for body in with_stats]
    chart = await ok(client, "workers.get_stats", {
        "from_date": seconds[0], "to_date": seconds[-1] + 1, "interval": 1, "split_by_variant": True,
        "items": [{"key": "memory_used", "aggregation": "max"}, {"key": "cpu_usage", "aggregation": "max"}],
    })
    [series] = chart["workers"]
    charted = {(m["metric"], m["variant"]): dict(zip(m["dates"], m["stats"][0]["values"])) for m in series["metrics"]}
    for second, body in zip(seconds, with_stats):
        assert charted[("memory_used", "total")][second * 1000] == body["machine_stats"]["memory_used"]
        assert charted[("cpu_usage", "0")][second * 1000] == body["machine_stats"]["cpu_usage"][0]

    await send(session, agent_workers.UnregisterRequest(worker=WORKER))
    result = await send(session, agent_workers.GetAllRequest(last_seen=0))
    assert result.response.workers == []


async def test_agent_login_fails_with_wrong_or_revoked_secret(make_client, agent_env, db_conn):
    client = await make_client()
    me = client.credentials

    with pytest.raises(LoginError, match="error 401 .*Invalid credentials"):
        await asyncio.to_thread(agent_session, client, me.access_key, me.secret + "x")

    await asyncio.to_thread(agent_session, client, me.access_key, me.secret)  # the right secret works...
    assert await credentials.revoke(db_conn, me.access_key)
    with pytest.raises(LoginError, match="error 401 .*Invalid credentials"):  # ... until the key is revoked
        await asyncio.to_thread(agent_session, client, me.access_key, me.secret)
