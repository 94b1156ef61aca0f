-- Queues (docs/queues.md): the workers listening to each queue, and those of them running a task.
--
-- A status report's queues are its own `queues` list and its `queue`. For each, the writer
-- (server/storage/writer.py) stores a value among the report's values, of a queue
-- pseudo-metric named after the queue: 1 when the report carries a task, else 0. Raw reports,
-- compaction, late reports, retention and the rollup tiers then keep them as they keep the
-- metrics: per worker and bucket a rollup's count is the reports that listened to the queue,
-- its sum those that were busy. `stat_metrics.kind` keeps them apart from the metrics: no
-- public view of the metrics shows them (their definitions below are those of migrations 006,
-- 008 and 010 with that one condition added), and Grafana reads them through worker_queue_<r>.

-- 0: a metric (a key of machine_stats); 1: a queue pseudo-metric (its name is the queue's).
ALTER TABLE stat_metrics ADD COLUMN kind smallint NOT NULL DEFAULT 0;
ALTER TABLE stat_metrics DROP CONSTRAINT stat_metrics_company_name_key;
ALTER TABLE stat_metrics ADD CONSTRAINT stat_metrics_company_kind_name_key UNIQUE (company, kind, name);

-- A queue pseudo-metric's rollup blocks also keep, per bucket of the block, which of the
-- block's workers (bit i: workers[i + 1]) listened to the queue and which were busy, as rows
-- of bits (numpy's packbits, a row of ceil(workers / 8) bytes per bucket): a chart of a queue
-- counts distinct workers per bucket from them without decoding each worker's lanes. NULL in
-- the blocks of metrics. Written with the block (server/storage/rollups.py), from its rows.
ALTER TABLE rollup_1m ADD COLUMN listening bytea, ADD COLUMN busy bytea;
ALTER TABLE rollup_10m ADD COLUMN listening bytea, ADD COLUMN busy bytea;
ALTER TABLE rollup_1h ADD COLUMN listening bytea, ADD COLUMN busy bytea;

-- What get_queues answers for now (docs/queues.md), kept by the status reports' upsert
-- (server/storage/registrations.py) beside the health columns of 012: the cores (the values of
-- cpu_usage) and the memory (memory_used + memory_free, as sent: MB from clearml-agent) of the
-- worker's last report that had them. Its GPUs are those of gpu_idle_since (012).
ALTER TABLE worker_registrations
    ADD COLUMN cpu_cores integer,
    ADD COLUMN memory_total double precision;

-- --- the public views without the queue pseudo-metrics ----------------------------------

CREATE OR REPLACE VIEW worker_stat_points WITH (security_invoker = true) AS
SELECT r.time, w.company, w.worker, r.task, split_part(m.name, '_', 1) AS category, m.name AS metric,
       variant_name(l.variants[i]) AS variant, r.values[i] AS value
FROM (SELECT time, worker, layout, task, report_values(values) AS values FROM tenant_recent_reports
      UNION ALL
      SELECT time, worker, layout, task, report_values(values) FROM late_reports) AS r
JOIN stat_workers AS w ON w.id = r.worker
JOIN report_layouts AS l ON l.id = r.layout
CROSS JOIN LATERAL generate_subscripts(r.values, 1) AS i
JOIN stat_metrics AS m ON m.id = l.metrics[i] AND m.kind = 0
UNION ALL
SELECT p.at, w.company, w.worker, b.tasks[p.task], split_part(m.name, '_', 1), m.name, variant_name(p.variant), p.value
FROM tenant_report_blocks AS b
JOIN stat_workers AS w ON w.id = b.worker
CROSS JOIN LATERAL report_block_points(b.data) AS p
JOIN stat_metrics AS m ON m.id = p.metric AND m.kind = 0;

CREATE OR REPLACE FUNCTION worker_stat_points(since timestamptz, until timestamptz) RETURNS SETOF worker_stat_points
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT r.time, w.company, w.worker, r.task, split_part(m.name, '_', 1), m.name, variant_name(l.variants[i]), r.values[i]
FROM (SELECT time, worker, layout, task, report_values(values) AS values FROM tenant_recent_reports
      WHERE time BETWEEN since AND until
      UNION ALL
      SELECT time, worker, layout, task, report_values(values) FROM late_reports WHERE time BETWEEN since AND until) AS r
JOIN stat_workers AS w ON w.id = r.worker
JOIN report_layouts AS l ON l.id = r.layout
CROSS JOIN LATERAL generate_subscripts(r.values, 1) AS i
JOIN stat_metrics AS m ON m.id = l.metrics[i] AND m.kind = 0
UNION ALL
SELECT p.at, w.company, w.worker, b.tasks[p.task], split_part(m.name, '_', 1), m.name, variant_name(p.variant), p.value
FROM tenant_report_blocks AS b
JOIN stat_workers AS w ON w.id = b.worker
CROSS JOIN LATERAL report_block_points(b.data) AS p
JOIN stat_metrics AS m ON m.id = p.metric AND m.kind = 0
WHERE b.start > since - interval '1 hour' AND b.start <= until AND p.at BETWEEN since AND until
$$;

-- worker_stats: its two functions leave the queue pseudo-metrics out of `metrics`.
CREATE OR REPLACE FUNCTION report_metrics(layout integer, vals double precision[]) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT coalesce(jsonb_object_agg(per_metric.name, per_metric.values), '{}')
FROM (SELECT m.name, jsonb_object_agg(variant_name(l.variants[i]), vals[i]) AS values
      FROM report_layouts AS l
      CROSS JOIN LATERAL generate_subscripts(vals, 1) AS i
      JOIN stat_metrics AS m ON m.id = l.metrics[i] AND m.kind = 0
      WHERE l.id = layout
      GROUP BY m.name) AS per_metric
$$;

CREATE OR REPLACE FUNCTION report_block_reports(data bytea)
RETURNS TABLE (at timestamptz, task integer, metrics jsonb)
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE AS $$
DECLARE
    bits varbit := codec_bits(data);
    cursor integer := 0;
    times bigint[];
    run_lengths bigint[];
    run_values bigint[];
    metrics bigint[];
    variants bigint[];
    sizes bigint[];
    names text[];
    task_of integer[] := '{}';
    lane integer;
    presence bigint[];
    kind integer;
    ints bigint[];
    report_of integer[] := '{}';
    series_of integer[] := '{}';
    value_of double precision[] := '{}';
    n integer;
BEGIN
    SELECT s.stop, s.ints INTO cursor, times FROM codec_sequence(bits, cursor) AS s;
    SELECT s.stop, s.ints INTO cursor, run_lengths FROM codec_sequence(bits, cursor) AS s;
    SELECT s.stop, s.ints INTO cursor, run_values FROM codec_sequence(bits, cursor) AS s;
    SELECT s.stop, s.ints INTO cursor, metrics FROM codec_sequence(bits, cursor) AS s;
    SELECT s.stop, s.ints INTO cursor, variants FROM codec_sequence(bits, cursor) AS s;
    SELECT s.stop, s.ints INTO cursor, sizes FROM codec_sequence(bits, cursor) AS s;
    FOR r IN 1 .. coalesce(array_length(run_lengths, 1), 0) LOOP
        task_of := task_of || array_fill(run_values[r]::integer, ARRAY[run_lengths[r]::integer]);
    END LOOP;
    -- A queue pseudo-metric's series has no name here: its values are left out.
    SELECT array_agg(CASE WHEN m.kind = 0 THEN m.name END ORDER BY u.o) INTO names
    FROM unnest(metrics) WITH ORDINALITY AS u (id, o) JOIN stat_metrics AS m ON m.id = u.id;
    n := coalesce(array_length(times, 1), 0);
    lane := ((cursor + 7) / 8) * 8;
    FOR s IN 1 .. coalesce(array_length(metrics, 1), 0) LOOP
        SELECT q.stop, q.ints INTO cursor, presence FROM codec_sequence(bits, lane) AS q;
        SELECT q.stop, q.kind, q.ints INTO cursor, kind, ints FROM codec_sequence(bits, cursor) AS q;
        IF cardinality(presence) = 0 THEN
            report_of := report_of || ARRAY(SELECT generate_series(1, n));
        ELSE
            report_of := report_of || ARRAY(SELECT p::integer + 1 FROM unnest(presence) AS p);
        END IF;
        series_of := series_of || array_fill(s, ARRAY[cardinality(ints)]);
        value_of := value_of || codec_floats(kind, ints);
        lane := lane + 8 * sizes[s]::integer;
    END LOOP;
    RETURN QUERY
    SELECT micros_time(times[i]), task_of[i], coalesce(g.metrics, '{}')
    FROM generate_series(1, n) AS i
    LEFT JOIN (
        SELECT per_metric.report, jsonb_object_agg(per_metric.name, per_metric.values) AS metrics
        FROM (SELECT u.r AS report, names[u.s] AS name, jsonb_object_agg(variant_name(variants[u.s]::integer), u.v) AS values
              FROM unnest(report_of, series_of, value_of) AS u (r, s, v)
              WHERE names[u.s] IS NOT NULL
              GROUP BY u.r, names[u.s]) AS per_metric
        GROUP BY per_metric.report
    ) AS g ON g.report = i
    ORDER BY i;
END $$;

-- The rollup views of the metrics (worker_metric_rollup_<r>, worker_stat_rollup_10m / 1h and
-- their functions read these two).
CREATE OR REPLACE VIEW rollup_metric_rows WITH (security_invoker = true) AS
SELECT g.tier, g.block_start, g.period, g.block_start + u.bucket * g.resolution AS time, g.company, w.worker,
       split_part(m.name, '_', 1) AS category, m.name AS metric, codec_float(r.min_kind, u.min) AS min,
       codec_float(r.max_kind, u.max) AS max, codec_float(r.sum_kind, u.sum) / u.count AS avg,
       codec_float(r.sum_kind, u.sum) AS sum, u.count
FROM rollup_block_groups AS g
JOIN stat_workers AS w ON w.id = g.worker
JOIN stat_metrics AS m ON m.id = g.metric AND m.kind = 0
CROSS JOIN LATERAL rollup_group_lanes(g.lanes, false) AS r
CROSS JOIN LATERAL unnest(r.buckets, r.mins, r.maxs, r.sums, r.counts) AS u (bucket, min, max, sum, count);

CREATE OR REPLACE VIEW rollup_variant_rows WITH (security_invoker = true) AS
SELECT g.tier, g.block_start, g.period, g.block_start + u.bucket * g.resolution AS time, g.company, w.worker,
       split_part(m.name, '_', 1) AS category, m.name AS metric, variant_name(r.variant) AS variant,
       codec_float(r.min_kind, u.min) AS min, codec_float(r.max_kind, u.max) AS max,
       codec_float(r.sum_kind, u.sum) / u.count AS avg, codec_float(r.sum_kind, u.sum) AS sum, u.count
FROM rollup_block_groups AS g
JOIN stat_workers AS w ON w.id = g.worker
JOIN stat_metrics AS m ON m.id = g.metric AND m.kind = 0
CROSS JOIN LATERAL rollup_group_lanes(g.lanes, true) AS r
CROSS JOIN LATERAL unnest(r.buckets, r.mins, r.maxs, r.sums, r.counts) AS u (bucket, min, max, sum, count);

-- --- the queues' public views, per tier --------------------------------------------------
-- Per worker, queue and bucket it listened to the queue in: its reports that listened, and
-- whether one of them carried a task (as worker_activity_<r> for all its reports).
--   SELECT time, queue, count(*) AS listening, count(*) FILTER (WHERE busy) AS busy
--   FROM worker_queue_10m(now() - interval '1 day', now()) GROUP BY 1, 2

CREATE VIEW rollup_queue_rows WITH (security_invoker = true) AS
SELECT g.tier, g.block_start, g.period, g.block_start + u.bucket * g.resolution AS time, g.company, w.worker,
       m.name AS queue, u.count AS reports, codec_float(r.sum_kind, u.sum) > 0 AS busy
FROM rollup_block_groups AS g
JOIN stat_workers AS w ON w.id = g.worker
JOIN stat_metrics AS m ON m.id = g.metric AND m.kind = 1
CROSS JOIN LATERAL rollup_group_lanes(g.lanes, false) AS r
CROSS JOIN LATERAL unnest(r.buckets, r.sums, r.counts) AS u (bucket, sum, count);

CREATE VIEW worker_queue_1m WITH (security_invoker = true) AS
SELECT time, company, worker, queue, reports, busy FROM rollup_queue_rows WHERE tier = '1m';
CREATE VIEW worker_queue_10m WITH (security_invoker = true) AS
SELECT time, company, worker, queue, reports, busy FROM rollup_queue_rows WHERE tier = '10m';
CREATE VIEW worker_queue_1h WITH (security_invoker = true) AS
SELECT time, company, worker, queue, reports, busy FROM rollup_queue_rows WHERE tier = '1h';

CREATE FUNCTION worker_queue_1m(since timestamptz, until timestamptz) RETURNS SETOF worker_queue_1m
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT time, company, worker, queue, reports, busy FROM rollup_queue_rows
WHERE tier = '1m' AND block_start > since - period AND block_start <= until AND time BETWEEN since AND until
$$;
CREATE FUNCTION worker_queue_10m(since timestamptz, until timestamptz) RETURNS SETOF worker_queue_10m
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT time, company, worker, queue, reports, busy FROM rollup_queue_rows
WHERE tier = '10m' AND block_start > since - period AND block_start <= until AND time BETWEEN since AND until
$$;
CREATE FUNCTION worker_queue_1h(since timestamptz, until timestamptz) RETURNS SETOF worker_queue_1h
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT time, company, worker, queue, reports, busy FROM rollup_queue_rows
WHERE tier = '1h' AND block_start > since - period AND block_start <= until AND time BETWEEN since AND until
$$;

-- --- Grafana's readers: the new views too (010's function, with them) --------------------
CREATE OR REPLACE FUNCTION grafana_access_setup() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['workers_grafana_readers', 'workers_tenant_views'] LOOP
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) THEN
                EXECUTE format('CREATE ROLE %I NOLOGIN', name);
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database of the cluster created it meanwhile
        END;
    END LOOP;
    -- Only what is missing, so that once set up, the tables' owner may run this again.
    FOREACH name IN ARRAY ARRAY['recent_reports', 'report_blocks', 'rollup_1m', 'rollup_10m', 'rollup_1h'] LOOP
        IF NOT has_table_privilege('workers_tenant_views', to_regclass(name), 'SELECT') THEN
            EXECUTE format('GRANT SELECT ON %I TO workers_tenant_views', name);
        END IF;
        IF (SELECT relowner <> 'workers_tenant_views'::regrole FROM pg_class
            WHERE oid = to_regclass('tenant_' || name)) THEN
            EXECUTE format('ALTER VIEW %I OWNER TO workers_tenant_views', 'tenant_' || name);
        END IF;
    END LOOP;
    BEGIN  -- PUBLIC has it in the default schema `public`; elsewhere the schema's owner may grant it
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO workers_grafana_readers', current_schema());
    EXCEPTION WHEN insufficient_privilege THEN
        NULL;
    END;
    FOREACH name IN ARRAY ARRAY[
        'companies', 'worker_registrations', 'stat_workers', 'stat_metrics', 'report_layouts', 'late_reports',
        'tenant_recent_reports', 'tenant_report_blocks', 'tenant_rollup_1m', 'tenant_rollup_10m', 'tenant_rollup_1h',
        'rollup_block_groups', 'rollup_metric_rows', 'rollup_variant_rows', 'rollup_activity_rows',
        'worker_stat_points', 'worker_stats',
        'worker_stat_rollup_1m', 'worker_stat_rollup_10m', 'worker_stat_rollup_1h',
        'worker_metric_rollup_1m', 'worker_metric_rollup_10m', 'worker_metric_rollup_1h',
        'worker_activity_1m', 'worker_activity_10m', 'worker_activity_1h',
        'rollup_queue_rows', 'worker_queue_1m', 'worker_queue_10m', 'worker_queue_1h'
    ] LOOP
        IF NOT has_table_privilege('workers_grafana_readers', to_regclass(name), 'SELECT') THEN
            EXECUTE format('GRANT SELECT ON %I TO workers_grafana_readers', name);
        END IF;
    END LOOP;
END $$;

DO $$
BEGIN
    PERFORM grafana_access_setup();
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'Grafana reader roles not set up: %. Run `python -m server grafana-role create` once '
                 'as a role that may create roles and own views (a superuser).', SQLERRM;
END $$;
