"""`python -m server import FILE` (server/importer.py) on bench/history.py's histories and on
the ClearML export of docs/bulk-import.md: imported reports are stored as the API stores
reports (read back through get_stats, get_metric_keys and the `worker_stat_points` view)
without touching any registration; with one invalid line nothing is stored."""

import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import orjson
from helpers import ROOT, ok

from server.storage import tenants

EXPORT_DOC = ROOT / "docs" / "bulk-import.md"
CLEARML_DOCUMENTS = Path(__file__).parent / "clearml-worker-stats.ndjson"  # as the apiserver writes them


def run_import(dsn: str, source: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", "import", source], cwd=ROOT, input=stdin, capture_output=True, timeout=300,
        env={**os.environ, "WORKERS_DB_DSN": dsn, **(env or {})},
    )  # fmt: skip


def points_of(reports: list[dict], company: str) -> list[tuple]:
    """Every value of these reports as a point (company, worker, ms, task, metric, variant, value)."""
    points = []
    for report in reports:
        milliseconds = report["timestamp"] if report["timestamp"] > 10**11 else report["timestamp"] * 1000
        for metric, value in report["machine_stats"].items():
            variants = {"total": value} if not isinstance(value, list) else {str(i): item for i, item in enumerate(value)}
            points += [(company, report["worker"], milliseconds, report.get("task"), metric, variant, item)
                       for variant, item in variants.items() if item is not None]  # fmt: skip
    return sorted(points)


async def stored_points(db_conn) -> list[tuple]:
    rows = await db_conn.fetch(
        """SELECT company, worker, round(extract(epoch FROM time) * 1000)::bigint, task, metric, variant, value
           FROM worker_stat_points"""
    )
    return sorted(tuple(row) for row in rows)


async def test_a_history_is_stored_as_the_api_stores_reports_and_registers_no_one(make_client, dsn, db_conn, tmp_path):
    client = await make_client(company="history")
    await ok(client, "workers.register", {"worker": "bench-0", "tags": ["live"]})  # left as it is
    registered = await ok(client, "workers.get_all", {"last_seen": 0})
    end = int(time.time())
    path = tmp_path / "history.ndjson"
    subprocess.run([sys.executable, "-m", "bench.history", "--workers", "3", "--hours", "0.5", "--end", str(end),
                    "--company", "history", "--out", str(path)], cwd=ROOT, check=True, timeout=120)  # fmt: skip
    reports = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [report["timestamp"] for report in reports] == sorted(report["timestamp"] for report in reports)

    done = run_import(dsn, str(path))
    assert done.returncode == 0, done.stderr.decode()
    assert f"{len(reports):,} reports stored".encode() in done.stdout, done.stdout

    assert await stored_points(db_conn) == points_of(reports, client.credentials.company_id)
    assert await ok(client, "workers.get_all", {"last_seen": 0}) == registered
    keys = await ok(client, "workers.get_metric_keys", {})
    assert {key for category in keys["categories"] for key in category["metric_keys"]} == {
        key for report in reports for key in report["machine_stats"]}  # fmt: skip
    chart = await ok(client, "workers.get_stats", {
        "from_date": end - 3600, "to_date": end + 600, "interval": 600,
        "items": [{"key": "cpu_usage", "aggregation": "min"}, {"key": "cpu_usage", "aggregation": "max"}],
    })  # fmt: skip
    cpu = defaultdict(list)  # (worker, bucket start in ms) -> values
    for report in reports:
        cpu[report["worker"], report["timestamp"] // 600_000 * 600_000] += report["machine_stats"]["cpu_usage"]
    assert sorted(worker["worker"] for worker in chart["workers"]) == sorted({worker for worker, _ in cpu})
    for worker in chart["workers"]:
        [metric] = worker["metrics"]
        charted = {stat["aggregation"]: stat["values"] for stat in metric["stats"]}
        for date, low, high in zip(metric["dates"], charted["min"], charted["max"]):
            values = cpu.get((worker["worker"], date), [0])  # buckets without reports: 0
            assert (low, high) == (min(values), max(values)), (worker["worker"], date)


async def test_an_invalid_line_stores_nothing(dsn, db_conn, tmp_path):
    now_ms = int(time.time() * 1000)
    good = {"company": "new-co", "worker": "w1", "timestamp": now_ms, "machine_stats": {"cpu_usage": [1.5, 2]}}
    lines = [
        orjson.dumps(good),
        orjson.dumps({**good, "timestamp": now_ms + 25 * 3600 * 1000}),
        orjson.dumps(good),
        orjson.dumps({**good, "machine_stats": {"cpu_usage": "high"}}),
        orjson.dumps({key: value for key, value in good.items() if key != "company"}),
        b'{"worker": "w1", ',
        b"[1, 2]",
    ]
    path = tmp_path / "reports.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    done = run_import(dsn, str(path))
    assert done.returncode == 1
    problems = done.stderr.decode()
    assert "LINE 2: Validation error: timestamp: Must not be more than 24 hours ahead of the server's clock." in problems
    assert "LINE 4: Validation error: machine_stats: Value of 'cpu_usage' must be a number or a list of numbers." in problems
    assert "LINE 5: Missing required fields: company" in problems
    assert "LINE 6: not JSON" in problems and "LINE 7: not a JSON object" in problems
    assert "5 invalid line(s); nothing stored" in problems
    assert "LINE 1" not in problems and "LINE 3" not in problems
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stat_points") == 0
    assert await tenants.find_company(db_conn, "new-co") is None


async def test_the_settings_per_report_limits_apply(dsn, db_conn, tmp_path):
    line = {"company": "c", "worker": "w1", "timestamp": int(time.time()), "machine_stats": {"cpu_usage": [1, 2, 3]}}
    done = run_import(dsn, "-", orjson.dumps(line), env={"WORKERS_MAX_VALUES_PER_METRIC": "2"})
    assert done.returncode == 1
    assert "LINE 1: Validation error: machine_stats: 'cpu_usage' has 3 values, more than the limit of 2 " \
           "(WORKERS_MAX_VALUES_PER_METRIC)." in done.stderr.decode()  # fmt: skip
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stat_points") == 0


async def test_standard_input_and_a_company_not_seen_before(dsn, db_conn):
    company = "5f0c6d1e2a3b4c5d6e7f8091a2b3c4d5"  # an apiserver's company id, say
    report = {"company": company, "worker": "w1", "timestamp": 1_765_000_000, "task": "t1",  # seconds
              "machine_stats": {"memory_used": 2048.5, "gpu_usage": [97, None, 64], "disk_read": None}}  # fmt: skip
    done = run_import(dsn, "-", orjson.dumps(report) + b"\n\n")  # a blank line is no report
    assert done.returncode == 0, done.stderr.decode()
    assert b"1 reports stored, 2025-12-06 05:46:40 to 2025-12-06 05:46:40 UTC" in done.stdout
    assert dict(await tenants.find_company(db_conn, company)) == {"id": company, "name": company}
    assert await stored_points(db_conn) == [
        (company, "w1", 1_765_000_000_000, "t1", "gpu_usage", "0", 97.0),
        (company, "w1", 1_765_000_000_000, "t1", "gpu_usage", "2", 64.0),
        (company, "w1", 1_765_000_000_000, "t1", "memory_used", "total", 2048.5),
    ]


def documented_export() -> str:
    """The jq program of the export one-liner in docs/bulk-import.md."""
    found = re.search(r"""jq -cn --arg company "\$COMPANY" '([^']+)'""", EXPORT_DOC.read_text())
    assert found, f"no export one-liner in {EXPORT_DOC}"
    return found[1]


async def test_the_documented_clearml_export(dsn, db_conn):
    """The apiserver's per-value documents (elasticdump --sourceOnly, sorted by worker and
    timestamp) grouped back into reports by the documented jq program, then imported: every
    document becomes the point it was, and nothing else."""
    company = "d1bd92a3b039400cbafc60a7a5b1e52b"
    exported = subprocess.run(["jq", "-cn", "--arg", "company", company, documented_export()],
                              input=CLEARML_DOCUMENTS.read_bytes(), capture_output=True, check=True, timeout=30)  # fmt: skip
    reports = [orjson.loads(line) for line in exported.stdout.splitlines()]
    assert reports == [
        {"company": company, "worker": "box-1:gpu:0", "timestamp": 1765000000000,
         "task": "6f1d0c3b9a2e4f5d8c7b6a5f4e3d2c1b", "machine_stats": {
             "cpu_usage": [12.5, 80, 99.9, 0, 3.25, 45.5, 60.125, 1, 7.75, 100, 33.3, 0.5], "cpu_temperature": [61.5],
             "memory_used": 20480.125, "memory_free": 11264, "disk_free_home": 63.2, "network_rx": 4.076,
             "gpu_usage": [97, 64], "gpu_temperature": [78, 77], "gpu_memory_used": [20695, 15502],
             "gpu_memory_free": [3881, 9074], "gpu_fraction": [1, 1]}},
        {"company": company, "worker": "box-1:gpu:0", "timestamp": 1765000030000, "task": None, "machine_stats": {
            "cpu_usage": [1.5, 0, 0.25, 2, 0, 1, 0.5, 0, 0.75, 0, 1.25, 0], "memory_used": 2048.5,
            "memory_free": 29696.25, "gpu_usage": [0, 0]}},
        {"company": company, "worker": "box-2:cpu:0", "timestamp": 1765000010000,
         "task": "0a1b2c3d4e5f60718293a4b5c6d7e8f9", "machine_stats": {"cpu_usage": [55.125], "memory_used": 1024}},
    ]  # fmt: skip
    done = run_import(dsn, "-", exported.stdout)
    assert done.returncode == 0, done.stderr.decode()
    documents = [orjson.loads(line) for line in CLEARML_DOCUMENTS.read_bytes().splitlines()]
    assert await stored_points(db_conn) == sorted(
        (company, doc["worker"], doc["timestamp"], doc["task"], doc["metric"], doc["variant"], doc["value"])
        for doc in documents
    )
