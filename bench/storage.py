"""The storage benchmark: what the compact storage costs, per value and per tier.

    python -m bench.storage [--workers 100] [--hours 12] [--period 10] [--database workers_bench_storage]
                            [--seed 1]

bench/storage.sh runs it with the venv and the local database; docs/storage-benchmark.md says
how to read it. In a database of its own, recreated on the cluster of WORKERS_DB_DSN:
1. migrates it and notes its size (the empty schema);
2. generates a fleet's history ending now (bench/history.py: N agent-shaped workers x H hours,
   a report per P s) as NDJSON, stores it with `python -m server import`, rolls it up and
   packs it with `python -m server rollups refresh` (every hour before the open one goes to
   report_blocks), then VACUUM ANALYZE and CHECKPOINT;
3. measures the database's growth and every table's size: total, per worker-day, per value;
4. attributes the packed bytes of a sample of worker-hours to each metric, by re-encoding
   each series alone with the codec;
5. checks that a sample of worker-hours reads back through worker_stat_points(since, until)
   bit for bit;
6. times raw-point queries of one worker and a rollup query through SQL;
7. projects the storage of 200 and 2,000 workers at the default retention.
Exit status 1 when a value read back differs from the one sent.
"""

import argparse
import asyncio
import os
import random
import shlex
import struct
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import numpy as np
import orjson

from bench import history
from bench.common import (
    commit_of,
    cores,
    database_bytes,
    database_dsn,
    load_average,
    log,
    median,
    recreate_database,
    resolve_dsn,
    run_server_command,
    uncommitted_files,
)
from server.config import Settings
from server.storage import blocks, compaction
from server.storage.codec import DELTA, DELTA_FOR, FOR, RAW, LanesWriter, SectionReader
from server.storage.rollups import TIERS, floor_to

HOUR = 3600
DAY = 86400
KB, MB, GB = 1e3, 1e6, 1e9
COMPANY = history.DEFAULT_COMPANY
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)

BREAKDOWN_BLOCKS = 200  # worker-hours whose bytes are attributed to metrics
CHECKED_HOURS = 20  # worker-hours read back and compared with the NDJSON
RUNS = 5  # timed runs of each query, after one warm-up
COUNT_BATCH = 100  # blocks decoded at a time to count the values they hold
REFRESHES = 3  # at most: a refresh that crosses an hour leaves that hour to the next one

TARGET_RAW = 2.0  # bytes per value packed, indexes included
TARGET_ROLLUPS = 0.3 * MB  # per worker-day, every rollup tier together
TARGET_ALL = 4.0  # bytes per value sent, every tier

RAW_TABLES = ("report_blocks", "recent_reports", "late_reports")
DICTIONARIES = ("stat_workers", "stat_metrics", "report_layouts")
MODES = {FOR: "FOR", DELTA: "delta", DELTA_FOR: "delta-FOR", RAW: "raw"}


# ------------------------------------------------------------------------- the history


@dataclass
class Sent:
    """What the NDJSON holds: reports and values (every number in machine_stats), and the
    values of the worker-hours to check, as (µs, metric, variant, float64 bits) multisets."""

    reports: int = 0
    values: int = 0
    per_metric: Counter = field(default_factory=Counter)
    per_worker: Counter = field(default_factory=Counter)  # values
    reports_per_worker: Counter = field(default_factory=Counter)
    checked: dict = field(default_factory=lambda: defaultdict(Counter))


def generate(path: Path, args: argparse.Namespace, start: float, end: float) -> int:
    """The fleet's history in [start, end) as NDJSON; how many reports."""
    with open(path, "wb", buffering=1 << 20) as out:
        return history.write(out, COMPANY, history.history(args.workers, start, end, args.period, args.seed))


def bits(value: float) -> bytes:
    return struct.pack(">d", value)


def report_values(stats: dict):
    """(metric, variant, value) of every number of a report's machine_stats."""
    for metric, value in stats.items():
        if isinstance(value, list):
            yield from ((metric, str(i), item) for i, item in enumerate(value) if item is not None)
        elif value is not None:
            yield metric, "total", value


def read_sent(path: Path, wanted: set[tuple[str, int]]) -> Sent:
    """Count the file's reports and values; keep the values of the `wanted` (worker, hour)s."""
    sent = Sent()
    with open(path, "rb") as lines:
        for line in lines:
            report = orjson.loads(line)
            values = list(report_values(report.get("machine_stats") or {}))
            worker, micros = report["worker"], report["timestamp"] * 1000
            sent.reports += 1
            sent.values += len(values)
            sent.per_worker[worker] += len(values)
            sent.reports_per_worker[worker] += 1
            sent.per_metric.update(metric for metric, _, _ in values)
            key = (worker, floor_to(micros // 1_000_000, HOUR))
            if key in wanted:
                sent.checked[key].update((micros, metric, variant, bits(value)) for metric, variant, value in values)
    return sent


def refresh_until_packed(dsn: str) -> list[tuple[str, float]]:
    """`python -m server rollups refresh`, again while it left something to pack (a run
    that crossed an hour leaves that hour to the next); each run's summary and seconds."""
    runs = []
    for _ in range(REFRESHES):
        began = time.monotonic()
        summary = run_server_command(dsn, "rollups", "refresh")
        runs.append((summary, time.monotonic() - began))
        log(summary)
        if not asyncio.run(unpacked(dsn)):
            break
    return runs


_UNPACKED = """
SELECT (SELECT count(*) FROM late_reports)
     + (SELECT count(*) FROM recent_reports, rollup_watermark
        WHERE time < time_bucket('1 hour', materialized - make_interval(secs => $1)))
"""


async def unpacked(dsn: str) -> int:
    """Reports a compaction would pack now: late ones, and rows of hours it no longer keeps open."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(_UNPACKED, compaction.GRACE_SECONDS)
    finally:
        await conn.close()


async def settle(dsn: str) -> None:
    """VACUUM ANALYZE every table, then CHECKPOINT: sizes as autovacuum leaves settled data."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE", timeout=3600)
        await conn.execute("CHECKPOINT", timeout=600)
    finally:
        await conn.close()


# ------------------------------------------------------------------------- the database


@dataclass
class State:
    start: float  # the history's first moment (epoch seconds)
    end: float
    compacted: float  # reports before it are packed
    materialized: float  # the rollup tiers hold the buckets before it
    workers: dict[int, str]  # stat_workers id -> worker
    metrics: dict[int, str]  # stat_metrics id -> name
    chunk_days: dict[str, float]  # hypertable -> chunk interval


@dataclass
class Sizes:
    total: int
    toast: int
    indexes: int
    chunks: int | None  # None: a plain table
    free: int = 0  # free space and dead tuples in the heap and TOAST (pgstattuple): reusable

    @property
    def heap(self) -> int:
        return self.total - self.toast - self.indexes


@dataclass
class Part:
    """A table's size and what it holds."""

    table: str
    sizes: Sizes
    rows: int
    packed: int | None = None  # sum(octet_length(data))
    values: int | None = None  # values held (raw tables)
    held_seconds: float = 0.0  # the span of time it holds, per worker

    @property
    def bytes(self) -> int:
        return self.sizes.total


async def read_state(conn, start: float, end: float) -> State:
    compacted, materialized = await conn.fetchrow(
        "SELECT extract(epoch FROM compacted)::float8, extract(epoch FROM materialized)::float8 FROM rollup_watermark"
    )
    chunks = await conn.fetch(
        "SELECT hypertable_name, extract(epoch FROM time_interval)::float8 / 86400 AS days "
        "FROM timescaledb_information.dimensions"
    )
    return State(
        start=start, end=end, compacted=compacted, materialized=materialized,
        workers=dict(await conn.fetch("SELECT id, worker FROM stat_workers WHERE company = $1", COMPANY)),
        metrics=dict(await conn.fetch("SELECT id, name FROM stat_metrics WHERE company = $1", COMPANY)),
        chunk_days={row["hypertable_name"]: row["days"] for row in chunks},
    )  # fmt: skip


_HYPERTABLE_SIZES = """
SELECT coalesce(sum(total_bytes), 0)::bigint, coalesce(sum(toast_bytes), 0)::bigint,
       coalesce(sum(index_bytes), 0)::bigint,
       (SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = $1::text)
FROM hypertable_detailed_size($1::text::regclass)
"""
_TABLE_SIZES = """
SELECT pg_total_relation_size(c.oid), coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0),
       pg_indexes_size(c.oid), NULL
FROM pg_class AS c WHERE c.oid = $1::text::regclass
"""


# Free space and dead tuples of the tables' (or chunks') heap and TOAST.
_FREE = """
SELECT coalesce(sum(s.free_space + s.dead_tuple_len), 0)::bigint
FROM pg_class AS c
CROSS JOIN LATERAL (VALUES (c.oid), (nullif(c.reltoastrelid, 0))) AS r (oid)
CROSS JOIN LATERAL pgstattuple(r.oid::regclass) AS s
WHERE c.oid = ANY($1::regclass[]) AND r.oid IS NOT NULL
"""


async def table_sizes(conn, table: str, hypertables: set[str]) -> Sizes:
    """hypertable_detailed_size (chunks, their indexes and TOAST) or pg_total_relation_size;
    and the free space inside."""
    if table in hypertables:
        sizes = Sizes(*await conn.fetchrow(_HYPERTABLE_SIZES, table))
        relations = [row[0] for row in await conn.fetch("SELECT show_chunks($1::text::regclass)::text", table)]
    else:
        sizes = Sizes(*await conn.fetchrow(_TABLE_SIZES, table))
        relations = [table]
    sizes.free = await conn.fetchval(_FREE, relations)
    return sizes


_PACKED = "SELECT count(*), coalesce(sum(octet_length(data)), 0)::bigint FROM {table}"
# The metric values of each layout: a report's values are its layout's, less one per queue it
# names (a queue pseudo-metric, stat_metrics.kind 1: docs/queues.md), which no report sent as a value.
_METRIC_VALUES_OF_LAYOUTS = """
SELECT l.id AS layout, count(*) FILTER (WHERE m.kind = 0) AS metric_values
FROM report_layouts AS l CROSS JOIN unnest(l.metrics) AS v (metric) JOIN stat_metrics AS m ON m.id = v.metric
GROUP BY l.id
"""
_ROWS = f"""
SELECT count(*), coalesce(sum(v.metric_values), 0)::bigint
FROM {{table}} AS r LEFT JOIN ({_METRIC_VALUES_OF_LAYOUTS}) AS v USING (layout)
"""


async def measure_parts(conn, state: State) -> list[Part]:
    names = await conn.fetch("SELECT hypertable_name FROM timescaledb_information.hypertables")
    hypertables = {row[0] for row in names}
    parts = []
    for table in RAW_TABLES:
        sizes = await table_sizes(conn, table, hypertables)
        if table == "report_blocks":
            rows, packed = await conn.fetchrow(_PACKED.format(table=table))
            held = max(0.0, min(state.compacted, state.end) - state.start)
            parts.append(Part(table, sizes, rows, packed=packed, held_seconds=held))
        else:
            rows, values = await conn.fetchrow(_ROWS.format(table=table))
            held = state.end - max(state.start, state.compacted) if table == "recent_reports" else 0.0
            parts.append(Part(table, sizes, rows, values=values, held_seconds=max(0.0, held)))
    for tier in TIERS:
        sizes = await table_sizes(conn, tier.table, hypertables)
        rows, packed = await conn.fetchrow(_PACKED.format(table=tier.table))
        # Whole buckets: the history's first, partial one costs as much as any.
        held = floor_to(state.materialized, tier.seconds) - floor_to(state.start, tier.seconds)
        parts.append(Part(tier.table, sizes, rows, packed=packed, held_seconds=held))
    for table in DICTIONARIES:
        rows = await conn.fetchval(f"SELECT count(*) FROM {table}")
        parts.append(Part(table, await table_sizes(conn, table, hypertables), rows))
    return parts


async def leftovers(conn) -> list[str]:
    """What recent_reports and late_reports still hold, in words."""
    found = []
    for table in ("recent_reports", "late_reports"):
        rows, low, high = await conn.fetchrow(f"SELECT count(*), min(time), max(time) FROM {table}")
        found.append(f"{table}: {rows:,} report(s)" + (f", {low:%H:%M:%S} to {high:%H:%M:%S} UTC" if rows else ""))
    return found


async def count_stored_values(conn) -> int:
    """Every metric value of report_blocks (decoded COUNT_BATCH blocks at a time) and of the
    rows; not the queue pseudo-metrics' (one per queue a report names)."""
    queues = {row["id"] for row in await conn.fetch("SELECT id FROM stat_metrics WHERE kind = 1")}
    keys = await conn.fetch("SELECT worker, start FROM report_blocks ORDER BY worker, start")
    total = 0
    for index in range(0, len(keys), COUNT_BATCH):
        batch = await fetch_blocks(conn, keys[index : index + COUNT_BATCH])
        total += sum(
            len(values)
            for reports in decode(batch)
            for metric, values in zip(reports.metrics.tolist(), reports.values)
            if metric not in queues
        )
    for table in ("recent_reports", "late_reports"):
        _, rows = await conn.fetchrow(_ROWS.format(table=table))
        total += rows
    return total


async def fetch_blocks(conn, keys: list) -> list:
    return await conn.fetch(
        "SELECT b.worker, b.start, b.tasks, b.data FROM report_blocks AS b "
        "JOIN unnest($1::integer[], $2::timestamptz[]) AS k (worker, start) USING (worker, start) "
        "ORDER BY b.worker, b.start",
        [key["worker"] for key in keys], [key["start"] for key in keys],
    )  # fmt: skip


def decode(rows: list) -> list[blocks.Reports]:
    return blocks.decode_reports([(bytes(row["data"]), list(row["tasks"])) for row in rows])


async def full_period_data(conn, tier) -> tuple[int, int]:
    """The tier's packed data, and an estimate of it had every block covered its whole
    period (a day of 10-minute buckets, a week of hours): each period's rows repeated, their
    buckets shifted, until the period is full, encoded with blocks.encode_rollup, and counted
    for the buckets it holds. A short history fills these blocks in part, so each worker's
    lanes carry their fixed cost (the sequences' headers) over fewer buckets than in service."""
    groups: dict[tuple[int, int], list] = defaultdict(list)
    for row in await conn.fetch(f"SELECT start, metric, workers, offsets, data FROM {tier.table}"):
        start = int(row["start"].timestamp())
        block = blocks.RollupBlock(np.array(row["workers"]), np.array(row["offsets"]), bytes(row["data"]))
        rows = blocks.decode_rollup(block, row["metric"])
        rows.buckets = rows.buckets + start // tier.seconds
        groups[(row["metric"], floor_to(start, tier.period))].append((len(row["data"]), rows))
    real = estimated = 0
    for found in groups.values():
        real += sum(size for size, _ in found)
        estimated += full_period_bytes(blocks.concatenate([rows for _, rows in found]), tier)
    return real, round(estimated)


def full_period_bytes(rows: blocks.Aggregates, tier) -> float:
    """The bytes of a period's rows had they been a whole period of such rows, per bucket
    they span."""
    first = int(rows.buckets.min())
    span = int(rows.buckets.max()) - first + 1
    period = tier.period // tier.seconds
    copies = []
    for copy in range(-(-period // span)):
        shifted = rows.take(np.arange(len(rows)))
        shifted.buckets = rows.buckets - first + copy * span
        copies.append(shifted)
    whole = blocks.concatenate(copies)
    whole = whole.take(whole.buckets < max(period, span))
    whole = whole.take(np.lexsort((whole.buckets, whole.variants, whole.workers)))
    return len(blocks.encode_rollup(whole).data) * span / max(period, span)


# ------------------------------------------------------------------------- the breakdown


@dataclass
class MetricBytes:
    values: int = 0
    bytes: int = 0
    series: int = 0
    modes: Counter = field(default_factory=Counter)
    scales: Counter = field(default_factory=Counter)  # values per scale (k: 10^-k), -1: raw


@dataclass
class Breakdown:
    blocks: int
    stored_bytes: int
    header_bytes: int
    times_bytes: int  # the times alone, part of the header
    values: int
    metrics: dict[str, MetricBytes]
    reencoded_same: int  # blocks that encode_reports gives back byte for byte


def evenly(items: list, count: int) -> list:
    """`count` items spread evenly over the list (all of them when it has fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


def series_lanes(decoded: list[blocks.Reports]) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray]:
    """Each series re-encoded alone, as its lane of a block is (its presence, then its
    values): the lanes' bytes, their values' kinds (mode << 4 | scale), the series' metric
    ids and value counts."""
    presence = [p if p is not None else np.zeros(0, np.int64) for reports in decoded for p in reports.present]
    values = [v for reports in decoded for v in reports.values]
    writer = LanesWriter(len(values))
    writer.ints(np.concatenate(presence), [len(p) for p in presence])
    writer.floats(np.concatenate(values), [len(v) for v in values])
    data, sizes = writer.to_bytes()
    reader = SectionReader(data, (np.cumsum(sizes) - sizes) * 8)
    reader.next(skip=True)
    kinds = reader.next().kinds
    metrics = [int(metric) for reports in decoded for metric in reports.metrics]
    return sizes, kinds, metrics, np.array([len(v) for v in values])


def times_bytes(decoded: list[blocks.Reports]) -> int:
    """The header's times alone (a lane per block)."""
    writer = LanesWriter(len(decoded))
    writer.ints(np.concatenate([reports.times for reports in decoded]), [len(reports.times) for reports in decoded])
    return int(writer.lane_bytes().sum())


def breakdown(rows: list, names: dict[int, str]) -> Breakdown:
    decoded = decode(rows)
    stored = [bytes(row["data"]) for row in rows]
    again = blocks.encode_reports(decoded)
    sizes, kinds, metric_ids, counts = series_lanes(decoded)
    metrics: dict[str, MetricBytes] = defaultdict(MetricBytes)
    for size, kind, metric, count in zip(sizes.tolist(), kinds.tolist(), metric_ids, counts.tolist()):
        found = metrics[names.get(metric, f"#{metric}")]
        found.values += count
        found.bytes += size
        found.series += 1
        found.modes[kind >> 4] += 1
        found.scales[-1 if kind >> 4 == RAW else kind & 15] += count
    stored_bytes = sum(map(len, stored))
    return Breakdown(
        blocks=len(rows),
        stored_bytes=stored_bytes,
        header_bytes=stored_bytes - int(sizes.sum()),
        times_bytes=times_bytes(decoded),
        values=int(counts.sum()),
        metrics=dict(metrics),
        reencoded_same=sum(data == made for data, (made, _) in zip(stored, again)),
    )


# ------------------------------------------------------------------------- exactness


@dataclass
class Check:
    worker: str
    hour: int
    sent: int
    differences: list[str]


async def read_back(conn, worker: str, hour: int) -> Counter:
    """The worker-hour's values through worker_stat_points(since, until)."""
    since = datetime.fromtimestamp(hour, timezone.utc)
    rows = await conn.fetch(
        "SELECT time, metric, variant, value FROM worker_stat_points($2, $3) WHERE company = $4 AND worker = $1",
        worker, since, since + timedelta(hours=1) - MICROSECOND, COMPANY,
    )  # fmt: skip
    return Counter(
        ((row["time"] - EPOCH) // MICROSECOND, row["metric"], row["variant"], bits(row["value"])) for row in rows
    )


def differences(sent: Counter, got: Counter) -> list[str]:
    missing, extra = sent - got, got - sent
    said = [f"sent, not read back: {item}" for item in list(missing)[:3]]
    said += [f"read back, not sent: {item}" for item in list(extra)[:3]]
    if missing or extra:
        said.append(f"{sum(missing.values()):,} value(s) missing, {sum(extra.values()):,} unexpected")
    return said


async def check_exactness(conn, wanted: set[tuple[str, int]], sent: Sent) -> list[Check]:
    checks = []
    for worker, hour in sorted(wanted):
        expected = sent.checked.get((worker, hour), Counter())
        found = differences(expected, await read_back(conn, worker, hour))
        checks.append(Check(worker, hour, sum(expected.values()), found))
    return checks


def checked_hours(state: State, seed: int) -> set[tuple[str, int]]:
    """CHECKED_HOURS packed worker-hours, chosen at random (seeded)."""
    hours = range(floor_to(state.start, HOUR), int(state.compacted), HOUR)
    pairs = [(worker, hour) for worker in sorted(state.workers.values()) for hour in hours]
    return set(random.Random(seed).sample(pairs, min(CHECKED_HOURS, len(pairs))))


# ------------------------------------------------------------------------- timings


@dataclass
class Timing:
    name: str
    rows: object  # what the query answered, to show
    median_ms: float
    spread_ms: tuple[float, float]
    note: str = ""


async def timed(conn, name: str, sql: str, *arguments, note: str = "") -> Timing:
    await conn.fetch(sql, *arguments)  # warm-up
    seconds, answer = [], None
    for _ in range(RUNS):
        began = time.perf_counter()
        answer = await conn.fetch(sql, *arguments)
        seconds.append((time.perf_counter() - began) * 1000)
    shown = f"{len(answer):,} rows" if len(answer) != 1 else ", ".join(f"{value:,.6g}" for value in answer[0].values())
    return Timing(name, shown, median(seconds), (min(seconds), max(seconds)), note)


_POINTS_BOUNDED = "SELECT count(*), sum(value) FROM worker_stat_points($2, $3) WHERE worker = $1"
_POINTS_VIEW = "SELECT count(*), sum(value) FROM worker_stat_points WHERE worker = $1 AND time BETWEEN $2 AND $3"
_ROLLUP_10M = "SELECT * FROM worker_metric_rollup_10m($2, $3) WHERE company = $1 AND metric = 'cpu_usage'"


def windows(state: State, hours: float) -> list[tuple[str, datetime, datetime]]:
    """Ranges of packed data ending where the open hour begins: 1 h, 12 h (all that is packed
    when the history is shorter), and a day when the history has one."""
    end = datetime.fromtimestamp(state.compacted, timezone.utc) - MICROSECOND
    packed_hours = (state.compacted - state.start) / HOUR
    long = (12.0, "12 h") if packed_hours >= 12 else (packed_hours, f"{packed_hours:.3g} h, all packed")
    spans = [(1.0, "1 h"), long]
    if hours >= 24 and packed_hours >= 24:
        spans.append((24.0, "24 h"))
    return [(label, end - timedelta(hours=span) + MICROSECOND, end) for span, label in spans]


_WORKER_BLOCKS = """
SELECT count(*) FILTER (WHERE b.start > $3::timestamptz - interval '1 hour' AND b.start <= $4), count(*)
FROM report_blocks AS b JOIN stat_workers AS w ON w.id = b.worker WHERE w.company = $1 AND w.worker = $2
"""


async def time_queries(conn, state: State, worker: str, args) -> list[Timing]:
    timings = []
    for label, since, until in windows(state, args.hours):
        in_range, every = await conn.fetchrow(_WORKER_BLOCKS, COMPANY, worker, since, until)
        bounded, view = f"worker_stat_points(since, until), {label}", f"view worker_stat_points, time BETWEEN, {label}"
        some, every_one = f"decodes {in_range} block(s)", f"decodes all {every} of the worker's blocks"
        timings.append(await timed(conn, bounded, _POINTS_BOUNDED, worker, since, until, note=some))
        timings.append(await timed(conn, view, _POINTS_VIEW, worker, since, until, note=every_one))
    since, until = (datetime.fromtimestamp(moment, timezone.utc) for moment in (state.start, state.end))
    timings.append(await timed(conn, f"worker_metric_rollup_10m(since, until), the fleet, {args.hours:g} h",
                               _ROLLUP_10M, COMPANY, since, until))  # fmt: skip
    return timings


# ------------------------------------------------------------------------- output


def per_worker_day(part_bytes: float, held_seconds: float, workers: int) -> float | None:
    return part_bytes / (workers * held_seconds / DAY) if held_seconds > 0 else None


def size_text(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= GB:
        return f"{value / GB:,.2f} GB"
    if value >= MB:
        return f"{value / MB:,.1f} MB"
    return f"{value / KB:,.1f} kB"


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_header(args, dsn: str, versions: tuple[str, str]) -> None:
    command = os.environ.get("BENCH_COMMAND") or shlex.join(["python", "-m", "bench.storage", *sys.argv[1:]])
    print(f"STORAGE: {args.workers:,} agent-shaped workers x {args.hours:g} h, one report per {args.period:g} s, "
          f"seed {args.seed}")
    print(f"  command: {command}")
    print(f"  date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
    print(f"  machine: {cores()} cores; load average {load_average()} at the start")
    changed = uncommitted_files()
    print(f"  commit: {commit_of()}" + (f" (uncommitted changes in the tree: {', '.join(changed)})" if changed else ""))
    print(f"  database: {dsn} (PostgreSQL {versions[0]}, TimescaleDB {versions[1]})")
    print("  units: kB = 10^3 bytes, MB = 10^6, GB = 10^9")


def print_load(sent: Sent, timings: dict, imported: str, refreshes: list, left: list[str], stored: int) -> None:
    print("\nLOAD")
    print(f"  history: {sent.reports:,} reports, {sent.values:,} values ({sent.values / sent.reports:.1f} a report), "
          f"generated in {timings['generate']:,.1f} s")  # fmt: skip
    print(f"  python -m server import: {imported}")
    for summary, seconds in refreshes:
        print(f"  python -m server rollups refresh ({seconds:,.1f} s): {summary}")
    print(f"  VACUUM ANALYZE + CHECKPOINT: {timings['settle']:,.1f} s")
    print(f"  left as rows: {'; '.join(left)} (the open hour stays as rows until it closes)")
    same = "every value sent is stored" if stored == sent.values else f"MISMATCH: {sent.values:,} sent"
    print(f"  values stored (report_blocks decoded, plus the rows): {stored:,}: {same}")


def packed_values(parts: list[Part], sent: Sent) -> int:
    """Values in report_blocks: those sent, less those still in rows."""
    return sent.values - sum(part.values or 0 for part in parts)


def print_storage(parts: list[Part], workers: int, sent: Sent, growth: int, empty: int) -> dict[str, float | None]:
    """The storage table; returns each part's bytes per worker-day."""
    print(f"\nSTORAGE after the refresh, VACUUM ANALYZE and CHECKPOINT ({sent.values:,} values sent; hypertables: "
          f"hypertable_detailed_size, their chunks with indexes and TOAST; plain tables: "
          f"pg_total_relation_size)")  # fmt: skip
    print(f"  {'table':<15} {'rows':>8} {'chunks':>6} {'total':>9} {'heap':>9} {'TOAST':>9} {'indexes':>9} "
          f"{'free':>9} {'data':>9} {'data %':>6} {'held (h)':>8} {'/worker-day':>11} {'B/value':>7}")  # fmt: skip
    daily = {}
    for part in parts:
        daily[part.table] = per_worker_day(part.bytes, part.held_seconds, workers)
        sizes = part.sizes
        share = f"{100 * part.packed / part.bytes:.0f}%" if part.packed is not None and part.bytes else ""
        print(f"  {part.table:<15} {part.rows:>8,} {'' if sizes.chunks is None else sizes.chunks:>6} "
              f"{size_text(sizes.total):>9} {size_text(sizes.heap):>9} {size_text(sizes.toast):>9} "
              f"{size_text(sizes.indexes):>9} {size_text(sizes.free):>9} "
              f"{size_text(part.packed) if part.packed is not None else '':>9} {share:>6} "
              f"{f'{part.held_seconds / HOUR:.2f}' if part.held_seconds else '':>8} {size_text(daily[part.table]):>11} "
              f"{part.bytes / sent.values:>7.3f}")  # fmt: skip
    listed = sum(part.bytes for part in parts)
    other = growth - listed
    print(f"  {'other':<15} {'':>8} {'':>6} {size_text(other):>9} {'':>69} {other / sent.values:>7.3f}"
          f"  (growth less the tables above: catalogs, statistics, companies, metric keys, free space)")  # fmt: skip
    print(f"  {'database growth':<15} {'':>8} {'':>6} {size_text(growth):>9} {'':>69} {growth / sent.values:>7.3f}"
          f"  (pg_database_size after - before; the empty schema: {size_text(empty)})")  # fmt: skip
    print("  free: free space and dead tuples in heap and TOAST (pgstattuple), part of the total, reusable by later "
          "writes; data: sum(octet_length(data)), the packed bytes alone; held: the hours of history the table holds "
          "(rollups: whole buckets); /worker-day: total / (workers x held / 24 h); B/value: total / values "
          "sent")  # fmt: skip
    for part in parts:
        if part.values:
            print(f"  {part.table}: {part.values:,} values as rows, {part.bytes / part.values:.2f} B/value held")
        elif part.values == 0 and part.bytes:
            print(f"  {part.table}: empty, {size_text(part.bytes)} kept by its index(es): VACUUM frees a btree's pages "
                  f"for reuse but does not shrink it (here: the import's late reports, before they were "
                  f"merged)")  # fmt: skip
    return daily


def print_tiers(parts: list[Part], daily: dict, sent: Sent, growth: int, workers: int) -> None:
    by_table = {part.table: part for part in parts}
    blocks_part = by_table["report_blocks"]
    packed = packed_values(parts, sent)
    raw_rate = blocks_part.bytes / packed if packed else float("inf")
    raw_rows = sum(by_table[table].bytes for table in RAW_TABLES[1:])
    rollup_bytes = sum(by_table[tier.table].bytes for tier in TIERS)
    rollup_daily = sum(daily[tier.table] or 0 for tier in TIERS)
    rollup_free = sum(by_table[tier.table].sizes.free for tier in TIERS)
    tables = sum(part.bytes for part in parts)
    print("\nTIERS AND TARGETS")
    print(f"  raw, packed (report_blocks): {packed:,} values, {raw_rate:.3f} B/value packed (the data alone: "
          f"{blocks_part.packed / packed:.3f}), {size_text(daily['report_blocks'])} per worker-day"
          f" -- target <= {TARGET_RAW:g} B/value: {met(raw_rate <= TARGET_RAW)}")  # fmt: skip
    print(f"  raw, still rows (recent_reports + late_reports): {size_text(raw_rows)}, {raw_rows / sent.values:.3f} "
          f"B/value sent: the open hour, packed once it closes")  # fmt: skip
    print(f"  rollups (1m + 10m + 1h): {size_text(rollup_bytes)}, {rollup_bytes / sent.values:.3f} B/value sent, "
          f"{size_text(rollup_daily)} per worker-day ({' + '.join(size_text(daily[tier.table]) for tier in TIERS)})"
          f" -- target <= {size_text(TARGET_ROLLUPS)} per worker-day: "
          f"{met(rollup_daily <= TARGET_ROLLUPS)}")  # fmt: skip
    rollup_live = sum(live_daily(by_table[tier.table], workers) for tier in TIERS)
    print(f"    of which free space inside the tables: {size_text(rollup_free)} (left by the refresh's rewrites of "
          f"blocks; later writes reuse it); without it: {size_text(rollup_live)} per worker-day")  # fmt: skip
    print(f"  all tiers: the database grew {size_text(growth)}, {growth / sent.values:.3f} B/value sent (the tables "
          f"above: {tables / sent.values:.3f}) -- target <= {TARGET_ALL:g} B/value: "
          f"{met(growth / sent.values <= TARGET_ALL)}")  # fmt: skip
    kept = growth - import_leftovers(parts)
    print(f"    less what the import left behind (late_reports' empty index, the free space inside the tables: "
          f"{size_text(growth - kept)}): {size_text(kept)}, {kept / sent.values:.3f} B/value sent")  # fmt: skip


def live_daily(part: Part, workers: int) -> float:
    """Bytes per worker-day less the free space inside the table."""
    return per_worker_day(part.bytes - part.sizes.free, part.held_seconds, workers) or 0.0


def import_leftovers(parts: list[Part]) -> int:
    """Space that a bulk import leaves and later writes reuse: the free space inside the
    tables, and an emptied late_reports' index."""
    emptied = sum(part.bytes - part.sizes.free for part in parts if part.table == "late_reports" and part.rows == 0)
    return emptied + sum(part.sizes.free for part in parts)


def breakdown_line(name: str, values: int | None, size: int, found: Breakdown, sent_share="", rest="") -> None:
    per_value = size / found.values if values is None else size / values
    print(f"  {name:<32} {'' if values is None else f'{values:,}':>10} {sent_share:>6} {size:>11,} {per_value:>8.3f} "
          f"{8 * per_value:>6.2f} {100 * size / found.stored_bytes:>5.1f}%  {rest}")  # fmt: skip


def mix(counter: Counter, names) -> str:
    total = sum(counter.values())
    return ", ".join(f"{names(key)} {100 * count / total:.0f}%" for key, count in sorted(counter.items()))


def print_breakdown(found: Breakdown, whole_packed: int, whole_values: int, sent: Sent) -> None:
    print(f"\nRAW BLOCKS BY METRIC ({found.blocks} worker-hours spread evenly over workers and hours: {found.values:,} "
          f"values, {found.stored_bytes:,} bytes of data, {found.stored_bytes / found.values:.3f} B/value; the whole "
          f"table's data: {whole_packed / whole_values:.3f} B/value)")  # fmt: skip
    print(f"  each series re-encoded alone with codec.LanesWriter, as its lane of a block is (its presence, then its "
          f"values); the blocks re-encoded by blocks.encode_reports equal the stored ones byte for byte: "
          f"{found.reencoded_same} of {found.blocks}")  # fmt: skip
    print(f"  {'part':<32} {'values':>10} {'sent':>6} {'bytes':>11} {'B/value':>8} {'bits':>6} {'share':>6}  "
          f"{'modes (of its series)':<34} scales (of its values)")  # fmt: skip
    breakdown_line("header: times, tasks, directory", None, found.header_bytes, found,
                   rest=f"once per block: {found.header_bytes / found.blocks:,.0f} B a block")  # fmt: skip
    breakdown_line("  of which the times", None, found.times_bytes, found)
    for name, metric in sorted(found.metrics.items(), key=lambda item: -item[1].bytes):
        modes = mix(metric.modes, MODES.get)
        scales = mix(metric.scales, lambda k: "raw" if k < 0 else f"k={k}")
        share = f"{100 * sent.per_metric[name] / sent.values:.0f}%"
        breakdown_line(name, metric.values, metric.bytes, found, share, f"{modes:<34} {scales}")
    breakdown_line("all", found.values, found.stored_bytes, found, "100%")
    print("  values: in the sample; sent: the metric's share of all the values sent; B/value and bits: over the "
          "metric's own values (the header's: over all); share: of the sample's bytes; scale k: values stored as "
          "integers x 10^-k")  # fmt: skip


def print_checks(checks: list[Check]) -> None:
    compared = sum(check.sent for check in checks)
    failed = [check for check in checks if check.differences]
    print(f"\nEXACTNESS: {len(checks)} packed worker-hours chosen at random, {compared:,} values of the NDJSON against "
          f"worker_stat_points(since, until) for that worker and hour (float64 bits, struct.pack('>d'))")  # fmt: skip
    for check in failed:
        print(f"  {check.worker} {datetime.fromtimestamp(check.hour, timezone.utc):%Y-%m-%d %H:%M} UTC: DIFFERS")
        for text in check.differences:
            print(f"    {text}")
    print(f"  {'every value equal' if not failed else f'{len(failed)} worker-hour(s) DIFFER'}")


def print_timings(timings: list[Timing], worker: str, values_per_report: float) -> None:
    print(f"\nQUERIES on packed data through SQL (median of {RUNS} runs after one warm-up, jit off as in the server; "
          f"worker {worker}, {values_per_report:.0f} values a report, the fleet's largest)")  # fmt: skip
    for timing in timings:
        low, high = timing.spread_ms
        note = f"; {timing.note}" if timing.note else ""
        print(f"  {timing.name:<58} {timing.median_ms:>8,.1f} ms  ({low:,.1f} to {high:,.1f})  "
              f"answer: {timing.rows}{note}")  # fmt: skip
    print(f"  {_POINTS_BOUNDED}\n  {_POINTS_VIEW}\n  {_ROLLUP_10M}")


def estimated_daily(parts: list[Part], full_periods: dict, workers: int) -> dict[str, float]:
    """Each tier's bytes per worker-day in service, estimated: without the free space inside
    the table (later writes reuse it), and for a rollup tier, less the packed data its blocks
    would not need had they covered whole periods."""
    estimate = {}
    for part in parts:
        real, whole = full_periods.get(part.table, (0, 0))
        saved = per_worker_day(real - whole, part.held_seconds, workers) or 0.0
        estimate[part.table] = live_daily(part, workers) - saved
    return estimate


def cells(sizes) -> str:
    return " ".join(f"{size_text(size):>13}" for size in sizes)


def projection_row(name: str, per_day: float, days: float, chunk_days: float, estimate: float) -> np.ndarray:
    """Prints a tier's line; returns its sizes: 200, 2,000 workers, 2,000 with one chunk
    more, then the estimate's 200 and 2,000."""
    measured = np.array([200 * days, 2000 * days, 2000 * (days + chunk_days)]) * per_day
    estimated = np.array([200 * days, 2000 * days]) * estimate
    retention = f"{days:g} d" if days >= 1 else f"{days * 24:g} h"
    print(f"  {name:<20} {size_text(per_day):>11} {retention:>9} {cells(measured)} {size_text(estimate):>13} "
          f"{cells(estimated)}")  # fmt: skip
    return np.concatenate([measured, estimated])


def print_projection(parts: list[Part], daily: dict, full_periods: dict, chunk_days: dict, workers: int) -> None:
    settings = Settings()
    estimate = estimated_daily(parts, full_periods, workers)
    lines = [("raw: report_blocks", "report_blocks", settings.raw_retention_days)]
    lines += [(f"rollup {tier.name}", tier.table, settings.retention.tier_days[tier.name]) for tier in TIERS]
    print("\nPROJECTION at the default retention (server.config.Settings), from the bytes per worker-day above, at "
          "this period; the estimate: without the free space inside the tables, and the rollup blocks as whole "
          "periods")  # fmt: skip
    print(f"  {'':<20} {'measured:':>11} {'':>9} {'':>13} {'':>13} {'2,000 workers':>13} {'estimate:':>13}")
    print(f"  {'tier':<20} {'/worker-day':>11} {'retention':>9} {'200 workers':>13} {'2,000 workers':>13} "
          f"{'+ one chunk':>13} {'/worker-day':>13} {'200 workers':>13} {'2,000 workers':>13}")  # fmt: skip
    totals = np.zeros(5)
    for name, table, days in lines:
        totals += projection_row(name, daily[table] or 0.0, days, chunk_days[table], estimate[table])
    open_hour = next(part for part in parts if part.table == "recent_reports")
    per_worker = open_hour.bytes / workers * HOUR / open_hour.held_seconds if open_hour.held_seconds else 0.0
    # An hour of rows per worker, whatever the retention: as a day's worth over 1/24 of a day.
    totals += projection_row("raw: the open hour", per_worker * 24, 1 / 24, 0.0, per_worker * 24)
    print(f"  {'all':<20} {'':>11} {'':>9} {cells(totals[:3])} {'':>13} {cells(totals[3:])}")
    shown = ", ".join(f"{table} {chunk_days[table]:g} d" for _, table, _ in lines)
    print(f"  + one chunk: retention drops whole chunks, so a tier holds up to one chunk interval more ({shown}).")
    print("  The open hour: rows, an hour a worker whatever the retention (its /worker-day: as if kept a day). "
          "Whole periods: a rollup block spans its tier's period (1m: an hour, 10m: a day, 1h: a week); a shorter "
          "history fills it in part, each worker's lanes carrying their fixed cost (the sequences' headers) over "
          "fewer buckets than in service. Each period's rows are re-encoded repeated until the period is full "
          "(blocks.encode_rollup):")  # fmt: skip
    for tier in TIERS:
        real, whole = full_periods[tier.table]
        print(f"    {tier.table}: data {size_text(real)} as stored, {size_text(whole)} as whole periods")
    print("  Not counted: the dictionaries and catalogs (above).")


# ------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=100, help="fleet size (default 100)")
    parser.add_argument("--hours", type=float, default=12.0, help="hours of history, ending now (default 12)")
    parser.add_argument("--period", type=float, default=10.0, help="seconds between a worker's reports (default 10)")
    parser.add_argument("--database", default="workers_bench_storage", help="the benchmark's own database (recreated)")
    parser.add_argument("--seed", type=int, default=history.DEFAULT_SEED, help="the fleet and the samples (default 1)")
    args = parser.parse_args(argv)
    for name in ("workers", "hours", "period"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be positive")
    return args


async def create_pgstattuple(dsn: str) -> None:
    """pgstattuple (PostgreSQL's contrib), for the free space inside the tables."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    finally:
        await conn.close()


async def database_versions(dsn: str) -> tuple[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        return (await conn.fetchval("SHOW server_version"),
                await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"))  # fmt: skip
    finally:
        await conn.close()


def load(dsn: str, args, workdir: Path) -> tuple[Path, float, float, dict, str, list]:
    """Generate the history, import it, refresh and settle; the file, its span, the steps'
    seconds, the import's summary and the refreshes'."""
    path = workdir / "history.ndjson"
    end = time.time()
    start = end - args.hours * HOUR
    seconds = {}
    began = time.monotonic()
    log(f"generating {args.workers} workers x {args.hours:g} h into {path}")
    generate(path, args, start, end)
    seconds["generate"] = time.monotonic() - began
    log("storing it with python -m server import")
    imported = run_server_command(dsn, "import", str(path))
    refreshes = refresh_until_packed(dsn)
    began = time.monotonic()
    asyncio.run(settle(dsn))
    seconds["settle"] = time.monotonic() - began
    return path, start, end, seconds, imported, refreshes


async def examine(dsn: str, path: Path, args, start: float, end: float) -> dict:
    """Everything measured on the loaded database (one connection, jit off as in the server)."""
    conn = await asyncpg.connect(dsn, server_settings={"jit": "off"})
    try:
        state = await read_state(conn, start, end)
        parts = await measure_parts(conn, state)
        left = await leftovers(conn)
        log("reading the NDJSON back: counts and the values to check")
        wanted = checked_hours(state, args.seed)
        sent = read_sent(path, wanted)
        log("counting the stored values; the breakdown by metric")
        stored = await count_stored_values(conn)
        keys = await conn.fetch("SELECT worker, start FROM report_blocks ORDER BY worker, start")
        found = breakdown(await fetch_blocks(conn, evenly(keys, BREAKDOWN_BLOCKS)), state.metrics)
        log("re-encoding the rollup blocks as whole periods")
        full_periods = {tier.table: await full_period_data(conn, tier) for tier in TIERS}
        log("checking exactness")
        checks = await check_exactness(conn, wanted, sent)
        worker = max(sent.per_worker, key=lambda name: (sent.per_worker[name] / sent.reports_per_worker[name], name))
        log(f"timing queries of worker {worker}")
        timings = await time_queries(conn, state, worker, args)
    finally:
        await conn.close()
    return dict(state=state, parts=parts, left=left, sent=sent, stored=stored, breakdown=found, checks=checks,
                worker=worker, timings=timings, full_periods=full_periods)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster_dsn, _ = resolve_dsn()
    dsn = database_dsn(cluster_dsn, args.database)
    print_header(args, dsn, asyncio.run(database_versions(cluster_dsn)))
    log(f"database {dsn} recreated and migrated")
    asyncio.run(recreate_database(cluster_dsn, args.database))
    run_server_command(dsn, "migrate")
    asyncio.run(create_pgstattuple(dsn))
    empty = asyncio.run(database_bytes(dsn))
    with tempfile.TemporaryDirectory(prefix="workers-bench-storage-") as workdir:
        path, start, end, seconds, imported, refreshes = load(dsn, args, Path(workdir))
        growth = asyncio.run(database_bytes(dsn)) - empty
        found = asyncio.run(examine(dsn, path, args, start, end))
    sent, parts, state = found["sent"], found["parts"], found["state"]
    print_load(sent, seconds, imported, refreshes, found["left"], found["stored"])
    daily = print_storage(parts, args.workers, sent, growth, empty)
    print_tiers(parts, daily, sent, growth, args.workers)
    blocks_part = next(part for part in parts if part.table == "report_blocks")
    print_breakdown(found["breakdown"], blocks_part.packed, packed_values(parts, sent), sent)
    print_checks(found["checks"])
    worker = found["worker"]
    print_timings(found["timings"], worker, sent.per_worker[worker] / sent.reports_per_worker[worker])
    print_projection(parts, daily, found["full_periods"], state.chunk_days, args.workers)
    print(f"\n  load average at the end: {load_average()}")
    failed = any(check.differences for check in found["checks"]) or found["stored"] != sent.values
    said = "a value read back differs from the one sent" if failed else "every value checked read back exactly"
    print(f"RESULT: {said}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
