"""Tenant isolation (SPEC §1): company B never sees, counts, reports as, unregisters or reads
the statistics of company A's workers, even with the same worker ids; hostile text in
string fields is stored as text."""

import time

import pytest
from helpers import call, ok, table_snapshot

BASE = 1_699_999_200
CHART = {"from_date": BASE, "to_date": BASE + 120, "interval": 60}


@pytest.fixture
async def companies(make_client):
    """Company A with a worker `shared` that has statistics; company B with nothing yet."""
    company_a = await make_client(company="A")
    company_b = await make_client(company="B")
    await ok(company_a, "workers.register", {"worker": "shared", "tags": ["a-tag"]})
    await ok(
        company_a,
        "workers.status_report",
        {"worker": "shared", "timestamp": BASE + 10, "task": "a-task", "machine_stats": {"cpu_usage": [50]}},
    )
    return company_a, company_b


async def test_b_sees_and_counts_none_of_a_workers(companies):
    _, company_b = companies
    assert (await ok(company_b, "workers.get_all", {"last_seen": 0}))["workers"] == []
    assert (await ok(company_b, "workers.get_count", {}))["count"] == 0
    assert (await ok(company_b, "workers.get_all", {"worker_pattern": "*", "tags": ["a-tag"]}))["workers"] == []


async def test_b_cannot_read_a_statistics_or_metric_keys(companies):
    company_a, company_b = companies
    assert (await call(company_b, "workers.get_metric_keys", {"worker_ids": ["shared"]}))[:2] == (400, 1005)
    stats = {**CHART, "items": [{"key": "cpu_usage"}], "worker_ids": ["shared"]}
    assert (await ok(company_b, "workers.get_stats", stats))["workers"] == []
    activity = await ok(company_b, "workers.get_activity_report", CHART)
    assert activity["total"]["counts"] == [0, 0] and activity["active"]["counts"] == [0, 0]
    assert (await ok(company_a, "workers.get_activity_report", CHART))["total"]["counts"] == [1, 0]


async def test_b_cannot_unregister_a_worker(companies):
    company_a, company_b = companies
    await ok(company_b, "workers.unregister", {"worker": "shared"})
    assert [w["id"] for w in (await ok(company_a, "workers.get_all", {}))["workers"]] == ["shared"]


async def test_b_cannot_unregister_a_worker_without_auto_unregister(make_client, companies):
    company_a, _ = companies
    strict_b = await make_client(company="B", auto_unregister=False)
    assert (await call(strict_b, "workers.unregister", {"worker": "shared"}))[:2] == (400, 1004)
    assert (await ok(company_a, "workers.get_count", {}))["count"] == 1


async def test_same_worker_id_in_both_companies_stays_apart(companies, db_conn):
    company_a, company_b = companies
    before_a = (await ok(company_a, "workers.get_all", {}))["workers"]
    await ok(company_b, "workers.register", {"worker": "shared", "tags": ["b-tag"]})
    await ok(
        company_b,
        "workers.status_report",
        {"worker": "shared", "timestamp": BASE + 20, "machine_stats": {"cpu_usage": [90], "memory_used": 1}},
    )
    assert (await ok(company_a, "workers.get_all", {}))["workers"] == before_a
    b_worker = (await ok(company_b, "workers.get_all", {}))["workers"][0]
    assert b_worker["tags"] == ["b-tag"] and b_worker["task"] is None
    assert b_worker["company"]["name"] == "B"

    keys_a = await ok(company_a, "workers.get_metric_keys", {})
    assert keys_a == {"categories": [{"name": "cpu", "metric_keys": ["cpu_usage"]}]}
    stats = {**CHART, "items": [{"key": "cpu_usage", "aggregation": "max"}]}
    values = lambda data: data["workers"][0]["metrics"][0]["stats"][0]["values"]  # noqa: E731
    assert values(await ok(company_a, "workers.get_stats", stats)) == [50, 0]
    assert values(await ok(company_b, "workers.get_stats", stats)) == [90, 0]
    companies_in_table = await db_conn.fetch("SELECT DISTINCT company FROM worker_stats")
    assert len(companies_in_table) == 2


async def test_b_status_report_without_auto_register_cannot_use_a_worker(make_client, companies, db_conn):
    _, _ = companies
    strict_b = await make_client(company="B", auto_register=False)
    before = await table_snapshot(db_conn)
    code, subcode, *_ = await call(strict_b, "workers.status_report", {"worker": "shared", "timestamp": time.time()})
    assert (code, subcode) == (400, 1001)
    assert await table_snapshot(db_conn) == before


HOSTILE = [
    "x'; DROP TABLE worker_registrations; --",
    "' OR '1'='1",
    "\\'; SELECT pg_sleep(5); --",
    "%_*?[]{}$1::text",
    "<script>alert(1)</script>",
    "worker\u2028\u00e9\U0001F600",
]


@pytest.mark.parametrize("text", HOSTILE)
async def test_hostile_text_in_every_string_field_is_stored_as_text(companies, db_conn, text):
    company_a, company_b = companies
    await ok(company_b, "workers.register", {"worker": text, "queues": [text], "tags": [text], "system_tags": [text]})
    await ok(
        company_b,
        "workers.status_report",
        {"worker": text, "timestamp": BASE + 30, "task": text, "queue": text, "machine_stats": {f"{text}_x": 1}},
    )
    by_pattern = (await ok(company_b, "workers.get_all", {"worker_pattern": text}))["workers"]
    assert [w["id"] for w in by_pattern] == [text]  # a pattern matches itself, even with wildcards in it
    listed = (await ok(company_b, "workers.get_all", {"tags": [text], "system_tags": [text]}))["workers"]
    assert [w["id"] for w in listed] == [text]
    assert listed[0]["task"] == {"id": text} and listed[0]["queues"] == [{"id": text}]
    keys = await ok(company_b, "workers.get_metric_keys", {"worker_ids": [text]})
    assert keys["categories"][0]["metric_keys"] == [f"{text}_x"]
    await ok(company_b, "workers.unregister", {"worker": text})
    assert await db_conn.fetchval("SELECT count(*) FROM worker_registrations") == 1
    assert (await ok(company_a, "workers.get_count", {}))["count"] == 1
