-- Read-only database roles for Grafana, one company each (`python -m server grafana-role`,
-- docs/grafana.md). A reader is a login role that is a member of the group role
-- `workers_grafana_readers`; `grafana_roles` says which company it reads. Row-level security
-- on every table behind the public views shows a reader the rows of its company alone, and a
-- reader mapped to no company nothing. Every other role reads as before: the tables' owner
-- (the server, which migrates them) bypasses row-level security, superusers always do, and
-- the policies let any role that is not a reader see every row.
--
-- TimescaleDB copies a hypertable's grants to its chunks but not its row-level security
-- (timescale/timescaledb#7830): a reader granted SELECT on a hypertable would read every
-- company's rows in its chunks (_timescaledb_internal.*). So readers are granted no
-- hypertable: the views read them through the `tenant_*` views below, owned by the NOLOGIN
-- role `workers_tenant_views`, which holds the hypertables' SELECT and of which nobody is a
-- member. A view reads its tables with its owner's privileges and under its owner's policies,
-- which here test the role running the query (current_user). The public views are
-- security_invoker, so the plain tables behind them are read as, and filtered for, the caller.
--
-- Roles belong to the cluster, not the database: both group roles are created when missing,
-- by whichever database migrates first, and shared. grafana_access_setup() does everything
-- that needs them; where the migrating role may not create roles or give views to
-- workers_tenant_views, the migration leaves readers unset (a notice says so) and
-- `grafana-role create`, run later by a role that may, calls it again.

-- A reader's company: the role names are the operator's, chosen with the CLI.
CREATE TABLE grafana_roles (
    role       text        PRIMARY KEY,
    company    text        NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The policies' questions about the role running the query. SQL-standard bodies: their
-- tables are bound now, so a temporary table of the caller's cannot stand in for them.
CREATE FUNCTION grafana_reader() RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN coalesce((SELECT NOT (r.rolsuper OR r.rolbypassrls) AND pg_has_role(r.oid, g.oid, 'MEMBER')
                 FROM pg_catalog.pg_roles AS r, pg_catalog.pg_roles AS g
                 WHERE r.rolname = current_user AND g.rolname = 'workers_grafana_readers'), false);

CREATE FUNCTION grafana_reader_company() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN (SELECT company FROM grafana_roles WHERE role = current_user);

CREATE FUNCTION grafana_reader_workers() RETURNS integer[]
LANGUAGE sql STABLE PARALLEL SAFE
RETURN ARRAY(SELECT id FROM stat_workers WHERE company = grafana_reader_company());

CREATE FUNCTION grafana_reader_metrics() RETURNS integer[]
LANGUAGE sql STABLE PARALLEL SAFE
RETURN ARRAY(SELECT id FROM stat_metrics WHERE company = grafana_reader_company());

-- Each role reads its own row of the mapping (a reader: which company it reads).
ALTER TABLE grafana_roles ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_row ON grafana_roles USING (role = current_user);
GRANT SELECT ON grafana_roles TO PUBLIC;

-- Everything a reader can reach holds its company's rows only. (The sub-selects run once per
-- query; for a role that is not a reader the first one is true and the rest never run.)
ALTER TABLE companies ENABLE ROW LEVEL SECURITY;
CREATE POLICY grafana_reader_company ON companies
    USING (NOT (SELECT grafana_reader()) OR id = (SELECT grafana_reader_company()));
ALTER TABLE worker_registrations ENABLE ROW LEVEL SECURITY;
CREATE POLICY grafana_reader_company ON worker_registrations
    USING (NOT (SELECT grafana_reader()) OR company = (SELECT grafana_reader_company()));
ALTER TABLE stat_workers ENABLE ROW LEVEL SECURITY;
CREATE POLICY grafana_reader_company ON stat_workers
    USING (NOT (SELECT grafana_reader()) OR company = (SELECT grafana_reader_company()));
ALTER TABLE stat_metrics ENABLE ROW LEVEL SECURITY;
CREATE POLICY grafana_reader_company ON stat_metrics
    USING (NOT (SELECT grafana_reader()) OR company = (SELECT grafana_reader_company()));
-- A layout holds metric ids of one company (or none: a report without values).
ALTER TABLE report_layouts ENABLE ROW LEVEL SECURITY;
CREATE POLICY grafana_reader_company ON report_layouts
    USING (NOT (SELECT grafana_reader()) OR metrics <@ (SELECT grafana_reader_metrics()));
ALTER TABLE late_reports ENABLE ROW LEVEL SECURITY;
CREATE POLICY grafana_reader_company ON late_reports
    USING (NOT (SELECT grafana_reader()) OR worker = ANY ((SELECT grafana_reader_workers())::integer[]));
-- The hypertables: applied when the tenant_* views read them as workers_tenant_views.
ALTER TABLE recent_reports ENABLE ROW LEVEL SECURITY;
CREATE POLICY grafana_reader_company ON recent_reports
    USING (NOT (SELECT grafana_reader()) OR worker = ANY ((SELECT grafana_reader_workers())::integer[]));
ALTER TABLE report_blocks ENABLE ROW LEVEL SECURITY;
CREATE POLICY grafana_reader_company ON report_blocks
    USING (NOT (SELECT grafana_reader()) OR worker = ANY ((SELECT grafana_reader_workers())::integer[]));
ALTER TABLE rollup_1m ENABLE ROW LEVEL SECURITY;
CREATE POLICY grafana_reader_company ON rollup_1m
    USING (NOT (SELECT grafana_reader()) OR company = (SELECT grafana_reader_company()));
ALTER TABLE rollup_10m ENABLE ROW LEVEL SECURITY;
CREATE POLICY grafana_reader_company ON rollup_10m
    USING (NOT (SELECT grafana_reader()) OR company = (SELECT grafana_reader_company()));
ALTER TABLE rollup_1h ENABLE ROW LEVEL SECURITY;
CREATE POLICY grafana_reader_company ON rollup_1h
    USING (NOT (SELECT grafana_reader()) OR company = (SELECT grafana_reader_company()));

-- The hypertables as the views read them (owned by workers_tenant_views once set up).
CREATE VIEW tenant_recent_reports AS SELECT * FROM recent_reports;
CREATE VIEW tenant_report_blocks AS SELECT * FROM report_blocks;
CREATE VIEW tenant_rollup_1m AS SELECT * FROM rollup_1m;
CREATE VIEW tenant_rollup_10m AS SELECT * FROM rollup_10m;
CREATE VIEW tenant_rollup_1h AS SELECT * FROM rollup_1h;

-- The views and the function that read hypertables, as before (006) but through tenant_*.
CREATE OR REPLACE VIEW rollup_block_groups WITH (security_invoker = true) AS
SELECT b.tier, b.resolution, b.period, b.start AS block_start, b.company, b.metric, g.worker,
       substring(b.data FROM g.lane + 1 FOR coalesce(b.offsets[g.i + 1], octet_length(b.data)) - g.lane) AS lanes
FROM (SELECT '1m'::text AS tier, interval '1 minute' AS resolution, interval '1 hour' AS period, * FROM tenant_rollup_1m
      UNION ALL
      SELECT '10m', interval '10 minutes', interval '1 day', * FROM tenant_rollup_10m
      UNION ALL
      SELECT '1h', interval '1 hour', interval '7 days', * FROM tenant_rollup_1h) AS b
CROSS JOIN LATERAL unnest(b.workers, b.offsets) WITH ORDINALITY AS g (worker, lane, i);

CREATE OR REPLACE VIEW worker_stat_points WITH (security_invoker = true) AS
SELECT r.time, w.company, w.worker, r.task, split_part(m.name, '_', 1) AS category, m.name AS metric,
       variant_name(l.variants[i]) AS variant, r.values[i] AS value
FROM (SELECT time, worker, layout, task, report_values(values) AS values FROM tenant_recent_reports
      UNION ALL
      SELECT time, worker, layout, task, report_values(values) FROM late_reports) AS r
JOIN stat_workers AS w ON w.id = r.worker
JOIN report_layouts AS l ON l.id = r.layout
CROSS JOIN LATERAL generate_subscripts(r.values, 1) AS i
JOIN stat_metrics AS m ON m.id = l.metrics[i]
UNION ALL
SELECT p.at, w.company, w.worker, b.tasks[p.task], split_part(m.name, '_', 1), m.name, variant_name(p.variant), p.value
FROM tenant_report_blocks AS b
JOIN stat_workers AS w ON w.id = b.worker
CROSS JOIN LATERAL report_block_points(b.data) AS p
JOIN stat_metrics AS m ON m.id = p.metric;

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
JOIN stat_metrics AS m ON m.id = l.metrics[i]
UNION ALL
SELECT p.at, w.company, w.worker, b.tasks[p.task], split_part(m.name, '_', 1), m.name, variant_name(p.variant), p.value
FROM tenant_report_blocks AS b
JOIN stat_workers AS w ON w.id = b.worker
CROSS JOIN LATERAL report_block_points(b.data) AS p
JOIN stat_metrics AS m ON m.id = p.metric
WHERE b.start > since - interval '1 hour' AND b.start <= until AND p.at BETWEEN since AND until
$$;

CREATE OR REPLACE VIEW worker_stats WITH (security_invoker = true) AS
SELECT r.time, w.company, w.worker, r.task, report_metrics(r.layout, report_values(r.values)) AS metrics
FROM (SELECT * FROM tenant_recent_reports UNION ALL SELECT * FROM late_reports) AS r
JOIN stat_workers AS w ON w.id = r.worker
UNION ALL
SELECT p.at, w.company, w.worker, b.tasks[p.task], p.metrics
FROM tenant_report_blocks AS b
JOIN stat_workers AS w ON w.id = b.worker
CROSS JOIN LATERAL report_block_reports(b.data) AS p;

-- The other views read as their caller too.
ALTER VIEW rollup_metric_rows SET (security_invoker = true);
ALTER VIEW rollup_variant_rows SET (security_invoker = true);
ALTER VIEW rollup_activity_rows SET (security_invoker = true);
ALTER VIEW worker_metric_rollup_1m SET (security_invoker = true);
ALTER VIEW worker_metric_rollup_10m SET (security_invoker = true);
ALTER VIEW worker_metric_rollup_1h SET (security_invoker = true);
ALTER VIEW worker_stat_rollup_1m SET (security_invoker = true);
ALTER VIEW worker_stat_rollup_10m SET (security_invoker = true);
ALTER VIEW worker_stat_rollup_1h SET (security_invoker = true);
ALTER VIEW worker_activity_1m SET (security_invoker = true);
ALTER VIEW worker_activity_10m SET (security_invoker = true);
ALTER VIEW worker_activity_1h SET (security_invoker = true);

-- The roles and privileges (idempotent). A later migration that adds something Grafana reads
-- grants it here (CREATE OR REPLACE) and calls this again.
CREATE FUNCTION grafana_access_setup() RETURNS void
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
        'worker_activity_1m', 'worker_activity_10m', 'worker_activity_1h'
    ] LOOP
        IF NOT has_table_privilege('workers_grafana_readers', to_regclass(name), 'SELECT') THEN
            EXECUTE format('GRANT SELECT ON %I TO workers_grafana_readers', name);
        END IF;
    END LOOP;
END $$;
REVOKE EXECUTE ON FUNCTION grafana_access_setup() FROM PUBLIC;

DO $$
BEGIN
    PERFORM grafana_access_setup();
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'Grafana reader roles not set up: %. Run `python -m server grafana-role create` once '
                 'as a role that may create roles and own views (a superuser).', SQLERRM;
END $$;
