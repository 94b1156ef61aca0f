"""Statistics: how status reports are stored (SPEC §2 status_report, §4) and read back by
get_metric_keys, get_stats and get_activity_report.

Reports are sent at fixed past times relative to BASE, so that every expected bucket is
written out by hand below.
"""

import re
from datetime import datetime, timezone

import pytest

from helpers import call, ok

BASE = 1_699_999_200  # 2023-11-14 22:00:00 UTC: a multiple of 3600, hence of 40, 60 and 100

def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


async def report(client, worker: str, timestamp: float, machine_stats: dict | None = None, **fields) -> None:
    body = {"worker": worker, "timestamp": timestamp, **fields}
    if machine_stats is not None:
        body["machine_stats"] = machine_stats
    await ok(client, "workers.status_report", body)


async def points(db_conn, columns: str = "metric, variant, value") -> list[tuple]:
    rows = await db_conn.fetch(f"SELECT {columns} FROM worker_stat_points ORDER BY metric, variant")
    return [tuple(row) for row in rows]


def in_seconds(dates: list[int]) -> list[int]:
    """Answer dates are milliseconds (SPEC §2); the expectations below are in seconds."""
    assert all(isinstance(date, int) and date > 10**11 and date % 1000 == 0 for date in dates), dates
    return [date // 1000 for date in dates]


async def get_stats(client, from_date, to_date, interval, items, **fields) -> dict:
    """get_stats data, its dates in seconds."""
    body = {"from_date": from_date, "to_date": to_date, "interval": interval, "items": items, **fields}
    data = await ok(client, "workers.get_stats", body)
    for worker in data["workers"]:
        for entry in worker["metrics"]:
            entry["dates"] = in_seconds(entry["dates"])
    return data


def series(data: dict) -> dict:
    """get_stats data as {(worker, metric, variant or None): {"dates": [...], aggregation: values}}."""
    result = {}
    for worker in data["workers"]:
        for entry in worker["metrics"]:
            key = (worker["worker"], entry["metric"], entry.get("variant"))
            assert key not in result, data
            result[key] = {"dates": entry["dates"]}
            for stat in entry["stats"]:
                assert len(stat["values"]) == len(entry["dates"]), entry
                result[key][stat["aggregation"]] = stat["values"]
    return result


async def activity(client, from_date, to_date, interval, **fields) -> dict:
    """get_activity_report data, its dates in seconds."""
    body = {"from_date": from_date, "to_date": to_date, "interval": interval, **fields}
    data = await ok(client, "workers.get_activity_report", body)
    for series_name in ("total", "active"):
        data[series_name]["dates"] = in_seconds(data[series_name]["dates"])
    return data


# --- status_report: what is stored ------------------------------------------------------


async def test_scalar_is_variant_total_and_list_items_are_indexed_variants(client, db_conn):
    await report(client, "w1", BASE, {"cpu_usage": [10, 20.5, 30], "memory_used": 2048})
    assert await points(db_conn) == [
        ("cpu_usage", "0", 10.0),
        ("cpu_usage", "1", 20.5),
        ("cpu_usage", "2", 30.0),
        ("memory_used", "total", 2048.0),
    ]


async def test_null_values_are_skipped_and_list_indexes_kept(client, db_conn):
    stats = {"cpu_usage": [None, 5, None, 7], "gpu_usage": None, "gpu_temperature": [None, None], "memory_used": 1}
    await report(client, "w1", BASE, stats)
    assert await points(db_conn) == [("cpu_usage", "1", 5.0), ("cpu_usage", "3", 7.0), ("memory_used", "total", 1.0)]


async def test_undocumented_numeric_keys_are_stored(client, db_conn):
    await report(client, "w1", BASE, {"gpu_fraction": 0.5, "custom_metric": [1, 2]})
    assert await points(db_conn, "category, metric, variant, value") == [
        ("custom", "custom_metric", "0", 1.0),
        ("custom", "custom_metric", "1", 2.0),
        ("gpu", "gpu_fraction", "total", 0.5),
    ]


async def test_category_is_the_text_before_the_first_underscore(client, db_conn):
    await report(client, "w1", BASE, {"gpu_memory_used": 1, "disk_free_home": 2, "network_rx": 3, "uptime": 4})
    assert await points(db_conn, "metric, category") == [
        ("disk_free_home", "disk"),
        ("gpu_memory_used", "gpu"),
        ("network_rx", "network"),
        ("uptime", "uptime"),
    ]


async def test_every_value_is_a_full_point_in_the_grafana_view(client, db_conn):
    await report(client, "w1", BASE + 5, {"cpu_usage": [10, 20], "memory_used": 2048}, task="t1")
    await report(client, "w2", BASE + 6, {"memory_free": 7})
    columns = "time, company, worker, task, category, metric, variant, value"
    company = client.credentials.company_id
    assert await points(db_conn, columns) == [
        (utc(BASE + 5), company, "w1", "t1", "cpu", "cpu_usage", "0", 10.0),
        (utc(BASE + 5), company, "w1", "t1", "cpu", "cpu_usage", "1", 20.0),
        (utc(BASE + 6), company, "w2", None, "memory", "memory_free", "total", 7.0),
        (utc(BASE + 5), company, "w1", "t1", "memory", "memory_used", "total", 2048.0),
    ]


async def test_report_without_machine_stats_is_stored_and_counts_as_activity(client, db_conn):
    await report(client, "w1", BASE + 10)
    await ok(client, "workers.status_report", {"worker": "w2", "timestamp": BASE + 20, "machine_stats": None})
    rows = await db_conn.fetch("SELECT worker, time FROM worker_stats ORDER BY worker")
    assert [tuple(row) for row in rows] == [("w1", utc(BASE + 10)), ("w2", utc(BASE + 20))]
    assert await points(db_conn) == []
    data = await activity(client, BASE, BASE + 60, 60)
    assert data["total"] == {"dates": [BASE], "counts": [2]}


async def test_millisecond_timestamp_is_stored_at_its_time(client, db_conn):
    await report(client, "w1", (BASE + 1) * 1000 + 500, {"memory_used": 1})
    assert await points(db_conn, "time, value") == [(utc(BASE + 1.5), 1.0)]


async def test_millisecond_reports_are_charted_at_their_time(client):
    await report(client, "w1", (BASE + 70) * 1000, {"memory_used": 4})
    data = await get_stats(client, BASE, BASE + 120, 60, [{"key": "memory_used"}])
    assert series(data) == {("w1", "memory_used", None): {"dates": [BASE, BASE + 60], "avg": [0, 4]}}


async def test_chart_dates_are_milliseconds_and_request_times_seconds(client):
    """What the reference server answers and its web UI reads (SPEC §2)."""
    await report(client, "w1", BASE + 70, {"memory_used": 4})
    body = {"from_date": BASE, "to_date": BASE + 120, "interval": 60, "items": [{"key": "memory_used"}]}
    stats = await ok(client, "workers.get_stats", body)
    assert stats["workers"][0]["metrics"][0]["dates"] == [BASE * 1000, (BASE + 60) * 1000]
    body = {"from_date": BASE, "to_date": BASE + 120, "interval": 60}
    data = await ok(client, "workers.get_activity_report", body)
    assert data["total"] == {"dates": [BASE * 1000, (BASE + 60) * 1000], "counts": [0, 1]}
    assert data["active"]["dates"] == data["total"]["dates"]


# --- get_metric_keys ----------------------------------------------------------------------


async def test_metric_keys_grouped_by_category_and_sorted(client):
    await report(client, "w2", BASE, {"memory_used": 1, "gpu_usage": [1]})
    await report(client, "w1", BASE, {"memory_free": 1, "cpu_usage": 1})
    await report(client, "w2", BASE + 1, {"gpu_fraction": 1, "cpu_temperature": 1, "memory_used": 2})
    data = await ok(client, "workers.get_metric_keys", {})
    assert data == {
        "categories": [
            {"name": "cpu", "metric_keys": ["cpu_temperature", "cpu_usage"]},
            {"name": "gpu", "metric_keys": ["gpu_fraction", "gpu_usage"]},
            {"name": "memory", "metric_keys": ["memory_free", "memory_used"]},
        ]
    }


async def test_metric_keys_of_the_requested_workers_only(client):
    await report(client, "w1", BASE, {"cpu_usage": 1})
    await report(client, "w2", BASE, {"memory_used": 1})
    await report(client, "w3", BASE, {"cpu_temperature": 1, "disk_read": 1})
    data = await ok(client, "workers.get_metric_keys", {"worker_ids": ["w1", "w3"]})
    assert data == {
        "categories": [
            {"name": "cpu", "metric_keys": ["cpu_temperature", "cpu_usage"]},
            {"name": "disk", "metric_keys": ["disk_read"]},
        ]
    }


@pytest.mark.parametrize("body", [{}, {"worker_ids": []}, {"worker_ids": None}], ids=["absent", "empty", "null"])
async def test_metric_keys_of_all_workers_without_a_worker_list(client, body):
    await report(client, "w1", BASE, {"cpu_usage": 1})
    await report(client, "w2", BASE, {"memory_used": 1})
    data = await ok(client, "workers.get_metric_keys", body)
    assert data == {
        "categories": [
            {"name": "cpu", "metric_keys": ["cpu_usage"]},
            {"name": "memory", "metric_keys": ["memory_used"]},
        ]
    }


async def test_metric_keys_without_any_stats_is_1005(client):
    await report(client, "w1", BASE)  # a report, but no machine_stats
    await report(client, "w2", BASE, {"gpu_usage": [None]})  # only nulls
    code, subcode, _, _ = await call(client, "workers.get_metric_keys", {})
    assert (code, subcode) == (400, 1005)


async def test_metric_keys_of_a_worker_without_stats_is_1005(client):
    await report(client, "w1", BASE, {"cpu_usage": 1})
    code, subcode, _, _ = await call(client, "workers.get_metric_keys", {"worker_ids": ["w2"]})
    assert (code, subcode) == (400, 1005)


# --- get_stats: buckets and range ---------------------------------------------------------


async def test_stats_buckets_are_epoch_aligned_and_zero_filled(client):
    await report(client, "w1", BASE + 30, {"memory_used": 10})
    await report(client, "w1", BASE + 50, {"memory_used": 20})
    await report(client, "w1", BASE + 130, {"memory_used": 40})
    data = await get_stats(client, BASE + 25, BASE + 250, 60, [{"key": "memory_used"}])
    assert data == {
        "workers": [
            {
                "worker": "w1",
                "metrics": [
                    {
                        "metric": "memory_used",
                        "dates": [BASE, BASE + 60, BASE + 120, BASE + 180],
                        "stats": [{"aggregation": "avg", "values": [15, 0, 40, 0]}],
                    }
                ],
            }
        ]
    }


async def test_stats_buckets_are_aligned_to_the_epoch_not_to_a_round_date(client):
    # 1_699_999_203 is a multiple of 7; BASE (…200) and 2000-01-03, time_bucket's default origin, are not
    await report(client, "w1", 1_699_999_201, {"memory_used": 1})
    await report(client, "w1", 1_699_999_203, {"memory_used": 2})
    await report(client, "w1", 1_699_999_209, {"memory_used": 4})
    data = await get_stats(client, 1_699_999_200, 1_699_999_217, 7, [{"key": "memory_used"}])
    assert series(data) == {
        ("w1", "memory_used", None): {"dates": [1_699_999_196, 1_699_999_203, 1_699_999_210], "avg": [1, 3, 0]}
    }


@pytest.mark.parametrize(
    "to_offset, dates, values",
    [
        (289, [BASE, BASE + 100], [0, 1]),  # last bucket starts at 200 > 289 - 90: dropped
        (290, [BASE, BASE + 100, BASE + 200], [0, 1, 2]),  # 200 is not later than 290 - 90: kept
    ],
    ids=["dropped", "kept"],
)
async def test_stats_incomplete_last_bucket(client, to_offset, dates, values):
    await report(client, "w1", BASE + 150, {"memory_used": 1})
    await report(client, "w1", BASE + 205, {"memory_used": 2})
    data = await get_stats(client, BASE, BASE + to_offset, 100, [{"key": "memory_used"}])
    assert series(data) == {("w1", "memory_used", None): {"dates": dates, "avg": values}}


async def test_stats_point_at_to_date_counts_and_one_after_does_not(client):
    await report(client, "w1", BASE + 290, {"memory_used": 4})
    await report(client, "w1", BASE + 290.5, {"memory_used": 100})
    data = await get_stats(client, BASE, BASE + 290, 100, [{"key": "memory_used", "aggregation": "max"}])
    assert series(data) == {
        ("w1", "memory_used", None): {"dates": [BASE, BASE + 100, BASE + 200], "max": [0, 0, 4]}
    }


async def test_stats_point_at_from_date_counts_and_one_before_does_not(client):
    await report(client, "w1", BASE + 9.5, {"memory_used": 100})
    await report(client, "w1", BASE + 10, {"memory_used": 3})
    data = await get_stats(client, BASE + 10, BASE + 100, 50, [{"key": "memory_used", "aggregation": "max"}])
    assert series(data) == {("w1", "memory_used", None): {"dates": [BASE, BASE + 50], "max": [3, 0]}}


async def test_stats_values_as_long_as_dates_for_every_metric(client):
    await report(client, "w1", BASE + 3, {"cpu_usage": [1, 2], "memory_used": 5})
    await report(client, "w2", BASE + 77, {"cpu_usage": [3]})
    items = [{"key": "cpu_usage", "aggregation": "min"}, {"key": "cpu_usage"}, {"key": "memory_used"}]
    data = await get_stats(client, BASE + 0.5, BASE + 99.5, 10, items, split_by_variant=True)
    dates = [BASE + 10 * i for i in range(10)]
    entries = [entry for worker in data["workers"] for entry in worker["metrics"]]
    assert len(entries) == 4
    for entry in entries:
        assert entry["dates"] == dates
        assert [len(stat["values"]) for stat in entry["stats"]] == [len(dates)] * len(entry["stats"])


# --- get_stats: aggregations and variants -------------------------------------------------


async def test_stats_avg_min_max_of_one_key_share_one_metric_entry(client):
    for offset, value in [(1, 1), (2, 2), (3, 6), (61, 10)]:
        await report(client, "w1", BASE + offset, {"memory_used": value})
    items = [{"key": "memory_used", "aggregation": a} for a in ("avg", "min", "max")]
    data = await get_stats(client, BASE, BASE + 120, 60, items)
    [worker] = data["workers"]
    [entry] = worker["metrics"]
    assert entry["dates"] == [BASE, BASE + 60]
    assert {stat["aggregation"]: stat["values"] for stat in entry["stats"]} == {
        "avg": [3, 10],
        "min": [1, 10],
        "max": [6, 10],
    }


async def test_stats_aggregation_defaults_to_avg(client):
    await report(client, "w1", BASE + 1, {"memory_used": 1})
    await report(client, "w1", BASE + 2, {"memory_used": 4})
    data = await get_stats(client, BASE, BASE + 60, 60, [{"key": "memory_used"}])
    assert data["workers"][0]["metrics"][0]["stats"] == [{"aggregation": "avg", "values": [2.5]}]


async def test_stats_without_split_aggregate_all_variants_together(client):
    await report(client, "w1", BASE + 1, {"cpu_usage": [10, 30, 50], "gpu_temperature": [50, 70]})
    await report(client, "w1", BASE + 2, {"cpu_usage": [90], "gpu_temperature": [60, 65]})
    items = [{"key": "cpu_usage", "aggregation": "avg"}, {"key": "gpu_temperature", "aggregation": "max"}]
    data = await get_stats(client, BASE, BASE + 60, 60, items)
    entries = data["workers"][0]["metrics"]
    assert all("variant" not in entry for entry in entries)
    assert series(data) == {
        # the average of the four per-core values, not of the two per-report averages (60)
        ("w1", "cpu_usage", None): {"dates": [BASE], "avg": [45]},
        ("w1", "gpu_temperature", None): {"dates": [BASE], "max": [70]},
    }


async def test_stats_split_by_variant_gives_one_entry_per_variant(client):
    await report(client, "w1", BASE + 1, {"cpu_usage": [10, 30], "memory_used": 5})
    await report(client, "w1", BASE + 2, {"cpu_usage": [20, 50], "memory_used": 7})
    items = [{"key": "cpu_usage"}, {"key": "memory_used"}]
    data = await get_stats(client, BASE, BASE + 60, 60, items, split_by_variant=True)
    assert all("variant" in entry for entry in data["workers"][0]["metrics"])
    assert series(data) == {
        ("w1", "cpu_usage", "0"): {"dates": [BASE], "avg": [15]},
        ("w1", "cpu_usage", "1"): {"dates": [BASE], "avg": [40]},
        ("w1", "memory_used", "total"): {"dates": [BASE], "avg": [6]},
    }


# --- get_stats: which workers and metrics -------------------------------------------------


async def test_stats_of_the_requested_workers_only(client):
    for worker, value in [("w1", 1), ("w2", 2), ("w3", 3)]:
        await report(client, worker, BASE + 1, {"memory_used": value})
    data = await get_stats(client, BASE, BASE + 60, 60, [{"key": "memory_used"}], worker_ids=["w1", "w3"])
    assert series(data) == {
        ("w1", "memory_used", None): {"dates": [BASE], "avg": [1]},
        ("w3", "memory_used", None): {"dates": [BASE], "avg": [3]},
    }


async def test_stats_only_of_workers_with_data_for_a_requested_metric_in_the_range(client):
    await report(client, "w1", BASE + 1, {"cpu_usage": [5]})
    await report(client, "w2", BASE + 1, {"memory_used": 1})  # another metric
    await report(client, "w3", BASE + 1)  # no machine_stats
    await report(client, "w4", BASE + 100, {"cpu_usage": [5]})  # after to_date
    data = await get_stats(client, BASE, BASE + 60, 60, [{"key": "cpu_usage"}])
    assert [worker["worker"] for worker in data["workers"]] == ["w1"]


async def test_stats_metric_without_data_is_omitted_for_that_worker(client):
    await report(client, "w1", BASE + 1, {"cpu_usage": [5], "memory_used": 1})
    await report(client, "w2", BASE + 1, {"cpu_usage": [7]})
    data = await get_stats(client, BASE, BASE + 60, 60, [{"key": "cpu_usage"}, {"key": "memory_used"}])
    assert series(data) == {
        ("w1", "cpu_usage", None): {"dates": [BASE], "avg": [5]},
        ("w1", "memory_used", None): {"dates": [BASE], "avg": [1]},
        ("w2", "cpu_usage", None): {"dates": [BASE], "avg": [7]},
    }


async def test_stats_without_matching_data_is_an_empty_list(client):
    await report(client, "w1", BASE + 1, {"cpu_usage": [5]})
    assert await get_stats(client, BASE, BASE + 60, 60, [{"key": "memory_used"}]) == {"workers": []}
    assert await get_stats(client, BASE + 60, BASE + 120, 60, [{"key": "cpu_usage"}]) == {"workers": []}


# --- get_stats and get_activity_report: request checks ------------------------------------


@pytest.mark.parametrize("endpoint", ["workers.get_stats", "workers.get_activity_report"])
@pytest.mark.parametrize("to_offset", [0, -1], ids=["equal", "before"])
async def test_from_date_not_before_to_date_is_16(client, endpoint, to_offset):
    body = {"from_date": BASE, "to_date": BASE + to_offset, "interval": 60, "items": [{"key": "cpu_usage"}]}
    code, subcode, _, _ = await call(client, endpoint, body)
    assert (code, subcode) == (400, 16)


async def test_stats_interval_below_the_minimum_is_raised_to_it(make_client):
    client = await make_client(min_chart_interval=40)
    await report(client, "w1", BASE + 45, {"memory_used": 1})
    await report(client, "w1", BASE + 85, {"memory_used": 3})
    data = await get_stats(client, BASE, BASE + 120, 10, [{"key": "memory_used"}])
    assert series(data) == {("w1", "memory_used", None): {"dates": [BASE, BASE + 40, BASE + 80], "avg": [0, 1, 3]}}


async def test_activity_interval_below_the_minimum_is_raised_to_it(make_client):
    client = await make_client(min_chart_interval=40)
    await report(client, "w1", BASE + 45, task="t1")
    data = await activity(client, BASE, BASE + 120, 10)
    assert data == {
        "total": {"dates": [BASE, BASE + 40, BASE + 80], "counts": [0, 1, 0]},
        "active": {"dates": [BASE, BASE + 40, BASE + 80], "counts": [0, 1, 0]},
    }


@pytest.mark.parametrize("endpoint", ["workers.get_stats", "workers.get_activity_report"])
async def test_too_many_buckets_is_16_naming_the_limit(make_client, endpoint):
    client = await make_client(max_chart_buckets=7)
    body = {"from_date": BASE, "to_date": BASE + 80, "interval": 10, "items": [{"key": "cpu_usage"}]}  # 8 buckets
    code, subcode, message, _ = await call(client, endpoint, body)
    assert (code, subcode) == (400, 16)
    assert re.search(r"\b7\b", message), message


@pytest.mark.parametrize("endpoint", ["workers.get_stats", "workers.get_activity_report"])
async def test_as_many_buckets_as_the_limit_is_accepted(make_client, endpoint):
    client = await make_client(max_chart_buckets=7)
    body = {"from_date": BASE, "to_date": BASE + 70, "interval": 10, "items": [{"key": "cpu_usage"}]}  # 7 buckets
    await ok(client, endpoint, body)


# --- get_activity_report ------------------------------------------------------------------


async def test_activity_total_counts_distinct_reporting_workers(client):
    await report(client, "w1", BASE + 1, {"cpu_usage": [1]})
    await report(client, "w1", BASE + 2)  # the same worker again: counted once
    await report(client, "w2", BASE + 3)
    await report(client, "w2", BASE + 61)
    data = await activity(client, BASE, BASE + 120, 60)
    assert data["total"] == {"dates": [BASE, BASE + 60], "counts": [2, 1]}


async def test_activity_active_counts_distinct_workers_reporting_a_task(client):
    await report(client, "w1", BASE + 1, task="t1")
    await report(client, "w1", BASE + 2, task="t1")  # the same worker again: counted once
    await report(client, "w2", BASE + 3)  # no task
    await report(client, "w3", BASE + 4, task="")  # empty task
    await report(client, "w4", BASE + 5, task="t2")
    await report(client, "w4", BASE + 6)  # a task in another report of the bucket is enough
    data = await activity(client, BASE, BASE + 60, 60)
    assert data == {"total": {"dates": [BASE], "counts": [4]}, "active": {"dates": [BASE], "counts": [2]}}


async def test_activity_buckets_are_epoch_aligned_and_zero_filled(client):
    await report(client, "w1", BASE + 70, task="t1")
    data = await activity(client, BASE + 25, BASE + 250, 60)
    dates = [BASE, BASE + 60, BASE + 120, BASE + 180]
    assert data == {
        "total": {"dates": dates, "counts": [0, 1, 0, 0]},
        "active": {"dates": dates, "counts": [0, 1, 0, 0]},
    }


async def test_activity_buckets_are_aligned_to_the_epoch_not_to_a_round_date(client):
    await report(client, "w1", 1_699_999_202)
    await report(client, "w2", 1_699_999_203)
    data = await activity(client, 1_699_999_200, 1_699_999_210, 7)
    assert data["total"] == {"dates": [1_699_999_196, 1_699_999_203], "counts": [1, 1]}


@pytest.mark.parametrize(
    "to_offset, dates, counts",
    [
        (289, [BASE, BASE + 100], [0, 1]),  # last bucket starts at 200 > 289 - 90: dropped
        (290, [BASE, BASE + 100, BASE + 200], [0, 1, 1]),  # 200 is not later than 290 - 90: kept
    ],
    ids=["dropped", "kept"],
)
async def test_activity_incomplete_last_bucket(client, to_offset, dates, counts):
    await report(client, "w1", BASE + 150)
    await report(client, "w1", BASE + 205)
    data = await activity(client, BASE, BASE + to_offset, 100)
    assert data["total"] == {"dates": dates, "counts": counts}


async def test_activity_counts_reports_from_from_date_through_to_date(client):
    await report(client, "w1", BASE + 9.5)  # before from_date
    await report(client, "w2", BASE + 10)  # at from_date
    await report(client, "w3", BASE + 290)  # at to_date
    await report(client, "w4", BASE + 290.5)  # after to_date
    data = await activity(client, BASE + 10, BASE + 290, 100)
    assert data["total"] == {"dates": [BASE, BASE + 100, BASE + 200], "counts": [1, 0, 1]}


# --- extensions: empty buckets as null, the partial last bucket, activity of some workers --


async def test_stats_empty_buckets_null_where_the_worker_sent_nothing(client):
    await report(client, "w1", BASE + 30, {"memory_used": 10, "gpu_usage": [0.0]})
    await report(client, "w1", BASE + 130, {"memory_used": 0.0})
    items = [{"key": "memory_used"}, {"key": "memory_used", "aggregation": "max"}, {"key": "gpu_usage"}]
    data = await get_stats(client, BASE, BASE + 250, 60, items, empty_buckets="null")
    dates = [BASE, BASE + 60, BASE + 120, BASE + 180]
    assert series(data) == {
        # a 0 sent stays 0; a bucket without a value of the metric is null
        ("w1", "memory_used", None): {"dates": dates, "avg": [10, None, 0, None], "max": [10, None, 0, None]},
        ("w1", "gpu_usage", None): {"dates": dates, "avg": [0, None, None, None]},
    }
    zero = await get_stats(client, BASE, BASE + 250, 60, items, empty_buckets="zero")
    assert series(zero) == series(await get_stats(client, BASE, BASE + 250, 60, items))
    assert series(zero)[("w1", "memory_used", None)]["avg"] == [10, 0, 0, 0]


@pytest.mark.parametrize("endpoint", ["workers.get_stats", "workers.get_activity_report"])
@pytest.mark.parametrize(
    "fields, name",
    [({"empty_buckets": "none"}, "empty_buckets"), ({"empty_buckets": 0}, "empty_buckets"),
     ({"include_partial_bucket": "yes"}, "include_partial_bucket"), ({"worker_ids": "w1"}, "worker_ids")],
)  # fmt: skip
async def test_bad_extension_fields_are_12_naming_the_field(client, endpoint, fields, name):
    if endpoint == "workers.get_activity_report" and name == "empty_buckets":
        return  # not a field of the activity report: ignored, like any unknown field
    body = {"from_date": BASE, "to_date": BASE + 60, "interval": 60, "items": [{"key": "cpu_usage"}], **fields}
    code, subcode, message, _ = await call(client, endpoint, body)
    assert (code, subcode) == (400, 12)
    assert name in message, message


@pytest.mark.parametrize("to_offset", [289, 250, 201])
async def test_stats_partial_last_bucket_is_answered_and_marked(client, to_offset):
    await report(client, "w1", BASE + 150, {"memory_used": 1})
    await report(client, "w1", BASE + 201, {"memory_used": 2})
    await report(client, "w1", BASE + 290, {"memory_used": 8})  # after every to_date here
    items = [{"key": "memory_used"}]
    data = await get_stats(client, BASE, BASE + to_offset, 100, items, include_partial_bucket=True)
    assert series(data) == {("w1", "memory_used", None): {"dates": [BASE, BASE + 100, BASE + 200], "avg": [0, 1, 2]}}
    assert data["partial_since"] == (BASE + 200) * 1000
    plain = await get_stats(client, BASE, BASE + to_offset, 100, items)
    assert "partial_since" not in plain
    assert series(plain)[("w1", "memory_used", None)]["dates"] == [BASE, BASE + 100]


async def test_partial_since_only_when_the_last_bucket_ends_after_to_date(client):
    await report(client, "w1", BASE + 50, {"memory_used": 1})
    await report(client, "w1", BASE + 150, {"memory_used": 3}, task="t1")
    items = [{"key": "memory_used"}]
    whole = await get_stats(client, BASE, BASE + 199.5, 100, items, include_partial_bucket=True)
    assert series(whole) == {("w1", "memory_used", None): {"dates": [BASE, BASE + 100], "avg": [1, 3]}}
    assert whole["partial_since"] == (BASE + 100) * 1000  # [100, 200) ends after 199.5
    exact = await get_stats(client, BASE, BASE + 100, 100, items, include_partial_bucket=True)
    assert series(exact) == {("w1", "memory_used", None): {"dates": [BASE, BASE + 100], "avg": [1, 0]}}
    assert exact["partial_since"] == (BASE + 100) * 1000  # the bucket holding to_date, to_date alone
    counts = await activity(client, BASE, BASE + 250, 100, include_partial_bucket=True)
    assert counts["total"] == {"dates": [BASE, BASE + 100, BASE + 200], "counts": [1, 1, 0]}
    assert counts["active"]["counts"] == [0, 1, 0]
    assert counts["partial_since"] == (BASE + 200) * 1000
    assert "partial_since" not in await activity(client, BASE, BASE + 250, 100)


async def test_activity_of_the_workers_asked_for(client):
    await report(client, "w1", BASE + 1, task="t1")
    await report(client, "w2", BASE + 2)
    await report(client, "w3", BASE + 61, task="t3")
    data = await activity(client, BASE, BASE + 120, 60, worker_ids=["w2", "w3", "unknown"])
    assert data["total"] == {"dates": [BASE, BASE + 60], "counts": [1, 1]}
    assert data["active"] == {"dates": [BASE, BASE + 60], "counts": [0, 1]}
    nobody = await activity(client, BASE, BASE + 120, 60, worker_ids=["unknown"])
    assert nobody["total"]["counts"] == [0, 0] and nobody["active"]["counts"] == [0, 0]
    everyone = await activity(client, BASE, BASE + 120, 60, worker_ids=[])
    assert everyone["total"]["counts"] == [2, 1]


async def test_activity_worker_ids_beyond_the_limit_is_16(make_client):
    client = await make_client(max_stats_worker_ids=2)
    body = {"from_date": BASE, "to_date": BASE + 60, "interval": 60, "worker_ids": ["a", "b", "c"]}
    code, subcode, message, _ = await call(client, "workers.get_activity_report", body)
    assert (code, subcode) == (400, 16)
    assert "worker_ids" in message, message
