"""Compaction: what the writer and the refresh store in a write-friendly form, packed.

Run by the refresher after each pass (the caller holds the refresh lock), and by
`python -m server rollups refresh`:
1. raw reports: `rollup_watermark.compacted` moves to the hour before what the rollups hold
   (less a grace for reports a little late); the writer then stores older reports in
   `late_reports`. Each hour of `recent_reports` below it is packed into one block per worker
   (merged with any block of that worker-hour), and its chunk dropped: the space goes back to
   the operating system;
2. late reports are merged into their worker-hours' blocks;
3. rollups: a period's small blocks (one per refresh pass) become one block per metric once
   the period has closed, or earlier when it has MAX_BLOCKS of them.
Each step is a transaction of its own: a reader sees reports either as rows or in blocks.
"""

import logging
from dataclasses import dataclass

import asyncpg

from . import raw, rollups
from .rollups import TIERS, floor_to

log = logging.getLogger(__name__)

HOUR = 3600
GRACE_SECONDS = 300  # reports up to this late after their hour still reach recent_reports
WORKERS_PER_SLICE = 100  # an hour of this many workers is packed at a time: bounded memory
LATE_PER_PASS = 200_000  # late reports merged per transaction
EMPTIED_LATE = 10_000  # after merging this many late reports, late_reports is truncated when empty
MAX_BLOCKS = 12  # of a period not closed yet

_MOVE_COMPACTED = """
UPDATE rollup_watermark SET compacted = greatest(compacted, to_timestamp($1)) RETURNING extract(epoch FROM compacted)::bigint
"""
_COMPACTED = "SELECT extract(epoch FROM compacted)::bigint, extract(epoch FROM materialized)::bigint FROM rollup_watermark"

# The hours of recent_reports below `compacted` (chunks are one hour).
_OLD_HOURS = """
SELECT extract(epoch FROM range_start)::bigint AS hour FROM timescaledb_information.chunks
WHERE hypertable_name = 'recent_reports' AND range_end <= to_timestamp($1) ORDER BY 1
"""
_WORKERS_IN = "SELECT DISTINCT worker FROM recent_reports WHERE time >= to_timestamp($1) AND time < to_timestamp($2)"
_HOUR_ROWS = raw.COLUMNS.format(rows=f"""
SELECT {raw.ROW} FROM recent_reports
WHERE time >= to_timestamp($1) AND time < to_timestamp($2) AND worker = ANY($3::integer[])
""")
_DROP_HOUR = """
SELECT count(*) FROM drop_chunks('recent_reports', older_than => to_timestamp($2), newer_than => to_timestamp($1))
"""
_TAKE_LATE = f"""
WITH taken AS (
    DELETE FROM late_reports WHERE ctid = ANY(ARRAY(SELECT ctid FROM late_reports LIMIT $1)) RETURNING *
)
{raw.COLUMNS.format(rows=f"SELECT {raw.ROW} FROM taken")}
"""
_BLOCKS_OF = """
SELECT b.worker, (extract(epoch FROM b.start) * 1000000)::bigint AS start, b.tasks, b.data
FROM report_blocks AS b JOIN unnest($1::integer[], $2::timestamptz[]) AS k (worker, start)
  ON b.worker = k.worker AND b.start = k.start
"""


@dataclass
class CompactionResult:
    hours: int = 0
    late: int = 0
    merged: int = 0


async def compact(conn: asyncpg.Connection) -> CompactionResult:
    result = CompactionResult()
    compacted, materialized = await conn.fetchrow(_COMPACTED)
    target = floor_to(materialized - GRACE_SECONDS, HOUR)
    if target > compacted:
        # Waits for the writer's batches in flight (they read the row FOR SHARE); after it,
        # no report is stored in recent_reports below the new `compacted`.
        compacted = await conn.fetchval(_MOVE_COMPACTED, target)
    for row in await conn.fetch(_OLD_HOURS, compacted):
        async with conn.transaction():
            await _pack_hour(conn, row["hour"])
        result.hours += 1
    while True:
        async with conn.transaction():
            taken = await conn.fetchrow(_TAKE_LATE, LATE_PER_PASS)
            count = len(taken["workers"])
            if not count:
                break
            await _merge(conn, await raw.rows_to_points(conn, taken))
        result.late += count
        if count < LATE_PER_PASS:
            break
    if result.late >= EMPTIED_LATE:
        await _give_back_late(conn)
    for tier in TIERS:
        for row in await rollups.fragmented(conn, tier, materialized):
            if row["period"] + tier.period <= materialized or row["blocks"] >= MAX_BLOCKS:
                async with conn.transaction():
                    await rollups.merge(conn, tier, row["company"], row["metric"], row["period"])
                result.merged += 1
    return result


async def _give_back_late(conn) -> None:
    """After many late reports (a bulk import of history), give late_reports' space back:
    its index keeps its pages however many rows are deleted. Only while it is empty, which
    is checked holding a lock that keeps writers out until the truncation commits."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE late_reports IN ACCESS EXCLUSIVE MODE")
        if not await conn.fetchval("SELECT EXISTS (SELECT FROM late_reports)"):
            await conn.execute("TRUNCATE late_reports")


async def _pack_hour(conn, hour: int) -> None:
    """Every worker's reports of `hour` in recent_reports into its block; the chunk dropped."""
    workers = sorted(row["worker"] for row in await conn.fetch(_WORKERS_IN, hour, hour + HOUR))
    for index in range(0, len(workers), WORKERS_PER_SLICE):
        chosen = workers[index : index + WORKERS_PER_SLICE]
        rows = await conn.fetchrow(_HOUR_ROWS, hour, hour + HOUR, chosen)
        await _merge(conn, await raw.rows_to_points(conn, rows))
    await conn.fetchval(_DROP_HOUR, hour, hour + HOUR)


async def _merge(conn, points) -> None:
    """Reports into their worker-hours' blocks, with what those blocks already hold."""
    made = raw.worker_hours(points)
    if not made:
        return
    keys = sorted({(worker, start) for worker, start, _ in made})
    existing = await conn.fetch(_BLOCKS_OF, [w for w, _ in keys], [raw.micros_time(s) for _, s in keys])
    if existing:
        # A report sent again after its first copy was packed is not packed twice.
        made = raw.worker_hours(raw.without_copies(points, raw.blocks_to_points(existing)))
    await raw.replace_blocks(conn, made)

