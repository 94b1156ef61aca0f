"""Raw values into bucket aggregates, and aggregates into coarser ones, with numpy.

What a rollup tier holds and what a chart read composes are both `blocks.Aggregates`: rows of
(metric, worker, variant, bucket) with min, max, sum and count, a row over all the metric's
variants (variant COMBINED) beside each variant's. Sums of decimal values are also kept as
exact integers at the values' scale, so that combining buckets never rounds them.
Buckets here are absolute: the bucket's start in seconds divided by its length.
"""

from dataclasses import dataclass

import numpy as np

from .blocks import ACTIVITY, COMBINED, TOTAL, Aggregates, concatenate, empty
from .codec import MAX_EXACT, value_scales

_FLOAT_POWERS = 10.0 ** np.arange(16)


@dataclass
class Points:
    """Raw reports and their values, as columns: one row per report, one row per value."""

    report_workers: np.ndarray  # int64 worker ids
    report_times: np.ndarray  # int64 µs since the epoch
    report_tasks: list  # the task id or None
    reports: np.ndarray  # per value: its report's row
    metrics: np.ndarray
    variants: np.ndarray
    values: np.ndarray

    @property
    def report_busy(self) -> np.ndarray:
        return np.fromiter((bool(task) for task in self.report_tasks), dtype=bool, count=len(self.report_tasks))


def empty_points() -> Points:
    nothing = np.zeros(0, dtype=np.int64)
    return Points(nothing, nothing, [], nothing, nothing, nothing, np.zeros(0))


def concatenate_points(parts: list[Points]) -> Points:
    parts = [part for part in parts if len(part.report_times)]
    if not parts:
        return empty_points()
    offsets = np.cumsum([0] + [len(part.report_times) for part in parts[:-1]])
    return Points(
        report_workers=np.concatenate([part.report_workers for part in parts]),
        report_times=np.concatenate([part.report_times for part in parts]),
        report_tasks=[task for part in parts for task in part.report_tasks],
        reports=np.concatenate([part.reports + offset for part, offset in zip(parts, offsets)]),
        metrics=np.concatenate([part.metrics for part in parts]),
        variants=np.concatenate([part.variants for part in parts]),
        values=np.concatenate([part.values for part in parts]),
    )


def _groups(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The order that sorts rows by `keys` (most significant first; stable), and where each
    group of equal keys starts in that order."""
    if not len(keys[0]):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    packed = _packed(keys)
    if packed is None:
        order = np.lexsort(keys[::-1])
        change = np.zeros(len(order), dtype=bool)
        for key in keys:
            sorted_key = key[order]
            change[1:] |= sorted_key[1:] != sorted_key[:-1]
    else:  # one sort of one key costs a fraction of lexsort's sort per key
        order = np.argsort(packed, kind="stable")
        sorted_key = packed[order]
        change = np.empty(len(order), dtype=bool)
        change[1:] = sorted_key[1:] != sorted_key[:-1]
    change[0] = True
    return order, np.flatnonzero(change)


def _packed(keys: list[np.ndarray]) -> np.ndarray | None:
    """The keys as one int64 that sorts as they do, or None when their ranges do not fit."""
    packed = np.zeros(len(keys[0]), dtype=np.int64)
    span = 1
    for key in reversed(keys):
        low = int(key.min())
        width = int(key.max()) - low + 1
        if span * width >= 2**62:
            return None
        packed += (key - low) * span
        span *= width
    return packed


def _group_ids(order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """For each row, the number of its group (`_groups`' order and starts)."""
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(order))))
    return ids


def split(rows: Aggregates) -> Aggregates:
    """Per-variant rows: each variant's, and a scalar metric's row over all variants as its
    variant "total" (where a metric, worker and bucket has no variant rows)."""
    combined = rows.variants == COMBINED
    variant_keys = set(zip(rows.metrics[~combined].tolist(), rows.workers[~combined].tolist(), rows.buckets[~combined].tolist()))
    scalar = combined & np.fromiter(
        ((m, w, b) not in variant_keys for m, w, b in zip(rows.metrics.tolist(), rows.workers.tolist(), rows.buckets.tolist())),
        dtype=bool, count=len(rows),
    )
    result = rows.take(~combined | scalar)
    result.variants = np.where(result.variants == COMBINED, TOTAL, result.variants)
    return result


def _exact_sums(values: np.ndarray, scales: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group (consecutive values from each start): its scale (the largest of its values';
    -1 when one has none, or when the sum would not stay exact within 2^53) and the exact
    sum at it."""
    sizes = np.diff(np.append(starts, len(values)))
    inexact = np.minimum.reduceat(scales, starts) < 0
    group_scale = np.where(inexact, -1, np.maximum.reduceat(scales, starts))
    per_value = np.repeat(group_scale, sizes)
    decimal = per_value >= 0
    scaled = np.zeros(len(values), dtype=np.int64)
    scaled[decimal] = np.round(values[decimal] * _FLOAT_POWERS[per_value[decimal]]).astype(np.int64)
    # No int64 overflow on the way: each value is within 2^53, and groups are checked first.
    safe = np.maximum.reduceat(np.abs(scaled), starts).astype(np.float64) * sizes < 2.0**62
    sums = np.add.reduceat(np.where(np.repeat(safe, sizes), scaled, 0), starts)
    group_scale = np.where(safe & (np.abs(sums) <= MAX_EXACT), group_scale, -1)
    return group_scale, np.where(group_scale >= 0, sums, 0)


def aggregate(
    points: Points, seconds: int, variants: bool = True, metrics: np.ndarray | None = None, exact: bool = True
) -> Aggregates:
    """Each metric's values per worker and bucket of `seconds` (with `variants`, per variant
    too), and the reports per worker and bucket as the ACTIVITY pseudo-metric. `metrics`:
    only these (and no activity). Without `exact`, sums are floats only (a chart's read:
    only stored rollups need their sums exact)."""
    keep = np.ones(len(points.values), dtype=bool) if metrics is None else np.isin(points.metrics, metrics)
    values = points.values[keep]
    reports = points.reports[keep]
    metric = points.metrics[keep]
    worker = points.report_workers[reports]
    bucket = points.report_times[reports] // (seconds * 1_000_000)
    scales = value_scales(values) if exact else np.full(len(values), -1, dtype=np.int64)
    groups = _groups([metric, worker, bucket])
    parts = [_aggregate([metric, worker, bucket], np.full(len(values), COMBINED), values, scales, groups)]
    if variants:
        # A scalar's only variant is its row over all variants: kept once (see `split`).
        variant = points.variants[keep]
        listed = variant != TOTAL
        group = _group_ids(*groups)
        has_list = np.zeros(len(groups[1]), dtype=bool)
        has_list[group[listed]] = True
        chosen = listed | has_list[group]
        parts.append(_aggregate(
            [metric[chosen], worker[chosen], variant[chosen], bucket[chosen]], variant[chosen], values[chosen], scales[chosen]
        ))
    if metrics is None and len(points.report_times):
        parts.append(activity(points, seconds))
    return sort(concatenate(parts))


def _aggregate(keys: list[np.ndarray], variants: np.ndarray, values: np.ndarray, scales: np.ndarray, groups=None) -> Aggregates:
    """Rows of the groups of equal `keys` (metric, worker, ..., bucket); `groups`: theirs
    (`_groups`), when known."""
    if not len(values):
        return empty()
    order, starts = _groups(keys) if groups is None else groups
    values, scales = values[order], scales[order]
    group_scale, exact = _exact_sums(values, scales, starts)
    first = order[starts]
    return Aggregates(
        metrics=keys[0][first],
        workers=keys[1][first],
        variants=variants[first],
        buckets=keys[-1][first],
        mins=np.minimum.reduceat(values, starts),
        maxs=np.maximum.reduceat(values, starts),
        sums=np.add.reduceat(values, starts),
        exact_sums=exact,
        scales=group_scale,
        counts=np.diff(np.append(starts, len(values))),
    )


def activity(points: Points, seconds: int) -> Aggregates:
    """Per worker and bucket: the reports (count) and those that carried a task (sum), as
    rows of the ACTIVITY pseudo-metric."""
    if not len(points.report_times):
        return empty()
    bucket = points.report_times // (seconds * 1_000_000)
    order, starts = _groups([points.report_workers, bucket])
    busy = points.report_busy[order].astype(np.int64)
    first = order[starts]
    busy_reports = np.add.reduceat(busy, starts)
    count = len(starts)
    return Aggregates(
        metrics=np.full(count, ACTIVITY, dtype=np.int64),
        workers=points.report_workers[first],
        variants=np.full(count, COMBINED, dtype=np.int64),
        buckets=bucket[first],
        mins=np.full(count, np.nan),
        maxs=np.full(count, np.nan),
        sums=busy_reports.astype(np.float64),
        exact_sums=busy_reports,
        scales=np.zeros(count, dtype=np.int64),
        counts=np.diff(np.append(starts, len(order))),
    )


def sort(rows: Aggregates) -> Aggregates:
    """By metric, worker, variant (COMBINED first), bucket: a rollup block's order."""
    return rows.take(np.lexsort((rows.buckets, rows.variants, rows.workers, rows.metrics)))


def combine(rows: Aggregates, factor: int = 1) -> Aggregates:
    """Rows of the same metric, worker, variant and bucket // factor made one (min of the
    mins, max of the maxs, sums and counts added; exact sums at the largest scale)."""
    if not len(rows):
        return rows
    bucket = rows.buckets // factor
    order, starts = _groups([rows.metrics, rows.workers, rows.variants, bucket])
    scales = rows.scales[order]
    inexact = np.minimum.reduceat(scales, starts) < 0
    group_scale = np.where(inexact, -1, np.maximum.reduceat(scales, starts))
    sizes = np.diff(np.append(starts, len(order)))
    per_row = np.repeat(group_scale, sizes)
    exact_rows = rows.exact_sums[order]
    decimal = per_row >= 0
    rescaled = np.zeros(len(order), dtype=np.float64)
    rescaled[decimal] = exact_rows[decimal] * _FLOAT_POWERS[per_row[decimal] - scales[decimal]]
    # Rescaled, each part and the group's sum must stay within 2^53 (exact in float64).
    fits = np.maximum.reduceat(np.abs(rescaled), starts) * sizes <= MAX_EXACT
    group_scale = np.where(fits, group_scale, -1)
    integer_rows = np.where(np.repeat(group_scale >= 0, sizes), rescaled, 0).astype(np.int64)
    exact = np.add.reduceat(integer_rows, starts)
    first = order[starts]
    with np.errstate(invalid="ignore"):  # the activity's min and max are NaN
        mins = np.fmin.reduceat(rows.mins[order], starts)
        maxs = np.fmax.reduceat(rows.maxs[order], starts)
    return Aggregates(
        metrics=rows.metrics[first],
        workers=rows.workers[first],
        variants=rows.variants[first],
        buckets=bucket[first],
        mins=mins,
        maxs=maxs,
        sums=np.add.reduceat(rows.sums[order], starts),
        exact_sums=np.where(group_scale >= 0, exact, 0),
        scales=group_scale,
        counts=np.add.reduceat(rows.counts[order], starts),
    )


def without(rows: Aggregates, workers: np.ndarray, low: int, high: int) -> Aggregates:
    """`rows` less those of `workers` in buckets [low, high)."""
    drop = np.isin(rows.workers, workers) & (rows.buckets >= low) & (rows.buckets < high)
    return rows.take(~drop)
