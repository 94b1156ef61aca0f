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
MICROS = "(extract(epoch FROM time) * 1000000)::bigint"

# A report row's columns for `rows_to_points`: its values in the array's binary form, read
# into numpy without a Python float for each.
ROW = f"worker, {MICROS} AS micros, layout, task, array_send(values) AS packed"

# $1, $2: [low, high) as timestamptz; $3 worker ids (NULL: every worker).
_ROWS = f"""
SELECT {ROW} FROM recent_reports
WHERE time >= $1 AND time < $2 AND ($3::integer[] IS NULL OR worker = ANY($3::integer[]))
UNION ALL
SELECT {ROW} FROM late_reports
WHERE time >= $1 AND time < $2 AND ($3::integer[] IS NULL OR worker = ANY($3::integer[]))
"""

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

    rows: list  # ROW's columns
    block_rows: list  # report_blocks: worker, start, tasks, data
    layouts: dict  # layout id -> (metric ids, variant codes)
    low_us: int
    high_us: int


async def fetch(db: asyncpg.Connection, low_us: int, high_us: int, workers=None) -> Fetched:
    """Every report timed in [low_us, high_us) of `workers` (ids; None: every worker), as
    read; `points` decodes them (CPU work a caller may run in a thread).

    Call it in a repeatable-read transaction: the rows are read first, which keeps their chunk
    from being dropped by a compaction meanwhile, then the blocks, as of the same snapshot; a
    report is then seen once, either as a row or in its block."""
    low, high = micros_time(low_us), micros_time(high_us)
    worker_ids = None if workers is None else [int(worker) for worker in workers]
    rows = await db.fetch(_ROWS, low, high, worker_ids)
    block_rows = await db.fetch(_BLOCKS, low, high, worker_ids)
    return Fetched(rows, block_rows, await _layouts(db, rows), low_us, high_us)


def points(fetched: Fetched) -> Points:
    return concatenate_points([
        rows_points(fetched.rows, fetched.layouts),
        blocks_to_points(fetched.block_rows, fetched.low_us, fetched.high_us),
    ])


async def read(db: asyncpg.Connection, low_us: int, high_us: int, workers=None) -> Points:
    """`fetch`, decoded."""
    return points(await fetch(db, low_us, high_us, workers))


async def _layouts(db, rows: list) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    if not rows:
        return {}
    return {
        layout: (np.array(metrics, dtype=np.int64), np.array(variants, dtype=np.int64))
        for layout, (metrics, variants) in (await ids.layouts(db, {row["layout"] for row in rows})).items()
    }


async def rows_to_points(db, rows: list) -> Points:
    """Points of report rows (ROW's columns)."""
    return rows_points(rows, await _layouts(db, rows))


def rows_points(rows: list, known: dict) -> Points:
    if not rows:
        return empty_points()
    counts, values = _unpack_float_arrays([row["packed"] for row in rows])
    layouts = [known[row["layout"]] for row in rows]
    return Points(
        report_workers=np.fromiter((row["worker"] for row in rows), dtype=np.int64, count=len(rows)),
        report_times=np.fromiter((row["micros"] for row in rows), dtype=np.int64, count=len(rows)),
        report_tasks=[row["task"] for row in rows],
        reports=np.repeat(np.arange(len(rows)), counts),
        metrics=np.concatenate([metrics for metrics, _ in layouts]),
        variants=np.concatenate([variants for _, variants in layouts]),
        values=values,
    )


def _unpack_float_arrays(packed: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """One-dimensional float8 arrays in PostgreSQL's binary form (array_send: a 20-byte
    header, 12 for an empty array, then each element as its 4-byte length and 8 bytes):
    each array's length, and all their values."""
    sizes = np.fromiter(map(len, packed), dtype=np.int64, count=len(packed))
    counts = np.where(sizes > 12, (sizes - 20) // 12, 0)
    data = b"".join(packed)
    starts = np.cumsum(sizes) - sizes
    positions = np.repeat(starts + 24, counts) + 12 * codec.ranks(counts)
    view = np.ndarray(shape=(max(len(data) - 7, 0),), dtype=">f8", buffer=data, strides=(1,))
    return counts, view[positions].astype(np.float64)


def blocks_to_points(rows: list, low_us: int | None = None, high_us: int | None = None) -> Points:
    """Points of report block rows (worker, start, tasks, data), those in [low_us, high_us)."""
    if not rows:
        return empty_points()
    decoded = blocks.decode_reports([(row["data"], list(row["tasks"])) for row in rows])
    parts = []
    for row, reports in zip(rows, decoded):
        count = len(reports.times)
        series_reports = [np.arange(count) if p is None else p for p in reports.present]
        lengths = np.array([len(r) for r in series_reports], dtype=np.int64)
        points = Points(
            report_workers=np.full(count, row["worker"], dtype=np.int64),
            report_times=reports.times,
            report_tasks=reports.tasks,
            reports=np.concatenate(series_reports) if series_reports else np.zeros(0, np.int64),
            metrics=np.repeat(reports.metrics, lengths),
            variants=np.repeat(reports.variants, lengths),
            values=np.concatenate(reports.values) if reports.values else np.zeros(0),
        )
        if low_us is not None:
            points = within(points, low_us, high_us)
        parts.append(points)
    return concatenate_points(parts)


def within(points: Points, low_us: int, high_us: int) -> Points:
    """The reports timed in [low_us, high_us) and their values."""
    keep = (points.report_times >= low_us) & (points.report_times < high_us)
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
