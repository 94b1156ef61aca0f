-- A report sent again (its answer lost after the commit: an API host killed, a proxy's retry)
-- is stored once. Identical reports: the same worker, time, layout, task and values; two
-- different reports at the same time are both kept. The writer inserts ON CONFLICT DO NOTHING
-- (storage/statistics.py).

-- The values and the task as one 16-byte digest: a report may have thousands of values, too
-- many for a btree's row. A NULL task and an empty one are the same here (the writer stores
-- an empty task as NULL).
CREATE FUNCTION report_digest(packed bytea, task text) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT decode(md5(packed || decode(md5(coalesce(task, '')), 'hex')), 'hex')
$$;

-- Copies stored before this migration: one of each kept.
DELETE FROM recent_reports AS a USING recent_reports AS b
WHERE a.worker = b.worker AND a.time = b.time AND a.layout = b.layout AND a.values = b.values
  AND a.task IS NOT DISTINCT FROM b.task AND a.ctid > b.ctid;
DELETE FROM late_reports AS a USING late_reports AS b
WHERE a.worker = b.worker AND a.time = b.time AND a.layout = b.layout AND a.values = b.values
  AND a.task IS NOT DISTINCT FROM b.task AND a.ctid > b.ctid;

-- In place of the (worker, time) indexes, which they serve as well (their leading columns).
-- A unique index of a hypertable holds its time column: TimescaleDB checks uniqueness per chunk.
CREATE UNIQUE INDEX recent_reports_once ON recent_reports (worker, time, layout, report_digest(values, task));
DROP INDEX recent_reports_worker_time;
CREATE UNIQUE INDEX late_reports_once ON late_reports (worker, time, layout, report_digest(values, task));
DROP INDEX late_reports_worker_time;
