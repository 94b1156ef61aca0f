-- Decoding blocks in SQL, faster: the same bits, the same views and columns (migration 006
-- describes them), less work per value and per call.
--
-- * codec_sequence: one loop per mode, none for a miniblock of width 0 (equal values or
--   steps: a rollup's buckets and counts mostly).
-- * Block decoders call it as an expression (`s := codec_sequence(...)`), not as a query,
--   and return arrays or one query at the end instead of a RETURN QUERY per lane: a query
--   costs about as much as decoding a hundred values.
-- * A view over all variants converts only the bytes of a worker's lane over all variants
--   (its variant lanes are most of them), and the views unnest the lanes' arrays themselves.
-- * micros_time is STABLE, as timestamptz + interval is: declared IMMUTABLE, PostgreSQL did
--   not inline it and ran it as a function call per value (1.4 µs each); a report block's
--   times are made timestamps once per report, not once per value.
-- The bits (storage/codec.py) do not change: nothing stored is rewritten.

CREATE OR REPLACE FUNCTION codec_sequence(bits varbit, start integer, OUT stop integer, OUT kind integer, OUT ints bigint[])
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
    last integer;
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
        FOR p IN pos .. pos + 64 * (n - 1) BY 64 LOOP
            ints := ints || substring(bits FROM p FOR 64)::bigint;
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
    FOR p IN pos .. pos + 7 * (blocks - 1) BY 7 LOOP
        widths := widths || substring(bits FROM p FOR 7)::integer;
    END LOOP;
    pos := pos + 7 * blocks;
    running := ref;
    IF mode <> 0 THEN
        ints := ARRAY[ref];
    END IF;
    FOR j IN 1 .. blocks LOOP
        width := widths[j];
        size := least(32, residuals - 32 * (j - 1));
        last := pos + width * (size - 1);
        IF width = 0 THEN
            IF mode = 0 THEN
                ints := ints || array_fill(ref, ARRAY[size]);
            ELSIF mode = 1 THEN
                ints := ints || array_fill(running, ARRAY[size]);
            ELSE
                FOR i IN 1 .. size LOOP
                    running := running + gcd * base;
                    ints := ints || running;
                END LOOP;
            END IF;
        ELSIF mode = 0 THEN  -- FOR: ref + gcd * residual
            FOR p IN pos .. last BY width LOOP
                ints := ints || (ref + gcd * substring(bits FROM p FOR width)::bigint);
            END LOOP;
        ELSIF mode = 1 THEN  -- delta: zigzag differences
            FOR p IN pos .. last BY width LOOP
                value := substring(bits FROM p FOR width)::bigint;
                running := running + gcd * ((value >> 1) # -(value & 1));
                ints := ints || running;
            END LOOP;
        ELSE  -- delta-FOR: differences less the smallest
            FOR p IN pos .. last BY width LOOP
                running := running + gcd * (substring(bits FROM p FOR width)::bigint + base);
                ints := ints || running;
            END LOOP;
        END IF;
        pos := pos + width * size;
    END LOOP;
    stop := pos - 1;
END $$;

CREATE OR REPLACE FUNCTION micros_time(micros bigint) RETURNS timestamptz
LANGUAGE sql STABLE STRICT PARALLEL SAFE AS $$
SELECT timestamptz '1970-01-01 00:00:00+00' + micros * interval '1 microsecond'
$$;

-- One decoded integer of a sequence of kind `kind` as its float64 (integers / 10^scale, raw
-- bits decoded). A plain SQL expression: PostgreSQL inlines it into the queries using it.
CREATE FUNCTION codec_float(kind integer, value bigint) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT CASE WHEN kind >> 4 = 3 THEN codec_ieee(value) ELSE value / (10::float8 ^ (kind & 15)) END
$$;

-- Every value of a report block: its time, the index of its task in the block's tasks (0:
-- none), its metric id and variant code.
CREATE OR REPLACE FUNCTION report_block_points(data bytea)
RETURNS TABLE (at timestamptz, task integer, metric integer, variant integer, value double precision)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    bits varbit := codec_bits(data);
    s record;
    times bigint[];
    run_lengths bigint[];
    run_values bigint[];
    metrics bigint[];
    variants bigint[];
    sizes bigint[];
    task_of integer[] := '{}';
    every_report bigint[];
    stamps timestamptz[];
    lane integer;
    presence bigint[];
    report_of bigint[] := '{}';  -- per value: its report's index (0-based), its series, kind and integer
    series_of integer[] := '{}';
    kind_of integer[] := '{}';
    ints bigint[] := '{}';
BEGIN
    s := codec_sequence(bits, 0); times := s.ints;
    s := codec_sequence(bits, s.stop); run_lengths := s.ints;
    s := codec_sequence(bits, s.stop); run_values := s.ints;
    s := codec_sequence(bits, s.stop); metrics := s.ints;
    s := codec_sequence(bits, s.stop); variants := s.ints;
    s := codec_sequence(bits, s.stop); sizes := s.ints;
    FOR r IN 1 .. coalesce(array_length(run_lengths, 1), 0) LOOP
        task_of := task_of || array_fill(run_values[r]::integer, ARRAY[run_lengths[r]::integer]);
    END LOOP;
    every_report := ARRAY(SELECT generate_series(0, cardinality(times) - 1));
    stamps := ARRAY(SELECT micros_time(t) FROM unnest(times) WITH ORDINALITY AS u (t, o) ORDER BY o);
    lane := ((s.stop + 7) / 8) * 8;
    FOR series IN 1 .. coalesce(array_length(metrics, 1), 0) LOOP
        s := codec_sequence(bits, lane);
        presence := s.ints;
        s := codec_sequence(bits, s.stop);
        report_of := report_of || CASE WHEN cardinality(presence) = 0 THEN every_report ELSE presence END;
        series_of := series_of || array_fill(series, ARRAY[cardinality(s.ints)]);
        kind_of := kind_of || array_fill(s.kind, ARRAY[cardinality(s.ints)]);
        ints := ints || s.ints;
        lane := lane + 8 * sizes[series]::integer;
    END LOOP;
    RETURN QUERY
    SELECT stamps[u.r + 1], task_of[u.r + 1], metrics[u.s]::integer, variants[u.s]::integer, codec_float(u.k, u.i)
    FROM unnest(report_of, series_of, kind_of, ints) AS u (r, s, k, i);
END $$;

-- One lane of aggregates of a rollup block (bucket indices, min, max, sum, count) starting at
-- bit `start` of `bits`, as the integers of each sequence and their kinds.
CREATE FUNCTION rollup_lane(bits varbit, start integer, OUT stop integer, OUT buckets bigint[],
                            OUT min_kind integer, OUT mins bigint[], OUT max_kind integer, OUT maxs bigint[],
                            OUT sum_kind integer, OUT sums bigint[], OUT counts bigint[])
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    s record;
BEGIN
    s := codec_sequence(bits, start); buckets := s.ints;
    s := codec_sequence(bits, s.stop); min_kind := s.kind; mins := s.ints;
    s := codec_sequence(bits, s.stop); max_kind := s.kind; maxs := s.ints;
    s := codec_sequence(bits, s.stop); sum_kind := s.kind; sums := s.ints;
    s := codec_sequence(bits, s.stop); counts := s.ints;
    stop := s.stop;
END $$;

-- One worker's lanes in a rollup block (`lanes`: its bytes of the block's data, from its
-- offset on), a row of arrays per lane (the views unnest them; `codec_float` makes the
-- integers floats). Without `per_variant`: the lane over all variants (variant -2). With it:
-- each variant's lane, and a scalar metric's buckets (the lane over all variants where a
-- bucket has no variant) as its variant "total" (-1).
CREATE FUNCTION rollup_group_lanes(lanes bytea, per_variant boolean)
RETURNS TABLE (variant integer, buckets bigint[], min_kind integer, mins bigint[], max_kind integer,
               maxs bigint[], sum_kind integer, sums bigint[], counts bigint[])
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    total integer := octet_length(lanes);
    bits varbit;
    s record;
    codes bigint[];
    sizes bigint[];
    variant_count integer;
    head integer;
    combined integer;
    lane integer;
    all_lane record;
    covered boolean := false;
    variant_buckets bigint[] := '{}';
    whole boolean := per_variant OR total <= 1024;  -- converted to bits at once
BEGIN
    IF whole THEN
        bits := codec_bits(lanes);
    ELSE
        -- The lane over all variants comes first; the variant lanes, most of the bytes, are
        -- not converted. Its first two sequences (the variant codes, and as many lane sizes)
        -- fit in `head` bytes: two sequence headers, a width per 32 values and 64 bits a value.
        bits := codec_bits(substring(lanes FOR 17));
        variant_count := substring(bits FROM 8 FOR substring(bits FOR 7)::integer)::integer;
        head := least(total, 2 * (70 + (variant_count + 31) / 32 + 8 * variant_count));
        bits := codec_bits(substring(lanes FOR head));
    END IF;
    s := codec_sequence(bits, 0); codes := s.ints;
    s := codec_sequence(bits, s.stop); sizes := s.ints;
    IF NOT whole THEN
        combined := total;
        FOR v IN 1 .. coalesce(array_length(sizes, 1), 0) LOOP
            combined := combined - sizes[v]::integer;
        END LOOP;
        bits := codec_bits(substring(lanes FOR combined));
    END IF;
    all_lane := rollup_lane(bits, s.stop);
    IF NOT per_variant OR cardinality(codes) = 0 THEN
        variant := CASE WHEN per_variant THEN -1 ELSE -2 END;
        buckets := all_lane.buckets; min_kind := all_lane.min_kind; mins := all_lane.mins;
        max_kind := all_lane.max_kind; maxs := all_lane.maxs; sum_kind := all_lane.sum_kind;
        sums := all_lane.sums; counts := all_lane.counts;
        RETURN NEXT;
        RETURN;
    END IF;
    lane := ((all_lane.stop + 7) / 8) * 8;
    FOR v IN 1 .. cardinality(codes) LOOP
        s := rollup_lane(bits, lane);
        variant := codes[v];
        buckets := s.buckets; min_kind := s.min_kind; mins := s.mins; max_kind := s.max_kind; maxs := s.maxs;
        sum_kind := s.sum_kind; sums := s.sums; counts := s.counts;
        RETURN NEXT;
        covered := covered OR s.buckets = all_lane.buckets;
        variant_buckets := variant_buckets || s.buckets;
        lane := lane + 8 * sizes[v]::integer;
    END LOOP;
    IF covered THEN  -- a variant has every bucket: no bucket of a scalar
        RETURN;
    END IF;
    -- The buckets no variant lane has (rare: a metric sent both with and without variants).
    RETURN QUERY
    SELECT -1, array_agg(u.b ORDER BY u.o), all_lane.min_kind, array_agg(u.mi ORDER BY u.o), all_lane.max_kind,
           array_agg(u.ma ORDER BY u.o), all_lane.sum_kind, array_agg(u.su ORDER BY u.o), array_agg(u.co ORDER BY u.o)
    FROM unnest(all_lane.buckets, all_lane.mins, all_lane.maxs, all_lane.sums, all_lane.counts)
         WITH ORDINALITY AS u (b, mi, ma, su, co, o)
    WHERE NOT u.b = ANY(variant_buckets)
    HAVING count(*) > 0;
END $$;

-- The rollups' row views (006), now unnesting a lane's arrays: the same columns.
CREATE OR REPLACE VIEW rollup_metric_rows AS
SELECT g.tier, g.block_start, g.period, g.block_start + u.bucket * g.resolution AS time, g.company, w.worker,
       split_part(m.name, '_', 1) AS category, m.name AS metric, codec_float(r.min_kind, u.min) AS min,
       codec_float(r.max_kind, u.max) AS max, codec_float(r.sum_kind, u.sum) / u.count AS avg,
       codec_float(r.sum_kind, u.sum) AS sum, u.count
FROM rollup_block_groups AS g
JOIN stat_workers AS w ON w.id = g.worker
JOIN stat_metrics AS m ON m.id = g.metric
CROSS JOIN LATERAL rollup_group_lanes(g.lanes, false) AS r
CROSS JOIN LATERAL unnest(r.buckets, r.mins, r.maxs, r.sums, r.counts) AS u (bucket, min, max, sum, count);

CREATE OR REPLACE VIEW rollup_variant_rows AS
SELECT g.tier, g.block_start, g.period, g.block_start + u.bucket * g.resolution AS time, g.company, w.worker,
       split_part(m.name, '_', 1) AS category, m.name AS metric, variant_name(r.variant) AS variant,
       codec_float(r.min_kind, u.min) AS min, codec_float(r.max_kind, u.max) AS max,
       codec_float(r.sum_kind, u.sum) / u.count AS avg, codec_float(r.sum_kind, u.sum) AS sum, u.count
FROM rollup_block_groups AS g
JOIN stat_workers AS w ON w.id = g.worker
JOIN stat_metrics AS m ON m.id = g.metric
CROSS JOIN LATERAL rollup_group_lanes(g.lanes, true) AS r
CROSS JOIN LATERAL unnest(r.buckets, r.mins, r.maxs, r.sums, r.counts) AS u (bucket, min, max, sum, count);

CREATE OR REPLACE VIEW rollup_activity_rows AS
SELECT g.tier, g.block_start, g.period, g.block_start + u.bucket * g.resolution AS time, g.company, w.worker,
       u.count AS reports, codec_float(r.sum_kind, u.sum) > 0 AS busy
FROM rollup_block_groups AS g
JOIN stat_workers AS w ON w.id = g.worker
CROSS JOIN LATERAL rollup_group_lanes(g.lanes, false) AS r
CROSS JOIN LATERAL unnest(r.buckets, r.sums, r.counts) AS u (bucket, sum, count)
WHERE g.metric = 0;

DROP FUNCTION rollup_group_rows(bytea, boolean);
