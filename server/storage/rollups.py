"""SQL of the rollup tiers (`rollup_1m`, `rollup_10m`, `rollup_1h`), their watermark and
invalidation log, and the rules of which periods a refresh rebuilds.

Each tier holds rollup blocks (storage/blocks.py): for one company and metric, every worker's
min, max, sum and count per bucket of the tier's resolution over a period (the 10-minute and
hourly tiers per variant too; the 1-minute tier over all variants only: a variant's minutes
are read from the raw reports, which are kept at least as long). The refresh
(storage/refresh.py) adds a small block per metric at each pass and compaction
(storage/compaction.py) merges them into one block per period.

The writer logs, in the statement that stores them, the reports of each batch that fall
behind the watermark (see migrations/004_rollups.sql); the refresh rebuilds what they touch.
"""

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

import asyncpg
import numpy as np

from . import aggregate, blocks, ids
from .aggregate import empty

REFRESH_LOCK = 0x574B5255  # an arbitrary advisory lock key: one refresher at a time


@dataclass(frozen=True)
class Tier:
    name: str
    seconds: int  # the resolution
    period: int  # the span of a merged block (seconds)
    variants: bool  # whether each variant's rows are kept

    @property
    def table(self) -> str:
        return f"rollup_{self.name}"


# Finest first; each resolution divides the next.
TIERS = (Tier("1m", 60, 3600, False), Tier("10m", 600, 86400, True), Tier("1h", 3600, 7 * 86400, True))
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

_DROP_CHUNKS = "SELECT count(*) FROM drop_chunks($1::regclass, older_than => now() - $2::float8 * interval '1 day')"

# A tier's blocks of company $1 and metrics $2 that may hold buckets in [$3, $4) (epoch
# seconds): a block starts at most a period before what it holds.
_BLOCKS = """
SELECT extract(epoch FROM start)::bigint AS start, buckets, metric, workers, offsets, data FROM {table}
WHERE company = $1 AND metric = ANY($2::integer[])
  AND start > to_timestamp($3) - make_interval(secs => {period}) AND start < to_timestamp($4)
"""

# The same, of workers $5 only: just their lanes are read (the data is stored uncompressed,
# so a slice of it is read alone).
_WORKER_LANES = """
SELECT extract(epoch FROM b.start)::bigint AS start, b.buckets, b.metric, g.worker,
       substring(b.data FROM g.lane + 1 FOR coalesce(b.offsets[g.i + 1], octet_length(b.data)) - g.lane) AS lanes
FROM {table} AS b
CROSS JOIN LATERAL unnest(b.workers, b.offsets) WITH ORDINALITY AS g (worker, lane, i)
WHERE b.company = $1 AND b.metric = ANY($2::integer[])
  AND b.start > to_timestamp($3) - make_interval(secs => {period}) AND b.start < to_timestamp($4)
  AND g.worker = ANY($5::integer[])
"""

# The queue pseudo-metrics' blocks, as the same, by their bits (migrations/013): their lanes
# only where a block has no bits.
_QUEUE_BITS = """
SELECT extract(epoch FROM start)::bigint AS start, buckets, metric, workers, listening, busy,
       CASE WHEN listening IS NULL THEN offsets END AS offsets, CASE WHEN listening IS NULL THEN data END AS data
FROM {table}
WHERE company = $1 AND metric = ANY($2::integer[])
  AND start > to_timestamp($3) - make_interval(secs => {period}) AND start < to_timestamp($4)
"""

_DELETE_PERIOD = "DELETE FROM {table} WHERE company = $1 AND metric = $2 AND start >= $3 AND start < $4"

# The blocks of company $1 holding buckets in [$2, $3) (epoch seconds) of any of workers $4.
_HOLDING = """
SELECT tableoid, ctid, extract(epoch FROM start)::bigint AS start, metric, workers, offsets, data FROM {table}
WHERE company = $1 AND start > to_timestamp($2) - make_interval(secs => {period}) AND start < to_timestamp($3)
  AND start + buckets * make_interval(secs => {seconds}) > to_timestamp($2) AND workers && $4::integer[]
"""
_DELETE_BLOCK = "DELETE FROM {table} WHERE tableoid = $1 AND ctid = $2"

# (company, metric, period start) of every period holding more than one block, and their
# count, among the periods that start before $1 (epoch seconds). Periods start at multiples
# of their length since the epoch, as floor_to counts them (time_bucket's weeks would start
# on Mondays).
_FRAGMENTED = """
SELECT company, metric,
       extract(epoch FROM time_bucket(make_interval(secs => {period}), start, origin => 'epoch'))::bigint AS period,
       count(*) AS blocks
FROM {table} WHERE start < to_timestamp($1)
GROUP BY 1, 2, 3 HAVING count(*) > 1
"""


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


# --- the tiers' blocks ---------------------------------------------------------------------


def _epoch_time(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


async def fetch(db, tier: Tier, company: str, metrics, low: int, high: int, workers=None) -> list[tuple]:
    """The tier's blocks of `metrics` (ids; 0: activity) that may hold buckets in [low, high)
    (epoch seconds), of `workers` (ids; None: all: whole blocks; else just those workers'
    lanes), as (start, metric, RollupBlock); `decode` reads them."""
    metric_ids = [int(metric) for metric in metrics]
    if workers is None:
        rows = await db.fetch(_BLOCKS.format(table=tier.table, period=tier.period), company, metric_ids, low, high)
        return [(row["start"], row["metric"], blocks.RollupBlock(
            np.array(row["workers"], dtype=np.int64), np.array(row["offsets"], dtype=np.int64), row["data"]))
            for row in rows]  # fmt: skip
    rows = await db.fetch(
        _WORKER_LANES.format(table=tier.table, period=tier.period), company, metric_ids, low, high, [int(w) for w in workers]
    )
    by_block = defaultdict(list)
    for row in rows:
        by_block[(row["start"], row["metric"])].append(row)
    fetched = []
    for (start, metric), lanes in by_block.items():
        sizes = np.array([len(lane["lanes"]) for lane in lanes], dtype=np.int64)
        block = blocks.RollupBlock(
            np.array([lane["worker"] for lane in lanes], dtype=np.int64),
            np.cumsum(sizes) - sizes,
            b"".join(lane["lanes"] for lane in lanes),
        )
        fetched.append((start, metric, block))
    return fetched


@dataclass
class QueueBlock:
    """A queue pseudo-metric's block as a queue chart reads it: its bits, or (a block without
    them) its rows."""

    start: int  # epoch seconds
    buckets: int
    metric: int
    workers: np.ndarray
    listening: np.ndarray | None  # blocks.queue_bits
    busy: np.ndarray | None
    rows: blocks.Aggregates | None


async def fetch_queue_bits(db, tier: Tier, company: str, metrics, low: int, high: int) -> list[QueueBlock]:
    """The tier's blocks of these queue pseudo-metrics that may hold buckets in [low, high)."""
    rows = await db.fetch(
        _QUEUE_BITS.format(table=tier.table, period=tier.period), company, [int(m) for m in metrics], low, high
    )
    found = []
    for row in rows:
        workers = np.array(row["workers"], dtype=np.int64)
        if row["listening"] is None:
            block = blocks.RollupBlock(workers, np.array(row["offsets"], dtype=np.int64), row["data"])
            decoded = blocks.decode_rollup(block, row["metric"], variants=False)
            found.append(QueueBlock(row["start"], row["buckets"], row["metric"], workers, None, None, decoded))
            continue
        listening = blocks.queue_bits(row["listening"], len(workers), row["buckets"])
        busy = blocks.queue_bits(row["busy"], len(workers), row["buckets"])
        found.append(QueueBlock(row["start"], row["buckets"], row["metric"], workers, listening, busy, None))
    return found


def decode(fetched: list[tuple], tier: Tier, low: int, high: int, variants: bool) -> blocks.Aggregates:
    """The rows of fetched blocks for buckets in [low, high), with absolute buckets."""
    if not fetched:
        return empty()
    rows = blocks.decode_rollups([(block, metric, start // tier.seconds) for start, metric, block in fetched], variants)
    first, last = low // tier.seconds, high // tier.seconds
    return rows.take((rows.buckets >= first) & (rows.buckets < last))


async def read(
    db, tier: Tier, company: str, metrics, low: int, high: int, workers=None, variants: bool = False
) -> blocks.Aggregates:
    """`fetch`, decoded."""
    return decode(await fetch(db, tier, company, metrics, low, high, workers), tier, low, high, variants)


async def write(db, tier: Tier, company: str, rows: blocks.Aggregates) -> None:
    """Store the rows (of one company, absolute buckets) as new blocks: one per metric and
    period, each from its first bucket to its last."""
    records, queue_records = [], []
    rows = aggregate.sort(rows)  # a block's order: by worker, variant, bucket
    period_of = rows.buckets * tier.seconds // tier.period
    pairs = sorted(set(zip(rows.metrics.tolist(), period_of.tolist())))
    queues = await ids.queue_metrics(db, {metric for metric, _ in pairs}) if pairs else set()
    for metric, period in pairs:
        mine = rows.take((rows.metrics == metric) & (period_of == period))
        first = int(mine.buckets.min())
        mine.buckets = mine.buckets - first
        buckets = int(mine.buckets.max()) + 1
        block = blocks.encode_rollup(mine)
        record = (_epoch_time(first * tier.seconds), buckets, company, metric,
                  block.workers.tolist(), block.offsets.tolist(), block.data)  # fmt: skip
        if metric in queues:
            queue_records.append((*record, *blocks.encode_queue_bits(mine, block.workers, buckets)))
        else:
            records.append(record)
    # (Blocks of metrics name no bits' columns: migration 007 stores rollups through this code,
    # before migration 013 made them.)
    columns = ["start", "buckets", "company", "metric", "workers", "offsets", "data"]
    if records:
        await db.copy_records_to_table(tier.table, columns=columns, records=records)
    if queue_records:
        await db.copy_records_to_table(tier.table, columns=[*columns, "listening", "busy"], records=queue_records)


async def replace(db, tier: Tier, company: str, workers: np.ndarray, low: int, high: int, fresh: blocks.Aggregates) -> None:
    """In the company's blocks of the tier, the rows of `workers` (ids) in buckets [low, high)
    (epoch seconds) become `fresh`: the blocks holding such rows are rewritten without them,
    and `fresh` is added as new blocks (compaction merges a period's blocks later)."""
    rows = await db.fetch(
        _HOLDING.format(table=tier.table, seconds=tier.seconds, period=tier.period),
        company, low, high, [int(worker) for worker in workers],
    )  # fmt: skip
    for row in rows:
        block = blocks.RollupBlock(np.array(row["workers"], dtype=np.int64), np.array(row["offsets"], dtype=np.int64), row["data"])
        kept = blocks.decode_rollups([(block, row["metric"], row["start"] // tier.seconds)], tier.variants)
        seconds = kept.buckets * tier.seconds
        kept = kept.take(~(np.isin(kept.workers, workers) & (seconds >= low) & (seconds < high)))
        await db.execute(_DELETE_BLOCK.format(table=tier.table), row["tableoid"], row["ctid"])
        if len(kept):
            await write(db, tier, company, kept)
    if len(fresh):
        await write(db, tier, company, fresh)


async def merge(db, tier: Tier, company: str, metric: int, period: int) -> None:
    """The period's blocks of that metric made one."""
    await _rewrite(db, tier, company, metric, period, lambda rows: rows)


async def _rewrite(db, tier: Tier, company: str, metric: int, period: int, change) -> None:
    end = period + tier.period
    rows = change(await read(db, tier, company, [metric], period, end, variants=tier.variants))
    await db.execute(_DELETE_PERIOD.format(table=tier.table), company, metric, _epoch_time(period), _epoch_time(end))
    if len(rows):
        await write(db, tier, company, rows)


async def fragmented(db, tier: Tier, before: int) -> list[asyncpg.Record]:
    """Periods (company, metric, period start) holding several blocks, of periods starting before `before`."""
    return await db.fetch(_FRAGMENTED.format(table=tier.table, period=tier.period), before)


async def advance(db, lag: float, max_step: float) -> None:
    """Move the watermark to the minute `lag` before now, at most `max_step` past what is
    materialized (in a transaction of its own: it waits for the writer's batches in flight)."""
    await db.execute(_ADVANCE, lag, max_step)


async def progress(db) -> tuple[int, int]:
    """(materialized, watermark), epoch seconds."""
    materialized, watermark = await db.fetchrow(_PROGRESS)
    return int(materialized), int(watermark)


async def set_materialized(db, moment: int) -> None:
    await db.execute(_MATERIALIZED, moment)


async def take_invalidations(db) -> list[Invalidation]:
    return [Invalidation(*row) for row in await db.fetch(_TAKE_INVALIDATIONS)]


async def companies(db) -> list[str]:
    return [row["id"] for row in await db.fetch(_COMPANIES)]


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
        dropped += await db.fetchval(_DROP_CHUNKS, tier.table, retention.tier_days[tier.name])
    return dropped
