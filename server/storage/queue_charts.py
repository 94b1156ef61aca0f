"""Queue charts (`workers.get_queues` over a range): per queue and bucket, the distinct workers
that listened to it and those of them that were busy (docs/queues.md).

The sources are the chart's (storage/charts.py: the same segments, so the same interval rules
and the same exactness): a rollup tier's buckets come from its queue blocks' bits (which of the
block's workers listened, and were busy, per bucket of the tier: migrations/013), raw reports
from their queue pseudo-metric values (1: busy, 0: idle). Each source marks, per queue, a grid
of the chart's buckets by the queue's workers; a worker counts once per bucket however many
sources and reports say it listened. The bits are combined while packed (a chart bucket of
several tier buckets is their bitwise or), then unpacked once per block: a 30-day chart of
2,000 workers reads 8.6 million worker-buckets a queue as a few megabytes of bits instead of
decoding as many rollup rows.
"""

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from . import charts, ids, raw, rollups
from .charts import RAW, Segment


@dataclass
class _Marks:
    """What the sources say of one queue: grids (chart bucket positions, worker ids, listening
    and busy as (positions, workers) booleans) and single marks (position, worker, busy)."""

    grids: list = field(default_factory=list)
    singles: list = field(default_factory=list)

    def workers(self) -> np.ndarray:
        parts = [grid[1] for grid in self.grids] + [single[1] for single in self.singles]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def counts(self, buckets: int) -> tuple[list[int], list[int]]:
        """Per chart bucket: the workers that listened, and those that were busy."""
        workers = self.workers()
        listening = np.zeros((buckets, len(workers)), dtype=bool)
        busy = np.zeros((buckets, len(workers)), dtype=bool)
        for positions, grid_workers, grid_listening, grid_busy in self.grids:
            cell = np.ix_(positions, np.searchsorted(workers, grid_workers))
            listening[cell] |= grid_listening
            busy[cell] |= grid_busy
        for positions, single_workers, single_busy in self.singles:
            columns = np.searchsorted(workers, single_workers)
            listening[positions, columns] = True
            busy[positions[single_busy], columns[single_busy]] = True
        return listening.sum(axis=1).tolist(), busy.sum(axis=1).tolist()


async def chart(pool, company: str, plan: charts.Plan, *, buckets: list[int]) -> dict[str, tuple]:
    """{queue: (listening, busy)}, one count per bucket asked for, of every queue that a worker
    of the company listened to in the range."""
    if not buckets:
        return {}
    interval = plan.interval

    async def read(conn):
        queues = await ids.queues_of_company(conn, company)
        if not queues:
            return None
        pieces = await plan.segments(conn, company)
        metrics = sorted(queues.values())
        workers = list((await ids.workers_of_company(conn, company)).values())
        fetched = []
        for piece in pieces:
            if piece.source == RAW:
                low, high = charts.micros(piece.low), charts.micros(piece.high)
                fetched.append(await raw.fetch(conn, low, high, workers, metrics=metrics))
            else:
                tier = charts.tier_of(piece.source)
                fetched.append(await rollups.fetch_queue_bits(conn, tier, company, metrics, int(piece.low), int(piece.high)))
        return queues, pieces, fetched

    found = await charts.read_snapshot(pool, read)
    if found is None:
        return {}
    queues, pieces, fetched = found

    def compute() -> dict[str, tuple]:
        marks: dict[int, _Marks] = defaultdict(_Marks)
        first = buckets[0] // interval
        for piece, data in zip(pieces, fetched):
            if piece.source == RAW:
                _mark_raw(marks, raw.points(data), set(queues.values()), interval, first, len(buckets))
            else:
                tier = charts.tier_of(piece.source)
                for block in data:
                    _mark_block(marks[block.metric], block, tier, piece, interval, first, len(buckets))
        names = {metric: name for name, metric in queues.items()}
        counted = {names[metric]: mark.counts(len(buckets)) for metric, mark in marks.items()}
        return {name: counts for name, counts in counted.items() if any(counts[0])}

    return await asyncio.to_thread(compute)


def _mark_raw(marks: dict, points, queue_metrics: set, interval: int, first: int, count: int) -> None:
    """Each raw report's queue values: its worker listened in its bucket (busy: value 1)."""
    chosen = np.isin(points.metrics, list(queue_metrics))
    reports = points.reports[chosen]
    positions = points.report_times[reports] // (interval * 1_000_000) - first
    inside = (positions >= 0) & (positions < count)
    metrics = points.metrics[chosen][inside]
    positions, workers = positions[inside], points.report_workers[reports][inside]
    busy = points.values[chosen][inside] > 0
    for metric in np.unique(metrics).tolist():
        mine = metrics == metric
        marks[metric].singles.append((positions[mine], workers[mine], busy[mine]))


def _mark_block(marks: _Marks, block: rollups.QueueBlock, tier: rollups.Tier, piece: Segment, interval: int,
                first: int, count: int) -> None:  # fmt: skip
    """A tier's queue block: its buckets within the segment, or'd per chart bucket."""
    fine = block.start // tier.seconds + np.arange(block.buckets)  # the block's buckets, from the epoch
    inside = (fine * tier.seconds >= piece.low) & (fine * tier.seconds < piece.high)
    positions = fine * tier.seconds // interval - first
    inside &= (positions >= 0) & (positions < count)
    if block.rows is not None:  # a block without bits: its rows
        rows = block.rows
        row_positions = (block.start // tier.seconds + rows.buckets) * tier.seconds // interval - first
        row_inside = np.isin(rows.buckets, np.flatnonzero(inside))
        marks.singles.append((row_positions[row_inside], rows.workers[row_inside], rows.sums[row_inside] > 0))
        return
    kept = np.flatnonzero(inside)
    if not len(kept):
        return
    positions = positions[kept]
    starts = np.flatnonzero(np.concatenate([[True], positions[1:] != positions[:-1]]))
    workers = len(block.workers)
    grids = [
        np.unpackbits(np.bitwise_or.reduceat(bits[kept], starts, axis=0), axis=1, count=workers).view(bool)
        for bits in (block.listening, block.busy)
    ]
    marks.grids.append((positions[starts], block.workers, *grids))
