"""Read benchmark: chart reads served by the rollups against the raw-only path.

    bench/reads.sh [--workers 200] [--days 1] [--period 10] [--runs 5] [--reload] [--database NAME]
                  [--only REGEX] [--no-raw]

(`bench/reads.sh` prepares the venv and the local database, then runs
`python -m bench.reads` with the same arguments.)

On the cluster of WORKERS_DB_DSN (default: the local one of scripts/local-timescaledb.sh)
it keeps a database of its own (--database, default `workers_bench_reads`: keep a 7-day
history in another one), and in it:

1. a fleet's history, ending now: one agent-shaped report per worker every --period
   seconds for --days days (bench/history.py: workers of 4 to 64 cores and 0 to 8 GPUs,
   running tasks for minutes to hours, idle in between), in a company of its own, stored
   with `python -m server import`. A history loaded before with the same options,
   migrations and generator, ending less than --days ago, is reused and topped up to now;
   else (or with --reload) the database is dropped and loaded afresh;
2. brings the rollups up to date and packs the reports with `python -m server rollups
   refresh --since START` (START: the history's start, or the end of the reused one; it
   rolls up, then compacts: hours of reports into report_blocks), VACUUM ANALYZE (what
   autovacuum does to settled data), then tops the history up to now once more and
   refreshes that too: the rollups end a minute or so (the refresh's lag) before the
   history, so the end of every read comes from raw rows after the watermark, as in service;
3. starts two servers (`python -m server serve`): one reading rollups, one reading raw
   reports only (WORKERS_READ_FROM_ROLLUPS=false);
4. registers every worker of the history (as a live fleet is: an imported history registers
   none, and how many are registered decides whether a fleet chart may read raw reports:
   docs/charts.md), then times every read through each server's HTTP API, ending at the
   history's end (median of --runs; a read slower than 2 s runs once): get_stats of the fleet
   (24 h @ 600 s), of one worker (4 metrics, 24 h @ 120 s), of ten workers (1 h @ 40 s), the
   fleet page's GPU heatmap (1 h @ 30 s, 24 h @ 600 s), get_activity_report and get_queues
   (24 h @ 600 s), with --days 7 or more the fleet over 7 days @ 3600 s, with --days 30 or
   more get_queues over 30 days (@ 10800 s, the fleet page's, and @ 3000 s); and the SQL
   of every Grafana panel (bench/grafana_sql.py) over 24 h with asyncpg, as Grafana sends
   it (the dashboards call the rollup functions bounded by their time range, e.g.
   worker_metric_rollup_10m(since, until)), beside its raw-only counterpart: the same SQL
   with each call replaced by the same aggregation of worker_stat_points(since, until).
   Raw points are decoded in PL/pgSQL (about 1 µs a value), so a fleet panel's
   counterpart reads only the last 2 hours of the window (FLEET_RAW_WINDOW); a worker's
   panel, the whole 24 h. The HTTP answers are compared whole, a panel's on the rows of its
   raw-only window whose buckets closed before the watermark's hour;
5. prints the load, the storage of every table (raw: report_blocks, recent_reports,
   late_reports; the rollup tiers rollup_1m, rollup_10m, rollup_1h; the dictionaries), and
   the results table.

Exit status 1 when any answer differs between the two paths, or any read fails.
`--only REGEX` times only the reads whose name matches; `--no-raw` times the rollup-served
reads alone (at 2,000 workers a raw-only fleet read takes minutes): exactness is what the
default run and the tests check.
"""

import argparse
import asyncio
import hashlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import orjson

from bench import history as fleet_history
from bench.common import (
    HOST,
    ROOT,
    ApiClient,
    ServerProcess,
    chart_body,
    create_credentials,
    database_dsn,
    free_port,
    log,
    login,
    median,
    recreate_database,
    resolve_dsn,
    run_server_command,
    set_company_limits,
)
from bench.history import worker_id

DEFAULT_DATABASE = "workers_bench_reads"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
DAY = 86400
PAGE_IDS_PER_CALL = 1000  # the fleet page's IDS_PER_CALL
SLOW_RUN_SECONDS = 2.0  # a read slower than this once is not run again
AVG_TOLERANCE = 1e-9  # relative; min, max and counts must be equal
RAW_READ_TIMEOUT = 900  # seconds: the raw-only server's read timeout, and the client's
# Grafana asks for range / max data points (about 1,000 for a wide panel) and rounds it:
# 24 h gives 86 s, which it rounds to 1 m.
GRAFANA_INTERVAL = 60
# The statistics' tables (migrations/006_compact_storage.sql), as printed: raw reports, the
# rollup tiers, the dictionaries.
RAW_TABLES = ("report_blocks", "recent_reports", "late_reports")
ROLLUP_TABLES = ("rollup_1m", "rollup_10m", "rollup_1h")
DICTIONARIES = ("stat_workers", "stat_metrics", "report_layouts")
STATISTICS_TABLES = (*RAW_TABLES, *ROLLUP_TABLES, *DICTIONARIES)
HYPERTABLES = ("report_blocks", "recent_reports", *ROLLUP_TABLES)  # the others are plain tables
# A fleet panel's raw-only counterpart decodes every value of every worker (about 1 µs a
# value in PL/pgSQL: a minute for 200 workers over 24 h), so it reads this much of the end of
# the panel's window only; a worker-detail panel's reads the whole window.
FLEET_RAW_WINDOW = 2 * 3600

# ------------------------------------------------------------------------- the database


def migrations_digest() -> str:
    """Of the migrations, and of the code that generates the history."""
    digest = hashlib.sha256()
    generator = [ROOT / "bench" / "history.py", ROOT / "server" / "demo.py"]
    migrations = sorted(path for path in (ROOT / "migrations").glob("*") if path.suffix in (".sql", ".py"))
    for path in [*migrations, *generator]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


async def database_exists(cluster_dsn: str, name: str) -> bool:
    conn = await asyncpg.connect(cluster_dsn)
    try:
        return await conn.fetchval("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", name)
    finally:
        await conn.close()


@dataclass
class History:
    """The loaded history, as recorded in the bench database (table bench_reads_history)."""

    company: str  # id
    company_name: str
    workers: int
    period: int
    days: float
    migrations: str  # digest of migrations/ when loaded
    start: float  # epoch seconds: the first report's time
    end: float  # epoch seconds: where the last top-up ended
    rows: int = 0
    load_seconds: float = 0.0

    def matches(self, args: argparse.Namespace) -> bool:
        return (self.workers, self.period, self.days, self.migrations) == (
            args.workers, args.period, args.days, migrations_digest())  # fmt: skip


_HISTORY_TABLE = """
CREATE TABLE IF NOT EXISTS bench_reads_history (
    company text, company_name text, workers integer, period integer, days float8, migrations text,
    start float8, "end" float8, rows bigint, load_seconds float8)
"""


async def saved_history(conn: asyncpg.Connection) -> History | None:
    await conn.execute(_HISTORY_TABLE)
    row = await conn.fetchrow("SELECT * FROM bench_reads_history")
    return History(**dict(row)) if row else None


async def save_history(conn: asyncpg.Connection, history: History) -> None:
    await conn.execute(_HISTORY_TABLE)
    async with conn.transaction():
        await conn.execute("DELETE FROM bench_reads_history")
        await conn.execute(
            "INSERT INTO bench_reads_history VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            history.company, history.company_name, history.workers, history.period, history.days,
            history.migrations, history.start, history.end, history.rows, history.load_seconds,
        )  # fmt: skip


def import_reports(dsn: str, history: History, low: float, high: float) -> int:
    """The fleet's reports in [low, high), generated by bench/history.py and stored by
    `python -m server import`; how many were stored."""
    with tempfile.NamedTemporaryFile(prefix="workers-bench-reads-", suffix=".ndjson") as out:
        reports = fleet_history.history(history.workers, low, high, history.period)
        generated = fleet_history.write(out, history.company, reports)
        out.flush()
        log(f"  {generated:,} reports generated; storing them with python -m server import")
        summary = run_server_command(dsn, "import", out.name)
    stored = re.match(r"([\d,]+) reports stored", summary)
    return int(stored[1].replace(",", "")) if stored else 0


def new_company(dsn: str, name: str) -> str:
    """Create the company (with an access key nobody uses) and return its id."""
    create_credentials(dsn, name)
    return asyncio.run(_company_id(dsn, name))


async def _company_id(dsn: str, name: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT id FROM companies WHERE name = $1", name)
    finally:
        await conn.close()


def prepare_history(cluster_dsn: str, dsn: str, args: argparse.Namespace) -> tuple[History, float, str]:
    """The history to read, loaded or topped up to now; the time from which the rollups
    must be rebuilt; and what was done."""
    saved = asyncio.run(_saved_history(cluster_dsn, args.database, dsn))
    now = time.time()
    if saved is not None and saved.matches(args) and not args.reload and now - saved.end < args.days * DAY:
        log(f"reusing the history of company {saved.company_name} ({saved.rows:,} reports); topping it up to now")
        since, loaded_before = saved.end, saved.load_seconds
        copied = asyncio.run(top_up(dsn, saved, now))
        note = (f"reused (loaded before in {loaded_before:,.0f} s), topped up with {copied:,} reports "
                f"in {saved.load_seconds - loaded_before:,.1f} s")  # fmt: skip
        return saved, since, note
    reason = "--reload" if args.reload else "none loaded yet" if saved is None else "other options or migrations"
    log(f"loading a new history ({reason}): database {args.database} recreated")
    asyncio.run(recreate_database(cluster_dsn, args.database))
    log(run_server_command(dsn, "migrate"))
    name = f"bench-reads-{time.strftime('%Y%m%d-%H%M%S')}"
    start = now - args.days * DAY
    history = History(new_company(dsn, name), name, args.workers, args.period, args.days, migrations_digest(), start, start)
    asyncio.run(top_up(dsn, history, now))
    note = (f"generated and imported in {history.load_seconds:,.1f} s ({history.rows / history.load_seconds:,.0f} "
            f"reports/s, python -m server import)")  # fmt: skip
    return history, start, note


async def _saved_history(cluster_dsn: str, database: str, dsn: str) -> History | None:
    if not await database_exists(cluster_dsn, database):
        return None
    conn = await asyncpg.connect(dsn)
    try:
        return await saved_history(conn)
    finally:
        await conn.close()


async def top_up(dsn: str, history: History, until: float) -> int:
    """Import the reports from the history's end to `until`, and record the new end."""
    began = time.monotonic()
    stored = import_reports(dsn, history, history.end, until)
    history.end = until
    history.rows += stored
    history.load_seconds += time.monotonic() - began
    conn = await asyncpg.connect(dsn)
    try:
        await save_history(conn, history)
    finally:
        await conn.close()
    return stored


def refresh_rollups(dsn: str, since: float) -> float:
    """Run the project's refresh, rebuilding every tier from `since` on; the seconds it took."""
    began = time.monotonic()
    log(run_server_command(dsn, "rollups", "refresh", "--since", f"{since:.3f}"))
    return time.monotonic() - began


def catch_up(dsn: str, history: History) -> None:
    """Top the history up to now and refresh what was added (the import logs reports behind
    the watermark as late reports; the refresh since the top-up's start covers them either
    way). The rollups then end about a minute (the refresh's lag) before the history, as in
    service."""
    added_since = history.end
    asyncio.run(top_up(dsn, history, time.time()))
    refresh_rollups(dsn, added_since)


async def vacuum_analyze(dsn: str) -> float:
    """VACUUM ANALYZE every statistics table (what autovacuum does to settled data); seconds taken."""
    began = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        for table in STATISTICS_TABLES:
            await conn.execute(f"VACUUM ANALYZE {table}", timeout=3600)
    finally:
        await conn.close()
    return time.monotonic() - began


async def storage(dsn: str) -> dict[str, int]:
    """Bytes of every statistics table, indexes and TOAST included (a hypertable's: all its chunks')."""
    conn = await asyncpg.connect(dsn)
    try:
        return {table: await conn.fetchval(_table_size(table), table) for table in STATISTICS_TABLES}
    finally:
        await conn.close()


def _table_size(table: str) -> str:
    size = "hypertable_size" if table in HYPERTABLES else "pg_total_relation_size"
    return f"SELECT coalesce({size}($1::regclass), 0)"


async def database_facts(dsn: str, company: str) -> dict[str, object]:
    conn = await asyncpg.connect(dsn)
    try:
        watermark, compacted = await conn.fetchrow(
            "SELECT extract(epoch FROM watermark)::float8, extract(epoch FROM compacted)::float8 FROM rollup_watermark"
        )
        return {
            "postgres": await conn.fetchval("SHOW server_version"),
            "timescaledb": await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"),
            "shared_buffers": await conn.fetchval("SHOW shared_buffers"),
            "watermark": watermark,
            "compacted": compacted,
            "pending": await conn.fetchval("SELECT count(*) FROM rollup_invalidations"),
            "reports": await conn.fetchval(_REPORTS_OF_COMPANY, company),
        }
    finally:
        await conn.close()


# Counted where they are stored: the worker_stats view would decode every block.
_REPORTS_OF_COMPANY = """
SELECT (SELECT coalesce(sum(b.reports), 0) FROM report_blocks AS b JOIN stat_workers AS w ON w.id = b.worker
        WHERE w.company = $1)
     + (SELECT count(*) FROM recent_reports AS r JOIN stat_workers AS w ON w.id = r.worker WHERE w.company = $1)
     + (SELECT count(*) FROM late_reports AS r JOIN stat_workers AS w ON w.id = r.worker WHERE w.company = $1)
"""


# ------------------------------------------------------------------------- reads


@dataclass
class Read:
    name: str
    target_ms: float
    endpoint: str = ""  # workers.* (HTTP) ...
    body: dict = field(default_factory=dict)
    sql: str = ""  # ... or a Grafana panel's SQL, and its raw-only counterpart
    raw_sql: str = ""
    raw_since: float = 0.0  # epoch seconds: the raw-only counterpart reads from here on (0: the whole window)
    worker_lists: list = field(default_factory=list)  # HTTP: one call per list of worker ids, at once


@dataclass
class Timing:
    runs_ms: list[float] = field(default_factory=list)
    answer: object = None
    error: str = ""

    @property
    def median_ms(self) -> float:
        return median(self.runs_ms)


@dataclass
class Result:
    read: Read
    rollups: Timing
    raw: Timing | None  # None: no raw-only counterpart
    differences: list[str] = field(default_factory=list)
    compared_rows: int | None = None  # a panel's: how many rows of the rollups' answer were compared

    @property
    def failed(self) -> bool:
        return bool(self.differences or self.rollups.error or (self.raw and self.raw.error))


def charted_worker(workers: int) -> str:
    """The worker of the one-worker reads: the largest (most GPUs, then most cores)."""
    return max(fleet_history.machines(workers), key=lambda machine: (machine.gpus, machine.cores)).worker


def http_reads(history: History, to_date: float) -> list[Read]:
    cpu = [("cpu_usage", "avg"), ("cpu_usage", "max")]
    gpu = [("gpu_usage", "avg")]
    four = [(key, agg) for key in ("cpu_usage", "memory_used", "gpu_usage", "network_rx") for agg in ("avg", "max")]
    ten = [worker_id(number * history.workers // 10) for number in range(min(10, history.workers))]
    day_ago = to_date - DAY
    fleet = [worker_id(number) for number in range(history.workers)]
    heatmap_lists = [fleet[i : i + PAGE_IDS_PER_CALL] for i in range(0, len(fleet), PAGE_IDS_PER_CALL)]
    if len(heatmap_lists) == 1:
        heatmap_lists = []  # one call without worker ids: every worker
    reads = [
        Read("get_stats fleet cpu avg+max 24 h @ 600 s", 100, "workers.get_stats",
             chart_body(day_ago, to_date, 600, cpu, [])),
        Read("get_stats 1 worker 4 metrics avg+max 24 h @ 120 s", 30, "workers.get_stats",
             chart_body(day_ago, to_date, 120, four, [charted_worker(history.workers)])),
        Read("get_stats 10 workers cpu avg+max 1 h @ 40 s", 30, "workers.get_stats",
             chart_body(to_date - 3600, to_date, 40, cpu, ten)),
        Read("get_activity_report 24 h @ 600 s", 30, "workers.get_activity_report",
             span(day_ago, to_date, 600)),
        # The fleet page's GPU heatmap: every worker's GPU utilisation at about 120 to 150
        # buckets; past 1,000 workers in calls of 1,000 worker ids at once, as the page asks.
        Read("get_stats fleet gpu avg 1 h @ 30 s (GPU heatmap)", 200, "workers.get_stats",
             chart_body(to_date - 3600, to_date, 30, gpu, []) | {"empty_buckets": "null"}, worker_lists=heatmap_lists),
        Read("get_stats fleet gpu avg 24 h @ 600 s (GPU heatmap)", 200, "workers.get_stats",
             chart_body(day_ago, to_date, 600, gpu, []) | {"empty_buckets": "null"}, worker_lists=heatmap_lists),
    ]  # fmt: skip
    reads.append(Read("get_queues 24 h @ 600 s", 100, "workers.get_queues", span(day_ago, to_date, 600)))
    if history.days >= 30:
        month_ago = to_date - 30 * DAY
        reads += [
            Read("get_queues 30 d @ 10800 s (the fleet page's)", 100, "workers.get_queues", span(month_ago, to_date, 10800)),
            Read("get_queues 30 d @ 3000 s (10-minute tier)", 100, "workers.get_queues", span(month_ago, to_date, 3000)),
        ]  # fmt: skip
    if history.days >= 7:
        reads.append(
            Read("get_stats fleet cpu avg+max 7 d @ 3600 s", 200, "workers.get_stats",
                 chart_body(to_date - 7 * DAY, to_date, 3600, cpu, []))
        )  # fmt: skip
    return reads


def span(from_date: float, to_date: float, interval: int) -> dict:
    return {"from_date": from_date, "to_date": to_date, "interval": interval}


async def timed_runs(run_once, runs: int) -> Timing:
    """`runs` runs of `run_once()` -> (ms, answer), or one when it took over SLOW_RUN_SECONDS."""
    timing = Timing()
    for _ in range(runs):
        try:
            elapsed_ms, timing.answer = await run_once()
        except Exception as error:  # reported in the results table
            timing.error = f"{type(error).__name__}: {error}"[:300]
            break
        timing.runs_ms.append(elapsed_ms)
        if elapsed_ms > SLOW_RUN_SECONDS * 1000:
            break
    return timing


async def time_http(client: ApiClient, read: Read, runs: int) -> Timing:
    async def call(body: dict) -> dict:
        _, status, content = await client.call(read.endpoint, body)
        answer = orjson.loads(content)
        if status != 200:
            raise RuntimeError(f"{status}: {answer.get('meta', {}).get('result_msg')}")
        return answer["data"]

    async def run_once():
        began = time.perf_counter()
        if not read.worker_lists:
            data = await call(read.body)
        else:  # the answers' workers together, as the fleet page puts them
            parts = await asyncio.gather(*(call(read.body | {"worker_ids": ids}) for ids in read.worker_lists))
            data = {"workers": [worker for part in parts for worker in part["workers"]]}
        return (time.perf_counter() - began) * 1000, data

    return await timed_runs(run_once, runs)


async def time_sql(conn: asyncpg.Connection, sql: str, runs: int) -> Timing:
    async def run_once():
        began = time.perf_counter()
        rows = await conn.fetch(sql, timeout=RAW_READ_TIMEOUT)
        return (time.perf_counter() - began) * 1000, [tuple(row) for row in rows]

    return await timed_runs(run_once, runs)


def differences(got, want, path: str = "", relative: float = 0.0) -> Iterator[str]:
    """Where `got` differs from `want` (JSON values): numbers exactly, except in a stats
    entry whose aggregation is avg, where AVG_TOLERANCE relative is allowed."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or got.keys() != want.keys():
            yield f"{path}: {_brief(got)} != {_brief(want)}"
            return
        if want.get("aggregation") == "avg":
            relative = AVG_TOLERANCE
        for key in want:
            yield from differences(got[key], want[key], f"{path}.{key}", relative)
    elif isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            yield f"{path}: {_brief(got)} != {_brief(want)}"
            return
        for index, (item_got, item_want) in enumerate(zip(got, want)):
            label = _label(item_want) or str(index)
            yield from differences(item_got, item_want, f"{path}[{label}]", relative)
    elif not _equal(got, want, relative):
        yield f"{path}: {got!r} != {want!r}"


def _label(item) -> str:
    if isinstance(item, dict):
        return "/".join(str(item[key]) for key in ("worker", "metric", "variant", "aggregation") if key in item)
    return ""


def _brief(value) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) < 120 else text[:117] + "..."


def _equal(got, want, relative: float) -> bool:
    if isinstance(got, bool) or isinstance(want, bool) or not isinstance(got, (int, float)) or not isinstance(want, (int, float)):
        return got == want
    return got == want or abs(got - want) <= relative * max(abs(got), abs(want))


# ------------------------------------------------------------------------- Grafana panels

# The rollup functions (migrations/006_compact_storage.sql) computed from the raw points of
# worker_stat_points(since, until), same columns: a panel's raw-only counterpart reads these in
# their place. (worker_activity counts a worker's reports as the distinct times of its points:
# every report of the benchmark's history carries values.)
_RAW_ROLLUPS = {
    "worker_metric_rollup": """SELECT time_bucket('{width}', time) AS time, company, worker, category, metric,
       min(value) AS min, max(value) AS max, avg(value) AS avg, sum(value) AS sum, count(*) AS count
FROM worker_stat_points({since}, {until}) GROUP BY 1, 2, 3, 4, 5""",
    "worker_stat_rollup": """SELECT time_bucket('{width}', time) AS time, company, worker, category, metric, variant,
       min(value) AS min, max(value) AS max, avg(value) AS avg, sum(value) AS sum, count(*) AS count
FROM worker_stat_points({since}, {until}) GROUP BY 1, 2, 3, 4, 5, 6""",
    "worker_activity": """SELECT time_bucket('{width}', time) AS time, company, worker, count(DISTINCT time) AS reports,
       coalesce(bool_or(task <> ''), false) AS busy
FROM worker_stat_points({since}, {until}) GROUP BY 1, 2, 3""",
}
# Like the functions, only the buckets that start between the two times: the first one whole.
_RAW_ROLLUP = "(SELECT * FROM ({query}) AS buckets WHERE time BETWEEN {since} AND {until})"
_WIDTHS = {"1m": "1 minute", "10m": "10 minutes", "1h": "1 hour"}
_ROLLUP_NAME = re.compile(r"\b(worker_metric_rollup|worker_stat_rollup|worker_activity)_(1m|10m|1h)\b", re.I)
# A call of a rollup function as Grafana sends it: its two times are literals.
_ROLLUP_CALL = re.compile(_ROLLUP_NAME.pattern + r"\s*\(\s*('[^']*')\s*,\s*('[^']*')\s*\)(\s+AS\s+\w+)?", re.I)
# The worker-detail dashboard's variable: a panel that uses it charts one worker.
_WORKER_VARIABLE = re.compile(r"\$worker\b|\$\{worker\b|\[\[worker\b")


def raw_panel_sql(sql: str, since: str | None = None) -> str:
    """A panel's SQL with every call of a rollup function replaced by the same aggregation of
    the raw points between the same two times, or from `since` (an SQL literal) on."""

    def raw_rollup(match: re.Match) -> str:
        name, tier = match[1].lower(), match[2].lower()
        low, high = since or match[3], match[4]
        query = _RAW_ROLLUPS[name].format(width=_WIDTHS[tier], since=low, until=high)
        return _RAW_ROLLUP.format(query=query, since=low, until=high) + (match[5] or f" AS {name}_{tier}")

    left = _ROLLUP_NAME.search(_ROLLUP_CALL.sub("", sql))
    if left:
        raise ValueError(f"{left[0]} is not called with two literal times: no raw-only counterpart")
    return _ROLLUP_CALL.sub(raw_rollup, sql)


def _sql_time(moment: float) -> str:
    return f"'{datetime.fromtimestamp(moment, timezone.utc).isoformat()}'"


def compared_rows(rows: list[tuple], since: datetime, before: datetime) -> list[tuple]:
    """A panel's rows (time first) of the buckets from `since` (where the raw-only counterpart's
    window starts) to `before` (the rollups hold only buckets that closed before the
    watermark), in a fixed order."""
    return sorted((row for row in rows if since <= row[0] < before), key=lambda row: tuple(map(str, row)))


def grafana_reads(company: str, worker: str, to_date: float) -> tuple[list[Read], str]:
    """Each dashboard panel's SQL over the last 24 h (bench/grafana_sql.py); and a note when
    there are none."""
    try:
        from bench import grafana_sql
    except ImportError as error:
        return [], f"no Grafana panels timed: bench/grafana_sql.py not importable ({error})"
    reads = []
    for dashboard_name, dashboard in grafana_sql.dashboards().items():
        for title, sql in grafana_sql.panels(dashboard):
            expanded = grafana_sql.expand(
                sql,
                time_from=to_date - DAY,
                time_to=to_date,
                interval_seconds=GRAFANA_INTERVAL,
                variables={"company": company, "worker": worker},
            )
            one_worker = bool(_WORKER_VARIABLE.search(sql))
            reads.append(panel_read(f"grafana {dashboard_name}: {title}", expanded, one_worker, to_date))
    return reads, "" if reads else "no Grafana panels found"


def panel_read(name: str, sql: str, one_worker: bool, to_date: float) -> Read:
    """A panel's read: its SQL, and its raw-only counterpart over the panel's whole window
    (one worker), or over its last FLEET_RAW_WINDOW seconds (the fleet)."""
    if one_worker:
        return Read(name, 100, sql=sql, raw_sql=raw_panel_sql(sql))
    since = to_date - FLEET_RAW_WINDOW
    return Read(name, 100, sql=sql, raw_sql=raw_panel_sql(sql, _sql_time(since)), raw_since=since)


# ------------------------------------------------------------------------- servers


def start_server(name: str, dsn: str, workdir: Path, extra_env: dict[str, str]) -> ServerProcess:
    port = free_port()
    env = {**os.environ, "WORKERS_DB_DSN": dsn, "PYTHONUNBUFFERED": "1", "WORKERS_LOG_LEVEL": "WARNING", **extra_env}
    server = ServerProcess(
        name,
        [sys.executable, "-m", "server", "serve", "--host", HOST, "--port", str(port), "--processes", "1"],
        port, env, workdir / f"{name}.log",
    )  # fmt: skip
    server.start()
    return server


async def run_reads(args, history: History, dsn: str, servers: dict[str, ServerProcess], tokens: dict[str, str]) -> tuple[list[Result], str]:
    """Time every read on both paths and compare the answers; the results, and a note."""
    to_date = history.end
    rollups_client = ApiClient(servers["rollups"].url, tokens["rollups"], 120)
    raw_client = ApiClient(servers["raw"].url, tokens["raw"], RAW_READ_TIMEOUT) if "raw" in servers else None
    panels, note = grafana_reads(history.company, charted_worker(history.workers), to_date)
    panels = [read for read in panels if chosen(read, args.only)]
    conn = await asyncpg.connect(dsn)
    try:
        await register_fleet(rollups_client, history)
        # The rollup-served reads first, while the last minute is still raw rows after the watermark.
        watermark = await conn.fetchval("SELECT watermark FROM rollup_watermark")
        http = [read for read in http_reads(history, to_date) if chosen(read, args.only)]
        served = [await time_http(rollups_client, read, args.runs) for read in http]
        sql_served = [await time_sql(conn, read.sql, args.runs) for read in panels]
        if raw_client is None:
            results = [Result(read, timing, None) for read, timing in zip(http + panels, served + sql_served)]
            return results, note
        results = []
        for read, timing in zip(http, served):
            log(f"raw-only: {read.name}")
            raw = await time_http(raw_client, read, args.runs)
            found = list(differences(timing.answer, raw.answer)) if not (timing.error or raw.error) else []
            results.append(Result(read, timing, raw, found))
        settled_before = EPOCH + timedelta(seconds=watermark.timestamp() // 3600 * 3600)  # every tier's buckets
        for read, timing in zip(panels, sql_served):
            log(f"raw-only: {read.name}")
            raw = await time_sql(conn, read.raw_sql, args.runs)
            result = Result(read, timing, raw)
            if not (timing.error or raw.error):
                since = EPOCH + timedelta(seconds=read.raw_since)
                got = compared_rows(timing.answer, since, settled_before)
                want = compared_rows(raw.answer, since, settled_before)
                result.differences = list(differences(got, want, relative=AVG_TOLERANCE))
                result.compared_rows = len(got)
            results.append(result)
        return results, note
    finally:
        await conn.close()
        await rollups_client.close()
        if raw_client is not None:
            await raw_client.close()


async def register_fleet(client: ApiClient, history: History) -> None:
    """Register every worker of the history, as a live fleet is: the interval a fleet chart is
    answered at depends on how many workers are registered (docs/charts.md), and an imported
    history registers none."""
    for number in range(history.workers):
        _, status, content = await client.call("workers.register", {"worker": worker_id(number)})
        if status != 200:
            raise RuntimeError(f"workers.register answered {status}: {content[:200]!r}")


def chosen(read: Read, only: re.Pattern | None) -> bool:
    return only is None or only.search(read.name) is not None


# ------------------------------------------------------------------------- output


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def print_setup(args, history: History, facts: dict, load_note: str, refresh_s: float, vacuum_s: float) -> None:
    span_days = (history.end - history.start) / DAY
    print(f"READ BENCHMARK: {history.workers} workers x {span_days:.2f} days x one report per {history.period} s "
          f"(company {history.company_name}, database {args.database})")  # fmt: skip
    print(f"  machine: {os.cpu_count()} cores; PostgreSQL {facts['postgres']}, TimescaleDB {facts['timescaledb']}, "
          f"shared_buffers {facts['shared_buffers']}")  # fmt: skip
    print(f"  history: {facts['reports']:,} reports, {load_note}")
    print(f"  rollups refresh (python -m server rollups refresh --since): {refresh_s:,.1f} s; VACUUM ANALYZE {vacuum_s:,.1f} s")
    lag = history.end - facts["watermark"]
    print(f"  reads end at the history's end (now); the rollups' watermark is {lag:,.0f} s before it")
    packed = datetime.fromtimestamp(facts["compacted"], timezone.utc)
    print(f"  reports before {packed:%Y-%m-%d %H:%M} UTC packed in report_blocks (compacted), later ones in recent_reports")
    if facts["pending"]:
        print(f"  WARNING: {facts['pending']} rollup invalidation(s) pending as the reads began (another process "
              f"refreshing?): the rollup path reads raw reports from their start on")  # fmt: skip


def print_storage(sizes: dict[str, int], history: History) -> None:
    worker_days = history.workers * (history.end - history.start) / DAY
    print()
    print("STORAGE (indexes and TOAST included: hypertable_size of a hypertable, pg_total_relation_size of a table)")
    print(f"  {'table':<16}{'total':>14}{'per worker-day':>18}")
    for table, size in sizes.items():
        _print_size(table, size, worker_days)
    _print_size("raw", sum(sizes[table] for table in RAW_TABLES), worker_days)
    _print_size("all rollups", sum(sizes[table] for table in ROLLUP_TABLES), worker_days)


def _print_size(name: str, size: int, worker_days: float) -> None:
    print(f"  {name:<16}{_mb(size):>14}{size / worker_days / 1e3:>15,.1f} kB")


def _ms(timing: Timing | None, runs: int) -> str:
    if timing is None:
        return "-"
    if timing.error:
        return "ERROR"
    return f"{timing.median_ms:,.1f}" + (" *" if len(timing.runs_ms) < runs else "")


def print_results(results: list[Result], runs: int) -> None:
    print()
    print(f"READS (median of {runs} runs; rollups = the server as configured, raw-only = WORKERS_READ_FROM_ROLLUPS=false;"
          f" end to end through the HTTP API, Grafana panels as SQL with asyncpg)")  # fmt: skip
    print(f"  {'read':<58}{'rollups ms':>12}{'raw-only ms':>14}{'raw/rollups':>13}{'target':>9}  {'met?':<5} equal?")
    for result in results:
        rollups, raw = result.rollups, result.raw
        ratio = "-"
        if raw is not None and not result.failed and rollups.median_ms:
            speedup = raw.median_ms / rollups.median_ms
            ratio = f"{speedup:.1f}x" if speedup < 10 else f"{speedup:,.0f}x"
        met = "-" if rollups.error else "yes" if rollups.median_ms <= result.read.target_ms else "NO"
        equal = "-" if raw is None else "ERROR" if result.failed and not result.differences else "NO" if result.differences else "yes"
        if result.compared_rows is not None:
            equal += f" ({result.compared_rows:,} rows)"
        target = f"<= {result.read.target_ms:g}"
        name = result.read.name + (" †" if result.read.raw_since else "")
        print(f"  {name:<58}{_ms(rollups, runs):>12}{_ms(raw, runs):>14}{ratio:>13}{target:>9}  {met:<5} {equal}")
    print(f"  * fewer runs: a run slower than {SLOW_RUN_SECONDS:g} s is not repeated")
    if any(result.read.sql for result in results):
        print("  Grafana panels: over 24 h; compared on the rows of buckets that closed before the watermark's hour")
    if any(result.read.raw_since for result in results):
        print(f"  † raw-only over the last {FLEET_RAW_WINDOW / 3600:g} h of the 24 h window only (a fleet panel's "
              f"raw reads decode every worker's values, ~1 µs each), compared on those rows; raw/rollups "
              f"sets {FLEET_RAW_WINDOW / 3600:g} h raw against 24 h of rollups")  # fmt: skip
    for result in results:
        for timing, path in ((result.rollups, "rollups"), (result.raw, "raw-only")):
            if timing is not None and timing.error:
                print(f"  ERROR {result.read.name} ({path}): {timing.error}")
        if result.differences:
            print(f"  DIFFERENT {result.read.name}: {len(result.differences)} difference(s), e.g.")
            for text in result.differences[:5]:
                print(f"    {text}")


# ------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.reads", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=200, help="fleet size (default 200)")
    parser.add_argument("--days", type=float, default=1, help="days of history (default 1; 7 adds the 7-day chart)")
    parser.add_argument("--period", type=int, default=10, help="seconds between a worker's reports (default 10)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each read (default 5)")
    parser.add_argument("--reload", action="store_true", help="load the history afresh even if one matches")
    parser.add_argument(
        "--database", default=DEFAULT_DATABASE, help=f"the bench's own database, on WORKERS_DB_DSN's cluster "
        f"(default {DEFAULT_DATABASE}); one history each"
    )  # fmt: skip
    parser.add_argument("--only", type=re.compile, metavar="REGEX", help="time only the reads whose name matches")
    parser.add_argument("--no-raw", action="store_true", help="time the rollup-served reads only (no raw-only "
                        "server, no comparison): for fleets whose raw-only reads take minutes")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("workers", "days", "period", "runs"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    if not args.database.startswith(DEFAULT_DATABASE):
        parser.error(f"--database must start with {DEFAULT_DATABASE}: the bench drops and recreates it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster_dsn, _ = resolve_dsn()
    dsn = database_dsn(cluster_dsn, args.database)
    workdir = Path(tempfile.mkdtemp(prefix="workers-bench-reads-"))
    log(f"database {dsn}; server logs in {workdir}")

    history, since, load_note = prepare_history(cluster_dsn, dsn, args)
    log(f"refreshing the rollups since {datetime.fromtimestamp(since, timezone.utc):%Y-%m-%d %H:%M:%S}")
    refresh_s = refresh_rollups(dsn, since)
    vacuum_s = asyncio.run(vacuum_analyze(dsn))
    catch_up(dsn, history)

    # The fleet is registered before the reads (register_fleet): no live-worker limit for it.
    set_company_limits(dsn, history.company_name, "--workers", "0")
    servers = {"rollups": start_server("rollups", dsn, workdir, {})}
    if not args.no_raw:
        servers["raw"] = start_server("raw", dsn, workdir, {
            "WORKERS_READ_FROM_ROLLUPS": "false", "WORKERS_READ_TIMEOUT_SECONDS": str(RAW_READ_TIMEOUT)})  # fmt: skip
    try:
        tokens = {}
        credentials = create_credentials(dsn, history.company_name)
        for name, server in servers.items():
            server.wait_ready(1)
            tokens[name], _ = login(server, credentials["access_key"], credentials["secret_key"])
        facts = asyncio.run(database_facts(dsn, history.company))
        log("timing the reads")
        results, note = asyncio.run(run_reads(args, history, dsn, servers, tokens))
    finally:
        for server in servers.values():
            server.stop()
    sizes = asyncio.run(storage(dsn))

    print_setup(args, history, facts, load_note, refresh_s, vacuum_s)
    print_storage(sizes, history)
    print_results(results, args.runs)
    if note:
        print(f"  {note}")
    failed = [result for result in results if result.failed]
    print()
    print(f"ANSWERS: {'all equal' if not failed else f'{len(failed)} read(s) DIFFERENT or failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        sys.exit(130)
