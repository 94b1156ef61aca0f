"""SQL of the raw reports the writer stores (`recent_reports`, `late_reports`) and of the
`worker_metric_keys` index table.

The writer stores one row per report: the worker's id, the layout of its values (their metrics
and variants, storage/ids.py) and the values as 8-byte big-endian floats in one bytea. Reports of hours already
compacted (before `rollup_watermark.compacted`) go to `late_reports`, the others to
`recent_reports`; compaction (storage/compaction.py) packs both into `report_blocks`.
"""


# Parts of the batching writer's statement: `$2` is a jsonb array of metric keys to upsert;
# $3..$7 one entry per report: time (epoch seconds), worker id, layout id, task, values (the
# float64s, big-endian). The watermark row is read FOR SHARE (see migrations/004 and 006):
# moving `compacted` waits for this batch.
# A report stored already (sent again after its answer was lost) is not stored twice: the
# unique indexes of migration 014 (worker, time, layout, values and task), and a late copy of
# a report still in recent_reports (`compacted` moved between the two) is not stored at all.
# A copy of a report already packed into its block is dropped when compaction merges it.
REPORTS = """
reports AS (
    SELECT to_timestamp(r.time) AS time, r.worker, r.layout, r.task, r.values
    FROM unnest($3::float8[], $4::integer[], $5::integer[], $6::text[], $7::bytea[]) AS r (time, worker, layout, task, values)
),
marks AS (SELECT compacted FROM rollup_watermark FOR SHARE),
recent AS (
    INSERT INTO recent_reports (time, worker, layout, task, values)
    SELECT r.* FROM reports AS r, marks AS m WHERE r.time >= m.compacted
    ON CONFLICT DO NOTHING
)
INSERT INTO late_reports (time, worker, layout, task, values)
SELECT r.* FROM reports AS r, marks AS m
WHERE r.time < m.compacted AND NOT EXISTS (
    SELECT FROM recent_reports AS o
    WHERE o.worker = r.worker AND o.time = r.time AND o.layout = r.layout
      AND o.task IS NOT DISTINCT FROM r.task AND o.values = r.values)
ON CONFLICT DO NOTHING
"""

METRIC_KEYS_UPSERT = """
INSERT INTO worker_metric_keys AS k (company, worker, metric, last_reported)
SELECT n.company, n.worker, n.metric, to_timestamp(n.time)
FROM jsonb_to_recordset($2::jsonb) AS n (
    company text, worker text, metric text, time double precision)
ORDER BY n.company, n.worker, n.metric
ON CONFLICT (company, worker, metric) DO UPDATE
SET last_reported = greatest(k.last_reported, EXCLUDED.last_reported)
"""

# A worker's metric keys new to its company, recorded when they are admitted (server/limits.py).
_ADD_METRIC_KEYS = """
INSERT INTO worker_metric_keys AS k (company, worker, metric, last_reported)
SELECT $1, $2, m.metric, to_timestamp($4) FROM unnest($3::text[]) AS m (metric)
ON CONFLICT (company, worker, metric) DO UPDATE
SET last_reported = greatest(k.last_reported, EXCLUDED.last_reported)
"""

# Two statements rather than `cardinality($2) = 0 OR worker = ANY($2)`, whose generic
# plan cannot use the index.
_METRIC_KEYS = "SELECT DISTINCT metric FROM worker_metric_keys WHERE company = $1 ORDER BY metric"
_METRIC_KEYS_OF_WORKERS = """
SELECT DISTINCT metric FROM worker_metric_keys WHERE company = $1 AND worker = ANY($2::text[]) ORDER BY metric
"""

# Reports of company $1 timed in the last $2 seconds (not later: daemons' clocks may be ahead).
_RECENT_REPORTS = """
SELECT count(*) FROM recent_reports AS r JOIN stat_workers AS w ON w.id = r.worker
WHERE w.company = $1 AND r.time > now() - make_interval(secs => $2) AND r.time <= now()
"""

# Raw reports past the retention: whole chunks of blocks (and of recent reports, should a
# chunk have been left), and late reports not merged yet.
_DROP_CHUNKS = """
SELECT count(*) FROM drop_chunks($1::regclass, older_than => now() - $2::double precision * interval '1 day')
"""
_DELETE_OLD_LATE = "DELETE FROM late_reports WHERE time < now() - $1::double precision * interval '1 day'"
_DELETE_STALE_KEYS = "DELETE FROM worker_metric_keys WHERE last_reported < now() - $1::double precision * interval '1 day'"


async def metric_keys(db, company: str, worker_ids: list[str]) -> list[str]:
    rows = await (db.fetch(_METRIC_KEYS_OF_WORKERS, company, worker_ids) if worker_ids else db.fetch(_METRIC_KEYS, company))
    return [row["metric"] for row in rows]


async def add_metric_keys(db, company: str, worker: str, metrics: list[str], when: float) -> None:
    await db.execute(_ADD_METRIC_KEYS, company, worker, metrics, when)


async def recent_reports(db, company: str, seconds: float) -> int:
    """The company's reports timed within the last `seconds`."""
    return await db.fetchval(_RECENT_REPORTS, company, seconds)


async def drop_older_than(db, days: float, keys_days: float) -> int:
    """Drop raw reports older than `days`, and metric keys not reported for `keys_days` (the
    longest any tier keeps them); returns the chunks dropped."""
    async with db.transaction():
        dropped = 0
        for table in ("report_blocks", "recent_reports"):
            dropped += await db.fetchval(_DROP_CHUNKS, table, days)
        await db.execute(_DELETE_OLD_LATE, days)
        await db.execute(_DELETE_STALE_KEYS, keys_days)
    return dropped
