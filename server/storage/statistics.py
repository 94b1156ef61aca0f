"""SQL of the `worker_stats` hypertable and its `worker_metric_keys` index table.

`worker_stats` holds one row per status report, its values as jsonb
`{metric: {variant: value}}`; the `worker_stat_points` view (migrations) expands it
into one point per value for Grafana.
"""


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

# The start (epoch seconds) of the bucket of `$2` seconds holding {time}; buckets start at
# multiples of the interval since the UNIX epoch. Shared by every part of a chart read.
# (date_part is float8; extract(epoch ...) would be a slower numeric.)
BUCKET_SECONDS = "date_part('epoch', time_bucket(make_interval(secs => $2), {time}, origin => 'epoch'::timestamptz))::bigint"

# Parts of a chart read (storage/charts.py): raw reports in [{low}, {high}) of company $1,
# as min, max, sum and count per worker, metric ($3), variant and bucket ...
_STATS_PART = f"""
SELECT s.worker, k.metric, {{variant}} AS variant, {BUCKET_SECONDS.format(time="s.time")} AS bucket,
       min(x.value) AS min, max(x.value) AS max, sum(x.value) AS sum, count(*) AS count
FROM worker_stats AS s
CROSS JOIN LATERAL unnest($3::text[]) AS k (metric)
CROSS JOIN LATERAL jsonb_each(s.metrics -> k.metric) AS v (variant, value)
CROSS JOIN LATERAL (SELECT v.value::float8) AS x (value)
WHERE s.company = $1 AND s.time >= to_timestamp({{low}}) AND s.time < to_timestamp({{high}}){{workers}}
GROUP BY 1, 2, 3, 4
"""

# ... and as the workers seen per bucket, and whether each ran a task in it.
_ACTIVITY_PART = f"""
SELECT s.worker, {BUCKET_SECONDS.format(time="s.time")} AS bucket, bool_or(s.task <> '') AS busy
FROM worker_stats AS s
WHERE s.company = $1 AND s.time >= to_timestamp({{low}}) AND s.time < to_timestamp({{high}})
GROUP BY 1, 2
"""


def stats_part(low: str, high: str, workers: str | None, split_by_variant: bool) -> str:
    """`low`, `high` and `workers` (or None: every worker) are parameter placeholders."""
    return _STATS_PART.format(
        variant="v.variant" if split_by_variant else "NULL::text",
        low=low,
        high=high,
        workers=f" AND s.worker = ANY({workers}::text[])" if workers else "",
    )


def activity_part(low: str, high: str) -> str:
    return _ACTIVITY_PART.format(low=low, high=high)


# Reports of company $1 timed in the last $2 seconds (not later: daemons' clocks may be ahead).
_RECENT_REPORTS = """
SELECT count(*) FROM worker_stats WHERE company = $1 AND time > now() - make_interval(secs => $2) AND time <= now()
"""

_DROP_CHUNKS = "SELECT count(*) FROM drop_chunks('worker_stats', older_than => now() - $1::double precision * interval '1 day')"
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
    """Drop raw report chunks older than `days`, and metric keys not reported for
    `keys_days` (the longest any tier keeps them); returns the chunks dropped."""
    async with db.transaction():
        dropped = await db.fetchval(_DROP_CHUNKS, days)
        await db.execute(_DELETE_STALE_KEYS, keys_days)
    return dropped
