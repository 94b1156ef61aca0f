"""`python -m server demo-fleet`, the quick start's simulated daemons, against a test server:
with the credentials the quick start makes (`credentials ensure`), its workers register
with their queues and tags, report agent-shaped statistics once per period each, spread
over the period, and unregister on SIGTERM."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import basic_auth, ok

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 4
PERIOD = 1.0


async def test_demo_fleet_registers_reports_and_unregisters(make_client, dsn, db_conn, tmp_path):
    client = await make_client()
    credentials = tmp_path / "credentials"
    env = {**os.environ, "WORKERS_DB_DSN": dsn}
    made = subprocess.run([sys.executable, "-m", "server", "credentials", "ensure", "--file", str(credentials),
                           "--company", "local"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = dict(line.split(None, 1) for line in credentials.read_text().splitlines())
    local = {"Authorization": basic_auth(key["access_key"].strip(), key["secret_key"].strip())}

    output = tmp_path / "demo.log"
    fleet = subprocess.Popen(
        [sys.executable, "-m", "server", "demo-fleet", "--workers", str(WORKERS), "--period", str(PERIOD),
         "--url", str(client.make_url("")), "--credentials", str(credentials)],
        cwd=ROOT, env=env, stdout=open(output, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        async def reports_per_worker() -> dict[str, int]:
            rows = await db_conn.fetch("SELECT worker, count(*) FROM worker_stats GROUP BY worker")
            return {row["worker"]: row["count"] for row in rows}

        deadline = time.monotonic() + 30
        while len(counts := await reports_per_worker()) < WORKERS or min(counts.values()) < 3:
            assert fleet.poll() is None and time.monotonic() < deadline, output.read_text()
            await asyncio.sleep(0.2)

        workers = (await ok(client, "workers.get_all", {"last_seen": 0}, headers=local))["workers"]
        assert len(workers) == WORKERS
        for worker in workers:
            assert worker["tags"][0] == "demo" and "default" in [queue["id"] for queue in worker["queues"]], worker
        assert await ok(client, "workers.get_all", {"last_seen": 0}) == {"workers": []}  # company "local" only

        # Agent-shaped reports, one per period each, the fleet's spread over the period.
        rows = await db_conn.fetch(
            "SELECT worker, extract(epoch FROM time)::float8 AS time, task, metrics FROM worker_stats ORDER BY time"
        )
        for row in rows:
            metrics = json.loads(row["metrics"])
            assert len(metrics["cpu_usage"]) in (4, 8, 16, 32) and "total" in metrics["memory_used"], metrics
            assert len(metrics.get("gpu_usage", {})) == len(metrics.get("gpu_memory_used", {})) <= 4, metrics
        times = {}
        for row in rows:
            times.setdefault(row["worker"], []).append(row["time"])
        for worker, reported in times.items():
            gaps = [later - earlier for earlier, later in zip(reported, reported[1:])]
            assert all(0.5 * PERIOD < gap < 2.5 * PERIOD for gap in gaps), (worker, gaps)
        phases = sorted(reported[0] % PERIOD for reported in times.values())
        assert max(phases) - min(phases) > PERIOD / 4, phases

        now = int(time.time())
        chart = await ok(client, "workers.get_stats", {
            "from_date": now - 30, "to_date": now + 1, "interval": 1,
            "items": [{"key": "cpu_usage", "aggregation": "max"}],
        }, headers=local)
        assert sorted(series["worker"] for series in chart["workers"]) == sorted(times)

        fleet.send_signal(signal.SIGTERM)  # it unregisters through this event loop's server: no blocking wait
        deadline = time.monotonic() + 20
        while fleet.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert fleet.returncode == 0, output.read_text()
    finally:
        if fleet.poll() is None:
            os.killpg(fleet.pid, signal.SIGKILL)
            fleet.wait(5)
    assert f"{WORKERS} of {WORKERS} demo workers unregistered" in output.read_text()
    assert (await ok(client, "workers.get_all", {"last_seen": 0}, headers=local)) == {"workers": []}


@pytest.mark.parametrize("contents", ["", "access_key ONLY\n"])
def test_demo_fleet_without_credentials_fails_clearly(tmp_path, contents):
    credentials = tmp_path / "credentials"
    credentials.write_text(contents)
    done = subprocess.run([sys.executable, "-m", "server", "demo-fleet", "--credentials", str(credentials)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "no access_key and secret_key" in done.stderr, done.stderr
