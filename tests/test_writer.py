"""The batching writer: every 200 is stored, 503 when it cannot be, drained on shutdown."""

import asyncio
import socket
import time

import asyncpg
import pytest
from helpers import basic_auth, call, now_ms, ok, set_database_open

from server.errors import ApiError
from server.storage import tenants
from server.storage.writer import Report, ReportWriter


@pytest.fixture
async def company(db_conn) -> str:
    """The company that the writer-level tests' reports belong to."""
    return await tenants.company_named(db_conn, "writers")


def _report(company: str, worker: str, moment: float, **fields) -> Report:
    defaults = dict(
        company=company,
        worker=worker,
        user_id="writer",
        ip=None,
        timeout=600,
        time=moment,
        task=None,
        queue=None,
        queues=None,
        tags=None,
        system_tags=None,
        metrics={"cpu_usage": {"0": 1.0}},
    )
    return Report(**{**defaults, **fields})


def _closed_port_dsn() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"postgresql://postgres@127.0.0.1:{port}/workers"


async def test_concurrent_reports_are_all_stored(client, db_conn):
    start = time.time() - 600
    reports = [
        {"worker": f"w{i % 20}", "timestamp": start + i / 10, "machine_stats": {"cpu_usage": [i, i + 0.5]}}
        for i in range(300)
    ]
    results = await asyncio.gather(*(call(client, "workers.status_report", body) for body in reports))
    assert all(result[:2] == (200, 0) for result in results)
    rows = await db_conn.fetch("SELECT extract(epoch FROM time) AS t, worker, metrics FROM worker_stats")
    assert len(rows) == 300
    stored = {(row["worker"], round(float(row["t"]), 3)): row["metrics"] for row in rows}
    for i, body in enumerate(reports):
        assert stored[(body["worker"], round(body["timestamp"], 3))] == f'{{"cpu_usage": {{"0": {i}, "1": {i + 0.5}}}}}'
    assert await db_conn.fetchval("SELECT count(*) FROM worker_registrations") == 20


async def test_clients_waiting_for_their_answers_are_not_held_back_by_the_gather(dsn, db_conn, company):
    """40 clients each send their next report once the last is stored: enough reports wait
    at once for the writer to take them without waiting out its gather (a whole second here),
    and every one is stored."""
    writer = ReportWriter(dsn, gather=1.0)
    await writer.start()
    start = time.time() - 600

    async def client(number: int) -> None:
        for sent in range(5):
            await writer.write(_report(company, f"c{number}", start + sent))

    try:
        began = time.monotonic()
        await asyncio.gather(*(client(number) for number in range(40)))
        elapsed = time.monotonic() - began
    finally:
        await writer.close()
    assert elapsed < 2.5, f"5 rounds of 40 reports took {elapsed:.1f} s: the writer waited out its gather"
    assert await db_conn.fetchval("SELECT count(*) FROM recent_reports") + await db_conn.fetchval(
        "SELECT count(*) FROM late_reports") == 200


async def test_reports_of_one_worker_in_one_batch_merge_their_registration_updates(dsn, db_conn, company):
    writer = ReportWriter(dsn, gather=0.2)
    await writer.start()
    moment = time.time()
    try:
        await asyncio.gather(
            writer.write(_report(company, "w1", moment, tags=["first"], queues=["q"])),
            writer.write(_report(company, "w1", moment + 1, task="t2")),
        )
    finally:
        await writer.close()
    row = await db_conn.fetchrow("SELECT tags, queues, task FROM worker_registrations WHERE worker = 'w1'")
    assert (row["tags"], row["queues"], row["task"]) == (["first"], ["q"], "t2")
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stats") == 2


async def _metric_keys(db_conn) -> dict[tuple[str, str], float]:
    rows = await db_conn.fetch("SELECT worker, metric, extract(epoch FROM last_reported) AS t FROM worker_metric_keys")
    return {(row["worker"], row["metric"]): float(row["t"]) for row in rows}


async def test_metric_keys_are_written_when_new_and_refreshed_hourly(dsn, db_conn, company):
    writer = ReportWriter(dsn)
    await writer.start()
    start = time.time() - 7200
    try:
        await writer.write(_report(company, "w1", start, metrics={"cpu_usage": {"0": 1.0}}))
        # Two reports in one batch, each with a metric the other lacks.
        await asyncio.gather(
            writer.write(_report(company, "w1", start + 10, metrics={"gpu_usage": {"0": 2.0}})),
            writer.write(
                _report(company, "w1", start + 20, metrics={"cpu_usage": {"0": 1.0}, "memory_used": {"total": 3.0}})
            ),
        )
        assert await _metric_keys(db_conn) == {
            ("w1", "cpu_usage"): pytest.approx(start),
            ("w1", "gpu_usage"): pytest.approx(start + 10),
            ("w1", "memory_used"): pytest.approx(start + 20),
        }
        # Known keys within the hour are not written again...
        await writer.write(_report(company, "w1", start + 60, metrics={"cpu_usage": {"0": 1.0}}))
        assert (await _metric_keys(db_conn))[("w1", "cpu_usage")] == pytest.approx(start)
        # ...after it, the keys the report carries are.
        await writer.write(_report(company, "w1", start + 3700, metrics={"cpu_usage": {"0": 1.0}}))
        keys = await _metric_keys(db_conn)
        assert keys[("w1", "cpu_usage")] == pytest.approx(start + 3700)
        assert keys[("w1", "gpu_usage")] == pytest.approx(start + 10)
    finally:
        await writer.close()


async def test_a_report_the_database_rejects_does_not_fail_the_others(dsn, db_conn, company):
    writer = ReportWriter(dsn, gather=0.2)
    await writer.start()
    moment = time.time()
    try:
        results = await asyncio.gather(
            writer.write(_report(company, "good-1", moment)),
            writer.write(_report(company, "bad\x00worker", moment)),
            writer.write(_report(company, "good-2", moment)),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], Exception)
    workers = {row["worker"] for row in await db_conn.fetch("SELECT worker FROM worker_stats")}
    assert workers == {"good-1", "good-2"}


async def test_unreachable_database_answers_503_promptly():
    writer = ReportWriter(_closed_port_dsn(), answer_timeout=5, retry_delay=30)
    await writer.start()
    try:
        started = time.monotonic()
        with pytest.raises(ApiError) as first:
            await writer.write(_report("unreachable", "w1", time.time()))
        assert first.value.result_code == 503
        with pytest.raises(ApiError) as second:  # known to be down: refused without trying
            await writer.write(_report("unreachable", "w1", time.time()))
        assert second.value.result_code == 503
        assert time.monotonic() - started < 3
    finally:
        await writer.close()


class _BrokenConnection:
    """A connection that the server closed (shutting down) between two of asyncpg's reads:
    asyncpg refuses the next statement with InternalClientError (seen in the fault run)."""

    terminated = False

    def is_closed(self) -> bool:
        return False

    async def execute(self, *args, **kwargs):
        raise asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")

    def terminate(self) -> None:
        self.terminated = True


async def test_a_connection_left_broken_answers_503_and_is_replaced(dsn, db_conn, company):
    writer = ReportWriter(dsn, connections=1, retry_delay=0.1)
    await writer.start()
    moment = time.time()
    try:
        await writer.write(_report(company, "w1", moment))
        healthy, broken = writer._connections[0], _BrokenConnection()
        await healthy.close()
        writer._connections[0] = broken
        with pytest.raises(ApiError) as refused:
            await writer.write(_report(company, "w1", moment + 1))
        assert refused.value.result_code == 503
        assert broken.terminated
        await asyncio.sleep(0.2)
        await writer.write(_report(company, "w1", moment + 2))
    finally:
        await writer.close()
    stored = await db_conn.fetch("SELECT extract(epoch FROM time) AS t FROM worker_stats ORDER BY time")
    assert [float(row["t"]) for row in stored] == [pytest.approx(moment), pytest.approx(moment + 2)]


async def test_full_queue_answers_503(dsn, db_conn, company):
    writer = ReportWriter(dsn, gather=0.5, queue_limit=2)
    await writer.start()
    moment = time.time()
    try:
        waiting = [asyncio.create_task(writer.write(_report(company, f"w{i}", moment))) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as refused:
            await writer.write(_report(company, "w-extra", moment))
        assert refused.value.result_code == 503
        await asyncio.gather(*waiting)
    finally:
        await writer.close()
    workers = {row["worker"] for row in await db_conn.fetch("SELECT worker FROM worker_stats")}
    assert workers == {"w0", "w1"}


async def test_close_drains_accepted_reports(dsn, db_conn, company):
    writer = ReportWriter(dsn, gather=1.0)
    await writer.start()
    moment = time.time()
    pending = [asyncio.create_task(writer.write(_report(company, f"w{i}", moment))) for i in range(50)]
    await asyncio.sleep(0.05)
    await writer.close()
    await asyncio.gather(*pending)
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stats") == 50
    with pytest.raises(ApiError) as refused:
        await writer.write(_report(company, "late", moment))
    assert refused.value.result_code == 503


async def test_status_report_answers_503_when_the_database_is_down(client, db_conn, monkeypatch):
    async def refuse(self, slot):
        raise ConnectionRefusedError("database down")

    monkeypatch.setattr(ReportWriter, "_connect", refuse)
    body = {"worker": "w1", "timestamp": now_ms(), "machine_stats": {"cpu_usage": 5}}
    response = await client.post("/workers.status_report", json=body)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    code, subcode, message, _ = await call(client, "workers.status_report", body)
    assert code == 503
    assert "retry" in message
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stats") == 0
    await ok(client, "workers.get_count", {})


async def test_a_database_refusing_connections_answers_503_then_recovers(make_client, dsn, db_conn):
    # As during maintenance: the database exists but takes no connections (SQLSTATE 55000).
    client = await make_client(authenticated=False)
    caller = client.credentials
    token = (await ok(client, "auth.login", headers={"Authorization": basic_auth(caller.access_key, caller.secret)}))[
        "token"
    ]
    bearer = {"Authorization": f"Bearer {token}"}
    report = {"worker": "w1", "timestamp": now_ms(), "machine_stats": {"cpu_usage": 5}}
    await ok(client, "workers.status_report", report, headers=bearer)
    await set_database_open(dsn, False, keep_pid=db_conn.get_server_pid())
    try:
        await asyncio.sleep(0.2)
        for endpoint, body in (
            ("workers.get_all", {}),
            ("workers.register", {"worker": "w2"}),
            ("workers.status_report", {**report, "timestamp": now_ms()}),
        ):
            code, _, message, _ = await call(client, endpoint, body, headers=bearer)
            assert code == 503, (endpoint, message)
        not_ready = await client.get("/readyz")
        assert not_ready.status == 503
        assert (await not_ready.json())["checks"]["database"].startswith("unavailable")
    finally:
        await set_database_open(dsn, True)
    await asyncio.sleep(1.2)  # the writer tries the database again after a second
    await ok(client, "workers.status_report", {**report, "timestamp": now_ms()}, headers=bearer)
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stats") == 2
    assert (await client.get("/readyz")).status == 200
    metrics = await (await client.get("/metrics")).text()
    assert 'workers_reports_unavailable_total{cause="database_down"} 1.0' in metrics
    assert 'workers_database_errors_total{kind="unavailable"}' in metrics
    assert 'workers_database_errors_total{kind="unavailable"} 0.0' not in metrics
