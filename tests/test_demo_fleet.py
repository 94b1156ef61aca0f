"""`python -m server demo-fleet`, the quick start's simulated daemons, against a test server:
with the credentials the quick start makes (`credentials ensure`), its workers register
with their queues and tags, report agent-shaped statistics once per period each, spread
over the period, and unregister on SIGTERM. And the agent-shaped machines themselves
(server/demo.py's Machine, which bench/history.py's histories are made of), over hours of
simulated time."""

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import basic_auth, ok

from server import demo

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
            rows = await db_conn.fetch("SELECT worker, count(DISTINCT time) FROM worker_stat_points GROUP BY worker")
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
            "SELECT worker, extract(epoch FROM time)::float8 AS time, metric, variant FROM worker_stat_points"
        )
        reports = defaultdict(lambda: defaultdict(set))  # (worker, time) -> metric -> variants
        for row in rows:
            reports[row["worker"], row["time"]][row["metric"]].add(row["variant"])
        for metrics in reports.values():
            assert len(metrics["cpu_usage"]) in demo.CORES[0] and metrics["memory_used"] == {"total"}, metrics
            assert len(metrics["gpu_usage"]) == len(metrics["gpu_memory_used"]) in demo.GPUS[0], metrics
        times = defaultdict(list)
        for worker, moment in sorted(reports, key=lambda report: report[1]):
            times[worker].append(moment)
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


# --- the agent-shaped machines ------------------------------------------------------------

HOURS = 6
STEP = 10.0  # seconds between reports, as bench/history.py's default period


def simulated(machine: demo.Machine, start: float = 1_765_000_000.0) -> list[dict]:
    return [machine.report(start + index * STEP) for index in range(int(HOURS * 3600 / STEP))]


def three_decimals(value: float) -> bool:
    return isinstance(value, float) and round(value, 3) == value


def test_machines_are_deterministic_for_a_seed():
    first, again, other = demo.fleet(6, seed=7, period=STEP), demo.fleet(6, seed=7, period=STEP), demo.fleet(6, seed=8)
    assert [simulated(machine)[:50] for machine in first] == [simulated(machine)[:50] for machine in again]
    assert [machine.worker for machine in first] == [machine.worker for machine in again]
    assert [simulated(machine)[:5] for machine in first] != [simulated(machine)[:5] for machine in other]
    assert all(re.fullmatch(r"demo-00[1-6]:(cpu|gpu):0", machine.worker) for machine in first)


def test_reports_are_agent_shaped():
    machines = demo.fleet(12, seed=3, period=STEP)
    assert {machine.cores for machine in machines} <= set(demo.CORES[0])
    assert {machine.gpus for machine in machines} <= set(demo.GPUS[0]) and any(machine.gpus for machine in machines)
    busy_cpu, idle_cpu, idle_network, task_runs = [], [], [], 0
    for machine in machines:
        assert machine.memory_mb // 1024 in demo.MEMORY_GIB and machine.gpu_memory_mb in demo.GPU_MEMORY_MIB
        reports = simulated(machine)
        tasks = [report["task"] for report in reports]
        task_runs += sum(1 for earlier, later in zip(tasks, tasks[1:]) if later != earlier)
        assert all(task is None or re.fullmatch(r"[0-9a-f]{32}", task) for task in tasks)
        for report in reports:
            stats = report["machine_stats"]
            cpu = stats["cpu_usage"]
            assert len(cpu) == machine.cores and all(0 <= value <= 100 and three_decimals(value) for value in cpu)
            assert three_decimals(stats["cpu_temperature"]) and 30 < stats["cpu_temperature"] < 100
            assert all(three_decimals(stats[key]) and stats[key] >= 0 for key in (
                "memory_used", "memory_free", "disk_read", "disk_write", "network_rx", "network_tx"))  # fmt: skip
            assert stats["memory_used"] + stats["memory_free"] < machine.memory_mb
            assert round(100 - stats["disk_free_home"], 1) == round(100 - stats["disk_free_home"], 3)
            gpu = {key: stats.get(key, []) for key in ("gpu_usage", "gpu_temperature", "gpu_memory_used", "gpu_memory_free")}
            assert all(len(values) == machine.gpus and all(type(value) is int for value in values) for values in gpu.values())
            assert [used + free for used, free in zip(gpu["gpu_memory_used"], gpu["gpu_memory_free"])] == [
                machine.gpu_memory_mb] * machine.gpus  # fmt: skip
            assert report["queue"] == (machine.queues[0] if report["task"] else None)
            (busy_cpu if report["task"] else idle_cpu).append(statistics.fmean(cpu))
            if not report["task"]:
                idle_network.append(stats["network_rx"])
        # Values move as load does, neither noise nor constants: from one report to the next
        # the memory used changes, but by far less than over the hours.
        used = [report["machine_stats"]["memory_used"] for report in reports]
        steps = [abs(later - earlier) for earlier, later in zip(used, used[1:])]
        assert len(set(used)) > len(used) / 2 and statistics.median(steps) < (max(used) - min(used)) / 20
        if machine.gpus:
            held = [report["machine_stats"]["gpu_memory_used"] for report in reports if report["task"]]
            kept = [earlier == later for reported, next_reported in zip(held, held[1:])
                    for earlier, later in zip(reported, next_reported)]  # fmt: skip
            assert sum(kept) > 0.8 * len(kept)  # per GPU: stable while a task holds its allocation
    assert task_runs >= len(machines)  # tasks start and finish: busy for minutes to hours, idle between
    assert statistics.fmean(busy_cpu) > statistics.fmean(idle_cpu) + 20 and statistics.median(idle_cpu) < 3
    assert statistics.median(idle_network) < 0.01
