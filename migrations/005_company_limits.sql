-- Per-company overrides of the limits' defaults (WORKERS_COMPANY_*), set by
-- `python -m server companies set`. NULL keeps the default; 0 is no limit.
CREATE TABLE company_limits (
    company            text             PRIMARY KEY REFERENCES companies (id) ON DELETE CASCADE,
    workers            integer          CHECK (workers >= 0),
    metric_keys        integer          CHECK (metric_keys >= 0),
    reports_per_second double precision CHECK (reports_per_second >= 0),
    burst              double precision CHECK (burst >= 0),  -- reports; NULL: the default seconds of the rate
    updated_at         timestamptz      NOT NULL DEFAULT now()
);
