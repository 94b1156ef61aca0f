"""The production command, `python -m server serve --processes N`: gunicorn with aiohttp's
uvloop worker, every process serving the whole API, and a clean drain on SIGTERM."""

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import create_credentials
from helpers import basic_auth, start_server, stop_server, wait_until_ready

PROCESSES = 2
REPORTS = 200


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.fixture
def server(dsn, tmp_path):
    """A server started as in production, on a free port; yields (process, base url)."""
    process, base = start_server(dsn, tmp_path / "server.log", processes=PROCESSES)
    yield process, base
    stop_server(process)


async def test_processes_serve_the_api_and_drain_on_sigterm(server, dsn, db_conn):
    process, base = server
    caller = await create_credentials(dsn, "served", "daemon")
    headers = {"Authorization": basic_auth(caller.access_key, caller.secret)}
    await asyncio.to_thread(wait_until_ready, base, process)
    # /readyz answers from the first process up; gunicorn spawns the others a moment apart.
    deadline = time.monotonic() + 30
    while True:
        children = _children(process.pid)
        refreshers = [pid for pid in children if b"rollups\x00refresh\x00--every" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        servers = [pid for pid in children if pid not in refreshers]
        if len(servers) >= PROCESSES or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert len(refreshers) == 1 and len(servers) == PROCESSES
    # The rollup refresher yields the CPU to the server processes.
    assert os.getpriority(os.PRIO_PROCESS, refreshers[0]) > os.getpriority(os.PRIO_PROCESS, servers[0])

    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(f"{base}/auth.login") as response:
            token = (await response.json())["data"]["token"]
        bearer = {"Authorization": f"Bearer {token}"}
        start = time.time() - 60

        async def report(i: int) -> int:
            body = {"worker": f"w{i % 10}", "timestamp": start + i / 100, "machine_stats": {"cpu_usage": [i]}}
            async with session.post(f"{base}/workers.status_report", json=body, headers=bearer) as response:
                return response.status

        statuses = await asyncio.gather(*(report(i) for i in range(REPORTS)))
        assert statuses == [200] * REPORTS
        async with session.post(f"{base}/workers.get_count", json={}, headers=bearer) as response:
            assert (await response.json())["data"]["count"] == 10

    process.send_signal(signal.SIGTERM)
    assert process.wait(40) == 0
    assert not Path(f"/proc/{refreshers[0]}").exists()
    stored = await db_conn.fetchval("SELECT count(*) FROM worker_stats WHERE company = $1", caller.company_id)
    assert stored == REPORTS


async def test_the_refresher_keeps_its_connection_and_makes_a_new_one_after_losing_it(dsn, db_conn, tmp_path):
    from server.background import REFRESHER_NAME

    process, base = start_server(dsn, tmp_path / "server.log", env={"WORKERS_ROLLUP_REFRESH_SECONDS": "0.2"})
    try:
        caller = await create_credentials(dsn, "refreshed", "daemon")
        await asyncio.to_thread(wait_until_ready, base, process)

        async def refresher_backends() -> list[int]:
            query = "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()"
            return [row["pid"] for row in await db_conn.fetch(query, REFRESHER_NAME)]

        async def backends_soon() -> list[int]:
            for _ in range(100):
                if pids := await refresher_backends():
                    return pids
                await asyncio.sleep(0.1)
            raise AssertionError("no refresher connection")

        first = await backends_soon()
        await asyncio.sleep(2)  # ten passes
        assert await refresher_backends() == first
        await db_conn.execute("SELECT pg_terminate_backend($1)", first[0])
        await asyncio.sleep(0.5)
        second = await backends_soon()
        assert second != first

        # Passes go on, on the new connection: a report of two minutes ago is rolled up.
        headers = {"Authorization": basic_auth(caller.access_key, caller.secret)}
        body = {"worker": "w1", "timestamp": (time.time() - 120) * 1000, "machine_stats": {"cpu_usage": [42.5]}}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.post(f"{base}/workers.status_report", json=body) as response:
                assert response.status == 200
        query = "SELECT max FROM worker_metric_rollup_1m WHERE company = $1 AND metric = 'cpu_usage'"
        for _ in range(100):
            if rows := await db_conn.fetch(query, caller.company_id):
                break
            await asyncio.sleep(0.1)
        assert [row["max"] for row in rows] == [42.5]
        assert await refresher_backends() == second
    finally:
        stop_server(process)
