-- Silent workers and idle GPUs (docs/health.md). What a read needs is kept up to date by the
-- status reports' upsert of the registration (server/storage/registrations.py), so that no
-- read scans the reports' history:
--   report_period   an exponentially weighted mean of the gaps between the worker's reports
--                   (seconds, the database's clock; NULL before its second report);
--   gpu_idle_since  per GPU of its last report (1-based), since when every report has had it
--                   below WORKERS_IDLE_GPU_PERCENT; NULL where the last report had it at or
--                   above (or no value for it);
--   cpu_usage, gpu_usage  the report's mean over cores / GPUs, averaged over the recent
--                   reports with a time constant of WORKERS_UTILISATION_MINUTES.
-- A new or renewed registration starts them afresh. No index covers them: the updates stay HOT.
ALTER TABLE worker_registrations
    ADD COLUMN report_period double precision,
    ADD COLUMN gpu_idle_since timestamptz[],
    ADD COLUMN cpu_usage double precision,
    ADD COLUMN gpu_usage double precision;

-- gpu_idle_since after a report whose GPUs are `busy` (at or above the threshold; NULL: no
-- value), at `at`, of a worker whose array was `kept`. The upsert calls these two only when its
-- GPUs are partly busy: when all are busy or all below, arrays of builtins do.
CREATE FUNCTION gpu_idle_since(kept timestamptz[], busy boolean[], at timestamptz) RETURNS timestamptz[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    since timestamptz[] := array_fill(NULL::timestamptz, ARRAY[cardinality(busy)]);
BEGIN
    FOR i IN 1 .. cardinality(busy) LOOP
        IF NOT busy[i] THEN
            since[i] := coalesce(kept[i], at);
        END IF;
    END LOOP;
    RETURN since;
END $$;

-- The same from the array a report would start with (`reported`: its time where a GPU is below
-- the threshold, NULL elsewhere): `kept`'s time where both have one.
CREATE FUNCTION gpu_idle_since_merge(kept timestamptz[], reported timestamptz[]) RETURNS timestamptz[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    since timestamptz[] := reported;
BEGIN
    FOR i IN 1 .. cardinality(reported) LOOP
        IF reported[i] IS NOT NULL AND kept[i] IS NOT NULL THEN
            since[i] := kept[i];
        END IF;
    END LOOP;
    RETURN since;
END $$;

-- A mean over time moved towards `sample`, which stands for the `seconds` since the last one:
-- the older mean keeps the weight exp(-seconds / tau). `sample` alone when there is no mean yet.
CREATE FUNCTION time_weighted_mean(mean float8, sample float8, seconds float8, tau float8) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN sample IS NULL THEN mean
    WHEN mean IS NULL OR seconds IS NULL THEN sample
    -- exp() of less than about -745 is an underflow error, not 0
    ELSE sample + (mean - sample) * exp(-least(greatest(seconds, 0) / tau, 50))
END;

-- Each live registration's health: `silent` when its last report is older than
-- `silent_periods` of its report periods (from `silent_since` on), never before its period is
-- known; per GPU of its last report (`gpu_idle_since`'s order), `gpu_idle` when every report
-- of the last `idle_gpu_minutes` had it below the threshold and the worker is not silent (of a
-- silent worker's GPUs nothing is known since its last report). The server, its /metrics and
-- the Grafana alert rules all read it, or worker_gpu_health below.
CREATE FUNCTION worker_health(silent_periods float8, idle_gpu_minutes float8)
RETURNS TABLE (company text, worker text, last_report_time timestamptz, report_period float8,
               silent_since timestamptz, silent boolean, cpu_usage float8, gpu_usage float8,
               gpu_idle_since timestamptz[], gpu_idle boolean[])
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT r.company, r.worker, r.last_report_time, r.report_period, s.since, s.silent, r.cpu_usage, r.gpu_usage,
       coalesce(r.gpu_idle_since, '{}'),
       ARRAY(SELECT coalesce(NOT s.silent AND r.report_period IS NOT NULL
                             AND g.since <= now() - make_interval(secs => idle_gpu_minutes * 60), false)
             FROM unnest(r.gpu_idle_since) WITH ORDINALITY AS g (since, i) ORDER BY g.i)
FROM worker_registrations AS r
CROSS JOIN LATERAL (
    SELECT t.since, coalesce(t.since < now(), false)
    FROM (SELECT r.last_report_time + make_interval(secs => silent_periods * r.report_period)) AS t (since)
) AS s (since, silent)
WHERE r.expires_at > now()
$$;

-- A row per GPU of worker_health's (`gpu` counts from 0, as the reports' lists do): below the
-- idle threshold in every report since `below_threshold_since` (NULL: not in the last one).
CREATE FUNCTION worker_gpu_health(silent_periods float8, idle_gpu_minutes float8)
RETURNS TABLE (company text, worker text, gpu integer, below_threshold_since timestamptz, idle boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT h.company, h.worker, g.i::integer - 1, g.since, g.idle
FROM worker_health(silent_periods, idle_gpu_minutes) AS h
CROSS JOIN LATERAL unnest(h.gpu_idle_since, h.gpu_idle) WITH ORDINALITY AS g (since, idle, i)
$$;
