"""The jsonb era's statistics (renamed legacy_* by 006) converted into the compact storage,
every report and every rollup row, then the legacy tables dropped.

- Raw reports (`legacy_worker_stats`, one row per report with its values as jsonb) become
  report blocks, a worker at a time, with the same code compaction uses.
- Rollup rows (`legacy_stats_<r>`, `legacy_activity_<r>`) become rollup blocks of their tier:
  the rows over all variants, each variant's (10 minutes and 1 hour; the 1-minute tier keeps
  the rows over all variants), and the activity (a bucket's reports, and 1 as its busy
  reports when one carried a task: what get_activity_report counts). Their sums are floats;
  those that are exact decimals are kept as such.
"""

import json

import numpy as np
import orjson

from server.storage import aggregate, raw, rollups
from server.storage.blocks import ACTIVITY, COMBINED, Aggregates, variant_code
from server.storage.codec import value_scales
from server.storage.ids import Ids, layout_key
from server.storage.writer import pack_values

WORKERS_AT_ONCE = 50
ROWS_AT_ONCE = 200_000

_WORKERS = "SELECT DISTINCT company, worker FROM legacy_worker_stats"
_REPORTS = """
SELECT worker, (extract(epoch FROM time) * 1000000)::bigint AS micros, task, metrics::text AS metrics
FROM legacy_worker_stats WHERE company = $1 AND worker = ANY($2::text[])
"""
_STATS = """
SELECT extract(epoch FROM time)::bigint AS time, company, worker, metric, min, max, sum, count,
       variants, mins, maxs, sums, counts
FROM legacy_stats_{tier} ORDER BY company, time LIMIT $1 OFFSET $2
"""
_ACTIVITY = """
SELECT extract(epoch FROM time)::bigint AS time, company, worker, reports, busy
FROM legacy_activity_{tier} ORDER BY company, time LIMIT $1 OFFSET $2
"""
LEGACY_TABLES = (
    "legacy_worker_stats", "legacy_stats_1m", "legacy_stats_10m", "legacy_stats_1h",
    "legacy_activity_1m", "legacy_activity_10m", "legacy_activity_1h",
)


def _metrics(text: str) -> dict:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # an integer beyond 64 bits (values reach 1e100)
        return json.loads(text)


async def migrate(conn) -> None:
    ids = Ids()
    await _reports(conn, ids)
    for tier in rollups.TIERS:
        await _rollups(conn, ids, tier)
    for table in LEGACY_TABLES:  # one at a time: TimescaleDB drops one hypertable per statement
        await conn.execute(f"DROP TABLE {table}")


async def _reports(conn, ids: Ids) -> None:
    by_company: dict[str, list[str]] = {}
    for row in await conn.fetch(_WORKERS):
        by_company.setdefault(row["company"], []).append(row["worker"])
    for company, workers in by_company.items():
        for index in range(0, len(workers), WORKERS_AT_ONCE):
            chosen = workers[index : index + WORKERS_AT_ONCE]
            rows = await conn.fetch(_REPORTS, company, chosen)
            reports = [(row, _metrics(row["metrics"])) for row in rows]
            await ids.make(conn, {(company, row["worker"]) for row, _ in reports},
                           {(company, layout_key(metrics)) for _, metrics in reports})  # fmt: skip
            packed = [pack_values(metrics) for _, metrics in reports]
            points = await raw.rows_to_points(conn, {  # the columns raw.COLUMNS reads
                "workers": [ids.worker(company, row["worker"]) for row, _ in reports],
                "micros": [row["micros"] for row, _ in reports],
                "layouts": [ids.layout(company, layout_key(metrics)) for _, metrics in reports],
                "tasks": [row["task"] for row, _ in reports],
                "counts": [len(values) // 8 for values in packed],
                "values": b"".join(packed),
            })
            await raw.replace_blocks(conn, raw.worker_hours(points))


async def _rollups(conn, ids: Ids, tier: rollups.Tier) -> None:
    for query, convert in ((_STATS, _stats_rows), (_ACTIVITY, _activity_rows)):
        offset = 0
        while True:
            rows = await conn.fetch(query.format(tier=tier.name), ROWS_AT_ONCE, offset)
            if not rows:
                break
            offset += len(rows)
            for company in sorted({row["company"] for row in rows}):
                mine = [row for row in rows if row["company"] == company]
                await ids.make(conn, {(company, row["worker"]) for row in mine}, set())
                converted = await convert(conn, ids, company, mine, tier)
                if len(converted):
                    await _add(conn, tier, company, converted)


async def _add(conn, tier: rollups.Tier, company: str, rows: Aggregates) -> None:
    """Rows added to the tier's blocks of their periods (a batch may end inside a period)."""
    for period in np.unique(rows.buckets * tier.seconds // tier.period):
        mine = rows.take(rows.buckets * tier.seconds // tier.period == period)
        low = int(period) * tier.period
        await rollups.replace(conn, tier, company, np.zeros(0, dtype=np.int64), low, low + tier.period, aggregate.sort(mine))


def _decimal(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float sums kept as exact decimals where they are some."""
    scales = value_scales(sums)
    exact = np.zeros(len(sums), dtype=np.int64)
    decimal = scales >= 0
    exact[decimal] = np.round(sums[decimal] * 10.0 ** scales[decimal]).astype(np.int64)
    return scales, exact


async def _stats_rows(conn, ids: Ids, company: str, rows: list, tier: rollups.Tier) -> Aggregates:
    metric_ids = await ids.metrics(conn, company, {row["metric"] for row in rows})
    columns = {name: [] for name in ("metrics", "workers", "variants", "buckets", "mins", "maxs", "sums", "counts")}

    def add(row, variant, low, high, total, count):
        columns["metrics"].append(metric_ids[row["metric"]])
        columns["workers"].append(ids.worker(company, row["worker"]))
        columns["variants"].append(variant)
        columns["buckets"].append(row["time"] // tier.seconds)
        columns["mins"].append(low)
        columns["maxs"].append(high)
        columns["sums"].append(total)
        columns["counts"].append(count)

    for row in rows:
        add(row, COMBINED, row["min"], row["max"], row["sum"], row["count"])
        if tier.variants and row["variants"] is not None:
            for name, low, high, total, count in zip(row["variants"], row["mins"], row["maxs"], row["sums"], row["counts"]):
                add(row, variant_code(name), low, high, total, count)
    sums = np.array(columns["sums"], dtype=np.float64)
    scales, exact = _decimal(sums)
    return Aggregates(
        metrics=np.array(columns["metrics"], dtype=np.int64),
        workers=np.array(columns["workers"], dtype=np.int64),
        variants=np.array(columns["variants"], dtype=np.int64),
        buckets=np.array(columns["buckets"], dtype=np.int64),
        mins=np.array(columns["mins"], dtype=np.float64),
        maxs=np.array(columns["maxs"], dtype=np.float64),
        sums=sums,
        exact_sums=exact,
        scales=scales,
        counts=np.array(columns["counts"], dtype=np.int64),
    )


async def _activity_rows(conn, ids: Ids, company: str, rows: list, tier: rollups.Tier) -> Aggregates:
    count = len(rows)
    busy = np.array([1 if row["busy"] else 0 for row in rows], dtype=np.int64)
    return Aggregates(
        metrics=np.full(count, ACTIVITY, dtype=np.int64),
        workers=np.array([ids.worker(company, row["worker"]) for row in rows], dtype=np.int64),
        variants=np.full(count, COMBINED, dtype=np.int64),
        buckets=np.array([row["time"] // tier.seconds for row in rows], dtype=np.int64),
        mins=np.full(count, np.nan),
        maxs=np.full(count, np.nan),
        sums=busy.astype(np.float64),
        exact_sums=busy,
        scales=np.zeros(count, dtype=np.int64),
        counts=np.array([row["reports"] for row in rows], dtype=np.int64),
    )

