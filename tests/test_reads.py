"""Heavy reads in reader processes (server/readers.py), admitted in turn (server/admission.py):
answered the same as in the server process, computed elsewhere at a lower priority, refused
with the documented errors when they wait too long, and seen in /metrics."""

import asyncio
import os

import asyncpg
import orjson
import pytest

from server import errors
from server.admission import ReadAdmission
from server.config import Settings
from server.errors import ApiError
from server.readers import Readers
from tests.helpers import call, now_ms, ok

# ------------------------------------------------------------------------- reads the tests hand to readers
# (module-level: a reader process imports them by name)


async def where_am_i(pool: asyncpg.Pool, settings: Settings, company: str, body: dict) -> dict:
    return {
        "pid": os.getpid(),
        "niceness": os.nice(0),
        "backend": await pool.fetchval("SELECT pg_backend_pid()"),
        "company": company,
        "body": body,
    }


async def refused(pool, settings, company, body) -> dict:
    raise ApiError(errors.INVALID_FIELD_VALUES, f"Invalid field values: {body['why']}")


async def slow(pool, settings, company, body) -> dict:
    await asyncio.sleep(body["seconds"])
    return {"slept": body["seconds"]}


def data_of(answer) -> dict:
    """What a read returned: the serialized bytes a reader sends, or the data itself."""
    return orjson.loads(orjson.dumps(answer))


# ------------------------------------------------------------------------- readers


@pytest.fixture
async def readers_of(dsn):
    made = []

    def make(**overrides):
        readers = Readers(Settings(**{"db_dsn": dsn, **overrides}))
        made.append(readers)
        return readers

    yield make
    for readers in made:
        readers.close()


async def test_a_read_runs_in_a_reader_process_at_the_read_niceness(readers_of, dsn):
    readers = readers_of(read_processes=1, read_nice=7)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        own_backend = await pool.fetchval("SELECT pg_backend_pid()")
        found = data_of(await readers.run(where_am_i, pool, "acme", {"x": [1, 2.5]}))
        again = data_of(await readers.run(where_am_i, pool, "acme", {}))
    finally:
        await pool.close()
    assert found["pid"] != os.getpid()
    assert found["niceness"] == os.nice(0) + 7
    assert found["backend"] != own_backend  # its own connection
    assert (found["company"], found["body"]) == ("acme", {"x": [1, 2.5]})
    assert again["pid"] == found["pid"]  # the reader is kept between reads


async def test_without_reader_processes_a_read_runs_here(readers_of, dsn):
    readers = readers_of(read_processes=0)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        found = data_of(await readers.run(where_am_i, pool, "acme", {}))
        assert found["backend"] == await pool.fetchval("SELECT pg_backend_pid()")
    finally:
        await pool.close()
    assert found["pid"] == os.getpid()


async def test_an_error_in_a_reader_reaches_the_client_as_raised(readers_of, dsn):
    readers = readers_of(read_processes=1)
    with pytest.raises(ApiError) as raised:
        await readers.run(refused, None, "acme", {"why": "no such range"})
    assert (raised.value.result_code, raised.value.result_subcode) == errors.INVALID_FIELD_VALUES
    assert raised.value.message == "Invalid field values: no such range"


async def test_a_database_out_of_reach_of_the_reader_is_unavailable(readers_of):
    readers = readers_of(read_processes=1, db_dsn="postgresql://postgres@127.0.0.1:9/none")
    with pytest.raises(ConnectionError):  # the protocol answers it 503, as any unreachable database
        await readers.run(where_am_i, None, "acme", {})


async def test_a_reader_that_dies_is_replaced(readers_of, dsn):
    readers = readers_of(read_processes=1)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        first = data_of(await readers.run(where_am_i, pool, "acme", {}))
        os.kill(first["pid"], 9)
        with pytest.raises(ApiError) as raised:
            for _ in range(50):  # the executor notices the death on its next use
                await readers.run(where_am_i, pool, "acme", {})
                await asyncio.sleep(0.1)
        assert (raised.value.result_code, raised.value.result_subcode) == errors.READS_BUSY
        second = data_of(await readers.run(where_am_i, pool, "acme", {}))
    finally:
        await pool.close()
    assert second["pid"] not in (first["pid"], os.getpid())


async def test_a_companys_reads_beyond_its_queue_are_refused_429(readers_of):
    readers = readers_of(read_processes=1, read_queue_per_company=1)
    running = asyncio.create_task(readers.run(slow, None, "acme", {"seconds": 1.0}))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(readers.run(slow, None, "acme", {"seconds": 0}))
    await asyncio.sleep(0.05)
    with pytest.raises(ApiError) as raised:
        await readers.run(slow, None, "acme", {"seconds": 0})
    assert (raised.value.result_code, raised.value.result_subcode) == errors.TOO_MANY_READS
    assert raised.value.retry_after > 0
    other = await readers.run(slow, None, "globex", {"seconds": 0})  # another company still queues
    assert data_of(other) == {"slept": 0}
    assert data_of(await running) == {"slept": 1.0}
    assert data_of(await waiting) == {"slept": 0}


# ------------------------------------------------------------------------- admission


async def test_companies_take_turns_for_a_slot():
    admission = ReadAdmission(slots=1, wait_seconds=5, per_company=10)
    order = []
    hold = asyncio.Event()

    async def read(company: str, number: int, wait: bool = False):
        async with admission.admitted(company):
            order.append(f"{company}{number}")
            if wait:
                await hold.wait()

    first = asyncio.create_task(read("a", 0, wait=True))
    await asyncio.sleep(0)
    queued = []
    for company, number in [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1), ("b", 2)]:
        queued.append(asyncio.create_task(read(company, number)))
        await asyncio.sleep(0)
    assert admission.waiting == 6
    hold.set()
    await asyncio.gather(first, *queued)
    assert order == ["a0", "a1", "b1", "c1", "a2", "b2", "a3"]
    assert admission.waiting == 0


async def test_a_read_that_waits_too_long_is_refused_503_and_frees_nothing_it_did_not_hold():
    admission = ReadAdmission(slots=1, wait_seconds=0.1, per_company=10)
    hold = asyncio.Event()

    async def holder():
        async with admission.admitted("a"):
            await hold.wait()

    holding = asyncio.create_task(holder())
    await asyncio.sleep(0)
    with pytest.raises(ApiError) as raised:
        async with admission.admitted("b"):
            pass
    assert (raised.value.result_code, raised.value.result_subcode) == errors.READS_BUSY
    assert raised.value.retry_after > 0
    # A waiting read that is cancelled (its client went away) leaves no trace either.
    cancelled = asyncio.create_task(holder())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    hold.set()
    await holding
    # Exactly one slot: two reads at once, the second waits for the first.
    events = []

    async def timed(name: str):
        async with admission.admitted(name):
            events.append(f"{name} in")
            await asyncio.sleep(0.02)
            events.append(f"{name} out")

    await asyncio.gather(timed("x"), timed("y"))
    assert events == ["x in", "x out", "y in", "y out"]


# ------------------------------------------------------------------------- through the API


async def _report_and_register(client, workers: int) -> None:
    now = now_ms()
    for number in range(workers):
        worker = f"reads-{number}"
        await ok(client, "workers.register", {"worker": worker, "timeout": 600})
        for step in range(3):
            stats = {"cpu_usage": [10.5 + number, 20.25 + step], "memory_used": 1000 + number * 7.125}
            await ok(client, "workers.status_report", {"worker": worker, "timestamp": now - (2 - step) * 20_000,
                                                        "machine_stats": stats, "task": "t" if step else None})  # fmt: skip


async def test_answers_are_the_same_from_a_reader_and_from_the_server_process(make_client):
    in_reader = await make_client(company="same-answers", read_processes=1)
    in_server = await make_client(company="same-answers", read_processes=0)
    await _report_and_register(in_reader, 4)
    now = now_ms() / 1000
    stats_body = {"from_date": now - 3600, "to_date": now + 60, "interval": 60,
                  "items": [{"key": "cpu_usage", "aggregation": "max"}, {"key": "memory_used", "aggregation": "avg"}],
                  "split_by_variant": True}  # fmt: skip
    activity_body = {"from_date": now - 3600, "to_date": now + 60, "interval": 60}
    for endpoint, body in [
        ("workers.get_stats", stats_body),
        ("workers.get_activity_report", activity_body),
        ("workers.get_all", {}),
    ]:
        from_reader = await ok(in_reader, endpoint, body)
        from_server = await ok(in_server, endpoint, body)
        assert from_reader == from_server, endpoint
    stats = await ok(in_reader, "workers.get_stats", stats_body)
    assert len(stats["workers"]) == 4
    assert sum(1 for worker in (await ok(in_reader, "workers.get_all", {}))["workers"]) == 4


async def test_an_invalid_read_is_refused_before_it_queues(make_client):
    client = await make_client(read_processes=1)
    now = now_ms() / 1000
    code, subcode, message, _ = await call(
        client, "workers.get_stats", {"from_date": now, "to_date": now - 60, "interval": 60, "items": [{"key": "cpu_usage", "aggregation": "max"}]}
    )
    assert (code, subcode) == errors.INVALID_FIELD_VALUES
    assert "from_date" in message


async def test_metrics_show_the_event_loop_lag_and_the_reads_refused(make_client):
    client = await make_client(read_processes=1)
    await asyncio.sleep(0.35)  # a few samples of the event loop's lag
    text = await (await client.get("/metrics")).text()
    count = next(line for line in text.splitlines() if line.startswith("workers_event_loop_lag_seconds_count"))
    assert float(count.split()[-1]) >= 2
    assert 'workers_reads_refused_total{cause="waited_too_long"} 0.0' in text
    assert 'workers_reads_refused_total{cause="company_queue_full"} 0.0' in text
    assert "workers_reads_waiting 0.0" in text
