-- Tenants, worker registrations and the statistics hypertable.
CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE companies (
    id   text PRIMARY KEY,
    name text NOT NULL
);

CREATE TABLE users (
    company text NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    id      text NOT NULL,
    name    text NOT NULL,
    PRIMARY KEY (company, id)
);

-- One row per registered worker. A row whose expires_at has passed is an expired
-- registration: never read, deleted by the expiry sweep. queues/tags/system_tags are
-- NULL when never set (read as empty lists).
CREATE TABLE worker_registrations (
    company            text        NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    worker             text        NOT NULL,
    user_id            text        NOT NULL,
    ip                 text,
    register_time      timestamptz NOT NULL,
    register_timeout   integer     NOT NULL,
    last_activity_time timestamptz NOT NULL,
    last_report_time   timestamptz,
    expires_at         timestamptz NOT NULL,
    task               text,
    queue              text,
    queues             text[],
    tags               text[],
    system_tags        text[],
    PRIMARY KEY (company, worker)
);
CREATE INDEX worker_registrations_expires_at ON worker_registrations (expires_at);

-- One row per status report; the report's values as
-- {"<metric>": {"<variant>": <value>, ...}, ...}, e.g.
-- {"cpu_usage": {"0": 12.5, "1": 80}, "memory_used": {"total": 2048}}.
-- A report without machine_stats is a row with '{}' (it still counts as activity).
CREATE TABLE worker_stats (
    time    timestamptz NOT NULL,
    company text        NOT NULL,
    worker  text        NOT NULL,
    task    text,
    metrics jsonb       NOT NULL
);
SELECT create_hypertable('worker_stats', by_range('time', INTERVAL '1 day'), create_default_indexes => false);
CREATE INDEX worker_stats_company_time ON worker_stats (company, time DESC);
CREATE INDEX worker_stats_company_worker_time ON worker_stats (company, worker, time DESC);

-- Grafana's interface (SPEC §4): every stored value as one point.
CREATE VIEW worker_stat_points AS
SELECT s.time,
       s.company,
       s.worker,
       s.task,
       split_part(m.metric, '_', 1) AS category,
       m.metric,
       v.variant,
       v.value::double precision AS value
FROM worker_stats AS s
CROSS JOIN LATERAL jsonb_each(s.metrics) AS m (metric, variants)
CROSS JOIN LATERAL jsonb_each(m.variants) AS v (variant, value);

-- Which metrics each worker has reported, so get_metric_keys need not scan the
-- hypertable. last_reported is refreshed at most hourly; retention deletes stale keys.
CREATE TABLE worker_metric_keys (
    company       text        NOT NULL,
    worker        text        NOT NULL,
    metric        text        NOT NULL,
    last_reported timestamptz NOT NULL,
    PRIMARY KEY (company, worker, metric)
);
CREATE INDEX worker_metric_keys_last_reported ON worker_metric_keys (last_reported);
