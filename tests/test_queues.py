"""Queues (docs/queues.md, workers.get_queues): the live, busy and idle workers of each queue now,
and over a range the distinct workers listening to each queue and busy per bucket, from the
reports' `queue` / `queues` (queue pseudo-metrics): the same whether rollups or raw reports
serve a bucket, late reports included, equal to a count made here from the reports sent; kept
apart from the metrics in every public view and in get_metric_keys; per company."""

import random

from helpers import call, ok
from test_rollups import BASE, refresh, send

RANGES = [
    (BASE, BASE + 3 * 3600, 3600),
    (BASE + 17.5, BASE + 3 * 3600 - 1, 600),
    (BASE + 1234.5, BASE + 9999, 120),
    (BASE - 600, BASE + 4 * 3600, 1200),
    (BASE + 100, BASE + 2000, 40),
]


def queue_reports(seconds: int, workers: int = 6, period: float = 9.1, seed: int = 3) -> list[dict]:
    """Reports naming queues every way a daemon may: `queues` alone, `queue` alone, both (the
    queue among the list or not), several queues, none at all; some with a task."""
    rng = random.Random(seed)
    reports = []
    for number in range(workers):
        moment = BASE + number * 1.3
        while moment < BASE + seconds:
            body = {"worker": f"w{number}", "timestamp": moment, "machine_stats": {"cpu_usage": [rng.uniform(0, 100)]}}
            phase = int((moment - BASE) // 1500)
            if number == 0:
                body["queues"] = ["default"]
            elif number == 1:
                body["queue"] = "gpu"
            elif number == 2:
                body["queues"], body["queue"] = ["default", "gpu"], "gpu"
            elif number == 3:
                body["queues"], body["queue"] = ["cpu"], "default"
            elif number == 4:
                body["queues"] = ["gpu"] if phase % 2 else ["cpu", "gpu"]
            # w5: no queue at all
            if (phase + number) % 3 == 0:
                body["task"] = f"task-{number}-{phase}"
            reports.append(body)
            moment += period + rng.uniform(-2, 2)
    return reports


def expected(reports: list[dict], from_date: float, to_date: float, dates: list[int]) -> dict:
    """{queue: (listening, busy)} per date, counted from the reports themselves."""
    interval = (dates[1] - dates[0]) // 1000 if len(dates) > 1 else None
    found: dict[str, tuple[list[set], list[set]]] = {}
    for report in reports:
        moment = report["timestamp"]
        if not from_date <= moment <= to_date:
            continue
        queues = set(report.get("queues") or []) | ({report["queue"]} if report.get("queue") else set())
        for position, date in enumerate(dates):
            if date / 1000 <= moment < date / 1000 + (interval or 10**9):
                for queue in queues:
                    listening, busy = found.setdefault(queue, ([set() for _ in dates], [set() for _ in dates]))
                    listening[position].add(report["worker"])
                    if report.get("task"):
                        busy[position].add(report["worker"])
    return {
        queue: ([len(s) for s in listening], [len(s) for s in busy])
        for queue, (listening, busy) in found.items()
        if any(listening)
    }


def charted(answer: dict) -> dict:
    return {entry["queue"]: (entry["chart"]["listening"], entry["chart"]["busy"]) for entry in answer["queues"]
            if any(entry["chart"]["listening"])}  # fmt: skip


async def compare(served_client, raw_client, reports, from_date, to_date, interval) -> dict:
    body = {"from_date": from_date, "to_date": to_date, "interval": interval}
    served = await ok(served_client, "workers.get_queues", body)
    assert served == await ok(raw_client, "workers.get_queues", body)
    assert charted(served) == expected(reports, from_date, to_date, served["dates"])
    return served


async def test_charts_from_rollups_equal_raw_reports_and_the_reports_sent(make_client, dsn, db_conn):
    served_client = await make_client(raw_read_budget_worker_hours=10_000)
    raw_client = await make_client(read_from_rollups=False)
    reports = queue_reports(3 * 3600)
    await send(served_client, reports)
    await refresh(dsn)
    assert await db_conn.fetchval("SELECT count(*) FROM rollup_10m WHERE listening IS NOT NULL") > 0
    for from_date, to_date, interval in RANGES:
        served = await compare(served_client, raw_client, reports, from_date, to_date, interval)
    assert {entry["queue"] for entry in served["queues"]} == {"default", "gpu", "cpu"}
    # A late report (a new queue, a task) is exact at once, and after the next refresh.
    late = {"worker": "w5", "timestamp": BASE + 1800.5, "queues": ["late"], "queue": "default", "task": "late-task"}
    await ok(served_client, "workers.status_report", late)
    reports.append(late)
    for from_date, to_date, interval in RANGES[:3]:
        await compare(served_client, raw_client, reports, from_date, to_date, interval)
    await refresh(dsn)
    for from_date, to_date, interval in RANGES[:3]:
        await compare(served_client, raw_client, reports, from_date, to_date, interval)


async def test_blocks_without_bits_are_read_from_their_lanes(make_client, dsn, db_conn):
    client = await make_client()
    reports = queue_reports(2 * 3600, workers=5)
    await send(client, reports)
    await refresh(dsn)
    body = {"from_date": BASE, "to_date": BASE + 2 * 3600, "interval": 600}
    with_bits = await ok(client, "workers.get_queues", body)
    for table in ("rollup_1m", "rollup_10m", "rollup_1h"):
        await db_conn.execute(f"UPDATE {table} SET listening = NULL, busy = NULL")
    assert await ok(client, "workers.get_queues", body) == with_bits
    assert charted(with_bits) == expected(reports, BASE, BASE + 2 * 3600, with_bits["dates"])


async def test_now_counts_live_busy_and_idle_workers_with_their_machines(make_client, dsn):
    alpha = await make_client(company="alpha")
    beta = await make_client(company="beta")
    stats = {"cpu_usage": [1, 2, 3, 4], "gpu_usage": [50, 0], "memory_used": 1000, "memory_free": 3000}
    await ok(alpha, "workers.register", {"worker": "waiting", "queues": ["default"]})
    await ok(alpha, "workers.status_report", {"worker": "a", "timestamp": BASE, "queues": ["default", "gpu"], "machine_stats": stats, "task": "t1"})
    await ok(alpha, "workers.status_report", {"worker": "b", "timestamp": BASE, "queue": "gpu", "machine_stats": {"cpu_usage": [5, 6]}})
    # A later report without machine stats keeps the last known machine.
    await ok(alpha, "workers.status_report", {"worker": "a", "timestamp": BASE + 10, "queues": ["default", "gpu"], "task": "t1"})
    await ok(beta, "workers.status_report", {"worker": "a", "timestamp": BASE, "queue": "beta-only", "machine_stats": stats})
    answer = await ok(alpha, "workers.get_queues", {})
    assert set(answer) == {"queues"}
    machine = {"cores": 4, "gpus": 2, "memory": 4000.0}
    nobody = {"workers": 0, "cores": 0, "gpus": 0, "memory": 0.0}
    assert answer["queues"] == [
        {"queue": "default", "live": {"workers": 2, **machine}, "busy": {"workers": 1, **machine},
         "idle": {"workers": 1, "cores": 0, "gpus": 0, "memory": 0.0}},
        {"queue": "gpu", "live": {"workers": 2, "cores": 6, "gpus": 2, "memory": 4000.0},
         "busy": {"workers": 1, **machine}, "idle": {"workers": 1, "cores": 2, "gpus": 0, "memory": 0.0}},
    ]  # fmt: skip
    assert [entry["queue"] for entry in (await ok(beta, "workers.get_queues", {}))["queues"]] == ["beta-only"]
    await ok(alpha, "workers.unregister", {"worker": "b"})
    [_, gpu] = (await ok(alpha, "workers.get_queues", {}))["queues"]
    assert gpu["idle"] == nobody and gpu["live"]["workers"] == 1
    # The chart of one company never counts the other's workers (both have a worker "a").
    body = {"from_date": BASE - 60, "to_date": BASE + 60, "interval": 60}
    charts = {entry["queue"]: entry["chart"] for entry in (await ok(beta, "workers.get_queues", body))["queues"]}
    assert set(charts) == {"beta-only"} and sum(charts["beta-only"]["listening"]) == 1


async def test_queues_are_not_metrics(client, dsn, db_conn):
    await send(client, queue_reports(2 * 3600, workers=5))
    await refresh(dsn)
    keys = await ok(client, "workers.get_metric_keys", {})
    assert [key for category in keys["categories"] for key in category["metric_keys"]] == ["cpu_usage"]
    body = {"from_date": BASE, "to_date": BASE + 7200, "interval": 600, "items": [{"key": "default"}, {"key": "gpu"}]}
    assert (await ok(client, "workers.get_stats", body))["workers"] == []
    since, until = "to_timestamp($1)", "to_timestamp($2)"
    for relation in ("worker_stat_points", "worker_metric_rollup_1m", "worker_metric_rollup_10m", "worker_metric_rollup_1h",
                     "worker_stat_rollup_1m", "worker_stat_rollup_10m", "worker_stat_rollup_1h"):  # fmt: skip
        for source in (relation, f"{relation}({since}, {until})"):
            arguments = (BASE, BASE + 7200) if "(" in source else ()
            metrics = await db_conn.fetch(f"SELECT DISTINCT metric FROM {source} AS t", *arguments)
            assert [row["metric"] for row in metrics] == ["cpu_usage"], source
    keys = await db_conn.fetch("SELECT DISTINCT jsonb_object_keys(metrics) AS key FROM worker_stats")
    assert [row["key"] for row in keys] == ["cpu_usage"]
    for tier in ("1m", "10m", "1h"):
        queues = await db_conn.fetch(f"SELECT DISTINCT queue FROM worker_queue_{tier}({since}, {until}) ORDER BY 1", BASE, BASE + 7200)
        assert [row["queue"] for row in queues] == ["cpu", "default", "gpu"]


async def test_queue_views_count_as_the_endpoint(client, dsn, db_conn):
    reports = queue_reports(3 * 3600, workers=5)
    await send(client, reports)
    await refresh(dsn)
    answer = await ok(client, "workers.get_queues", {"from_date": BASE, "to_date": BASE + 3 * 3600, "interval": 3600})
    rows = await db_conn.fetch(
        """SELECT queue, time, count(*) AS listening, count(*) FILTER (WHERE busy) AS busy
           FROM worker_queue_1h(to_timestamp($1), to_timestamp($2)) GROUP BY 1, 2 ORDER BY 1, 2""",
        BASE, BASE + 3 * 3600 - 1,
    )  # fmt: skip
    views: dict = {}
    for row in rows:
        listening, busy = views.setdefault(row["queue"], ([], []))
        listening.append(row["listening"])
        busy.append(row["busy"])
    assert views == charted(answer)


async def test_a_range_is_whole_and_valid(client, db_conn):
    for body, code, named in [
        ({"from_date": BASE}, (400, 11), "to_date, interval"),
        ({"from_date": BASE, "to_date": BASE + 60}, (400, 11), "interval"),
        ({"interval": 60}, (400, 11), "from_date, to_date"),
        ({"from_date": BASE, "to_date": BASE + 60, "interval": "x"}, (400, 12), "interval"),
        ({"from_date": -1, "to_date": BASE, "interval": 60}, (400, 12), "from_date"),
        ({"from_date": BASE, "to_date": BASE, "interval": 60}, (400, 16), "from_date"),
        ({"from_date": BASE, "to_date": BASE + 10**8, "interval": 1}, (400, 16), "WORKERS_MAX_CHART_BUCKETS"),
    ]:
        result, subcode, message, data = await call(client, "workers.get_queues", body)
        assert ((result, subcode), data) == (code, {}), message
        assert named in message, message


async def test_partial_bucket_and_empty_company(client):
    body = {"from_date": BASE, "to_date": BASE + 90, "interval": 60, "include_partial_bucket": True}
    assert await ok(client, "workers.get_queues", body) == {
        "queues": [], "dates": [BASE // 60 * 60_000, (BASE // 60 + 1) * 60_000], "partial_since": (BASE // 60 + 1) * 60_000
    }  # fmt: skip
    await ok(client, "workers.status_report", {"worker": "w", "timestamp": BASE + 70, "queue": "q"})
    answer = await ok(client, "workers.get_queues", body)
    assert answer["queues"][0]["chart"] == {"listening": [0, 1], "busy": [0, 0]}
