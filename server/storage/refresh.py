"""The refresh that keeps the rollup tiers up to date (one process or host at a time: a
session advisory lock).

A pass moves the watermark forward (a transaction of its own, which waits for the writer's
batches in flight), then, in one repeatable-read transaction:
1. takes the invalidation log (late reports);
2. rolls the reports timed between what the tiers hold (`materialized`) and the watermark up
   into rows per metric, worker, variant and minute (numpy, storage/aggregate.py), and
   stores those over all variants as small 1-minute blocks, one per metric;
3. stores every 10-minute and hourly bucket that closed: made of the finer rows this process
   kept since the bucket began (so each raw report is read once), or of the raw reports for
   the workers whose rows it has not seen whole (it started since, or late reports touched
   them);
4. rebuilds, from the raw reports, the buckets the tiers already held that late reports
   touched;
5. moves `materialized` to the watermark.
A pass that fails leaves the tiers, `materialized` and the kept rows as they were.
Compaction (storage/compaction.py) then merges the small blocks into one block per period.
"""

import time
from collections import defaultdict
from dataclasses import dataclass, field

import asyncpg
import numpy as np

from . import aggregate, ids, raw, rollups
from .blocks import COMBINED, Aggregates
from .rollups import FINEST, TIERS, Invalidation, Retention, Tier, floor_to

SLICE_SECONDS = 3600  # the fleet's raw reports are rolled up an hour at a time: bounded memory
MAX_ROWS = 2_000_000  # rebuilt rows held before they are stored
ALL = None  # every worker


@dataclass(frozen=True)
class RefreshResult:
    old_watermark: float
    new_watermark: float
    invalidations: int
    regions: int


@dataclass
class _Kept:
    """The finer rows a coarser tier's open buckets are made of, kept between passes:
    complete from `since` (epoch seconds) on, except for the workers `dirty` names per bucket
    start (ALL: every worker)."""

    rows: Aggregates = field(default_factory=aggregate.empty)
    since: int | None = None
    dirty: dict = field(default_factory=lambda: defaultdict(set))

    def copy(self) -> "_Kept":
        dirty = defaultdict(set, {start: (ALL if workers is ALL else set(workers)) for start, workers in self.dirty.items()})
        return _Kept(self.rows, self.since, dirty)


class Refresher:
    def __init__(self, retention: Retention, *, lag: float, max_step: float = 86400.0):
        self.retention = retention
        self.lag = lag
        self.max_step = max_step
        self._kept = {tier.name: _Kept() for tier in TIERS[1:]}
        self._companies: dict[int, str] = {}

    async def refresh(self, conn: asyncpg.Connection) -> list[RefreshResult]:
        """Bring every tier up to date, in steps of at most `max_step` (the caller holds
        rollups.REFRESH_LOCK)."""
        steps = []
        while True:
            step = await self.refresh_once(conn)
            steps.append(step)
            if step.new_watermark - step.old_watermark < self.max_step:
                return steps

    async def refresh_once(self, conn: asyncpg.Connection) -> RefreshResult:
        """One pass."""
        await rollups.advance(conn, self.lag, self.max_step)
        now = time.time()
        kept = {name: state.copy() for name, state in self._kept.items()}
        async with conn.transaction(isolation="repeatable_read"):
            old, new = await rollups.progress(conn)
            taken = await rollups.take_invalidations(conn)
            await self._mark_dirty(conn, taken, kept)
            for low in range(old, new, SLICE_SECONDS):
                await self._roll_up(conn, low, min(new, low + SLICE_SECONDS), kept)
            rebuilt = await self._rebuild(conn, old, await rollups.companies(conn), taken, now)
            await rollups.set_materialized(conn, new)
        self._kept = kept
        return RefreshResult(old, new, len(taken), rebuilt)

    async def _roll_up(self, conn, low: int, high: int, kept: dict[str, _Kept]) -> None:
        """The reports timed in [low, high) (whole minutes) into the 1-minute tier, and every
        coarser bucket that closes by `high`."""
        points = await raw.read(conn, low * 1_000_000, high * 1_000_000)
        rows = aggregate.aggregate(points, FINEST.seconds, variants=True)
        await self._store(conn, FINEST, rows.take(rows.variants == COMBINED))
        for finer, tier in zip(TIERS, TIERS[1:]):
            state = kept[tier.name]
            if state.since is None:
                state.since = low
            state.rows = aggregate.concatenate([state.rows, rows])
            closed = [
                await self._bucket(conn, tier, finer, start, state)
                for start in range(floor_to(low, tier.seconds), floor_to(high, tier.seconds), tier.seconds)
            ]
            open_from = floor_to(high, tier.seconds)
            state.rows = state.rows.take(state.rows.buckets * finer.seconds >= open_from)
            rows = aggregate.concatenate(closed) if closed else aggregate.empty()
            await self._store(conn, tier, rows)

    async def _bucket(self, conn, tier: Tier, finer: Tier, start: int, state: _Kept) -> Aggregates:
        """The rows of the tier's bucket [start, start + tier.seconds)."""
        end = start + tier.seconds
        dirty = state.dirty.pop(start, set())
        if state.since > start or dirty is ALL:
            return await _from_raw(conn, tier, start, end, ALL)
        seconds = state.rows.buckets * finer.seconds
        rows = aggregate.combine(state.rows.take((seconds >= start) & (seconds < end)), tier.seconds // finer.seconds)
        if dirty:
            workers = np.array(sorted(dirty), dtype=np.int64)
            rows = aggregate.concatenate([rows.take(~np.isin(rows.workers, workers)), await _from_raw(conn, tier, start, end, workers)])
        return aggregate.sort(rows)

    async def _store(self, conn, tier: Tier, rows: Aggregates) -> None:
        """Rows (absolute buckets) as new blocks of the tier, per company."""
        if not len(rows):
            return
        for company, mine in (await self._by_company(conn, rows)).items():
            await rollups.write(conn, tier, company, mine)

    async def _by_company(self, conn, rows: Aggregates) -> dict[str, Aggregates]:
        missing = [int(worker) for worker in np.unique(rows.workers) if int(worker) not in self._companies]
        if missing:
            found = await ids.workers_by_id(conn, missing)
            self._companies.update({worker: company for worker, (company, _) in found.items()})
        company_of = np.array([self._companies[int(worker)] for worker in rows.workers], dtype=object)
        return {company: rows.take(company_of == company) for company in set(company_of.tolist())}

    async def _mark_dirty(self, conn, taken: list[Invalidation], kept: dict[str, _Kept]) -> None:
        """Late reports in the open buckets: their workers are read again when a bucket closes."""
        for tier in TIERS[1:]:
            state = kept[tier.name]
            if state.since is None:
                continue
            for item in taken:
                if item.high < state.since:
                    continue
                workers = ALL if item.worker is None else set((await _worker_ids(conn, item.company, [item.worker])).tolist())
                for start in range(floor_to(max(item.low, state.since), tier.seconds), int(item.high) + 1, tier.seconds):
                    if workers is ALL or state.dirty[start] is ALL:
                        state.dirty[start] = ALL
                    else:
                        state.dirty[start] |= workers

    async def _rebuild(self, conn, old: int, companies: list[str], taken: list[Invalidation], now: float) -> int:
        """Rebuild, from the raw reports, the buckets before `old` that late reports touched."""
        if not taken:
            return 0
        count = 0
        horizon = self.retention.horizon(None, now)  # raw reports are kept at least this far back
        for tier in TIERS:
            todo = rollups.regions(tier.seconds, old, old, companies, taken, horizon)
            count += len(todo)
            for (company, low, high), names in _grouped(todo).items():
                known = await ids.workers_of_company(conn, company)
                chosen = known.values() if names is ALL else [known[name] for name in names if name in known]
                workers = np.array(sorted(chosen), dtype=np.int64)
                if not len(workers):
                    continue
                await self._replace(conn, tier, company, workers, low, high)
        return count

    async def _replace(self, conn, tier: Tier, company: str, workers: np.ndarray, low: int, high: int) -> None:
        """The tier's rows of `workers` in [low, high) rebuilt from the raw reports: read an
        hour at a time, stored a period at a time (or sooner, past MAX_ROWS), so that a long
        rebuild (a bulk import) writes each period once rather than once per hour."""
        step = max(SLICE_SECONDS, tier.seconds)
        fresh: list[Aggregates] = []
        held, since = 0, low
        for slice_low in range(low, high, step):
            slice_high = min(high, slice_low + step)
            rows = await _from_raw(conn, tier, slice_low, slice_high, workers)
            fresh.append(rows)
            held += len(rows)
            if slice_high == high or slice_high % tier.period == 0 or held > MAX_ROWS:
                await rollups.replace(conn, tier, company, workers, since, slice_high, aggregate.concatenate(fresh))
                fresh, held, since = [], 0, slice_high


async def _from_raw(conn, tier: Tier, low: int, high: int, workers) -> Aggregates:
    """The tier's rows for buckets in [low, high) of `workers` (ALL: everyone), from the raw reports."""
    points = await raw.read(conn, low * 1_000_000, high * 1_000_000, workers)
    rows = aggregate.aggregate(points, tier.seconds, variants=tier.variants)
    return rows if tier.variants else rows.take(rows.variants == COMBINED)


def _grouped(todo: list[tuple]) -> dict[tuple[str, int, int], list[str] | None]:
    """Regions (company, worker or None, low, high) gathered, per company, into spans of
    overlapping regions and their workers (ALL: every worker of the company), so that
    a span of many workers (a bulk import) is rebuilt once, not once per worker."""
    by_company: dict[str, list[tuple[int, int, str | None]]] = defaultdict(list)
    for company, worker, low, high in todo:
        by_company[company].append((int(low), int(high), worker))
    grouped: dict[tuple[str, int, int], list[str] | None] = {}
    for company, regions in by_company.items():
        regions.sort(key=lambda region: region[:2])
        low, high, workers = regions[0][0], regions[0][1], set()
        for region_low, region_high, worker in regions:
            if region_low > high:
                grouped[(company, low, high)] = None if ALL in workers else sorted(workers)
                low, high, workers = region_low, region_high, set()
            high = max(high, region_high)
            workers.add(worker)
        grouped[(company, low, high)] = None if ALL in workers else sorted(workers)
    return grouped


async def _worker_ids(conn, company: str | None, workers: list[str]) -> np.ndarray:
    known = await ids.workers_of_company(conn, company) if company is not None else {}
    return np.array([known[worker] for worker in workers if worker in known], dtype=np.int64)
