"""Chart reads (`get_stats`, `get_activity_report`) from the cheapest exact sources.

A chart's range is cut into segments, each read from one source: the coarsest rollup tier
whose resolution divides the interval serves the whole buckets it holds, finer tiers the
pieces at either end, and the raw reports only what no tier can serve exactly (a partial
minute at the start, and everything after the rollups' watermark), the way TimescaleDB's
real-time aggregates combine a materialization with the raw rows after its threshold.
Every segment yields rows in the shape of a rollup row (min, max, sum and count; a raw
value is a row of its own with count 1; for activity, a worker seen in a bucket) that one
statement aggregates per bucket, so each bucket is exact whichever sources serve it.
"""

from dataclasses import dataclass

import asyncpg

from .. import errors
from ..errors import ApiError
from . import rollups, statistics
from .rollups import FINEST, TIERS, Retention, ceil_to, floor_to

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


def choose_interval(interval: int, from_date: float, now: float, retention: Retention, raw_affordable: bool) -> int:
    """The interval to chart with (SPEC §2). How far back the chart reaches is the longer
    of its range and the span of CHART_POINTS buckets at `interval` (judged by the interval
    too, so that a first load and its refreshes agree). While raw reports reach that far,
    `interval` is kept when a tier's resolution divides it or reading it raw is
    `raw_affordable`; otherwise it is raised to the next multiple of the finest tier that
    reaches that far."""
    reach = max(now - from_date, interval * CHART_POINTS)
    if reach <= retention.days(None) * 86400 and (interval % FINEST.seconds == 0 or raw_affordable):
        return interval
    tier = next((tier for tier in TIERS if reach <= retention.days(tier) * 86400), TIERS[-1])
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


def segments(low: float, high: float, interval: int, exact_before: float) -> list[Segment]:
    """Cut [low, high) into segments: rollup tiers whose resolution divides `interval`,
    coarsest first, for whole buckets before `exact_before`; raw reports for the rest."""
    resolutions = [tier.seconds for tier in reversed(TIERS) if interval % tier.seconds == 0]
    return _split(low, high, resolutions, exact_before)


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


# $1 company, $2 interval (seconds), then for get_stats $3 metrics and (when filtered) $4
# worker ids, then each segment's low and high. A bucket served by several segments has a
# row from each: get_stats combines them in `stats` (cheaper than one more aggregation of
# every row in SQL, when the rows of a tier are already whole buckets).
_STATS = "{parts}"

_ACTIVITY = """
SELECT bucket, count(*) AS total, count(*) FILTER (WHERE busy) AS active
FROM (SELECT bucket, worker, bool_or(busy) AS busy FROM ({parts}) AS parts GROUP BY 1, 2) AS per_worker
GROUP BY 1
"""


def _compose(template: str, parts_of, pieces: list[Segment], first: int) -> tuple[str, list[float]]:
    """The statement for `pieces` (a part per segment from `parts_of(source, low, high)`),
    with their bounds as parameters from `$first` on."""
    parts, bounds = [], []
    for number, piece in enumerate(pieces):
        low, high = f"${first + 2 * number}", f"${first + 2 * number + 1}"
        parts.append(parts_of(piece.source, low, high))
        bounds += [piece.low, piece.high]
    return template.format(parts="\nUNION ALL\n".join(parts)), bounds


def _tier(seconds: int) -> rollups.Tier:
    return next(tier for tier in TIERS if tier.seconds == seconds)


async def _fetch(db, statement: str, *arguments) -> list[asyncpg.Record]:
    try:
        return await db.fetch(statement, *arguments)
    except asyncpg.QueryCanceledError:
        raise ApiError(
            errors.INVALID_FIELD_VALUES,
            "Invalid field values: the read did not finish within the read timeout "
            "(WORKERS_READ_TIMEOUT_SECONDS): ask for fewer workers or metrics, a shorter range or a larger interval",
        ) from None


Series = dict[tuple[str, str, str | None], dict[int, dict[str, float]]]


async def stats(
    db,
    company: str,
    pieces: list[Segment],
    *,
    interval: int,
    metrics: list[str],
    worker_ids: list[str],
    split_by_variant: bool,
) -> Series:
    """{(worker, metric, variant or None): {bucket start in seconds: {"min", "max", "avg"}}}."""
    if not pieces:
        return {}
    workers = "$4" if worker_ids else None

    def part(source: int, low: str, high: str) -> str:
        if source == RAW:
            return statistics.stats_part(low, high, workers, split_by_variant)
        return rollups.stats_part(_tier(source), low, high, workers, split_by_variant, interval)

    statement, bounds = _compose(_STATS, part, pieces, 5 if worker_ids else 4)
    arguments = [company, float(interval), metrics] + ([worker_ids] if worker_ids else [])
    combined: dict[tuple, dict[int, list]] = {}
    for worker, metric, variant, bucket, low, high, total, count in await _fetch(db, statement, *arguments, *bounds):
        buckets = combined.get((worker, metric, variant))
        if buckets is None:
            buckets = combined[(worker, metric, variant)] = {}
        found = buckets.get(bucket)
        if found is None:
            buckets[bucket] = [low, high, total, count]
            continue
        found[0], found[1] = min(found[0], low), max(found[1], high)
        found[2] += total
        found[3] += count
    return {
        key: {bucket: {"min": low, "max": high, "avg": total / count} for bucket, (low, high, total, count) in buckets.items()}
        for key, buckets in combined.items()
    }


async def activity(db, company: str, pieces: list[Segment], *, interval: int) -> list[asyncpg.Record]:
    """Distinct reporting workers (`total`) and those running a task (`active`) per bucket."""
    if not pieces:
        return []

    def part(source: int, low: str, high: str) -> str:
        if source == RAW:
            return statistics.activity_part(low, high)
        return rollups.activity_part(_tier(source), low, high, interval)

    statement, bounds = _compose(_ACTIVITY, part, pieces, 3)
    return await _fetch(db, statement, company, float(interval), *bounds)
