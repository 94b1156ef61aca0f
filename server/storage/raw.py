"""Raw reports wherever they are: rows of `recent_reports` and `late_reports` (as the writer
stores them), and `report_blocks` (as compaction packs them); and SQL of `report_blocks`.

`read` gives a time range of them as `aggregate.Points`, the same whichever place holds
them, for chart reads (storage/charts.py), the refresh and compaction.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import asyncpg
import numpy as np

from . import blocks, codec, ids
from .aggregate import Points, concatenate_points, empty_points

HOUR_US = 3_600_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# A timestamptz's microseconds since the epoch: date_part's float8 seconds are within a
# quarter of a microsecond of them up to the year 2255, and rounding makes them exact again
# (extract(epoch ...) is exact too, as a slower numeric).
MICROS = "round(date_part('epoch', time) * 1000000)::bigint"

# Report rows (`{rows}`: a query of ROW's columns) as one row of column arrays, read into
# numpy without a Python object per report or per value: all their values in one bytea.
ROW = f"worker, {MICROS} AS micros, layout, task, values"
COLUMNS = """
SELECT coalesce(array_agg(r.worker), '{{}}') AS workers, coalesce(array_agg(r.micros), '{{}}') AS micros,
       coalesce(array_agg(r.layout), '{{}}') AS layouts, coalesce(array_agg(r.task), '{{}}') AS tasks,
       coalesce(array_agg(octet_length(r.values) / 8), '{{}}') AS counts, coalesce(string_agg(r.values, ''::bytea), '') AS values
FROM ({rows}) AS r
"""

# The same without the values: who reported when, with which task (activity reads).
REPORT_ONLY_ROW = f"worker, {MICROS} AS micros, layout, task, ''::bytea AS values"

# $1, $2: [low, high) as timestamptz; $3 worker ids (NULL: every worker).
_RANGE = """
SELECT {row} FROM recent_reports
WHERE time >= $1 AND time < $2 AND ($3::integer[] IS NULL OR worker = ANY($3::integer[]))
UNION ALL
SELECT {row} FROM late_reports
WHERE time >= $1 AND time < $2 AND ($3::integer[] IS NULL OR worker = ANY($3::integer[]))
"""
_ROWS = COLUMNS.format(rows=_RANGE.format(row=ROW))
_REPORT_ONLY_ROWS = COLUMNS.format(rows=_RANGE.format(row=REPORT_ONLY_ROW))

_BLOCKS = """
SELECT worker, (extract(epoch FROM start) * 1000000)::bigint AS start, tasks, data FROM report_blocks
WHERE start > $1::timestamptz - interval '1 hour' AND start < $2
  AND ($3::integer[] IS NULL OR worker = ANY($3::integer[]))
"""

_DELETE_BLOCKS = """
DELETE FROM report_blocks AS b USING unnest($1::bigint[], $2::integer[]) AS d (start, worker)
WHERE b.worker = d.worker AND b.start = to_timestamp(d.start / 1000000.0)
"""


@dataclass
class Fetched:
    """Raw reports as read from the database, before any decoding (see `points`)."""

    rows: asyncpg.Record  # COLUMNS
    block_rows: list  # report_blocks: worker, start, tasks, data
    layouts: dict  # layout id -> (metric ids, variant codes)
    low_us: int
    high_us: int
    metrics: list | None  # the metric ids whose values are read (None: all)


async def fetch(db: asyncpg.Connection, low_us: int, high_us: int, workers=None, *, metrics=None) -> Fetched:
    """Every report timed in [low_us, high_us) of `workers` (ids; None: every worker), as
    read; `points` decodes them (CPU work a caller may run in a thread), with the values of
    `metrics` (ids; None: all; empty: none, who reported when with which task). Report rows'
    values are read whole unless none are wanted; blocks' series of other metrics are not
    decoded.

    Call it in a repeatable-read transaction: the rows are read first, which keeps their chunk
    from being dropped by a compaction meanwhile, then the blocks, as of the same snapshot; a
    report is then seen once, either as a row or in its block."""
    low, high = micros_time(low_us), micros_time(high_us)
    worker_ids = None if workers is None else [int(worker) for worker in workers]
    values = metrics is None or len(metrics) > 0
    rows = await db.fetchrow(_ROWS if values else _REPORT_ONLY_ROWS, low, high, worker_ids)
    block_rows = await db.fetch(_BLOCKS, low, high, worker_ids)
    return Fetched(rows, block_rows, await _layouts(db, rows), low_us, high_us, metrics)


def points(fetched: Fetched) -> Points:
    rows = rows_points(fetched.rows, fetched.layouts)
    stored = blocks_to_points(fetched.block_rows, fetched.low_us, fetched.high_us, fetched.metrics)
    if fetched.metrics is None:  # every value at hand: a late copy of a packed report is seen
        return without_copies(rows, stored)
    return concatenate_points([rows, stored])


def without_copies(rows: Points, stored: Points) -> Points:
    """`rows` and `stored` together, less each report of `rows` identical to one of `stored`
    (the same worker, time, task and values): a report sent again after its answer was lost,
    stored as a late row once the first was packed into its block (see migrations/014)."""
    candidates = np.flatnonzero(np.isin(rows.report_times, stored.report_times))
    if not len(candidates):
        return concatenate_points([rows, stored])
    chosen = np.flatnonzero(np.isin(stored.report_times, rows.report_times[candidates]))
    known = set(_report_keys(stored, chosen))
    keep = np.ones(len(rows.report_times), dtype=bool)
    for report, key in zip(candidates, _report_keys(rows, candidates)):
        keep[report] = key not in known
    return concatenate_points([_kept(rows, keep), stored])


def _report_keys(points: Points, reports: np.ndarray) -> list[tuple]:
    """What makes each of these reports (indices) the report it is: worker, time, task and
    its values, (metric, variant, value) in order."""
    taken = np.flatnonzero(np.isin(points.reports, reports))
    taken = taken[np.lexsort((points.variants[taken], points.metrics[taken], points.reports[taken]))]
    bounds = np.searchsorted(points.reports[taken], np.stack([reports, reports + 1]))
    metrics, variants, values = points.metrics.tolist(), points.variants.tolist(), points.values.tolist()
    keys = []
    for report, low, high in zip(reports.tolist(), bounds[0].tolist(), bounds[1].tolist()):
        own = taken[low:high].tolist()
        keys.append((
            int(points.report_workers[report]),
            int(points.report_times[report]),
            points.report_tasks[report] or None,
            tuple((metrics[i], variants[i], values[i]) for i in own),
        ))
    return keys


async def read(db: asyncpg.Connection, low_us: int, high_us: int, workers=None) -> Points:
    """`fetch`, decoded."""
    return points(await fetch(db, low_us, high_us, workers))


async def _layouts(db, rows: asyncpg.Record) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {
        layout: (np.array(metrics, dtype=np.int64), np.array(variants, dtype=np.int64))
        for layout, (metrics, variants) in (await ids.layouts(db, set(rows["layouts"]))).items()
    }


async def rows_to_points(db, rows: asyncpg.Record) -> Points:
    """Points of report rows read as COLUMNS."""
    return rows_points(rows, await _layouts(db, rows))


def rows_points(rows: asyncpg.Record, known: dict) -> Points:
    """Points of report rows read as COLUMNS, with their layouts."""
    count = len(rows["workers"])
    if not count:
        return empty_points()
    counts = np.array(rows["counts"], dtype=np.int64)
    values = np.frombuffer(rows["values"], dtype=">f8").astype(np.float64)
    # Each report's metrics and variants: its layout's, gathered for all reports at once.
    layout_ids = sorted(known)
    lengths = np.array([len(known[layout][0]) for layout in layout_ids], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    all_metrics = np.concatenate([known[layout][0] for layout in layout_ids] or [np.zeros(0, np.int64)])
    all_variants = np.concatenate([known[layout][1] for layout in layout_ids] or [np.zeros(0, np.int64)])
    layout_of = np.searchsorted(layout_ids, np.array(rows["layouts"], dtype=np.int64))
    index = np.repeat(starts[layout_of], counts) + codec.ranks(counts)
    return Points(
        report_workers=np.array(rows["workers"], dtype=np.int64),
        report_times=np.array(rows["micros"], dtype=np.int64),
        report_tasks=list(rows["tasks"]),
        reports=np.repeat(np.arange(count), counts),
        metrics=all_metrics[index],
        variants=all_variants[index],
        values=values,
    )


def blocks_to_points(rows: list, low_us: int | None = None, high_us: int | None = None, metrics=None) -> Points:
    """Points of report block rows (worker, start, tasks, data), those in [low_us, high_us),
    with the values of `metrics` (see `blocks.decode_report_columns`)."""
    if not rows:
        return empty_points()
    columns = blocks.decode_report_columns([(row["data"], list(row["tasks"])) for row in rows], metrics, high_us, low_us)
    workers = np.array([row["worker"] for row in rows], dtype=np.int64)
    points = Points(
        report_workers=workers[columns.blocks],
        report_times=columns.times,
        report_tasks=columns.tasks,
        reports=columns.reports,
        metrics=columns.metrics,
        variants=columns.variants,
        values=columns.values,
    )
    return points if low_us is None else within(points, low_us, high_us)


def within(points: Points, low_us: int, high_us: int) -> Points:
    """The reports timed in [low_us, high_us) and their values."""
    return _kept(points, (points.report_times >= low_us) & (points.report_times < high_us))


def _kept(points: Points, keep: np.ndarray) -> Points:
    """The reports marked in `keep` and their values."""
    if keep.all():
        return points
    new_index = np.cumsum(keep) - 1
    kept_values = keep[points.reports]
    return Points(
        report_workers=points.report_workers[keep],
        report_times=points.report_times[keep],
        report_tasks=[task for task, kept in zip(points.report_tasks, keep) if kept],
        reports=new_index[points.reports[kept_values]],
        metrics=points.metrics[kept_values],
        variants=points.variants[kept_values],
        values=points.values[kept_values],
    )


def worker_hours(points: Points) -> list[tuple[int, int, blocks.Reports]]:
    """The reports of each worker and hour as a block's content: (worker, hour start µs, reports)."""
    if not len(points.report_times):
        return []
    hour = points.report_times // HOUR_US
    report_order = np.lexsort((points.report_times, hour, points.report_workers))
    group_of = np.zeros(len(report_order), dtype=np.int64)  # per report: its worker-hour
    rank = np.zeros(len(report_order), dtype=np.int64)  # its place in the worker-hour
    group_starts = [start for start, _ in _runs(points.report_workers[report_order], hour[report_order])]
    sizes = np.diff(np.append(group_starts, len(report_order)))
    group_of[report_order] = np.repeat(np.arange(len(group_starts)), sizes)
    rank[report_order] = np.arange(len(report_order)) - np.repeat(group_starts, sizes)
    value_group, value_rank = group_of[points.reports], rank[points.reports]
    order = np.lexsort((value_rank, points.variants, points.metrics, value_group))
    value_group, value_rank = value_group[order], value_rank[order]
    metrics, variants, values = points.metrics[order], points.variants[order], points.values[order]
    value_starts = np.searchsorted(value_group, np.arange(len(group_starts) + 1))
    result = []
    for group, (first, size) in enumerate(zip(group_starts, sizes)):
        chosen = report_order[first : first + size]
        low, high = value_starts[group], value_starts[group + 1]
        series = list(_runs(metrics[low:high], variants[low:high]))
        present = []
        for start, stop in series:
            indices = value_rank[low + start : low + stop]
            present.append(None if stop - start == size else indices)
        result.append((
            int(points.report_workers[chosen[0]]),
            int(hour[chosen[0]]) * HOUR_US,
            blocks.Reports(
                times=points.report_times[chosen],
                tasks=[points.report_tasks[i] for i in chosen],
                metrics=np.array([metrics[low + start] for start, _ in series], dtype=np.int64),
                variants=np.array([variants[low + start] for start, _ in series], dtype=np.int64),
                values=[values[low + start : low + stop] for start, stop in series],
                present=present,
            ),
        ))
    return result


def _runs(*keys: np.ndarray):
    """[start, stop) of the runs of equal keys in sorted columns."""
    if not len(keys[0]):
        return
    change = np.zeros(len(keys[0]), dtype=bool)
    change[0] = True
    for key in keys:
        change[1:] |= key[1:] != key[:-1]
    starts = np.flatnonzero(change)
    yield from zip(starts.tolist(), np.append(starts[1:], len(keys[0])).tolist())


async def replace_blocks(db: asyncpg.Connection, made: list[tuple[int, int, blocks.Reports]]) -> None:
    """Store these worker-hours as blocks, in place of any block of theirs."""
    if not made:
        return
    encoded = blocks.encode_reports([reports for _, _, reports in made])
    await db.execute(_DELETE_BLOCKS, [start for _, start, _ in made], [worker for worker, _, _ in made])
    await db.copy_records_to_table(
        "report_blocks",
        columns=["start", "worker", "reports", "tasks", "data"],
        records=[
            (micros_time(start), worker, len(reports.times), tasks, data)
            for (worker, start, reports), (data, tasks) in zip(made, encoded)
        ],
    )


def micros_time(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(micros))
