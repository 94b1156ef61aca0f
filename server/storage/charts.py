"""Chart reads (`get_stats`, `get_activity_report`) from the cheapest exact sources.

A chart's range is cut into segments, each read from one source: the coarsest rollup tier
whose resolution divides the interval serves the whole buckets it holds, finer tiers the
pieces at either end, and the raw reports only what no tier can serve exactly (a partial
minute at the start, and everything after the rollups' watermark), the way TimescaleDB's
real-time aggregates combine a materialization with the raw rows after its threshold.
Every segment yields rows in the shape of a rollup row (min, max, sum and count; a raw
value is a row of its own with count 1; for activity, a worker seen in a bucket), combined
per bucket (numpy, in a thread: the event loop only awaits the reads), so each bucket is
exact whichever sources serve it.
"""

import asyncio
import math
from dataclasses import dataclass

import asyncpg
import numpy as np

from .. import errors
from ..errors import ApiError
from . import aggregate, ids, raw, rollups
from .blocks import ACTIVITY, COMBINED, Aggregates, variant_name
from .rollups import TIERS, Retention, ceil_to, floor_to

RAW = 0  # the source of a segment read from the raw reports
RESOLUTION = 1e-6  # of timestamptz: a range that ends at t inclusive ends before t + RESOLUTION


@dataclass(frozen=True)
class Segment:
    source: int  # RAW, or the resolution in seconds of the rollup tier
    low: float  # [low, high), epoch seconds
    high: float


# The buckets a chart is judged by when deciding whether raw reports can serve its interval:
# the ClearML web UI's most points per chart.
CHART_POINTS = 1000


def raw_worker_hours(interval: int, workers: int) -> float:
    """What serving `interval` from raw reports costs, in worker-hours: the span of a
    CHART_POINTS-bucket chart at that interval, times the workers. Judged by the interval,
    not the range asked for, so that a chart's first load and its incremental refreshes
    (short ranges at the same interval) are answered at the same interval."""
    return interval * CHART_POINTS / 3600 * max(workers, 1)


def tiers_for(split_by_variant: bool) -> list[rollups.Tier]:
    """The tiers that can serve a chart: with split_by_variant, those that keep each variant
    (the 1-minute tier keeps the rows over all variants only)."""
    return [tier for tier in TIERS if tier.variants or not split_by_variant]


def choose_interval(
    interval: int, from_date: float, now: float, retention: Retention, raw_affordable: bool, split_by_variant: bool = False
) -> int:
    """The interval to chart with (SPEC §2). How far back the chart reaches is the longer
    of its range and the span of CHART_POINTS buckets at `interval` (judged by the interval
    too, so that a first load and its refreshes agree). While raw reports reach that far,
    `interval` is kept when a tier's resolution divides it or reading it raw is
    `raw_affordable`; otherwise it is raised to the next multiple of the finest tier that
    reaches that far."""
    tiers = tiers_for(split_by_variant)
    reach = max(now - from_date, interval * CHART_POINTS)
    if reach <= retention.days(None) * 86400 and (interval % tiers[0].seconds == 0 or raw_affordable):
        return interval
    tier = next((tier for tier in tiers if reach <= retention.days(tier) * 86400), tiers[-1])
    return ceil_to(interval, tier.seconds)


def read_range(
    from_date: float, to_date: float, first_bucket: int, end_of_buckets: int, now: float, retention: Retention
) -> tuple[float, float]:
    """The [low, high) range of report times that the buckets are made of: from_date to
    to_date inclusive (SPEC §2), within the buckets. Where that end of the range lies past
    the raw reports' retention, its bucket is read whole: only rollups hold it, whole."""
    raw_horizon = retention.horizon(None, now)
    low = first_bucket if from_date < raw_horizon else from_date
    high = end_of_buckets if to_date < raw_horizon else min(to_date + RESOLUTION, end_of_buckets)
    return low, high


def segments(low: float, high: float, interval: int, exact_before: float, split_by_variant: bool = False) -> list[Segment]:
    """Cut [low, high) into segments: rollup tiers whose resolution divides `interval`,
    coarsest first, for whole buckets before `exact_before`; raw reports for the rest."""
    resolutions = [tier.seconds for tier in reversed(tiers_for(split_by_variant)) if interval % tier.seconds == 0]
    return _split(low, high, resolutions, exact_before)


@dataclass(frozen=True)
class Plan:
    """What a chart reads: report times in [low, high), bucketed by `interval`; from the
    rollups wherever they are exact (`from_rollups`), else raw reports only."""

    low: float
    high: float
    interval: int
    split_by_variant: bool = False
    from_rollups: bool = True

    async def segments(self, conn, company: str) -> list[Segment]:
        """The segments, as the rollups stand in the snapshot of `conn`'s transaction: their
        `materialized` mark and pending invalidations are read with the blocks they describe
        (a replica, or a refresh committing meanwhile, cannot pair one with the other's)."""
        if not self.from_rollups:
            return [Segment(RAW, self.low, self.high)] if self.low < self.high else []
        exact_before = await rollups.read_watermark(conn, company)
        return segments(self.low, self.high, self.interval, exact_before, self.split_by_variant)


def _split(low: float, high: float, resolutions: list[int], exact_before: float) -> list[Segment]:
    if low >= high:
        return []
    if not resolutions:
        return [Segment(RAW, low, high)]
    step, finer = resolutions[0], resolutions[1:]
    start, end = ceil_to(low, step), floor_to(min(high, exact_before), step)
    if start >= end:
        return _split(low, high, finer, exact_before)
    return [
        *_split(low, start, finer, exact_before),
        Segment(step, start, end),
        *_split(end, high, finer, exact_before),
    ]


def tier_of(seconds: int) -> rollups.Tier:
    return next(tier for tier in TIERS if tier.seconds == seconds)


def _timeout() -> ApiError:
    return ApiError(
        errors.INVALID_FIELD_VALUES,
        "Invalid field values: the read did not finish within the read timeout "
        "(WORKERS_READ_TIMEOUT_SECONDS): ask for fewer workers or metrics, a shorter range or a larger interval",
    )


async def _fetch(conn, company: str, pieces: list[Segment], metrics, workers, every_worker: bool) -> list:
    """Each segment's data as read (raw reports, or a tier's blocks); `_rows` decodes them.
    `workers`: the ids asked for; `every_worker`: they are all the company's, so rollup
    blocks are read whole rather than a worker's lanes at a time."""
    fetched = []
    for piece in pieces:
        if piece.source == RAW:
            wanted = [] if metrics is None else metrics  # activity: who reported, no values
            fetched.append(await raw.fetch(conn, micros(piece.low), micros(piece.high), workers, metrics=wanted))
        else:
            wanted = [ACTIVITY] if metrics is None else metrics
            tier = tier_of(piece.source)
            lanes_of = None if every_worker else workers
            fetched.append(await rollups.fetch(conn, tier, company, wanted, int(piece.low), int(piece.high), lanes_of))
    return fetched


def _rows(pieces: list[Segment], fetched: list, interval: int, metrics, variants: bool) -> Aggregates:
    """Every segment's rows per bucket of `interval`, combined (a bucket several segments
    serve is made one row). CPU work only: run in a thread, so that the event loop goes on
    answering status reports meanwhile."""
    parts = []
    for piece, data in zip(pieces, fetched):
        if piece.source == RAW:
            points = raw.points(data)
            if metrics is None:
                parts.append(aggregate.activity(points, interval))
            else:
                rows = aggregate.aggregate(points, interval, variants=variants, metrics=metrics, exact=False)
                parts.append(aggregate.split(rows) if variants else rows.take(rows.variants == COMBINED))
        else:
            tier = tier_of(piece.source)
            rows = rollups.decode(data, tier, int(piece.low), int(piece.high), variants)
            rows = aggregate.split(rows) if variants else rows.take(rows.variants == COMBINED)
            parts.append(aggregate.combine(rows, interval // tier.seconds))
    return aggregate.combine(aggregate.concatenate(parts)) if parts else aggregate.empty()


def micros(seconds: float) -> int:
    return math.ceil(seconds * 1_000_000)


async def read_snapshot(pool, read):
    """Run `read(conn)` in a read-only repeatable-read transaction (raw reports are read as
    rows and blocks of one snapshot); a statement past the read timeout is a clear 400."""
    try:
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            return await read(conn)
    except asyncpg.QueryCanceledError:
        raise _timeout() from None


def _chosen(known_workers: dict[str, int], worker_ids) -> list[int]:
    """The ids of the workers asked for that the company has (none asked: all of them)."""
    return [known_workers[w] for w in worker_ids if w in known_workers] if worker_ids else list(known_workers.values())


# Per series (worker, metric, variant or None): "min", "max" and "avg", one value per bucket
# asked for (NaN where the series has no report in the bucket).
Series = dict[tuple[str, str, str | None], dict[str, np.ndarray]]


async def stats(
    pool,
    company: str,
    plan: Plan,
    *,
    buckets: list[int],
    metrics: list[str],
    worker_ids: list[str],
) -> Series:
    async def read(conn):
        known_workers = await ids.workers_of_company(conn, company)
        workers = _chosen(known_workers, worker_ids)
        metric_ids = await ids.metrics_by_name(conn, company, metrics)
        if not workers or not metric_ids:
            return None
        pieces = await plan.segments(conn, company)
        fetched = await _fetch(conn, company, pieces, list(metric_ids.values()), workers, every_worker=not worker_ids)
        return known_workers, metric_ids, pieces, fetched

    found = await read_snapshot(pool, read) if buckets else None
    if found is None:
        return {}
    known_workers, metric_ids, pieces, fetched = found
    interval, split_by_variant = plan.interval, plan.split_by_variant

    def compute() -> Series:
        rows = _rows(pieces, fetched, interval, list(metric_ids.values()), split_by_variant)
        names = {worker_id: name for name, worker_id in known_workers.items()}
        return _series(rows, buckets[0] // interval, len(buckets), names, {i: n for n, i in metric_ids.items()}, split_by_variant)

    return await asyncio.to_thread(compute)


def _series(rows: Aggregates, first: int, count: int, worker_names, metric_names, split: bool) -> Series:
    """Rows as one row of a grid per series and aggregation, over the buckets asked for."""
    rows = rows.take((rows.buckets >= first) & (rows.buckets < first + count))
    if not len(rows):
        return {}
    rows = rows.take(np.lexsort((rows.buckets, rows.variants, rows.metrics, rows.workers)))
    change = np.ones(len(rows), dtype=bool)
    change[1:] = (rows.workers[1:] != rows.workers[:-1]) | (rows.metrics[1:] != rows.metrics[:-1]) | (
        rows.variants[1:] != rows.variants[:-1]
    )
    starts = np.flatnonzero(change)
    series, position = np.cumsum(change) - 1, rows.buckets - first
    grids = {}
    for name, column in (("min", rows.mins), ("max", rows.maxs), ("avg", rows.sums / rows.counts)):
        grid = np.full((len(starts), count), np.nan)
        grid[series, position] = column
        grids[name] = grid
    result: Series = {}
    for index, start in enumerate(starts.tolist()):
        variant = variant_name(int(rows.variants[start])) if split else None
        key = (worker_names[int(rows.workers[start])], metric_names[int(rows.metrics[start])], variant)
        result[key] = {name: grid[index] for name, grid in grids.items()}
    return result


async def activity(
    pool, company: str, plan: Plan, *, buckets: list[int], worker_ids: list[str] = ()
) -> tuple[list, list]:
    """Distinct reporting workers (`total`) and those running a task (`active`) per bucket,
    of `worker_ids` (empty: every worker of the company)."""

    async def read(conn):
        known_workers = await ids.workers_of_company(conn, company)
        workers = _chosen(known_workers, worker_ids)
        if not workers:
            return None
        pieces = await plan.segments(conn, company)
        return pieces, await _fetch(conn, company, pieces, None, workers, every_worker=not worker_ids)

    found = await read_snapshot(pool, read) if buckets else None
    if found is None:
        return [0] * len(buckets), [0] * len(buckets)
    pieces, fetched = found
    interval = plan.interval

    def compute() -> tuple[list, list]:
        rows = _rows(pieces, fetched, interval, None, False)
        position = rows.buckets - buckets[0] // interval
        inside = (position >= 0) & (position < len(buckets)) & (rows.counts > 0)
        total = np.bincount(position[inside], minlength=len(buckets))
        active = np.bincount(position[inside & (rows.exact_sums > 0)], minlength=len(buckets))
        return total.tolist(), active.tolist()

    return await asyncio.to_thread(compute)
