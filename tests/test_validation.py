"""Request validation (SPEC §1, §2): a malformed request is a 400 naming the field, never a 500,
and changes nothing; null means absent; unknown fields are ignored."""

import re
import time
from datetime import datetime, timezone

import pytest
from helpers import WORKER_ENDPOINTS, call, now_ms, ok, table_snapshot

MISSING = (400, 11)
INVALID = (400, 12)
WORKER = "w1"
DAY = 24 * 3600
LONG_ID = "x" * 513
NOW = time.time()
# A valid body of each endpoint that takes required fields, to break one field at a time.
STATS = {"from_date": 0, "to_date": 100, "interval": 10, "items": [{"key": "cpu_usage", "aggregation": "max"}]}
ACTIVITY = {"from_date": 0, "to_date": 100, "interval": 10}


def report(**fields) -> dict:
    return {"worker": WORKER, "timestamp": now_ms(), **fields}


def case_ids(cases) -> list[str]:
    return [f"{endpoint.removeprefix('workers.')}-{field}" for endpoint, _, field in cases]


# (endpoint, body with one bad field, the field the 400/12 message must name)
WRONG_VALUES = [
    ("workers.register", {"worker": 5}, "worker"),
    ("workers.register", {"worker": ""}, "worker"),
    ("workers.register", {"worker": LONG_ID}, "worker"),
    ("workers.register", {"worker": "a\x00b"}, "worker"),
    ("workers.register", {"worker": WORKER, "tags": "gpu"}, "tags"),
    ("workers.register", {"worker": WORKER, "tags": ["gpu", 1]}, "tags"),
    ("workers.register", {"worker": WORKER, "tags": [LONG_ID]}, "tags"),
    ("workers.register", {"worker": WORKER, "queues": "q1"}, "queues"),
    ("workers.register", {"worker": WORKER, "system_tags": [None]}, "system_tags"),
    ("workers.register", {"worker": WORKER, "timeout": "600"}, "timeout"),
    ("workers.register", {"worker": WORKER, "timeout": 1.5}, "timeout"),
    ("workers.register", {"worker": WORKER, "timeout": True}, "timeout"),
    ("workers.unregister", {"worker": 5}, "worker"),
    ("workers.unregister", {"worker": [WORKER]}, "worker"),
    ("workers.status_report", report(worker=5), "worker"),
    ("workers.status_report", report(worker=LONG_ID), "worker"),
    ("workers.status_report", report(worker="a\x00b"), "worker"),
    ("workers.status_report", report(timestamp=str(now_ms())), "timestamp"),
    ("workers.status_report", report(timestamp=True), "timestamp"),
    ("workers.status_report", report(timestamp=-1), "timestamp"),
    ("workers.status_report", report(timestamp=-now_ms()), "timestamp"),
    ("workers.status_report", report(timestamp=NOW + DAY + 3600), "timestamp"),
    ("workers.status_report", report(timestamp=(NOW + DAY + 3600) * 1000), "timestamp"),
    ("workers.status_report", report(task=5), "task"),
    ("workers.status_report", report(queue=["q1"]), "queue"),
    ("workers.status_report", report(queues="q1"), "queues"),
    ("workers.status_report", report(tags="t1"), "tags"),
    ("workers.status_report", report(machine_stats=[1, 2]), "machine_stats"),
    ("workers.status_report", report(machine_stats="cpu_usage"), "machine_stats"),
    ("workers.status_report", report(machine_stats={"cpu_usage": "high"}), "cpu_usage"),
    ("workers.status_report", report(machine_stats={"gpu_usage": [1, "x"]}), "gpu_usage"),
    ("workers.status_report", report(machine_stats={"gpu_usage": [1, [2]]}), "gpu_usage"),
    ("workers.status_report", report(machine_stats={"memory_used": {"a": 1}}), "memory_used"),
    ("workers.status_report", report(machine_stats={"gpu_fraction": True}), "gpu_fraction"),
    ("workers.status_report", report(machine_stats={"cpu_usage": 1, "": 2}), "machine_stats"),
    ("workers.status_report", report(machine_stats={LONG_ID: 2}), "machine_stats"),
    ("workers.get_all", {"last_seen": -5}, "last_seen"),
    ("workers.get_all", {"last_seen": "abc"}, "last_seen"),
    ("workers.get_all", {"last_seen": 1.5}, "last_seen"),
    ("workers.get_all", {"last_seen": True}, "last_seen"),
    ("workers.get_all", {"tags": "t1"}, "tags"),
    ("workers.get_all", {"system_tags": [1]}, "system_tags"),
    ("workers.get_all", {"worker_pattern": 5}, "worker_pattern"),
    ("workers.get_count", {"last_seen": -5}, "last_seen"),
    ("workers.get_count", {"last_seen": "abc"}, "last_seen"),
    ("workers.get_count", {"tags": ["t1", 2]}, "tags"),
    ("workers.get_metric_keys", {"worker_ids": WORKER}, "worker_ids"),
    ("workers.get_metric_keys", {"worker_ids": [WORKER, 1]}, "worker_ids"),
    ("workers.get_stats", {**STATS, "interval": 10.5}, "interval"),
    ("workers.get_stats", {**STATS, "interval": "10"}, "interval"),
    ("workers.get_stats", {**STATS, "interval": -10}, "interval"),
    ("workers.get_stats", {**STATS, "interval": 0}, "interval"),
    ("workers.get_stats", {**STATS, "interval": True}, "interval"),
    ("workers.get_stats", {**STATS, "from_date": -1}, "from_date"),
    ("workers.get_stats", {**STATS, "from_date": "0"}, "from_date"),
    ("workers.get_stats", {**STATS, "to_date": "100"}, "to_date"),
    ("workers.get_stats", {**STATS, "items": []}, "items"),
    ("workers.get_stats", {**STATS, "items": "cpu_usage"}, "items"),
    ("workers.get_stats", {**STATS, "items": ["cpu_usage"]}, "items"),
    ("workers.get_stats", {**STATS, "items": [{"key": "cpu_usage", "aggregation": "median"}]}, "aggregation"),
    ("workers.get_stats", {**STATS, "items": [{"key": 5}]}, "key"),
    ("workers.get_stats", {**STATS, "split_by_variant": "yes"}, "split_by_variant"),
    ("workers.get_stats", {**STATS, "split_by_variant": 1}, "split_by_variant"),
    ("workers.get_stats", {**STATS, "worker_ids": WORKER}, "worker_ids"),
    ("workers.get_activity_report", {**ACTIVITY, "interval": 2.5}, "interval"),
    ("workers.get_activity_report", {**ACTIVITY, "interval": "10"}, "interval"),
    ("workers.get_activity_report", {**ACTIVITY, "interval": -5}, "interval"),
    ("workers.get_activity_report", {**ACTIVITY, "from_date": -100}, "from_date"),
    ("workers.get_activity_report", {**ACTIVITY, "from_date": "x"}, "from_date"),
]
# Well-typed numbers beyond what the database can store: still a 400/12, never a 500.
TOO_LARGE = [
    ("workers.register", {"worker": WORKER, "timeout": 2**31}, "timeout"),
    ("workers.get_all", {"last_seen": 2**31}, "last_seen"),
    ("workers.get_count", {"last_seen": 10**12}, "last_seen"),
    # 10^13 s is beyond PostgreSQL's last timestamp (year 294276)
    ("workers.get_activity_report", {"from_date": 1e13, "to_date": 1e13 + 100, "interval": 10}, "from_date"),
    ("workers.get_stats", {**STATS, "from_date": 1e13, "to_date": 1e13 + 100}, "from_date"),
    # beyond PostgreSQL's largest interval (about 178 million years)
    ("workers.get_stats", {**STATS, "to_date": NOW + DAY, "interval": 10**17}, "interval"),
    ("workers.get_activity_report", {**ACTIVITY, "to_date": NOW + DAY, "interval": 10**17}, "interval"),
    # values whose squares would overflow PostgreSQL's avg() in get_stats
    ("workers.status_report", report(machine_stats={"cpu_usage": 1.7e308}), "cpu_usage"),
    ("workers.status_report", report(machine_stats={"gpu_usage": [1, -1e101]}), "gpu_usage"),
    ("workers.status_report", report(machine_stats={"gpu_usage": [None, 2e200]}), "gpu_usage"),
]


def names(field: str, message: str) -> bool:
    """Whether `message` names `field` as a whole word (`worker` is not named by `worker_ids`)."""
    return re.search(rf"(?<!\w){re.escape(field)}(?!\w)", message) is not None


@pytest.fixture
async def seeded(client):
    """A registered worker with one stored report, so that a change to any table would show."""
    await ok(client, "workers.register", {"worker": WORKER, "queues": ["q1"], "tags": ["t1"]})
    await ok(client, "workers.status_report", report(task="t", machine_stats={"cpu_usage": [1, 2]}))


async def rejected(client, db_conn, endpoint: str, body=None, *, raw: bytes | None = None):
    """Call with a bad request; check that it changed nothing; return (code, subcode, message)."""
    before = await table_snapshot(db_conn)
    code, subcode, message, data = await call(client, endpoint, body, raw=raw)
    assert data == {}
    assert await table_snapshot(db_conn) == before
    return code, subcode, message


# --- bodies that are not a JSON object --------------------------------------------------------


@pytest.mark.parametrize("raw", [b"{", b'{"worker": "w1",}', b"\xff\xfe", b"[1, 2]", b'"text"', b"42", b"null"])
@pytest.mark.parametrize("endpoint", WORKER_ENDPOINTS)
async def test_body_that_is_not_a_json_object(client, db_conn, seeded, endpoint, raw):
    code, subcode, message = await rejected(client, db_conn, endpoint, raw=raw)
    assert (code, subcode) == INVALID
    assert "JSON" in message


# --- missing required fields ------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint, body, missing",
    [
        ("workers.register", {}, ["worker"]),
        ("workers.register", {"tags": ["a"]}, ["worker"]),
        ("workers.unregister", {}, ["worker"]),
        ("workers.status_report", {}, ["worker", "timestamp"]),
        ("workers.status_report", {"worker": WORKER}, ["timestamp"]),
        ("workers.status_report", {"timestamp": 1}, ["worker"]),
        ("workers.get_stats", {}, ["from_date", "to_date", "interval", "items"]),
        ("workers.get_stats", {**STATS, "items": [{"aggregation": "max"}]}, ["items.0.key"]),
        ("workers.get_activity_report", {}, ["from_date", "to_date", "interval"]),
        ("workers.get_activity_report", {"from_date": 0, "to_date": 100}, ["interval"]),
    ],
)
async def test_missing_required_fields_are_named(client, db_conn, seeded, endpoint, body, missing):
    code, subcode, message = await rejected(client, db_conn, endpoint, body)
    assert (code, subcode) == MISSING
    for field in missing:
        assert names(field, message), (field, message)
    for field in set(body) - set(missing):
        if not any(path.startswith(f"{field}.") for path in missing):
            assert not names(field, message), (field, message)


@pytest.mark.parametrize(
    "endpoint, body, missing",
    [
        ("workers.register", {"worker": None}, "worker"),
        ("workers.unregister", {"worker": None}, "worker"),
        ("workers.status_report", report(timestamp=None), "timestamp"),
        ("workers.get_stats", {**STATS, "items": None}, "items"),
        ("workers.get_activity_report", {**ACTIVITY, "interval": None}, "interval"),
    ],
)
async def test_null_for_a_required_field_is_missing(client, db_conn, seeded, endpoint, body, missing):
    code, subcode, message = await rejected(client, db_conn, endpoint, body)
    assert (code, subcode) == MISSING
    assert names(missing, message), message


# --- wrong types and values out of range ------------------------------------------------------


@pytest.mark.parametrize("endpoint, body, field", WRONG_VALUES, ids=case_ids(WRONG_VALUES))
async def test_wrong_type_or_value_names_the_field(client, db_conn, seeded, endpoint, body, field):
    code, subcode, message = await rejected(client, db_conn, endpoint, body)
    assert (code, subcode) == INVALID, message
    assert names(field, message), message


@pytest.mark.parametrize("endpoint, body, field", TOO_LARGE, ids=case_ids(TOO_LARGE))
async def test_number_too_large_is_a_validation_error(client, db_conn, seeded, endpoint, body, field):
    code, subcode, message = await rejected(client, db_conn, endpoint, body)
    assert (code, subcode) == INVALID, message
    assert names(field, message), message


async def test_values_at_the_largest_magnitude_are_stored_and_aggregated(client):
    start = int(time.time()) // 10 * 10 - 100
    for offset, value in ((1, 1e100), (2, -1e100), (3, 1e100)):
        await ok(client, "workers.status_report", report(timestamp=start + offset, machine_stats={"big": [value]}))
    body = {"from_date": start, "to_date": start + 20, "interval": 10}
    for aggregation, expected in (("avg", pytest.approx(1e100 / 3)), ("max", 1e100), ("min", -1e100)):
        data = await ok(client, "workers.get_stats", {**body, "items": [{"key": "big", "aggregation": aggregation}]})
        assert data["workers"][0]["metrics"][0]["stats"][0]["values"][0] == expected


async def test_negative_register_timeout_fails_registration(client, db_conn, seeded):
    code, subcode, message = await rejected(client, db_conn, "workers.register", {"worker": WORKER, "timeout": -5})
    assert (code, subcode) == (400, 1002)
    assert names("timeout", message), message


async def test_from_date_not_before_to_date_is_invalid(client, db_conn, seeded):
    code, subcode, message = await rejected(client, db_conn, "workers.get_stats", {**STATS, "from_date": 100})
    assert (code, subcode) == (400, 16)
    assert names("from_date", message) and names("to_date", message), message


# --- what is accepted -------------------------------------------------------------------------


async def test_longest_worker_id_is_accepted(client):
    worker = "x" * 512
    await ok(client, "workers.status_report", report(worker=worker))
    data = await ok(client, "workers.get_all", {})
    assert [entry["id"] for entry in data["workers"]] == [worker]


async def test_register_timeout_zero_means_the_default(client):
    await ok(client, "workers.register", {"worker": WORKER, "timeout": 0})
    data = await ok(client, "workers.get_all", {})
    assert data["workers"][0]["register_timeout"] == 600


async def test_timestamp_an_hour_ahead_is_accepted(client, db_conn):
    await ok(client, "workers.status_report", report(timestamp=now_ms() + 3600 * 1000))
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stats") == 1


async def test_null_optional_fields_mean_absent(client, db_conn):
    body = report(machine_stats=None, tags=None, system_tags=None, queues=None, task=None, queue=None)
    await ok(client, "workers.status_report", body)
    assert await db_conn.fetchval("SELECT metrics::text FROM worker_stats") == "{}"
    [worker] = (await ok(client, "workers.get_all", {}))["workers"]
    assert (worker["tags"], worker["queues"], worker["task"]) == ([], [], None)


async def test_null_lists_in_a_report_keep_the_registered_ones(client):
    await ok(client, "workers.register", {"worker": WORKER, "queues": ["q1"], "tags": ["t1"], "system_tags": ["s"]})
    await ok(client, "workers.status_report", report(queues=None, tags=None, system_tags=None))
    [worker] = (await ok(client, "workers.get_all", {}))["workers"]
    assert (worker["queues"], worker["tags"], worker["system_tags"]) == ([{"id": "q1"}], ["t1"], ["s"])


async def test_null_values_in_machine_stats_are_skipped(client, db_conn):
    await ok(client, "workers.status_report", report(machine_stats={"cpu_usage": [None, 5], "gpu_usage": None}))
    points = await db_conn.fetch("SELECT metric, variant, value FROM worker_stat_points")
    assert [tuple(point) for point in points] == [("cpu_usage", "1", 5.0)]


@pytest.mark.parametrize(
    "endpoint, body, workers",
    [
        ("workers.register", {"worker": "w2", "is_daemon": True, "extra": {"a": [1]}}, [WORKER, "w2"]),
        ("workers.status_report", report(worker="w2", is_daemon=True, unknown="x"), [WORKER, "w2"]),
        ("workers.unregister", {"worker": WORKER, "is_daemon": True}, []),
    ],
)
async def test_unknown_fields_are_ignored(client, seeded, endpoint, body, workers):
    await ok(client, endpoint, body)
    data = await ok(client, "workers.get_all", {"is_daemon": True, "batch_size": "many"})
    assert [worker["id"] for worker in data["workers"]] == workers


async def test_timestamps_in_seconds_and_milliseconds_store_the_same_time(client, db_conn):
    seconds = int(time.time()) - 60
    await ok(client, "workers.status_report", {"worker": "in-s", "timestamp": seconds})
    await ok(client, "workers.status_report", {"worker": "in-ms", "timestamp": seconds * 1000})
    await ok(client, "workers.status_report", {"worker": "in-s-float", "timestamp": seconds + 0.0})
    rows = dict(await db_conn.fetch("SELECT worker, time FROM worker_stats"))
    expected = datetime.fromtimestamp(seconds, timezone.utc)
    assert rows == {"in-s": expected, "in-ms": expected, "in-s-float": expected}


async def test_millisecond_fraction_is_kept(client, db_conn):
    millis = (now_ms() // 1000 - 60) * 1000 + 250
    await ok(client, "workers.status_report", report(timestamp=millis))
    stored = await db_conn.fetchval("SELECT time FROM worker_stats")
    assert stored == datetime.fromtimestamp(millis / 1000, timezone.utc)


@pytest.mark.parametrize("last_seen", [0, None, "none", "None"])
async def test_last_seen_zero_null_or_none_disable_the_filter(client, db_conn, last_seen):
    await ok(client, "workers.register", {"worker": WORKER})
    await db_conn.execute("UPDATE worker_registrations SET last_activity_time = now() - interval '2 hours'")
    assert (await ok(client, "workers.get_all", {}))["workers"] == []  # the default last_seen is 3600
    data = await ok(client, "workers.get_all", {"last_seen": last_seen})
    assert [worker["id"] for worker in data["workers"]] == [WORKER]
    assert await ok(client, "workers.get_count", {"last_seen": last_seen}) == {"count": 1}
