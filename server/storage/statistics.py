"""SQL of the `worker_stats` hypertable and its `worker_metric_keys` index table.

`worker_stats` holds one row per status report, its values as jsonb
`{metric: {variant: value}}`; the `worker_stat_points` view (migrations) expands it
into one point per value for Grafana.
"""

import asyncpg

# Parts of the batching writer's statement: `$2` is a jsonb array of metric keys to
# upsert, `$3` one of report rows.
REPORTS_INSERT = """
INSERT INTO worker_stats (time, company, worker, task, metrics)
SELECT to_timestamp(r.time), r.company, r.worker, r.task, r.metrics
FROM jsonb_to_recordset($3::jsonb) AS r (
    time double precision, company text, worker text, task text, metrics jsonb)
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

_METRIC_KEYS = """
SELECT DISTINCT metric FROM worker_metric_keys
WHERE company = $1 AND (cardinality($2::text[]) = 0 OR worker = ANY($2::text[]))
ORDER BY metric
"""

# Buckets start at multiples of the interval since the UNIX epoch.
_BUCKET = "time_bucket(make_interval(secs => $4), {time}, origin => 'epoch'::timestamptz)"
_BUCKET_SECONDS = f"extract(epoch FROM {_BUCKET})::bigint"

# $1 company, $2/$3 from/to (epoch seconds), $4 interval seconds, $5 metrics,
# $6 worker ids (empty: all), $7 split by variant.
_AGGREGATE = f"""
SELECT s.worker,
       k.metric,
       CASE WHEN $7::boolean THEN v.variant END AS variant,
       {_BUCKET_SECONDS.format(time="s.time")} AS bucket,
       min(v.value::double precision) AS min,
       max(v.value::double precision) AS max,
       avg(v.value::double precision) AS avg
FROM worker_stats AS s
CROSS JOIN LATERAL unnest($5::text[]) AS k (metric)
CROSS JOIN LATERAL jsonb_each(s.metrics -> k.metric) AS v (variant, value)
WHERE s.company = $1
  AND s.time BETWEEN to_timestamp($2) AND to_timestamp($3)
  AND (cardinality($6::text[]) = 0 OR s.worker = ANY($6::text[]))
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4
"""

# $1 company, $2/$3 from/to (epoch seconds), $4 interval seconds.
_ACTIVITY = f"""
SELECT {_BUCKET_SECONDS.format(time="time")} AS bucket,
       count(DISTINCT worker) AS total,
       count(DISTINCT worker) FILTER (WHERE task <> '') AS active
FROM worker_stats
WHERE company = $1 AND time BETWEEN to_timestamp($2) AND to_timestamp($3)
GROUP BY 1
ORDER BY 1
"""

_DROP_CHUNKS = "SELECT count(*) FROM drop_chunks('worker_stats', older_than => now() - $1::double precision * interval '1 day')"
_DELETE_STALE_KEYS = "DELETE FROM worker_metric_keys WHERE last_reported < now() - $1::double precision * interval '1 day'"


async def metric_keys(db, company: str, worker_ids: list[str]) -> list[str]:
    return [row["metric"] for row in await db.fetch(_METRIC_KEYS, company, worker_ids)]


async def aggregate(
    db,
    company: str,
    *,
    from_date: float,
    to_date: float,
    interval: int,
    metrics: list[str],
    worker_ids: list[str],
    split_by_variant: bool,
) -> list[asyncpg.Record]:
    """min/max/avg per (worker, metric, variant or None, bucket start in seconds)."""
    return await db.fetch(
        _AGGREGATE, company, from_date, to_date, interval, metrics, worker_ids, split_by_variant
    )


async def activity(db, company: str, *, from_date: float, to_date: float, interval: int) -> list[asyncpg.Record]:
    """Distinct reporting workers (`total`) and those running a task (`active`) per bucket."""
    return await db.fetch(_ACTIVITY, company, from_date, to_date, interval)


async def drop_older_than(db, days: float) -> int:
    """Drop statistics chunks older than `days` and metric keys not reported since; returns chunks dropped."""
    async with db.transaction():
        dropped = await db.fetchval(_DROP_CHUNKS, days)
        await db.execute(_DELETE_STALE_KEYS, days)
    return dropped
