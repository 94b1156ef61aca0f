-- Compact storage (server/storage/codec.py, blocks.py, compaction.py): statistics as bit-packed
-- blocks of scaled integers, integer ids for workers and metrics, and the public views over
-- them, decoded by the PL/pgSQL functions below. The jsonb-era tables are renamed legacy_*;
-- migration 007 converts what they hold and drops them.

-- The jsonb era: renamed, emptied by 007.
DROP VIEW worker_stat_points;
DROP VIEW worker_stat_rollup_1m, worker_stat_rollup_10m, worker_stat_rollup_1h;
DROP VIEW worker_metric_rollup_1m, worker_metric_rollup_10m, worker_metric_rollup_1h;
DROP VIEW worker_activity_1m, worker_activity_10m, worker_activity_1h;
ALTER TABLE worker_stats RENAME TO legacy_worker_stats;
ALTER TABLE stats_1m RENAME TO legacy_stats_1m;
ALTER TABLE stats_10m RENAME TO legacy_stats_10m;
ALTER TABLE stats_1h RENAME TO legacy_stats_1h;
ALTER TABLE activity_1m RENAME TO legacy_activity_1m;
ALTER TABLE activity_10m RENAME TO legacy_activity_10m;
ALTER TABLE activity_1h RENAME TO legacy_activity_1h;

-- Dictionaries: the statistics tables hold these ids. Metric ids start at 1: 0 is the
-- workers' activity (storage/blocks.py ACTIVITY). Variants are integers: -1 is "total"
-- (a scalar), i is "i" (the i-th value of a list).
CREATE TABLE stat_workers (
    id      integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    company text NOT NULL,
    worker  text NOT NULL,
    UNIQUE (company, worker)
);
CREATE TABLE stat_metrics (
    id      integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    company text NOT NULL,
    name    text NOT NULL,
    UNIQUE (company, name)
);
-- The shape of a report's values: value i is metric metrics[i], variant variants[i]. Unique
-- by a digest: a report may have thousands of values, too many for a btree's row.
CREATE TABLE report_layouts (
    id       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    metrics  integer[] NOT NULL,
    variants integer[] NOT NULL
);
-- (Integer arrays print the same whatever the settings: the digest is immutable.)
CREATE FUNCTION layout_digest(metrics integer[], variants integer[]) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT sha256((metrics::text || '/' || variants::text)::bytea) $$;
CREATE UNIQUE INDEX report_layouts_shape ON report_layouts (layout_digest(metrics, variants));

-- Reports of the open hour(s), as the writer stores them: one row per report, in 1-hour
-- chunks that compaction drops once it has packed them into report_blocks. `values`: the
-- report's values in the order of its layout, as 8-byte IEEE 754 numbers, big-endian
-- (report_values() reads them as a float8 array).
CREATE TABLE recent_reports (
    time   timestamptz NOT NULL,
    worker integer     NOT NULL,
    layout integer     NOT NULL,
    task   text,
    values bytea       NOT NULL
);
SELECT create_hypertable('recent_reports', by_range('time', INTERVAL '1 hour'), create_default_indexes => false);
CREATE INDEX recent_reports_worker_time ON recent_reports (worker, time);
-- The fleet's last minutes (a chart's part after the rollups): rows are stored in time order,
-- so a BRIN index finds them for next to nothing.
CREATE INDEX recent_reports_time ON recent_reports USING brin (time) WITH (pages_per_range = 8);

-- Reports timed before `rollup_watermark.compacted` (hours already packed) wait here until
-- compaction merges them into their blocks.
CREATE TABLE late_reports (LIKE recent_reports);
CREATE INDEX late_reports_worker_time ON late_reports (worker, time);

-- One worker's reports of one hour (storage/blocks.py, report blocks). `data` is stored
-- uncompressed out of line (it is incompressible), so that slices of it are read alone.
CREATE TABLE report_blocks (
    start   timestamptz NOT NULL,  -- the hour
    worker  integer     NOT NULL,
    reports integer     NOT NULL,
    tasks   text[]      NOT NULL,  -- the distinct tasks the data's task runs point to (1-based)
    data    bytea       NOT NULL
);
ALTER TABLE report_blocks ALTER COLUMN data SET STORAGE EXTERNAL;
SELECT create_hypertable('report_blocks', by_range('start', INTERVAL '1 day'), create_default_indexes => false);
CREATE UNIQUE INDEX report_blocks_worker_start ON report_blocks (worker, start);

-- Rollup tiers: for one company and metric (0: activity), every worker's buckets from
-- `start` on (`buckets` of the tier's resolution). `workers` are sorted, `offsets` say where
-- each one's lanes start in `data` (bytes).
CREATE TABLE rollup_1m (
    start   timestamptz NOT NULL,
    buckets integer     NOT NULL,
    company text        NOT NULL,
    metric  integer     NOT NULL,
    workers integer[]   NOT NULL,
    offsets integer[]   NOT NULL,
    data    bytea       NOT NULL
);
ALTER TABLE rollup_1m ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE rollup_10m (LIKE rollup_1m INCLUDING STORAGE);
CREATE TABLE rollup_1h (LIKE rollup_1m INCLUDING STORAGE);
SELECT create_hypertable('rollup_1m', by_range('start', INTERVAL '1 day'), create_default_indexes => false);
SELECT create_hypertable('rollup_10m', by_range('start', INTERVAL '7 days'), create_default_indexes => false);
SELECT create_hypertable('rollup_1h', by_range('start', INTERVAL '30 days'), create_default_indexes => false);
CREATE INDEX rollup_1m_metric_start ON rollup_1m (company, metric, start);
CREATE INDEX rollup_10m_metric_start ON rollup_10m (company, metric, start);
CREATE INDEX rollup_1h_metric_start ON rollup_1h (company, metric, start);

-- Reports timed before `compacted` are packed into report_blocks (or wait in late_reports);
-- the writer reads it with the watermark (FOR SHARE), so moving it waits for the batches in
-- flight, as the watermark does.
ALTER TABLE rollup_watermark ADD COLUMN compacted timestamptz;
UPDATE rollup_watermark SET compacted = time_bucket('1 hour', now());
ALTER TABLE rollup_watermark ALTER COLUMN compacted SET NOT NULL;

-- --- the codec in PL/pgSQL (storage/codec.py describes the bits) --------------------------

CREATE FUNCTION codec_bits(data bytea) RETURNS varbit
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT ('x' || encode(data, 'hex'))::varbit $$;

-- A float64 from its 64 IEEE 754 bits, exactly (normal and subnormal numbers, either zero).
CREATE FUNCTION codec_ieee(bits bigint) RETURNS double precision
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
SELECT CASE WHEN exponent = 0 THEN mantissa * 4.9406564584124654e-324
            ELSE (mantissa + 4503599627370496) * power(2::float8, exponent - 1075) END
       * CASE WHEN bits < 0 THEN -1 ELSE 1 END
FROM (SELECT ((bits >> 52) & 2047)::int AS exponent, (bits & 4503599627370495)::float8 AS mantissa) AS parts
$$;

-- The sequence starting at bit `start` (0-based) of `bits`: its kind (mode << 4 | scale),
-- its integers (a raw sequence's: the IEEE bits), and the bit after it.
CREATE FUNCTION codec_sequence(bits varbit, start integer, OUT stop integer, OUT kind integer, OUT ints bigint[])
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    pos integer := start + 1;  -- substring() counts from 1
    len integer;
    n integer;
    mode integer;
    gcd bigint;
    ref bigint;
    base bigint := 0;
    residuals integer;
    blocks integer;
    widths integer[] := '{}';
    width integer;
    size integer;
    value bigint;
    running bigint;
BEGIN
    len := substring(bits FROM pos FOR 7)::integer;
    n := substring(bits FROM pos + 7 FOR len)::bigint;
    pos := pos + 7 + len;
    kind := substring(bits FROM pos FOR 6)::integer;
    pos := pos + 6;
    mode := kind >> 4;
    ints := '{}';
    IF n = 0 THEN
        stop := pos - 1;
        RETURN;
    END IF;
    IF mode = 3 THEN  -- raw: padding to a byte, then 64 bits a value
        pos := ((pos - 1 + 7) / 8) * 8 + 1;
        FOR i IN 0 .. n - 1 LOOP
            ints := ints || substring(bits FROM pos + 64 * i FOR 64)::bigint;
        END LOOP;
        stop := pos - 1 + 64 * n;
        RETURN;
    END IF;
    len := substring(bits FROM pos FOR 7)::integer;
    gcd := substring(bits FROM pos + 7 FOR len)::bigint;
    pos := pos + 7 + len;
    len := substring(bits FROM pos FOR 7)::integer;
    ref := substring(bits FROM pos + 7 FOR len)::bigint;
    ref := (ref >> 1) # -(ref & 1);
    pos := pos + 7 + len;
    IF mode = 2 THEN
        len := substring(bits FROM pos FOR 7)::integer;
        base := substring(bits FROM pos + 7 FOR len)::bigint;
        base := (base >> 1) # -(base & 1);
        pos := pos + 7 + len;
    END IF;
    residuals := CASE WHEN mode = 0 THEN n ELSE n - 1 END;
    blocks := (residuals + 31) / 32;
    FOR j IN 0 .. blocks - 1 LOOP
        widths := widths || substring(bits FROM pos + 7 * j FOR 7)::integer;
    END LOOP;
    pos := pos + 7 * blocks;
    running := ref;
    IF mode <> 0 THEN
        ints := ints || ref;
    END IF;
    FOR j IN 1 .. blocks LOOP
        width := widths[j];
        size := least(32, residuals - 32 * (j - 1));
        FOR i IN 0 .. size - 1 LOOP
            value := substring(bits FROM pos + width * i FOR width)::bigint;
            IF mode = 0 THEN
                ints := ints || (ref + gcd * value);
            ELSE
                IF mode = 1 THEN
                    running := running + gcd * ((value >> 1) # -(value & 1));
                ELSE
                    running := running + gcd * (value + base);
                END IF;
                ints := ints || running;
            END IF;
        END LOOP;
        pos := pos + width * size;
    END LOOP;
    stop := pos - 1;
END $$;

-- A report row's values (recent_reports, late_reports) as a float8 array.
CREATE FUNCTION report_values(packed bytea) RETURNS double precision[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
SELECT coalesce(array_agg(codec_ieee(('x' || encode(substring(packed FROM 8 * i + 1 FOR 8), 'hex'))::bit(64)::bigint)
                          ORDER BY i), '{}')
FROM generate_series(0, octet_length(packed) / 8 - 1) AS i
$$;

-- A sequence's values as float64: integers / 10^scale, raw bits decoded.
CREATE FUNCTION codec_floats(kind integer, ints bigint[]) RETURNS double precision[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
SELECT coalesce(array_agg(CASE WHEN kind >> 4 = 3 THEN codec_ieee(i) ELSE i / (10::float8 ^ (kind & 15)) END
                          ORDER BY o), '{}')
FROM unnest(ints) WITH ORDINALITY AS v (i, o)
$$;

CREATE FUNCTION variant_name(code integer) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT CASE WHEN code = -1 THEN 'total' ELSE code::text END $$;

CREATE FUNCTION micros_time(micros bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
SELECT timestamptz '1970-01-01 00:00:00+00' + micros * interval '1 microsecond'
$$;

-- Every value of a report block: its time, the index of its task in the block's tasks (0:
-- none), its metric id and variant code.
CREATE FUNCTION report_block_points(data bytea)
RETURNS TABLE (at timestamptz, task integer, metric integer, variant integer, value double precision)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    bits varbit := codec_bits(data);
    cursor integer := 0;
    times bigint[];
    run_lengths bigint[];
    run_values bigint[];
    metrics bigint[];
    variants bigint[];
    sizes bigint[];
    task_of integer[] := '{}';
    lane integer;
    presence bigint[];
    kind integer;
    ints bigint[];
    chosen bigint[];
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
    lane := ((cursor + 7) / 8) * 8;
    FOR s IN 1 .. coalesce(array_length(metrics, 1), 0) LOOP
        SELECT q.stop, q.ints INTO cursor, presence FROM codec_sequence(bits, lane) AS q;
        SELECT q.stop, q.kind, q.ints INTO cursor, kind, ints FROM codec_sequence(bits, cursor) AS q;
        IF cardinality(presence) = 0 THEN
            RETURN QUERY SELECT micros_time(times[o::integer]), task_of[o::integer], metrics[s]::integer,
                                variants[s]::integer, v
                         FROM unnest(codec_floats(kind, ints)) WITH ORDINALITY AS p (v, o);
        ELSE
            RETURN QUERY SELECT micros_time(times[presence[o::integer] + 1]), task_of[presence[o::integer] + 1],
                                metrics[s]::integer, variants[s]::integer, v
                         FROM unnest(codec_floats(kind, ints)) WITH ORDINALITY AS p (v, o);
        END IF;
        lane := lane + 8 * sizes[s]::integer;
    END LOOP;
END $$;

-- Every report of a report block (those without values too): its time, the index of its task,
-- and its values as the jsonb-era table held them, {"metric": {"variant": value}}.
CREATE FUNCTION report_block_reports(data bytea)
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
    SELECT array_agg(m.name ORDER BY u.o) INTO names
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
              GROUP BY u.r, names[u.s]) AS per_metric
        GROUP BY per_metric.report
    ) AS g ON g.report = i
    ORDER BY i;
END $$;

-- A report row's values as the jsonb-era table held them.
CREATE FUNCTION report_metrics(layout integer, vals double precision[]) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT coalesce(jsonb_object_agg(per_metric.name, per_metric.values), '{}')
FROM (SELECT m.name, jsonb_object_agg(variant_name(l.variants[i]), vals[i]) AS values
      FROM report_layouts AS l
      CROSS JOIN LATERAL generate_subscripts(vals, 1) AS i
      JOIN stat_metrics AS m ON m.id = l.metrics[i]
      WHERE l.id = layout
      GROUP BY m.name) AS per_metric
$$;

-- One worker's rows in a rollup block, from its lanes (`lanes`: its bytes of the block's data,
-- from its offset on). `bucket` is the index of the bucket within the block. Without
-- `per_variant`: the rows over all variants (variant -2). With it: each variant's rows, and
-- a scalar metric's row as its variant "total" (-1) where a bucket has no variant rows.
CREATE FUNCTION rollup_group_rows(lanes bytea, per_variant boolean)
RETURNS TABLE (variant integer, bucket integer, min double precision, max double precision,
               sum double precision, count bigint)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    bits varbit := codec_bits(lanes);
    cursor integer := 0;
    codes bigint[];
    sizes bigint[];
    lane integer;
    buckets bigint[];
    kind integer;
    ints bigint[];
    mins double precision[];
    maxs double precision[];
    sums double precision[];
    counts bigint[];
    combined_buckets bigint[];
    variant_buckets bigint[] := '{}';
    code integer := -2;
BEGIN
    SELECT s.stop, s.ints INTO cursor, codes FROM codec_sequence(bits, cursor) AS s;
    SELECT s.stop, s.ints INTO cursor, sizes FROM codec_sequence(bits, cursor) AS s;
    FOR v IN 0 .. CASE WHEN per_variant THEN coalesce(array_length(codes, 1), 0) ELSE 0 END LOOP
        IF v > 0 THEN
            code := codes[v];
            cursor := lane;
        END IF;
        SELECT s.stop, s.ints INTO cursor, buckets FROM codec_sequence(bits, cursor) AS s;
        SELECT s.stop, s.kind, s.ints INTO cursor, kind, ints FROM codec_sequence(bits, cursor) AS s;
        mins := codec_floats(kind, ints);
        SELECT s.stop, s.kind, s.ints INTO cursor, kind, ints FROM codec_sequence(bits, cursor) AS s;
        maxs := codec_floats(kind, ints);
        SELECT s.stop, s.kind, s.ints INTO cursor, kind, ints FROM codec_sequence(bits, cursor) AS s;
        sums := codec_floats(kind, ints);
        SELECT s.stop, s.ints INTO cursor, counts FROM codec_sequence(bits, cursor) AS s;
        IF v = 0 THEN
            lane := ((cursor + 7) / 8) * 8;
            IF per_variant THEN
                combined_buckets := buckets;
                CONTINUE;  -- the row over all variants comes last, where it stands for "total"
            END IF;
        ELSE
            lane := lane + 8 * sizes[v]::integer;
            variant_buckets := variant_buckets || buckets;
        END IF;
        RETURN QUERY SELECT code, b::integer, mins[o::integer], maxs[o::integer], sums[o::integer], counts[o::integer]
                     FROM unnest(buckets) WITH ORDINALITY AS u (b, o);
    END LOOP;
    IF per_variant THEN
        -- The scalar's buckets: read the lane over all variants again, keep those without variants.
        cursor := 0;
        SELECT s.stop INTO cursor FROM codec_sequence(bits, cursor) AS s;
        SELECT s.stop INTO cursor FROM codec_sequence(bits, cursor) AS s;
        SELECT s.stop INTO cursor FROM codec_sequence(bits, cursor) AS s;
        SELECT s.stop, s.kind, s.ints INTO cursor, kind, ints FROM codec_sequence(bits, cursor) AS s;
        mins := codec_floats(kind, ints);
        SELECT s.stop, s.kind, s.ints INTO cursor, kind, ints FROM codec_sequence(bits, cursor) AS s;
        maxs := codec_floats(kind, ints);
        SELECT s.stop, s.kind, s.ints INTO cursor, kind, ints FROM codec_sequence(bits, cursor) AS s;
        sums := codec_floats(kind, ints);
        SELECT s.stop, s.ints INTO cursor, counts FROM codec_sequence(bits, cursor) AS s;
        RETURN QUERY SELECT -1, b::integer, mins[o::integer], maxs[o::integer], sums[o::integer], counts[o::integer]
                     FROM unnest(combined_buckets) WITH ORDINALITY AS u (b, o)
                     WHERE NOT b = ANY(variant_buckets);
    END IF;
END $$;

-- Every worker of every rollup block, with the bytes of its lanes: what the rollup views read.
-- `tier` is a constant of each branch: a query for one tier plans that tier's table alone.
CREATE VIEW rollup_block_groups AS
SELECT b.tier, b.resolution, b.period, b.start AS block_start, b.company, b.metric, g.worker,
       substring(b.data FROM g.lane + 1 FOR coalesce(b.offsets[g.i + 1], octet_length(b.data)) - g.lane) AS lanes
FROM (SELECT '1m'::text AS tier, interval '1 minute' AS resolution, interval '1 hour' AS period, * FROM rollup_1m
      UNION ALL
      SELECT '10m', interval '10 minutes', interval '1 day', * FROM rollup_10m
      UNION ALL
      SELECT '1h', interval '1 hour', interval '7 days', * FROM rollup_1h) AS b
CROSS JOIN LATERAL unnest(b.workers, b.offsets) WITH ORDINALITY AS g (worker, lane, i);

-- --- the public views (SPEC §4): same columns as before ------------------------------------

-- Every stored value as one point.
CREATE VIEW worker_stat_points AS
SELECT r.time, w.company, w.worker, r.task, split_part(m.name, '_', 1) AS category, m.name AS metric,
       variant_name(l.variants[i]) AS variant, r.values[i] AS value
FROM (SELECT time, worker, layout, task, report_values(values) AS values FROM recent_reports
      UNION ALL
      SELECT time, worker, layout, task, report_values(values) FROM late_reports) AS r
JOIN stat_workers AS w ON w.id = r.worker
JOIN report_layouts AS l ON l.id = r.layout
CROSS JOIN LATERAL generate_subscripts(r.values, 1) AS i
JOIN stat_metrics AS m ON m.id = l.metrics[i]
UNION ALL
SELECT p.at, w.company, w.worker, b.tasks[p.task], split_part(m.name, '_', 1), m.name, variant_name(p.variant), p.value
FROM report_blocks AS b
JOIN stat_workers AS w ON w.id = b.worker
CROSS JOIN LATERAL report_block_points(b.data) AS p
JOIN stat_metrics AS m ON m.id = p.metric;

-- The same between two times (inclusive), reading only the blocks of those hours: a view
-- cannot tell PostgreSQL which blocks hold a time range, a function's arguments can.
--   SELECT * FROM worker_stat_points(now() - interval '1 hour', now()) WHERE worker = 'gpu-box-1'
CREATE FUNCTION worker_stat_points(since timestamptz, until timestamptz) RETURNS SETOF worker_stat_points
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT r.time, w.company, w.worker, r.task, split_part(m.name, '_', 1), m.name, variant_name(l.variants[i]), r.values[i]
FROM (SELECT time, worker, layout, task, report_values(values) AS values FROM recent_reports
      WHERE time BETWEEN since AND until
      UNION ALL
      SELECT time, worker, layout, task, report_values(values) FROM late_reports WHERE time BETWEEN since AND until) AS r
JOIN stat_workers AS w ON w.id = r.worker
JOIN report_layouts AS l ON l.id = r.layout
CROSS JOIN LATERAL generate_subscripts(r.values, 1) AS i
JOIN stat_metrics AS m ON m.id = l.metrics[i]
UNION ALL
SELECT p.at, w.company, w.worker, b.tasks[p.task], split_part(m.name, '_', 1), m.name, variant_name(p.variant), p.value
FROM report_blocks AS b
JOIN stat_workers AS w ON w.id = b.worker
CROSS JOIN LATERAL report_block_points(b.data) AS p
JOIN stat_metrics AS m ON m.id = p.metric
WHERE b.start > since - interval '1 hour' AND b.start <= until AND p.at BETWEEN since AND until
$$;

-- Every report, as the jsonb-era table `worker_stats` held it (its metrics as jsonb: a
-- number's sign of zero is not kept there; worker_stat_points keeps every value exactly).
CREATE VIEW worker_stats AS
SELECT r.time, w.company, w.worker, r.task, report_metrics(r.layout, report_values(r.values)) AS metrics
FROM (SELECT * FROM recent_reports UNION ALL SELECT * FROM late_reports) AS r
JOIN stat_workers AS w ON w.id = r.worker
UNION ALL
SELECT p.at, w.company, w.worker, b.tasks[p.task], p.metrics
FROM report_blocks AS b
JOIN stat_workers AS w ON w.id = b.worker
CROSS JOIN LATERAL report_block_reports(b.data) AS p;

-- --- the rollups' public views (SPEC §4), per tier ----------------------------------------
-- Each reads the blocks of its tier: a view decodes every block its other conditions leave
-- (a condition on `time` is applied to the decoded rows), the function of the same name with
-- two times reads only the blocks of that range:
--   SELECT * FROM worker_metric_rollup_10m(now() - interval '1 day', now()) WHERE company = '...'

CREATE VIEW rollup_metric_rows AS
SELECT g.tier, g.block_start, g.period, g.block_start + r.bucket * g.resolution AS time, g.company, w.worker,
       split_part(m.name, '_', 1) AS category, m.name AS metric, r.min, r.max, r.sum / r.count AS avg, r.sum, r.count
FROM rollup_block_groups AS g
JOIN stat_workers AS w ON w.id = g.worker
JOIN stat_metrics AS m ON m.id = g.metric
CROSS JOIN LATERAL rollup_group_rows(g.lanes, false) AS r;

CREATE VIEW rollup_variant_rows AS
SELECT g.tier, g.block_start, g.period, g.block_start + r.bucket * g.resolution AS time, g.company, w.worker,
       split_part(m.name, '_', 1) AS category, m.name AS metric, variant_name(r.variant) AS variant,
       r.min, r.max, r.sum / r.count AS avg, r.sum, r.count
FROM rollup_block_groups AS g
JOIN stat_workers AS w ON w.id = g.worker
JOIN stat_metrics AS m ON m.id = g.metric
CROSS JOIN LATERAL rollup_group_rows(g.lanes, true) AS r;

CREATE VIEW rollup_activity_rows AS
SELECT g.tier, g.block_start, g.period, g.block_start + r.bucket * g.resolution AS time, g.company, w.worker,
       r.count AS reports, r.sum > 0 AS busy
FROM rollup_block_groups AS g
JOIN stat_workers AS w ON w.id = g.worker
CROSS JOIN LATERAL rollup_group_rows(g.lanes, false) AS r
WHERE g.metric = 0;

CREATE VIEW worker_metric_rollup_1m AS
SELECT time, company, worker, category, metric, min, max, avg, sum, count FROM rollup_metric_rows WHERE tier = '1m';
CREATE VIEW worker_metric_rollup_10m AS
SELECT time, company, worker, category, metric, min, max, avg, sum, count FROM rollup_metric_rows WHERE tier = '10m';
CREATE VIEW worker_metric_rollup_1h AS
SELECT time, company, worker, category, metric, min, max, avg, sum, count FROM rollup_metric_rows WHERE tier = '1h';

-- The 1-minute tier keeps the rows over all variants; a variant's minutes come from the raw
-- reports, which are kept at least as long.
CREATE VIEW worker_stat_rollup_1m AS
SELECT time_bucket('1 minute', time) AS time, company, worker, category, metric, variant,
       min(value) AS min, max(value) AS max, avg(value) AS avg, sum(value) AS sum, count(*) AS count
FROM worker_stat_points GROUP BY 1, 2, 3, 4, 5, 6;
CREATE VIEW worker_stat_rollup_10m AS
SELECT time, company, worker, category, metric, variant, min, max, avg, sum, count FROM rollup_variant_rows WHERE tier = '10m';
CREATE VIEW worker_stat_rollup_1h AS
SELECT time, company, worker, category, metric, variant, min, max, avg, sum, count FROM rollup_variant_rows WHERE tier = '1h';

CREATE VIEW worker_activity_1m AS SELECT time, company, worker, reports, busy FROM rollup_activity_rows WHERE tier = '1m';
CREATE VIEW worker_activity_10m AS SELECT time, company, worker, reports, busy FROM rollup_activity_rows WHERE tier = '10m';
CREATE VIEW worker_activity_1h AS SELECT time, company, worker, reports, busy FROM rollup_activity_rows WHERE tier = '1h';

CREATE FUNCTION worker_metric_rollup_1m(since timestamptz, until timestamptz) RETURNS SETOF worker_metric_rollup_1m
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT time, company, worker, category, metric, min, max, avg, sum, count FROM rollup_metric_rows
WHERE tier = '1m' AND block_start > since - period AND block_start <= until AND time BETWEEN since AND until
$$;
CREATE FUNCTION worker_metric_rollup_10m(since timestamptz, until timestamptz) RETURNS SETOF worker_metric_rollup_10m
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT time, company, worker, category, metric, min, max, avg, sum, count FROM rollup_metric_rows
WHERE tier = '10m' AND block_start > since - period AND block_start <= until AND time BETWEEN since AND until
$$;
CREATE FUNCTION worker_metric_rollup_1h(since timestamptz, until timestamptz) RETURNS SETOF worker_metric_rollup_1h
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT time, company, worker, category, metric, min, max, avg, sum, count FROM rollup_metric_rows
WHERE tier = '1h' AND block_start > since - period AND block_start <= until AND time BETWEEN since AND until
$$;
-- (Whole minutes, as the view gives them: a minute starting at `until` is read whole.)
CREATE FUNCTION worker_stat_rollup_1m(since timestamptz, until timestamptz) RETURNS SETOF worker_stat_rollup_1m
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT * FROM (
    SELECT time_bucket('1 minute', time) AS time, company, worker, category, metric, variant,
           min(value), max(value), avg(value), sum(value), count(*)
    FROM worker_stat_points(since, time_bucket('1 minute', until) + interval '59.999999 seconds')
    GROUP BY 1, 2, 3, 4, 5, 6) AS minutes
WHERE time BETWEEN since AND until
$$;
CREATE FUNCTION worker_stat_rollup_10m(since timestamptz, until timestamptz) RETURNS SETOF worker_stat_rollup_10m
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT time, company, worker, category, metric, variant, min, max, avg, sum, count FROM rollup_variant_rows
WHERE tier = '10m' AND block_start > since - period AND block_start <= until AND time BETWEEN since AND until
$$;
CREATE FUNCTION worker_stat_rollup_1h(since timestamptz, until timestamptz) RETURNS SETOF worker_stat_rollup_1h
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT time, company, worker, category, metric, variant, min, max, avg, sum, count FROM rollup_variant_rows
WHERE tier = '1h' AND block_start > since - period AND block_start <= until AND time BETWEEN since AND until
$$;
CREATE FUNCTION worker_activity_1m(since timestamptz, until timestamptz) RETURNS SETOF worker_activity_1m
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT time, company, worker, reports, busy FROM rollup_activity_rows
WHERE tier = '1m' AND block_start > since - period AND block_start <= until AND time BETWEEN since AND until
$$;
CREATE FUNCTION worker_activity_10m(since timestamptz, until timestamptz) RETURNS SETOF worker_activity_10m
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT time, company, worker, reports, busy FROM rollup_activity_rows
WHERE tier = '10m' AND block_start > since - period AND block_start <= until AND time BETWEEN since AND until
$$;
CREATE FUNCTION worker_activity_1h(since timestamptz, until timestamptz) RETURNS SETOF worker_activity_1h
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT time, company, worker, reports, busy FROM rollup_activity_rows
WHERE tier = '1h' AND block_start > since - period AND block_start <= until AND time BETWEEN since AND until
$$;
