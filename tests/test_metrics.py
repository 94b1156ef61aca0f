"""Prometheus metrics at /metrics, and the health checks /healthz and /readyz."""

import asyncio
import os

import asyncpg
import pytest
from conftest import create_credentials
from helpers import (
    basic_auth, call, fetch, free_port, health_fleet, now_ms, ok, start_server, stop_server, wait_until_ready,
)  # fmt: skip
from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value}"""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(client, **headers) -> dict[tuple, float]:
    response = await client.get("/metrics", headers=headers)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples(await response.text())


def requests_of(found: dict, endpoint: str, code: int) -> float:
    return found.get(("workers_requests_total", (("code", str(code)), ("endpoint", endpoint))), 0)


def report(worker: str) -> dict:
    return {"worker": worker, "timestamp": now_ms(), "machine_stats": {"cpu_usage": [10, 20], "memory_used": 1024}}


async def test_counters_move_with_the_calls(make_client):
    client = await make_client()
    before = await scrape(client)  # open: no credentials needed by default
    for index in range(5):
        await ok(client, "workers.status_report", report(f"w{index % 2}"))
    await ok(client, "workers.get_all", {})
    await call(client, "workers.get_stats", {"items": []})  # 400/11
    await call(client, "workers.no_such_thing", {})  # 400/1
    found = await scrape(client)
    assert requests_of(found, "workers.status_report", 200) - requests_of(before, "workers.status_report", 200) == 5
    assert requests_of(found, "workers.get_all", 200) == 1
    assert requests_of(found, "workers.get_stats", 400) == 1
    assert requests_of(found, "unknown", 400) == 1  # a path a client made up is never a label
    duration = ("workers_request_duration_seconds_count", (("endpoint", "workers.status_report"),))
    assert found[duration] == 5
    assert found[("workers_reports_stored_total", ())] == 5
    assert found[("workers_writer_batch_size_count", ())] >= 1
    assert found[("workers_writer_batch_size_sum", ())] == 5
    assert found[("workers_writer_commit_duration_seconds_count", ())] == found[("workers_writer_batch_size_count", ())]
    assert found[("workers_writer_queue_depth", ())] == 0
    for cause in ("queue_full", "database_down", "not_stored_in_time", "shutting_down"):
        assert found[("workers_reports_unavailable_total", (("cause", cause),))] == 0


async def test_live_registered_workers(make_client, db_conn):
    client = await make_client()
    for worker in ("a", "b", "c"):
        await ok(client, "workers.register", {"worker": worker})
    await ok(client, "workers.register", {"worker": "gone", "timeout": 1})
    await asyncio.sleep(1.5)  # past "gone"'s timeout, and several expiry sweeps (0.2 s in tests)
    found = await scrape(client)
    assert found[("workers_registered_workers", ())] == 3


HEALTH = ("workers_registered_workers", "workers_silent_workers", "workers_gpus", "workers_idle_gpus")


async def swept(client, wanted: dict) -> dict:
    """A scrape once the expiry sweep (every 0.2 s in tests) has counted what is wanted."""
    for _ in range(50):
        found = await scrape(client)
        if all(found.get(key) == value for key, value in wanted.items()):
            return found
        await asyncio.sleep(0.1)
    return found


async def test_silent_workers_and_idle_gpus(make_client, db_conn):
    client = await make_client()
    await health_fleet(client, db_conn)
    counts = {(name, ()): value for name, value in zip(HEALTH, (4, 1, 5, 3))}
    found = await swept(client, counts)
    # live 4; silent: dead; GPUs 2 + 2 + 1; idle: idle's two and busy's GPU 1 (dead's is not known)
    assert {key: found.get(key) for key in counts} == counts
    assert not any(name.startswith("workers_company_") for name, _ in found)  # not per company by default


async def test_health_counts_per_company(make_client, db_conn):
    client = await make_client(company="first", metrics_per_company=True)
    other = await make_client(company="second", metrics_per_company=True)
    await health_fleet(client, db_conn)
    await ok(other, "workers.status_report", {"worker": "w", "timestamp": now_ms(), "machine_stats": {"gpu_usage": [3]}})
    first, second = client.credentials.company_id, other.credentials.company_id

    def per_company(company: str, values: tuple) -> dict:
        return {(name.replace("workers_", "workers_company_"), (("company", company),)): value
                for name, value in zip(HEALTH, values)}  # fmt: skip

    wanted = {**per_company(first, (4, 1, 5, 3)), **per_company(second, (1, 0, 1, 0))}
    wanted.update({(name, ()): value for name, value in zip(HEALTH, (5, 1, 6, 3))})
    found = await swept(client, wanted)
    assert {key: found.get(key) for key in wanted} == wanted
    assert len([name for name, _ in found if name.startswith("workers_company_")]) == 8  # 4 per company
    await ok(other, "workers.unregister", {"worker": "w"})  # a company without workers: its counts 0
    found = await swept(client, per_company(second, (0, 0, 0, 0)))
    assert {key: found.get(key) for key in per_company(second, (0, 0, 0, 0))} == per_company(second, (0, 0, 0, 0))


async def test_reports_answered_503_when_the_queue_is_full(make_client):
    client = await make_client(writer_queue_limit=0)
    for _ in range(3):
        code, _, message, _ = await call(client, "workers.status_report", report("w"))
        assert code == 503, message
    found = await scrape(client)
    assert found[("workers_reports_unavailable_total", (("cause", "queue_full"),))] == 3
    assert requests_of(found, "workers.status_report", 503) == 3
    assert found[("workers_reports_stored_total", ())] == 0


async def test_reports_answered_503_when_not_stored_in_time(make_client, dsn):
    client = await make_client(writer_answer_timeout=0.5)
    await ok(client, "workers.status_report", report("w"))
    locker = await asyncpg.connect(dsn)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE worker_registrations IN ACCESS EXCLUSIVE MODE")
            code, _, message, _ = await call(client, "workers.status_report", report("w"))
            assert code == 503 and "not stored within" in message
    finally:
        await locker.close()
    found = await scrape(client)
    assert found[("workers_reports_unavailable_total", (("cause", "not_stored_in_time"),))] == 1


async def test_metrics_may_require_credentials(make_client):
    client = await make_client(authenticated=False, metrics_credentials=True)
    code, subcode, _, _ = await call(client, "metrics", method="GET")
    assert (code, subcode) == (401, 20)
    caller = client.credentials
    await scrape(client, Authorization=basic_auth(caller.access_key, caller.secret))


async def test_metrics_off(make_client):
    client = await make_client(metrics=False)
    await ok(client, "workers.status_report", report("w"))
    code, subcode, _, _ = await call(client, "metrics", method="GET")
    assert (code, subcode) == (400, 1)


async def test_health_checks(make_client, db_conn):
    client = await make_client(authenticated=False)
    for path in ("/healthz", "/readyz"):
        response = await client.get(path)
        assert response.status == 200, await response.text()
    ready = await (await client.get("/readyz")).json()
    assert ready == {"status": "ready", "checks": {"database": "ok", "migrations": "ok", "writer": "ok"}}
    last = await db_conn.fetchrow("SELECT * FROM schema_migrations ORDER BY version DESC LIMIT 1")
    await db_conn.execute("DELETE FROM schema_migrations WHERE version = $1", last["version"])
    try:
        response = await client.get("/readyz")
        assert response.status == 503
        assert (await response.json())["checks"]["migrations"] == f"pending: {last['name']}"
        assert (await client.get("/healthz")).status == 200  # the process still answers
    finally:
        await db_conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)", *last.values()
        )
    assert (await client.get("/readyz")).status == 200


@pytest.mark.parametrize("separate_bind", [False, True], ids=["on the API port", "on a bind of its own"])
async def test_every_process_is_counted(dsn, tmp_path, separate_bind):
    """Two server processes: every scrape, whichever process answers it, sums both."""
    metrics_port = free_port()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    if separate_bind:
        env["WORKERS_METRICS_BIND"] = f"127.0.0.1:{metrics_port}"
    process, base = start_server(dsn, tmp_path / "server.log", processes=2, env=env)
    try:
        await asyncio.to_thread(wait_until_ready, base, process)
        caller = await create_credentials(dsn, "metered", "daemon")
        headers = {"Authorization": basic_auth(caller.access_key, caller.secret), "Connection": "close"}

        def send(index: int) -> int:
            body = f'{{"worker": "w{index}", "timestamp": {now_ms()}}}'.encode()
            return fetch(f"{base}/workers.status_report", "POST", body, headers)[0]

        # A new connection each: the kernel spreads them over both processes' sockets.
        assert await asyncio.gather(*(asyncio.to_thread(send, index) for index in range(40))) == [200] * 40
        files = {name.rsplit("_", 1)[1] for name in os.listdir(tmp_path / "metrics") if name.startswith("counter_")}
        assert len(files) == 2, files  # both processes counted some
        url = f"http://127.0.0.1:{metrics_port}/metrics" if separate_bind else f"{base}/metrics"
        for _ in range(6):
            status, _, text = await asyncio.to_thread(fetch, url)
            assert status == 200
            found = samples(text.decode())
            assert found[("workers_reports_stored_total", ())] == 40
            assert requests_of(found, "workers.status_report", 200) == 40
        if separate_bind:
            status, _, _ = await asyncio.to_thread(fetch, f"{base}/metrics")
            assert status == 400  # not on the API's port then
    finally:
        stop_server(process)
