-- Silent workers and idle GPUs (docs/health.md). What a read needs is kept up to date by the
-- status reports' upsert of the registration (server/storage/registrations.py), so that no
-- read scans the reports' history:
--   report_period   an exponentially weighted mean of the gaps between the worker's reports
--                   (seconds, the database's clock; NULL before its second report);
--   gpu_seen_since  per GPU index (1-based), since when the worker reports that GPU;
--   gpu_busy_at     per GPU index, its last report at or above WORKERS_IDLE_GPU_PERCENT;
--   cpu_usage, gpu_usage  the report's mean over cores / GPUs, averaged over the recent
--                   reports with a time constant of WORKERS_UTILISATION_MINUTES.
-- A new or renewed registration starts them afresh. No index covers them: the updates stay HOT.
ALTER TABLE worker_registrations
    ADD COLUMN report_period double precision,
    ADD COLUMN gpu_seen_since timestamptz[],
    ADD COLUMN gpu_busy_at timestamptz[],
    ADD COLUMN cpu_usage double precision,
    ADD COLUMN gpu_usage double precision;

-- Per GPU of a report (`gpus` of them): `first`'s time, or `second`'s where that is null.
CREATE FUNCTION gpu_times_merge(first timestamptz[], second timestamptz[], gpus integer) RETURNS timestamptz[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY(SELECT coalesce(first[i], second[i]) FROM generate_series(1, gpus) AS i ORDER BY i);

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
-- `silent_periods` of its report periods (from `silent_since` on); never before its period is
-- known. The server, its /metrics and the Grafana alert rules all read it.
CREATE FUNCTION worker_health(silent_periods float8)
RETURNS TABLE (company text, worker text, last_report_time timestamptz, report_period float8,
               silent_since timestamptz, silent boolean, cpu_usage float8, gpu_usage float8,
               gpu_seen_since timestamptz[], gpu_busy_at timestamptz[])
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT r.company, r.worker, r.last_report_time, r.report_period, s.since, coalesce(s.since < now(), false),
       r.cpu_usage, r.gpu_usage, r.gpu_seen_since, r.gpu_busy_at
FROM worker_registrations AS r
CROSS JOIN LATERAL (SELECT r.last_report_time + make_interval(secs => silent_periods * r.report_period)) AS s (since)
WHERE r.expires_at > now()
$$;

-- Each GPU of a live registration (`gpu` counts from 0, as the reports' lists do): below the
-- idle threshold in every report since `below_threshold_since` (its last report at or above
-- it, or the first that had it); `idle` when that is at least `idle_gpu_minutes` ago and the
-- worker is not silent (of a silent worker's GPUs nothing is known since its last report).
CREATE FUNCTION worker_gpu_health(silent_periods float8, idle_gpu_minutes float8)
RETURNS TABLE (company text, worker text, gpu integer, below_threshold_since timestamptz, idle boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT h.company, h.worker, g.i::integer - 1, greatest(g.seen_since, g.busy_at),
       h.report_period IS NOT NULL AND NOT h.silent
           AND greatest(g.seen_since, g.busy_at) <= now() - make_interval(secs => idle_gpu_minutes * 60)
FROM worker_health(silent_periods) AS h
CROSS JOIN LATERAL unnest(h.gpu_seen_since, h.gpu_busy_at) WITH ORDINALITY AS g (seen_since, busy_at, i)
WHERE g.seen_since IS NOT NULL
$$;
