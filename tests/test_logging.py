"""What the server logs: the access log (WORKERS_ACCESS_LOG), one line per request and never
a credential; nothing per request without it; and a quiet stop on Ctrl-C."""

import asyncio
import logging
import os
import re
import signal

import pytest
from conftest import create_credentials
from helpers import basic_auth, fetch, ok, start_server, stop_server, wait_until_ready

ACCESS_LOGGER = "server.access"
# address, method, path, status, milliseconds, company
ACCESS_LINE = re.compile(r"(\S+) ([A-Z]+) (\S+) (\d{3}) (\d+\.\d) ms company=(\S+)")


def access_lines(caplog) -> list[tuple[str, ...]]:
    lines = []
    for record in caplog.records:
        if record.name == ACCESS_LOGGER:
            assert record.levelno == logging.INFO
            match = ACCESS_LINE.fullmatch(record.getMessage())
            assert match, record.getMessage()
            lines.append(match.groups())
    return lines


async def test_the_access_log_has_a_line_per_request_and_no_credential(make_client, caplog):
    caplog.set_level(logging.INFO)
    client = await make_client(access_log=True, company="logged")
    caller = client.credentials
    token = (await ok(client, "auth.login"))["token"]
    caplog.clear()

    await ok(client, "workers.register", {"worker": "w1"})  # Basic credentials
    bearer = {"Authorization": f"Bearer {token}"}
    await ok(client, "workers.get_count", {}, headers=bearer, method="GET")
    cookie = {"Authorization": "", "Cookie": f"clearml_token_basic={token}"}
    await ok(client, "workers.get_all", {}, headers=cookie)
    wrong = {"Authorization": basic_auth(caller.access_key, "not-the-secret")}
    answer = await client.post("/workers.get_count?expiration_sec=5", headers=wrong)
    assert answer.status == 401
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/static/no-such-file.js")).status == 404

    lines = access_lines(caplog)
    assert [(method, path, status, company) for _, method, path, status, _, company in lines] == [
        ("POST", "/workers.register", "200", caller.company_id),
        ("GET", "/workers.get_count", "200", caller.company_id),
        ("POST", "/workers.get_all", "200", caller.company_id),
        ("POST", "/workers.get_count", "401", "-"),  # the query is not written
        ("GET", "/healthz", "200", "-"),
        ("GET", "/static/no-such-file.js", "404", "-"),
    ]
    assert {address for address, *_ in lines} == {"127.0.0.1"}
    logged = caplog.text + "".join(str(record.args) for record in caplog.records)
    for secret in (caller.secret, token, basic_auth(caller.access_key, caller.secret), "not-the-secret"):
        assert secret not in logged


async def test_without_the_setting_nothing_is_logged_per_request(make_client, caplog):
    caplog.set_level(logging.DEBUG)
    client = await make_client()
    await ok(client, "workers.register", {"worker": "w1"})
    assert (await client.get("/healthz")).status == 200
    assert access_lines(caplog) == []


def _serve_and_interrupt(dsn: str, log_file, caller, env: dict) -> str:
    """Serve as in production, make two requests, then Ctrl-C: SIGINT to the server's
    process group, as a terminal sends it. Its log."""
    process, base = start_server(dsn, log_file, processes=2, env=env, own_group=True)
    try:
        wait_until_ready(base, process)
        headers = {"Authorization": basic_auth(caller.access_key, caller.secret)}
        status, _, _ = fetch(f"{base}/workers.register", "POST", b'{"worker": "served"}', headers)
        assert status == 200
        assert fetch(f"{base}/workers.get_count", "GET", None, headers)[0] == 200
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        stop_server(process)
    return log_file.read_text()


@pytest.mark.parametrize("access_log", [True, False])
async def test_serve_stops_quietly_on_ctrl_c(dsn, tmp_path, access_log):
    caller = await create_credentials(dsn, "served", "daemon")
    env = {"WORKERS_ACCESS_LOG": "1" if access_log else "0"}
    log = await asyncio.to_thread(_serve_and_interrupt, dsn, tmp_path / "server.log", caller, env)
    assert "Error while closing socket" not in log, log
    assert "Traceback" not in log and " ERROR " not in log and "[ERROR]" not in log, log
    assert "Shutting down: Master" in log
    served = [line for line in log.splitlines() if f" {ACCESS_LOGGER}: " in line]
    if access_log:  # gunicorn's processes log it too; /readyz is polled until the server is up
        requests = [line for line in served if "/readyz" not in line]
        assert len(requests) == 2, served
        assert re.search(rf"INFO {ACCESS_LOGGER}: 127\.0\.0\.1 POST /workers\.register 200 \S+ ms "
                         rf"company={caller.company_id}$", requests[0]), requests
        assert " GET /workers.get_count 200 " in requests[1]
        assert caller.secret not in log
    else:
        assert served == []
