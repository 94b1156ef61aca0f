"""Registrations: register, unregister, status_report's updates, expiry, filters, tenancy."""

import asyncio
import time
from datetime import datetime, timedelta, timezone

import pytest
from helpers import call, now_ms, ok, table_snapshot


async def _workers(client, body=None) -> dict:
    data = await ok(client, "workers.get_all", body or {})
    return {worker["id"]: worker for worker in data["workers"]}


async def _count(client, body=None) -> int:
    return (await ok(client, "workers.get_count", body or {}))["count"]


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_register_records_the_registration(client):
    before = datetime.now(timezone.utc)
    await ok(
        client,
        "workers.register",
        {"worker": "w1", "queues": ["q1", "q2"], "tags": ["gpu"], "system_tags": ["daemon"]},
    )
    worker = (await _workers(client))["w1"]
    caller = client.credentials
    assert worker["key"] == f"worker_{caller.company_id}_w1"
    assert worker["user"] == {"id": caller.user_id, "name": "tester"}
    assert worker["company"] == {"id": caller.company_id, "name": "default"}
    assert worker["ip"] == "127.0.0.1"
    assert worker["register_timeout"] == 600
    assert worker["queues"] == [{"id": "q1"}, {"id": "q2"}]
    assert worker["tags"] == ["gpu"]
    assert worker["system_tags"] == ["daemon"]
    assert worker["task"] is None and worker["queue"] is None and worker["last_report_time"] is None
    registered = _parse(worker["register_time"])
    assert registered.tzinfo is not None
    assert abs(registered - before) < timedelta(seconds=5)
    assert worker["last_activity_time"] == worker["register_time"]


@pytest.mark.parametrize(("sent", "stored"), [(None, 600), (0, 600), (30, 30)])
async def test_register_timeout_defaults_to_the_configured_one(client, sent, stored):
    body = {"worker": "w1"} if sent is None else {"worker": "w1", "timeout": sent}
    await ok(client, "workers.register", body)
    assert (await _workers(client))["w1"]["register_timeout"] == stored


async def test_register_again_replaces_the_registration(client):
    await ok(client, "workers.register", {"worker": "w1", "tags": ["a"], "timeout": 100})
    await ok(client, "workers.status_report", {"worker": "w1", "timestamp": now_ms(), "task": "t1"})
    await ok(client, "workers.register", {"worker": "w1", "tags": ["b"]})
    worker = (await _workers(client))["w1"]
    assert worker["tags"] == ["b"]
    assert worker["register_timeout"] == 600
    assert worker["task"] is None


async def test_unregister_removes_the_worker(client):
    await ok(client, "workers.register", {"worker": "w1"})
    await ok(client, "workers.register", {"worker": "w2"})
    await ok(client, "workers.unregister", {"worker": "w1"})
    assert list(await _workers(client)) == ["w2"]


async def test_unregister_of_unknown_worker_is_accepted_by_default(client):
    assert await ok(client, "workers.unregister", {"worker": "ghost"}) == {}


async def test_unregister_of_unknown_worker_fails_without_auto_unregister(make_client):
    client = await make_client(auto_unregister=False)
    code, subcode, message, _ = await call(client, "workers.unregister", {"worker": "ghost"})
    assert (code, subcode) == (400, 1004)
    assert "ghost" in message
    await ok(client, "workers.register", {"worker": "w1"})
    await ok(client, "workers.unregister", {"worker": "w1"})


async def test_status_report_registers_an_unknown_worker(client):
    await ok(client, "workers.status_report", {"worker": "new", "timestamp": now_ms(), "tags": ["x"]})
    worker = (await _workers(client))["new"]
    assert worker["register_timeout"] == 600
    assert worker["tags"] == ["x"]
    assert worker["last_report_time"] is not None


async def test_status_report_of_unknown_worker_fails_without_auto_register(make_client, db_conn):
    client = await make_client(auto_register=False)
    await ok(client, "workers.register", {"worker": "known"})
    await ok(client, "workers.status_report", {"worker": "known", "timestamp": now_ms()})
    before = await table_snapshot(db_conn)
    code, subcode, message, _ = await call(
        client, "workers.status_report", {"worker": "stranger", "timestamp": now_ms(), "machine_stats": {"cpu_usage": 1}}
    )
    assert (code, subcode) == (400, 1001)
    assert "stranger" in message
    assert await table_snapshot(db_conn) == before


async def test_status_report_sets_and_clears_task_and_queue(client):
    await ok(client, "workers.register", {"worker": "w1"})
    await ok(client, "workers.status_report", {"worker": "w1", "timestamp": now_ms(), "task": "t1", "queue": "q1"})
    worker = (await _workers(client))["w1"]
    assert worker["task"] == {"id": "t1"} and worker["queue"] == {"id": "q1"}
    await ok(client, "workers.status_report", {"worker": "w1", "timestamp": now_ms()})
    worker = (await _workers(client))["w1"]
    assert worker["task"] is None and worker["queue"] is None


async def test_status_report_replaces_lists_only_when_sent(client):
    await ok(client, "workers.register", {"worker": "w1", "queues": ["q1"], "tags": ["a"], "system_tags": ["s"]})
    await ok(client, "workers.status_report", {"worker": "w1", "timestamp": now_ms(), "tags": None})
    worker = (await _workers(client))["w1"]
    assert (worker["queues"], worker["tags"], worker["system_tags"]) == ([{"id": "q1"}], ["a"], ["s"])
    await ok(
        client,
        "workers.status_report",
        {"worker": "w1", "timestamp": now_ms(), "queues": ["q2"], "tags": [], "system_tags": ["t"]},
    )
    worker = (await _workers(client))["w1"]
    assert (worker["queues"], worker["tags"], worker["system_tags"]) == ([{"id": "q2"}], [], ["t"])


async def test_status_report_updates_activity_and_keeps_registration_time(client):
    await ok(client, "workers.register", {"worker": "w1", "timeout": 100})
    registered = (await _workers(client))["w1"]
    await asyncio.sleep(0.05)
    await ok(client, "workers.status_report", {"worker": "w1", "timestamp": now_ms()})
    reported = (await _workers(client))["w1"]
    assert reported["register_time"] == registered["register_time"]
    assert reported["register_timeout"] == 100
    assert _parse(reported["last_activity_time"]) > _parse(registered["last_activity_time"])
    assert reported["last_report_time"] == reported["last_activity_time"]


async def test_expired_registration_is_hidden_before_the_sweep(make_client, db_conn):
    client = await make_client(expiry_sweep_seconds=3600)
    await ok(client, "workers.register", {"worker": "short", "timeout": 1})
    await ok(client, "workers.register", {"worker": "long", "timeout": 600})
    assert await _count(client) == 2
    await asyncio.sleep(1.3)
    assert list(await _workers(client)) == ["long"]
    assert await _count(client) == 1
    assert await db_conn.fetchval("SELECT count(*) FROM worker_registrations") == 2


async def test_expiry_sweep_deletes_expired_registrations(make_client, db_conn):
    client = await make_client(expiry_sweep_seconds=0.2)
    await ok(client, "workers.register", {"worker": "short", "timeout": 1})
    await ok(client, "workers.register", {"worker": "long", "timeout": 600})
    await asyncio.sleep(1.6)
    rows = await db_conn.fetch("SELECT worker FROM worker_registrations")
    assert [row["worker"] for row in rows] == ["long"]


async def test_status_report_extends_the_registration(make_client):
    # Margins of a second or more each way: a loaded machine delays the calls themselves.
    client = await make_client(expiry_sweep_seconds=3600)
    registered = time.monotonic()
    await ok(client, "workers.register", {"worker": "w1", "timeout": 4})
    await asyncio.sleep(2.5)
    reported = time.monotonic()
    await ok(client, "workers.status_report", {"worker": "w1", "timestamp": now_ms()})
    await asyncio.sleep(max(0.0, registered + 5.0 - time.monotonic()))  # past the registration's own expiry
    assert list(await _workers(client)) == ["w1"]
    assert time.monotonic() < reported + 4.0, "the machine was too slow to tell"
    await asyncio.sleep(max(0.0, reported + 5.0 - time.monotonic()))  # past the report's extension
    assert await _workers(client) == {}


async def test_status_report_after_expiry_registers_afresh(make_client):
    client = await make_client(expiry_sweep_seconds=3600)
    # 3 s: time enough to read the registration back on a loaded machine before it expires.
    await ok(client, "workers.register", {"worker": "w1", "timeout": 3, "tags": ["old"]})
    registered = (await _workers(client))["w1"]
    await asyncio.sleep(3.3)
    await ok(client, "workers.status_report", {"worker": "w1", "timestamp": now_ms()})
    worker = (await _workers(client))["w1"]
    assert worker["register_timeout"] == 600
    assert worker["tags"] == []
    assert _parse(worker["register_time"]) > _parse(registered["register_time"])


async def test_last_seen_filter(client, db_conn):
    await ok(client, "workers.register", {"worker": "fresh"})
    await ok(client, "workers.register", {"worker": "quiet"})
    await db_conn.execute(
        "UPDATE worker_registrations SET last_activity_time = now() - interval '2 hours' WHERE worker = 'quiet'"
    )
    assert sorted(await _workers(client)) == ["fresh"]  # get_all: last_seen defaults to 3600
    assert sorted(await _workers(client, {"last_seen": 0})) == ["fresh", "quiet"]
    assert sorted(await _workers(client, {"last_seen": None})) == ["fresh", "quiet"]
    assert sorted(await _workers(client, {"last_seen": 3 * 3600})) == ["fresh", "quiet"]
    assert await _count(client) == 2  # get_count: no filter by default
    assert await _count(client, {"last_seen": 3600}) == 1


TAGGED = {"a": ["gpu", "fast"], "b": ["gpu"], "c": ["cpu"], "d": []}


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (["gpu"], ["a", "b"]),
        (["gpu", "cpu"], ["a", "b", "c"]),
        (["-gpu"], ["c", "d"]),
        (["gpu", "-fast"], ["b"]),
        (["-fast", "-cpu"], ["b", "d"]),
        ([], ["a", "b", "c", "d"]),
    ],
)
async def test_tag_filters_include_any_and_exclude(client, tags, expected):
    for worker, worker_tags in TAGGED.items():
        await ok(client, "workers.register", {"worker": worker, "tags": worker_tags})
    assert sorted(await _workers(client, {"tags": tags})) == expected
    assert await _count(client, {"tags": tags}) == len(expected)


async def test_tags_and_system_tags_filters_must_both_pass(client):
    await ok(client, "workers.register", {"worker": "a", "tags": ["gpu"], "system_tags": ["prod"]})
    await ok(client, "workers.register", {"worker": "b", "tags": ["gpu"], "system_tags": ["dev"]})
    await ok(client, "workers.register", {"worker": "c", "tags": ["cpu"], "system_tags": ["prod"]})
    assert sorted(await _workers(client, {"tags": ["gpu"], "system_tags": ["prod"]})) == ["a"]
    assert sorted(await _workers(client, {"tags": ["gpu"], "system_tags": ["-prod"]})) == ["b"]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("gpu-*", ["gpu-1", "gpu-22"]),
        ("gpu-?", ["gpu-1"]),
        ("*1", ["gpu-1", "x_1", "xa1"]),
        ("x_1", ["x_1"]),
        ("x%1", []),
        ("gpu", []),
        ("*", ["gpu-1", "gpu-22", "x_1", "xa1"]),
    ],
)
async def test_worker_pattern_is_a_whole_id_glob(client, pattern, expected):
    for worker in ("gpu-1", "gpu-22", "x_1", "xa1"):
        await ok(client, "workers.register", {"worker": worker})
    assert sorted(await _workers(client, {"worker_pattern": pattern})) == expected
    assert await _count(client, {"worker_pattern": pattern}) == len(expected)


async def test_proxy_headers_are_ignored_unless_trusted(make_client):
    headers = {"X-Forwarded-For": "10.1.2.3, 10.0.0.1"}
    untrusting = await make_client()
    await ok(untrusting, "workers.register", {"worker": "w1"}, headers=headers)
    assert (await _workers(untrusting))["w1"]["ip"] == "127.0.0.1"
    trusting = await make_client(trust_proxy_headers=True)
    await ok(trusting, "workers.register", {"worker": "w1"}, headers=headers)
    assert (await _workers(trusting))["w1"]["ip"] == "10.1.2.3"
    await ok(trusting, "workers.register", {"worker": "w1"}, headers={**headers, "X-Real-IP": "10.9.9.9"})
    assert (await _workers(trusting))["w1"]["ip"] == "10.9.9.9"


async def test_companies_see_only_their_own_workers(make_client):
    company_a = await make_client(company="A")
    company_b = await make_client(company="B")
    await ok(company_a, "workers.register", {"worker": "shared", "tags": ["from-a"]})
    await ok(company_b, "workers.register", {"worker": "shared", "tags": ["from-b"]})
    await ok(company_a, "workers.register", {"worker": "only-a"})
    await ok(company_b, "workers.status_report", {"worker": "shared", "timestamp": now_ms(), "task": "tb"})

    workers_a, workers_b = await _workers(company_a), await _workers(company_b)
    assert sorted(workers_a) == ["only-a", "shared"]
    assert sorted(workers_b) == ["shared"]
    assert workers_a["shared"]["tags"] == ["from-a"] and workers_a["shared"]["task"] is None
    assert workers_b["shared"]["tags"] == ["from-b"] and workers_b["shared"]["task"] == {"id": "tb"}
    assert workers_b["shared"]["company"] == {"id": company_b.credentials.company_id, "name": "B"}

    await ok(company_b, "workers.unregister", {"worker": "only-a"})
    await ok(company_b, "workers.unregister", {"worker": "shared"})
    assert sorted(await _workers(company_a)) == ["only-a", "shared"]
    assert await _count(company_b) == 0
