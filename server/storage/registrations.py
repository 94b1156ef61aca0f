"""SQL of the `worker_registrations` table: every statement that touches it is here.

Times are the database's clock (`now()`), so several servers agree on expiry. A row whose
`expires_at` has passed is treated as absent by every read, before the sweep deletes it.
"""

from dataclasses import dataclass

import asyncpg

_COLUMNS = """company, worker, user_id, ip, register_time, register_timeout, last_activity_time,
    last_report_time, expires_at, task, queue, queues, tags, system_tags"""

_REGISTER = f"""
INSERT INTO worker_registrations AS w ({_COLUMNS})
VALUES ($1, $2, $3, $4, now(), $5::integer, now(), NULL, now() + make_interval(secs => $5::integer), NULL, NULL, $6, $7, $8)
ON CONFLICT (company, worker) DO UPDATE SET
    user_id = EXCLUDED.user_id,
    ip = EXCLUDED.ip,
    register_time = EXCLUDED.register_time,
    register_timeout = EXCLUDED.register_timeout,
    last_activity_time = EXCLUDED.last_activity_time,
    last_report_time = NULL,
    expires_at = EXCLUDED.expires_at,
    task = NULL,
    queue = NULL,
    queues = EXCLUDED.queues,
    tags = EXCLUDED.tags,
    system_tags = EXCLUDED.system_tags,
    report_period = NULL,
    gpu_idle_since = NULL,
    cpu_usage = NULL,
    gpu_usage = NULL,
    cpu_cores = NULL,
    memory_total = NULL
"""

# Part of the batching writer's statement: `$1` is a jsonb array of one entry per
# (company, worker), sorted by that key so that concurrent writers lock rows in the same
# order. A report refreshes a live registration; an unknown or expired one is (re)created
# with the report's timeout. queues/tags/system_tags are null in an entry when the report
# did not send them: kept as they are. Entries of reports that do not register (a bulk import
# of history) are skipped.
#
# `cores` and `memory` (migrations/013: what get_queues answers for now) are those of the last
# report that had them.
#
# The health columns (migrations/012, docs/health.md), from the entry's `gpu_busy` (per GPU
# index: at or above the idle threshold; null where the report has no value), `cpu` and `gpu`
# (the report's mean usage, null without one) and `$8`, the usage means' time constant in
# seconds. The gap since the last report moves report_period a quarter of the way (the gap of
# a live registration is within its timeout: an expired one starts afresh). gpu_idle_since
# takes the usual reports (every GPU below the threshold, as before, or every one busy) with
# builtins, and calls a function only when some GPUs are busy and others not.
REPORTS_UPSERT = f"""
INSERT INTO worker_registrations AS w ({_COLUMNS}, gpu_idle_since, cpu_usage, gpu_usage, cpu_cores, memory_total)
SELECT r.company, r.worker, r.user_id, r.ip, now(), r.timeout, now(), now(),
       now() + make_interval(secs => r.timeout), r.task, r.queue, r.queues, r.tags, r.system_tags,
       CASE
           WHEN r.gpu_busy IS NULL THEN NULL
           WHEN false = ALL (r.gpu_busy) THEN array_fill(now(), ARRAY[cardinality(r.gpu_busy)])
           WHEN true = ALL (r.gpu_busy) THEN array_fill(NULL::timestamptz, ARRAY[cardinality(r.gpu_busy)])
           ELSE gpu_idle_since(NULL, r.gpu_busy, now())
       END,
       r.cpu, r.gpu, r.cores, r.memory
FROM jsonb_to_recordset($1::jsonb) AS r (
    company text, worker text, user_id text, ip text, timeout integer,
    task text, queue text, queues text[], tags text[], system_tags text[], register boolean,
    gpu_busy boolean[], cpu float8, gpu float8, cores integer, memory float8)
WHERE r.register
ORDER BY r.company, r.worker
ON CONFLICT (company, worker) DO UPDATE SET
    user_id = CASE WHEN w.expires_at > now() THEN w.user_id ELSE EXCLUDED.user_id END,
    ip = EXCLUDED.ip,
    register_time = CASE WHEN w.expires_at > now() THEN w.register_time ELSE now() END,
    register_timeout = CASE WHEN w.expires_at > now() THEN w.register_timeout ELSE EXCLUDED.register_timeout END,
    last_activity_time = now(),
    last_report_time = now(),
    expires_at = now() + make_interval(
        secs => CASE WHEN w.expires_at > now() THEN w.register_timeout ELSE EXCLUDED.register_timeout END),
    task = EXCLUDED.task,
    queue = EXCLUDED.queue,
    queues = coalesce(EXCLUDED.queues, CASE WHEN w.expires_at > now() THEN w.queues END),
    tags = coalesce(EXCLUDED.tags, CASE WHEN w.expires_at > now() THEN w.tags END),
    system_tags = coalesce(EXCLUDED.system_tags, CASE WHEN w.expires_at > now() THEN w.system_tags END),
    report_period = CASE WHEN w.expires_at > now() THEN coalesce(
        0.75 * w.report_period + 0.25 * extract(epoch FROM now() - w.last_report_time),
        extract(epoch FROM now() - w.last_report_time)) END,
    gpu_idle_since = CASE
        WHEN w.expires_at <= now() THEN EXCLUDED.gpu_idle_since
        WHEN EXCLUDED.gpu_idle_since IS NULL THEN w.gpu_idle_since
        -- every GPU busy (or without a value)
        WHEN array_position(EXCLUDED.gpu_idle_since, now()) IS NULL THEN EXCLUDED.gpu_idle_since
        -- the same GPUs, every one below the threshold now and before
        WHEN cardinality(w.gpu_idle_since) = cardinality(EXCLUDED.gpu_idle_since)
             AND array_position(w.gpu_idle_since, NULL) IS NULL
             AND array_position(EXCLUDED.gpu_idle_since, NULL) IS NULL THEN w.gpu_idle_since
        ELSE gpu_idle_since_merge(w.gpu_idle_since, EXCLUDED.gpu_idle_since)
    END,
    cpu_usage = CASE WHEN w.expires_at > now()
        THEN time_weighted_mean(w.cpu_usage, EXCLUDED.cpu_usage, extract(epoch FROM now() - w.last_report_time), $8)
        ELSE EXCLUDED.cpu_usage END,
    gpu_usage = CASE WHEN w.expires_at > now()
        THEN time_weighted_mean(w.gpu_usage, EXCLUDED.gpu_usage, extract(epoch FROM now() - w.last_report_time), $8)
        ELSE EXCLUDED.gpu_usage END,
    cpu_cores = coalesce(EXCLUDED.cpu_cores, CASE WHEN w.expires_at > now() THEN w.cpu_cores END),
    memory_total = coalesce(EXCLUDED.memory_total, CASE WHEN w.expires_at > now() THEN w.memory_total END)
"""

_UNREGISTER = """
DELETE FROM worker_registrations WHERE company = $1 AND worker = $2
RETURNING expires_at > now() AS live
"""

_IS_REGISTERED = """
SELECT EXISTS (
    SELECT 1 FROM worker_registrations WHERE company = $1 AND worker = $2 AND expires_at > now())
"""

# $1 company, $2 last_seen seconds (0: any), $3/$4 tags to include/exclude,
# $5/$6 system tags to include/exclude, $7 LIKE pattern or NULL.
_FILTER = """
r.company = $1
AND r.expires_at > now()
AND ($2::integer = 0 OR r.last_activity_time >= now() - make_interval(secs => $2::integer))
AND (cardinality($3::text[]) = 0 OR r.tags && $3::text[])
AND NOT (coalesce(r.tags, '{}') && $4::text[])
AND (cardinality($5::text[]) = 0 OR r.system_tags && $5::text[])
AND NOT (coalesce(r.system_tags, '{}') && $6::text[])
AND ($7::text IS NULL OR r.worker LIKE $7::text)
"""

_WORKER_COLUMNS = """r.worker, r.ip, r.register_time, r.register_timeout, r.last_activity_time,
       r.last_report_time, r.task, r.queue,
       coalesce(r.queues, '{}') AS queues,
       coalesce(r.tags, '{}') AS tags,
       coalesce(r.system_tags, '{}') AS system_tags,
       r.company, c.name AS company_name, r.user_id, u.name AS user_name"""

_FIND = f"""
SELECT {_WORKER_COLUMNS}
FROM worker_registrations AS r
JOIN companies AS c ON c.id = r.company
LEFT JOIN users AS u ON u.company = r.company AND u.id = r.user_id
WHERE {_FILTER}
ORDER BY r.worker
"""

# With each worker's health (migrations/012): $8 silent periods, $9 idle GPU minutes.
_FIND_WITH_HEALTH = f"""
SELECT {_WORKER_COLUMNS},
       h.report_period, h.silent_since, h.silent, h.cpu_usage, h.gpu_usage, h.gpu_idle_since, h.gpu_idle
FROM worker_registrations AS r
JOIN companies AS c ON c.id = r.company
LEFT JOIN users AS u ON u.company = r.company AND u.id = r.user_id
JOIN worker_health($8, $9) AS h ON h.company = r.company AND h.worker = r.worker
WHERE {_FILTER}
ORDER BY r.worker
"""

_COUNT = f"SELECT count(*) FROM worker_registrations AS r WHERE {_FILTER}"

# The tasks and queues (`queue` and `queues`) the matching workers name, each once.
_NAMED_IDS = f"""
WITH listed AS (SELECT r.task, r.queue, r.queues FROM worker_registrations AS r WHERE {_FILTER})
SELECT ARRAY(SELECT DISTINCT task FROM listed WHERE task <> '' ORDER BY 1) AS tasks,
       ARRAY(SELECT DISTINCT named.queue
             FROM (SELECT queue FROM listed UNION ALL SELECT unnest(queues) FROM listed) AS named
             WHERE named.queue <> '' ORDER BY 1) AS queues
"""

# Per queue the company's live workers listen to (their registration's `queues` and `queue`,
# each once): the workers, those with a task and those without, and their cores, GPUs and
# memory (migrations/012 and 013; a worker without them counts 0).
_QUEUES_NOW = """
SELECT q.queue, r.task IS NOT NULL AND r.task <> '' AS busy, count(*)::integer AS workers,
       coalesce(sum(r.cpu_cores), 0)::bigint AS cores,
       coalesce(sum(cardinality(r.gpu_idle_since)), 0)::bigint AS gpus,
       coalesce(sum(r.memory_total), 0)::float8 AS memory
FROM worker_registrations AS r
CROSS JOIN LATERAL (SELECT DISTINCT n.queue FROM unnest(array_append(r.queues, r.queue)) AS n (queue)
                    WHERE n.queue <> '') AS q
WHERE r.company = $1 AND r.expires_at > now()
GROUP BY 1, 2
ORDER BY 1, 2
"""

_DELETE_EXPIRED = "DELETE FROM worker_registrations WHERE expires_at <= now()"

# Per company with live registrations: live and silent workers, their GPUs and the idle ones
# ($1 silent periods, $2 idle GPU minutes).
_HEALTH_COUNTS = """
SELECT company, count(*)::integer AS live, count(*) FILTER (WHERE silent)::integer AS silent,
       sum(cardinality(gpu_idle))::integer AS gpus,
       sum(cardinality(array_positions(gpu_idle, true)))::integer AS idle_gpus
FROM worker_health($1, $2)
GROUP BY company
ORDER BY company
"""


@dataclass(frozen=True)
class WorkerFilter:
    last_seen: int = 0
    include_tags: tuple[str, ...] = ()
    exclude_tags: tuple[str, ...] = ()
    include_system_tags: tuple[str, ...] = ()
    exclude_system_tags: tuple[str, ...] = ()
    like_pattern: str | None = None

    def arguments(self) -> tuple:
        return (
            self.last_seen,
            list(self.include_tags),
            list(self.exclude_tags),
            list(self.include_system_tags),
            list(self.exclude_system_tags),
            self.like_pattern,
        )


def glob_to_like(pattern: str) -> str:
    """`*` and `?` globs as a LIKE pattern matching the whole id; LIKE's own wildcards escaped."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


async def register(
    db,
    company: str,
    worker: str,
    *,
    user: str,
    ip: str | None,
    timeout: int,
    queues: list[str] | None,
    tags: list[str] | None,
    system_tags: list[str] | None,
) -> None:
    await db.execute(_REGISTER, company, worker, user, ip, timeout, queues, tags, system_tags)


async def unregister(db, company: str, worker: str) -> bool:
    """Delete the registration; True when a live one existed."""
    return bool(await db.fetchval(_UNREGISTER, company, worker))


async def is_registered(db, company: str, worker: str) -> bool:
    return await db.fetchval(_IS_REGISTERED, company, worker)


@dataclass(frozen=True)
class HealthRules:
    """When a worker is silent and a GPU idle (docs/health.md)."""

    silent_periods: float = 3.0
    idle_gpu_minutes: float = 30.0


async def find(db, company: str, where: WorkerFilter, health: HealthRules | None = None) -> list[asyncpg.Record]:
    """The matching workers; with `health`, each with its health columns too."""
    if health is None:
        return await db.fetch(_FIND, company, *where.arguments())
    return await db.fetch(
        _FIND_WITH_HEALTH, company, *where.arguments(), health.silent_periods, health.idle_gpu_minutes
    )


async def count(db, company: str, where: WorkerFilter) -> int:
    return await db.fetchval(_COUNT, company, *where.arguments())


async def named_ids(db, company: str, where: WorkerFilter) -> tuple[list[str], list[str]]:
    """The ids of the tasks and of the queues that the workers `find` lists name."""
    row = await db.fetchrow(_NAMED_IDS, company, *where.arguments())
    return row["tasks"], row["queues"]


async def queues_now(db, company: str) -> list[asyncpg.Record]:
    """Per queue the company's live workers listen to, and busy or not: the workers and their
    cores, GPUs and memory (queue, busy, workers, cores, gpus, memory)."""
    return await db.fetch(_QUEUES_NOW, company)


async def health_counts(db, health: HealthRules) -> list[asyncpg.Record]:
    """Per company with live registrations: `company`, `live`, `silent`, `gpus`, `idle_gpus`."""
    return await db.fetch(_HEALTH_COUNTS, health.silent_periods, health.idle_gpu_minutes)


async def delete_expired(db) -> int:
    status = await db.execute(_DELETE_EXPIRED)
    return int(status.split()[-1])
