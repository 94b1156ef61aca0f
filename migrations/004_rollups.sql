-- Rollups of worker_stats at 1 minute, 10 minutes and 1 hour, kept by the service itself
-- (the Apache edition of TimescaleDB has no continuous aggregates).
--
-- stats_<r>: one row per bucket, company, worker and metric. min/max/sum/count are over
-- every variant of the metric (what get_stats answers without split_by_variant); the
-- arrays hold the same per variant, in the order of `variants`, and are NULL when the only
-- variant is "total" (a scalar metric: most of them). activity_<r>: one row per
-- bucket and worker that reported in it, with its number of reports and whether any of
-- them carried a task. Each tier is a hypertable with its own retention.
-- The public, stable interface is the views below, not these tables.

CREATE TABLE stats_1m (
    time     timestamptz        NOT NULL,  -- bucket start
    company  text               NOT NULL,
    worker   text               NOT NULL,
    metric   text               NOT NULL,
    min      double precision   NOT NULL,
    max      double precision   NOT NULL,
    sum      double precision   NOT NULL,
    count    integer            NOT NULL,
    variants text[],
    mins     double precision[],
    maxs     double precision[],
    sums     double precision[],
    counts   integer[]
);
CREATE TABLE stats_10m (LIKE stats_1m);
CREATE TABLE stats_1h (LIKE stats_1m);

CREATE TABLE activity_1m (
    time    timestamptz NOT NULL,
    company text        NOT NULL,
    worker  text        NOT NULL,
    reports integer     NOT NULL,
    busy    boolean     NOT NULL  -- a report in the bucket carried a non-empty task
);
CREATE TABLE activity_10m (LIKE activity_1m);
CREATE TABLE activity_1h (LIKE activity_1m);

SELECT create_hypertable('stats_1m', by_range('time', INTERVAL '1 day'), create_default_indexes => false);
SELECT create_hypertable('stats_10m', by_range('time', INTERVAL '7 days'), create_default_indexes => false);
SELECT create_hypertable('stats_1h', by_range('time', INTERVAL '30 days'), create_default_indexes => false);
SELECT create_hypertable('activity_1m', by_range('time', INTERVAL '1 day'), create_default_indexes => false);
SELECT create_hypertable('activity_10m', by_range('time', INTERVAL '7 days'), create_default_indexes => false);
SELECT create_hypertable('activity_1h', by_range('time', INTERVAL '30 days'), create_default_indexes => false);

-- Fleet charts read by metric, one worker's charts by worker, the refresh by time.
CREATE INDEX stats_1m_fleet ON stats_1m (company, metric, time);
CREATE INDEX stats_1m_worker ON stats_1m (company, worker, metric, time);
CREATE INDEX stats_1m_time ON stats_1m (company, time);
CREATE INDEX stats_10m_fleet ON stats_10m (company, metric, time);
CREATE INDEX stats_10m_worker ON stats_10m (company, worker, metric, time);
CREATE INDEX stats_10m_time ON stats_10m (company, time);
CREATE INDEX stats_1h_fleet ON stats_1h (company, metric, time);
CREATE INDEX stats_1h_worker ON stats_1h (company, worker, metric, time);
CREATE INDEX stats_1h_time ON stats_1h (company, time);
CREATE INDEX activity_1m_time ON activity_1m (company, time);
CREATE INDEX activity_1m_worker ON activity_1m (company, worker, time);
CREATE INDEX activity_10m_time ON activity_10m (company, time);
CREATE INDEX activity_10m_worker ON activity_10m (company, worker, time);
CREATE INDEX activity_1h_time ON activity_1h (company, time);
CREATE INDEX activity_1h_worker ON activity_1h (company, worker, time);

-- The writer's threshold: reports it stores before `watermark` are logged as late (below).
-- It reads the row FOR SHARE in its statement, so the refresh's UPDATE of the watermark
-- waits for every batch in flight: a batch either commits before the watermark moves (and
-- the refresh, which reads the reports afterwards, sees its rows) or sees the new watermark
-- (and logs its late reports). `materialized`: every tier holds the buckets before it
-- (rounded down to the tier's resolution); the refresh moves it up to the watermark in the
-- transaction that rolls the reports up, so a refresh that fails leaves nothing behind.
CREATE TABLE rollup_watermark (
    id           boolean     PRIMARY KEY DEFAULT true CHECK (id),
    watermark    timestamptz NOT NULL,
    materialized timestamptz NOT NULL
);
INSERT INTO rollup_watermark (watermark, materialized)
VALUES (time_bucket('1 minute', now()), time_bucket('1 minute', now()));

-- Reports stored behind the watermark, per worker: the refresh rolls these periods up
-- again and deletes the rows. company and worker NULL: every worker (an operator's
-- `rollups refresh --since`).
CREATE TABLE rollup_invalidations (
    company text,
    worker  text,
    low     timestamptz NOT NULL,  -- earliest and latest report time, inclusive
    high    timestamptz NOT NULL
);
CREATE INDEX rollup_invalidations_company ON rollup_invalidations (company);

-- Reports stored before this migration: the first refresh rolls them up.
INSERT INTO rollup_invalidations (company, worker, low, high)
SELECT NULL, NULL, min(time), max(time) FROM worker_stats HAVING count(*) > 0;

-- The public views (SPEC §4), per resolution: every variant's bucket; every metric's
-- bucket over all its variants; every worker's bucket of activity.
CREATE VIEW worker_stat_rollup_1m AS
SELECT r.time, r.company, r.worker, split_part(r.metric, '_', 1) AS category, r.metric, v.variant,
       v.min, v.max, v.sum / v.count AS avg, v.sum, v.count
FROM stats_1m AS r
CROSS JOIN LATERAL unnest(
    coalesce(r.variants, '{total}'), coalesce(r.mins, ARRAY[r.min]), coalesce(r.maxs, ARRAY[r.max]),
    coalesce(r.sums, ARRAY[r.sum]), coalesce(r.counts, ARRAY[r.count])) AS v (variant, min, max, sum, count);

CREATE VIEW worker_stat_rollup_10m AS
SELECT r.time, r.company, r.worker, split_part(r.metric, '_', 1) AS category, r.metric, v.variant,
       v.min, v.max, v.sum / v.count AS avg, v.sum, v.count
FROM stats_10m AS r
CROSS JOIN LATERAL unnest(
    coalesce(r.variants, '{total}'), coalesce(r.mins, ARRAY[r.min]), coalesce(r.maxs, ARRAY[r.max]),
    coalesce(r.sums, ARRAY[r.sum]), coalesce(r.counts, ARRAY[r.count])) AS v (variant, min, max, sum, count);

CREATE VIEW worker_stat_rollup_1h AS
SELECT r.time, r.company, r.worker, split_part(r.metric, '_', 1) AS category, r.metric, v.variant,
       v.min, v.max, v.sum / v.count AS avg, v.sum, v.count
FROM stats_1h AS r
CROSS JOIN LATERAL unnest(
    coalesce(r.variants, '{total}'), coalesce(r.mins, ARRAY[r.min]), coalesce(r.maxs, ARRAY[r.max]),
    coalesce(r.sums, ARRAY[r.sum]), coalesce(r.counts, ARRAY[r.count])) AS v (variant, min, max, sum, count);

CREATE VIEW worker_metric_rollup_1m AS
SELECT time, company, worker, split_part(metric, '_', 1) AS category, metric,
       min, max, sum / count AS avg, sum, count
FROM stats_1m;

CREATE VIEW worker_metric_rollup_10m AS
SELECT time, company, worker, split_part(metric, '_', 1) AS category, metric,
       min, max, sum / count AS avg, sum, count
FROM stats_10m;

CREATE VIEW worker_metric_rollup_1h AS
SELECT time, company, worker, split_part(metric, '_', 1) AS category, metric,
       min, max, sum / count AS avg, sum, count
FROM stats_1h;

CREATE VIEW worker_activity_1m AS SELECT time, company, worker, reports, busy FROM activity_1m;
CREATE VIEW worker_activity_10m AS SELECT time, company, worker, reports, busy FROM activity_10m;
CREATE VIEW worker_activity_1h AS SELECT time, company, worker, reports, busy FROM activity_1h;
