"""SQL of the rollup tiers (`stats_<r>`, `activity_<r>`), their watermark and invalidation log,
and the refresh that keeps them up to date.

Each tier holds, per bucket of its resolution, what `get_stats` and `get_activity_report`
need to compose exact answers: min, max, sum and count of every metric (over all its
variants, and per variant), and per worker whether it reported and ran a task. The 1-minute
tier is rolled up from the raw reports (in this process: cheaper than unpacking jsonb in
SQL), each coarser tier from the tier below it (in SQL).

The refresh (one process or host at a time: a session advisory lock) first moves the
watermark forward in a transaction of its own, then, in one repeatable-read transaction,
takes the invalidation log and rebuilds what it names plus every bucket that closed between
the old and the new watermark. The writer logs, in the statement that stores them, the
reports of each batch that fall behind the watermark (see migrations/004_rollups.sql).
"""

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

import asyncpg
import orjson

from .statistics import BUCKET_SECONDS

log = logging.getLogger(__name__)

REFRESH_LOCK = 0x574B5255  # an arbitrary advisory lock key: one refresher at a time


@dataclass(frozen=True)
class Tier:
    name: str
    seconds: int

    @property
    def stats(self) -> str:
        return f"stats_{self.name}"

    @property
    def activity(self) -> str:
        return f"activity_{self.name}"


# Finest first; each resolution divides the next, so a tier is rolled up from the one below.
TIERS = (Tier("1m", 60), Tier("10m", 600), Tier("1h", 3600))
FINEST = TIERS[0]

# Part of the batching writer's statement: the workers of the batch (`$1`, one entry each
# with the earliest and latest time of its reports) whose reports fall behind the
# watermark. FOR SHARE makes the refresh's UPDATE of the watermark wait for this batch
# (see the migration); under READ COMMITTED a batch that waited reads the new watermark.
LATE_REPORTS_LOG = """
INSERT INTO rollup_invalidations (company, worker, low, high)
SELECT r.company, r.worker, to_timestamp(r.low), to_timestamp(r.high)
FROM jsonb_to_recordset($1::jsonb) AS r (company text, worker text, low float8, high float8),
     (SELECT watermark FROM rollup_watermark FOR SHARE) AS w
WHERE to_timestamp(r.low) < w.watermark
"""

_ADVANCE = """
UPDATE rollup_watermark
SET watermark = greatest(
    watermark,
    least(time_bucket('1 minute', now() - make_interval(secs => $1)), materialized + make_interval(secs => $2)))
"""

_PROGRESS = """
SELECT extract(epoch FROM materialized)::float8, extract(epoch FROM watermark)::float8 FROM rollup_watermark
"""

_MATERIALIZED = "UPDATE rollup_watermark SET materialized = to_timestamp($1)"

_TAKE_INVALIDATIONS = """
DELETE FROM rollup_invalidations
RETURNING company, worker, extract(epoch FROM low)::float8 AS low, extract(epoch FROM high)::float8 AS high
"""

_INVALIDATE_ALL = """
INSERT INTO rollup_invalidations (company, worker, low, high)
SELECT NULL, NULL, to_timestamp($1), watermark FROM rollup_watermark
WHERE watermark > to_timestamp($1)
"""

_COMPANIES = "SELECT id FROM companies"

# Rollups are exact before what they hold and before the company's earliest pending
# invalidation.
_READ_STATE = """
SELECT extract(epoch FROM least(
           (SELECT materialized FROM rollup_watermark),
           (SELECT min(low) FROM rollup_invalidations WHERE company = $1 OR company IS NULL)))::float8
"""

# `regions`: the periods to rebuild, $1..$4 = company, worker (NULL: all of the company's),
# low, high (epoch seconds, bucket-aligned). Regions never overlap (see `regions`).
_REGIONS = """
WITH regions AS (
    SELECT g.company, g.worker, to_timestamp(g.low) AS low, to_timestamp(g.high) AS high
    FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[]) AS g (company, worker, low, high)
)
"""

_DELETE = _REGIONS + """
DELETE FROM {table} AS t USING regions AS g
WHERE t.company = g.company AND t.time >= g.low AND t.time < g.high AND (g.worker IS NULL OR t.worker = g.worker)
"""

# $5/$6: the earliest low and latest high of the regions, so that the planner sees which
# chunks and which index range to read.
_IN_REGION = """regions AS g
JOIN {source} AS s ON s.company = g.company AND s.time >= g.low AND s.time < g.high
    AND (g.worker IS NULL OR s.worker = g.worker)
    AND s.time >= to_timestamp($5) AND s.time < to_timestamp($6)"""

_STATS_COLUMNS = "time, company, worker, metric, min, max, sum, count, variants, mins, maxs, sums, counts"
_ACTIVITY_COLUMNS = ["time", "company", "worker", "reports", "busy"]

# Per-variant aggregates of the source, combined into one row per bucket, worker and metric.
_STATS_INSERT = """INSERT INTO {table} (""" + _STATS_COLUMNS + """)
SELECT time, company, worker, metric, min, max, sum, count,
       nullif(variants, ARRAY['total']),
       CASE WHEN variants <> ARRAY['total'] THEN mins END, CASE WHEN variants <> ARRAY['total'] THEN maxs END,
       CASE WHEN variants <> ARRAY['total'] THEN sums END, CASE WHEN variants <> ARRAY['total'] THEN counts END
FROM (
    SELECT time, company, worker, metric, min(min) AS min, max(max) AS max, sum(sum) AS sum,
           sum(count)::integer AS count, array_agg(variant ORDER BY variant) AS variants,
           array_agg(min ORDER BY variant) AS mins, array_agg(max ORDER BY variant) AS maxs,
           array_agg(sum ORDER BY variant) AS sums, array_agg(count ORDER BY variant) AS counts
    FROM ({per_variant}) AS per_variant
    GROUP BY time, company, worker, metric
) AS combined
ORDER BY company, metric, worker, time
"""

# A row's variants, as rows: a scalar metric's row (NULL arrays) is its one variant "total".
VARIANTS = """unnest(
    coalesce(s.variants, ARRAY['total']), coalesce(s.mins, ARRAY[s.min]), coalesce(s.maxs, ARRAY[s.max]),
    coalesce(s.sums, ARRAY[s.sum]), coalesce(s.counts, ARRAY[s.count])) AS v (variant, min, max, sum, count)"""

# The 1-minute tier is rolled up in Python from the raw reports (see `_minute_rollups`):
# unpacking jsonb with jsonb_each costs the database about six times more.
_RAW_REPORTS = _REGIONS + f"""
SELECT extract(epoch FROM s.time)::float8 AS time, s.company, s.worker, s.task, s.metrics::text AS metrics
FROM {_IN_REGION.format(source="worker_stats")}
"""

_STATS_FROM_TIER = """
SELECT time_bucket(make_interval(secs => $7), s.time) AS time, s.company, s.worker, s.metric, v.variant,
       min(v.min) AS min, max(v.max) AS max, sum(v.sum) AS sum, sum(v.count)::integer AS count
FROM {in_region}
CROSS JOIN LATERAL {variants}
GROUP BY 1, 2, 3, 4, 5
"""

_ACTIVITY_FROM_TIER = """INSERT INTO {table} (time, company, worker, reports, busy)
SELECT time_bucket(make_interval(secs => $7), s.time), s.company, s.worker, sum(s.reports)::integer, bool_or(s.busy)
FROM {in_region}
GROUP BY 1, 2, 3
"""


def _rebuild_statements(tier: Tier, source: Tier) -> tuple[str, str]:
    """The statements that roll `tier`'s stats and activity up from `source` in the regions;
    $7 is the tier's resolution in seconds."""
    stats_rows = _STATS_FROM_TIER.format(in_region=_IN_REGION.format(source=source.stats), variants=VARIANTS)
    stats = _REGIONS + _STATS_INSERT.format(table=tier.stats, per_variant=stats_rows)
    activity = _REGIONS + _ACTIVITY_FROM_TIER.format(
        table=tier.activity, in_region=_IN_REGION.format(source=source.activity)
    )
    return stats, activity


_ROLL_UP = {tier.name: _rebuild_statements(tier, finer) for finer, tier in zip(TIERS, TIERS[1:])}

_DROP_CHUNKS = "SELECT count(*) FROM drop_chunks($1::regclass, older_than => now() - $2::float8 * interval '1 day')"


# Parts of a chart read (storage/charts.py), as statistics.stats_part and activity_part
# but from a tier's whole buckets in [{low}, {high}). Where the chart's interval is the
# tier's resolution its rows are already one per bucket: no grouping ({group} empty).
_STATS_PART = f"""
SELECT s.worker, s.metric, NULL::text AS variant, {BUCKET_SECONDS.format(time="s.time")} AS bucket,
       {{min}}(s.min) AS min, {{max}}(s.max) AS max, {{sum}}(s.sum) AS sum, {{sum}}(s.count) AS count
FROM {{table}} AS s
WHERE s.company = $1 AND s.metric = ANY($3::text[])
  AND s.time >= to_timestamp({{low}}) AND s.time < to_timestamp({{high}}){{workers}}
{{group}}"""

_STATS_PART_BY_VARIANT = f"""
SELECT s.worker, s.metric, v.variant, {BUCKET_SECONDS.format(time="s.time")} AS bucket,
       {{min}}(v.min) AS min, {{max}}(v.max) AS max, {{sum}}(v.sum) AS sum, {{sum}}(v.count) AS count
FROM {{table}} AS s
CROSS JOIN LATERAL {VARIANTS}
WHERE s.company = $1 AND s.metric = ANY($3::text[])
  AND s.time >= to_timestamp({{low}}) AND s.time < to_timestamp({{high}}){{workers}}
{{group}}"""

_ACTIVITY_PART = f"""
SELECT s.worker, {BUCKET_SECONDS.format(time="s.time")} AS bucket, {{bool_or}}(s.busy) AS busy
FROM {{table}} AS s
WHERE s.company = $1 AND s.time >= to_timestamp({{low}}) AND s.time < to_timestamp({{high}})
{{group}}"""

_GROUPED = {"min": "min", "max": "max", "sum": "sum", "bool_or": "bool_or"}
_AS_IS = {"min": "", "max": "", "sum": "", "bool_or": "", "group": ""}


def stats_part(tier: Tier, low: str, high: str, workers: str | None, split_by_variant: bool, interval: int) -> str:
    """`low`, `high` and `workers` (or None: every worker) are parameter placeholders."""
    template = _STATS_PART_BY_VARIANT if split_by_variant else _STATS_PART
    grouping = _AS_IS if interval == tier.seconds else {**_GROUPED, "group": "GROUP BY 1, 2, 3, 4"}
    workers_filter = f" AND s.worker = ANY({workers}::text[])" if workers else ""
    return template.format(table=tier.stats, low=low, high=high, workers=workers_filter, **grouping)


def activity_part(tier: Tier, low: str, high: str, interval: int) -> str:
    grouping = _AS_IS if interval == tier.seconds else {**_GROUPED, "group": "GROUP BY 1, 2"}
    return _ACTIVITY_PART.format(table=tier.activity, low=low, high=high, **grouping)


# --- which periods to rebuild -------------------------------------------------------------


@dataclass(frozen=True)
class Invalidation:
    company: str | None  # None: every company
    worker: str | None  # None: every worker of the company
    low: float  # earliest and latest report time, epoch seconds, inclusive
    high: float


def floor_to(moment: float, step: int) -> int:
    """The start of the `step`-second bucket (epoch-aligned) holding `moment`."""
    return math.floor(moment / step) * step


def ceil_to(moment: float, step: int) -> int:
    return math.ceil(moment / step) * step


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for low, high in sorted(spans):
        if merged and low <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _subtract(spans: list[tuple[float, float]], taken: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """`spans` less the (merged) spans `taken`."""
    result = []
    for low, high in spans:
        for taken_low, taken_high in taken:
            if taken_high <= low or taken_low >= high:
                continue
            if taken_low > low:
                result.append((low, taken_low))
            low = max(low, taken_high)
            if low >= high:
                break
        if low < high:
            result.append((low, high))
    return result


def regions(
    seconds: int,
    old_watermark: float,
    new_watermark: float,
    companies: list[str],
    invalidations: list[Invalidation],
    horizon: float,
) -> list[tuple[str, str | None, float, float]]:
    """The non-overlapping (company, worker or None, low, high) periods of a tier of
    `seconds` to rebuild: every bucket that closed between the two watermarks, for every
    company, and the buckets holding invalidated reports that the tier had already rolled
    up, from `horizon` on (its source keeps nothing older)."""
    done = floor_to(old_watermark, seconds)  # the tier holds buckets before this
    closed = floor_to(new_watermark, seconds)
    floor = ceil_to(horizon, seconds)
    fleet: dict[str, list[tuple[float, float]]] = {company: [] for company in companies}
    if done < closed:
        for company in companies:
            fleet[company].append((done, closed))
    per_worker: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for item in invalidations:
        low, high = max(floor_to(item.low, seconds), floor), min(floor_to(item.high, seconds) + seconds, done)
        if low >= high:
            continue
        if item.worker is None:
            for company in [item.company] if item.company is not None else companies:
                fleet.setdefault(company, []).append((low, high))
        elif item.company is not None:
            per_worker[(item.company, item.worker)].append((low, high))
    result = []
    merged_fleet = {company: _merge(spans) for company, spans in fleet.items()}
    for company, spans in merged_fleet.items():
        result.extend((company, None, low, high) for low, high in spans)
    for (company, worker), spans in per_worker.items():
        remaining = _subtract(_merge(spans), merged_fleet.get(company, []))
        result.extend((company, worker, low, high) for low, high in remaining)
    return result


# --- the refresh --------------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    """Days each tier is kept: raw reports, then each rollup tier by name."""

    raw_days: float
    tier_days: dict[str, float]

    def days(self, source: Tier | None) -> float:
        return self.raw_days if source is None else self.tier_days[source.name]

    def horizon(self, source: Tier | None, now: float) -> float:
        """The earliest time whose data `source` (None: raw) still holds whole.

        Retention drops a chunk once all of it is older than the retention, so what lies in
        the chunk holding `now - days` is still there. Raw reports and the 1-minute tier
        have chunks of one UTC day (migrations): their horizon is the start of that day, so
        that a chart of the last N days, N their retention, starts inside it."""
        oldest = now - self.days(source) * 86400
        if source is None or source is FINEST:
            return floor_to(oldest, 86400)
        return oldest


@dataclass(frozen=True)
class RefreshResult:
    old_watermark: float
    new_watermark: float
    invalidations: int
    regions: int


async def refresh_once(conn: asyncpg.Connection, retention: Retention, *, lag: float, max_step: float) -> RefreshResult:
    """Move the watermark (at most `max_step` seconds past what is materialized, never
    closer than `lag` to now), then roll up what closed before it and what was invalidated.
    The caller holds REFRESH_LOCK."""
    await conn.execute(_ADVANCE, lag, max_step)  # a transaction of its own: writers wait on it
    now = time.time()
    async with conn.transaction(isolation="repeatable_read"):
        old, new = await conn.fetchrow(_PROGRESS)
        taken = [Invalidation(*row) for row in await conn.fetch(_TAKE_INVALIDATIONS)]
        companies = [row["id"] for row in await conn.fetch(_COMPANIES)]
        rebuilt = 0
        for index, tier in enumerate(TIERS):
            source = TIERS[index - 1] if index else None
            todo = regions(tier.seconds, old, new, companies, taken, retention.horizon(source, now))
            rebuilt += len(todo)
            for batch in _batches(todo, SECONDS_PER_STATEMENT * tier.seconds // 60):
                await _rebuild(conn, tier, batch)
        await conn.execute(_MATERIALIZED, new)
    return RefreshResult(old, new, len(taken), rebuilt)


async def _rebuild(conn: asyncpg.Connection, tier: Tier, batch: list[tuple]) -> None:
    companies, workers, lows, highs = (list(column) for column in zip(*batch))
    for table in (tier.stats, tier.activity):
        await conn.execute(_DELETE.format(table=table), companies, workers, lows, highs)
    bounds = (min(lows), max(highs))
    if tier is FINEST:
        reports = await conn.fetch(_RAW_REPORTS, companies, workers, lows, highs, *bounds)
        stats, activity = _minute_rollups(reports)
        stats.sort(key=_fleet_order)
        await conn.copy_records_to_table(tier.stats, records=stats, columns=_STATS_COLUMNS.split(", "))
        await conn.copy_records_to_table(tier.activity, records=activity, columns=_ACTIVITY_COLUMNS)
        return
    for statement in _ROLL_UP[tier.name]:
        await conn.execute(statement, companies, workers, lows, highs, *bounds, float(tier.seconds))


def _fleet_order(row: tuple) -> tuple:
    """Rows are stored in (company, metric, worker, time) order within each rebuild, so that a
    fleet chart of one metric reads few pages (see the `stats_<r>_fleet` index)."""
    time, company, worker, metric = row[:4]
    return company, metric, worker, time


def _json(text: str) -> dict:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # an integer beyond 64 bits (values reach 1e100)
        return json.loads(text)


def _minute_rollups(reports: list) -> tuple[list[tuple], list[tuple]]:
    """The 1-minute tier's stats and activity rows of raw report rows.

    Values are collected in lists per worker-minute, metric and variant, then reduced once
    with the builtins min, max and sum (loops in C): cheaper than updating running
    aggregates for every value."""
    # (bucket, company, worker) -> [reports, busy, {metric: {variant: [values]}}]
    minutes: dict[tuple, list] = {}
    for when, company, worker, task, metrics in reports:
        key = (floor_to(when, FINEST.seconds), company, worker)
        minute = minutes.get(key)
        if minute is None:
            minute = minutes[key] = [0, False, {}]
        minute[0] += 1
        if task:
            minute[1] = True
        collected = minute[2]
        for metric, variants in _json(metrics).items():
            per_variant = collected.get(metric)
            if per_variant is None:
                collected[metric] = {variant: [value] for variant, value in variants.items()}
                continue
            for variant, value in variants.items():
                found = per_variant.get(variant)
                if found is None:
                    per_variant[variant] = [value]
                else:
                    found.append(value)
    stats, activity = [], []
    for (bucket, company, worker), (count, busy, collected) in minutes.items():
        moment = _utc(bucket)
        activity.append((moment, company, worker, count, busy))
        for metric, per_variant in collected.items():
            variants = sorted(per_variant)
            mins = [float(min(per_variant[variant])) for variant in variants]
            maxs = [float(max(per_variant[variant])) for variant in variants]
            sums = [float(sum(per_variant[variant])) for variant in variants]
            counts = [len(per_variant[variant]) for variant in variants]
            arrays = (variants, mins, maxs, sums, counts) if variants != ["total"] else (None,) * 5
            stats.append((moment, company, worker, metric, min(mins), max(maxs), sum(sums), sum(counts), *arrays))
    return stats, activity


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


# How much of the fleet's time one rebuild statement covers at most, for the 1-minute tier
# (coarser tiers: in proportion): a refresh every 30 s needs one statement per tier, a bulk
# rebuild many statements of bounded memory instead of one that aggregates days at once.
SECONDS_PER_STATEMENT = 3600


def _batches(todo: list[tuple], span: float):
    """`todo` regions in batches covering at most `span` seconds in all (long ones cut)."""
    batch, covered = [], 0.0
    for company, worker, low, high in todo:
        while low < high:
            piece = min(high, low + span - covered)
            batch.append((company, worker, low, piece))
            covered += piece - low
            low = piece
            if covered >= span:
                yield batch
                batch, covered = [], 0.0
    if batch:
        yield batch


async def refresh(
    conn: asyncpg.Connection, retention: Retention, *, lag: float, max_step: float = 86400.0
) -> list[RefreshResult] | None:
    """Bring every tier up to date (in steps of at most `max_step`); None when another
    process or host is refreshing."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", REFRESH_LOCK):
        return None
    try:
        steps = []
        while True:
            step = await refresh_once(conn, retention, lag=lag, max_step=max_step)
            steps.append(step)
            if step.new_watermark - step.old_watermark < max_step:
                return steps
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", REFRESH_LOCK)


async def invalidate_since(db, since: float) -> None:
    """Have the next refresh rebuild every tier from `since` on (after a bulk import)."""
    await db.execute(_INVALIDATE_ALL, since)


async def read_watermark(db, company: str) -> float:
    """The time before which the company's rollups are exact (no pending invalidation)."""
    return await db.fetchval(_READ_STATE, company)


async def drop_older_than(db, retention: Retention) -> int:
    """Drop each tier's chunks past its retention; returns the number of chunks dropped."""
    dropped = 0
    for tier in TIERS:
        for table in (tier.stats, tier.activity):
            dropped += await db.fetchval(_DROP_CHUNKS, table, retention.tier_days[tier.name])
    return dropped
