"""SQL of the dictionaries the statistics tables refer to (`stat_workers`, `stat_metrics`,
`report_layouts`), and a cache of their ids.

A metric's `kind` (migrations/013) is METRIC (a key of machine_stats) or QUEUE (a queue
pseudo-metric, named after its queue, docs/queues.md); names are unique per company and kind.
In a layout key and in this cache a queue pseudo-metric is the pair `queue_metric(name)`, a
metric its name.

A report's layout is the order of its values: metric after metric, each metric's variants in
order, as (metric id, variant code) pairs (storage/blocks.py: -1 is "total", i is "i").
Ids are made on first sight, by any process or host at once: `ON CONFLICT DO UPDATE` returns
the row whoever inserted it (DO NOTHING would return nothing for a row another transaction
has just committed).
"""

from .blocks import variant_code

_WORKER_IDS = """
INSERT INTO stat_workers AS w (company, worker)
SELECT * FROM unnest($1::text[], $2::text[]) ORDER BY 1, 2
ON CONFLICT (company, worker) DO UPDATE SET company = EXCLUDED.company
RETURNING w.id, w.company, w.worker
"""

_METRIC_IDS = """
INSERT INTO stat_metrics AS m (company, kind, name)
SELECT * FROM unnest($1::text[], $2::smallint[], $3::text[]) ORDER BY 1, 2, 3
ON CONFLICT (company, kind, name) DO UPDATE SET company = EXCLUDED.company
RETURNING m.id, m.company, m.kind, m.name
"""

# $1: each layout's metric ids and variants, as text arrays ('{1,1,2}'), in pairs.
_LAYOUT_IDS = """
INSERT INTO report_layouts AS l (metrics, variants)
SELECT m::integer[], v::integer[] FROM unnest($1::text[], $2::text[]) AS u (m, v) ORDER BY 1, 2
ON CONFLICT ((layout_digest(metrics, variants))) DO UPDATE SET metrics = EXCLUDED.metrics
RETURNING l.id, l.metrics, l.variants
"""

_LAYOUTS = "SELECT id, metrics, variants FROM report_layouts WHERE id = ANY($1::integer[])"
_WORKERS_BY_ID = "SELECT id, company, worker FROM stat_workers WHERE id = ANY($1::integer[])"
_WORKERS_OF_COMPANY = "SELECT id, worker FROM stat_workers WHERE company = $1"
_METRICS_BY_NAME = "SELECT id, name FROM stat_metrics WHERE company = $1 AND kind = $3 AND name = ANY($2::text[])"
_QUEUES_OF_COMPANY = "SELECT id, name FROM stat_metrics WHERE company = $1 AND kind = 1"
# (Written to read a schema before migration 013 too, where there are no queues: migration 007
# stores rollups through this code.)
_QUEUE_METRICS = "SELECT id FROM stat_metrics AS m WHERE id = ANY($1::integer[]) AND to_jsonb(m) ->> 'kind' = '1'"
# Migration 007 makes metric ids through this code, on the schema of its time (no `kind`).
_HAS_KINDS = """
SELECT EXISTS (SELECT FROM pg_attribute
               WHERE attrelid = 'stat_metrics'::regclass AND attname = 'kind' AND NOT attisdropped)
"""
_METRIC_IDS_BEFORE_KINDS = """
INSERT INTO stat_metrics AS m (company, name)
SELECT u.company, u.name FROM unnest($1::text[], $2::smallint[], $3::text[]) AS u (company, kind, name) ORDER BY 1, 2
ON CONFLICT (company, name) DO UPDATE SET company = EXCLUDED.company
RETURNING m.id, m.company, 0 AS kind, m.name
"""
_METRICS_BY_ID = "SELECT id, company, name FROM stat_metrics WHERE id = ANY($1::integer[])"

METRIC, QUEUE = 0, 1  # stat_metrics.kind


def queue_metric(queue: str) -> tuple[int, str]:
    """A queue pseudo-metric, as layout keys and the cache name it."""
    return (QUEUE, queue)


def _kind_and_name(metric) -> tuple[int, str]:
    return metric if isinstance(metric, tuple) else (METRIC, metric)


# A cache this large is emptied and refilled: each entry is one lookup to make again.
CACHE_LIMIT = 500_000


def layout_key(metrics: dict) -> tuple:
    """The layout of a report's values `{metric: {variant: value}}`, in their order."""
    return tuple((metric, tuple(variants)) for metric, variants in metrics.items())


class Ids:
    """Ids of workers, metrics and layouts, made when first needed and kept in this process."""

    def __init__(self):
        self._workers: dict[tuple[str, str], int] = {}
        self._metrics: dict[tuple[str, str], int] = {}
        self._layouts: dict[tuple[str, tuple], int] = {}
        self._kinds: bool | None = None  # whether stat_metrics has `kind` (migration 013)

    def worker(self, company: str, worker: str) -> int | None:
        return self._workers.get((company, worker))

    def layout(self, company: str, key: tuple) -> int | None:
        return self._layouts.get((company, key))

    async def metrics(self, db, company: str, names) -> dict:
        """Ids of the company's metrics of these names (a name, or `queue_metric(queue)`),
        made when new."""
        missing = sorted({_kind_and_name(name) for name in names if (company, name) not in self._metrics})
        if missing:
            if self._kinds is None:
                self._kinds = await db.fetchval(_HAS_KINDS)
            statement = _METRIC_IDS if self._kinds else _METRIC_IDS_BEFORE_KINDS
            rows = await db.fetch(statement, [company] * len(missing), [k for k, _ in missing], [n for _, n in missing])
            for row in rows:
                name = row["name"] if row["kind"] == METRIC else (row["kind"], row["name"])
                self._metrics[(row["company"], name)] = row["id"]
        return {name: self._metrics[(company, name)] for name in names}

    async def make(self, db, workers: set[tuple[str, str]], layouts: set[tuple[str, tuple]]) -> None:
        """Find or make the ids of these (company, worker) pairs and (company, layout key)
        pairs that the cache does not know."""
        workers = sorted(pair for pair in workers if pair not in self._workers)
        layouts = [pair for pair in layouts if pair not in self._layouts]
        for cache in (self._workers, self._metrics, self._layouts):
            if len(cache) > CACHE_LIMIT:
                cache.clear()
        if workers:
            rows = await db.fetch(_WORKER_IDS, [c for c, _ in workers], [w for _, w in workers])
            self._workers.update(((row["company"], row["worker"]), row["id"]) for row in rows)
        if not layouts:
            return
        for company in {company for company, _ in layouts}:
            await self.metrics(db, company, {metric for c, key in layouts if c == company for metric, _ in key})
        shapes = {}
        for company, key in layouts:
            metric_ids, variant_codes = [], []
            for metric, variants in key:
                metric_id = self._metrics[(company, metric)]
                for variant in variants:
                    metric_ids.append(metric_id)
                    variant_codes.append(variant_code(variant))
            shapes[(company, key)] = (metric_ids, variant_codes)
        texts = {pair: (_array_text(m), _array_text(v)) for pair, (m, v) in shapes.items()}
        rows = await db.fetch(_LAYOUT_IDS, [m for m, _ in texts.values()], [v for _, v in texts.values()])
        by_shape = {(_array_text(row["metrics"]), _array_text(row["variants"])): row["id"] for row in rows}
        for pair, text in texts.items():
            self._layouts[pair] = by_shape[text]


def _array_text(values) -> str:
    return "{" + ",".join(str(value) for value in values) + "}"


async def layouts(db, layout_ids) -> dict[int, tuple[list[int], list[int]]]:
    """{layout id: (metric ids, variant codes)}."""
    rows = await db.fetch(_LAYOUTS, list(layout_ids))
    return {row["id"]: (list(row["metrics"]), list(row["variants"])) for row in rows}


async def workers_by_id(db, worker_ids) -> dict[int, tuple[str, str]]:
    """{worker id: (company, worker)}."""
    rows = await db.fetch(_WORKERS_BY_ID, list(worker_ids))
    return {row["id"]: (row["company"], row["worker"]) for row in rows}


async def workers_of_company(db, company: str) -> dict[str, int]:
    """{worker: id} of every worker of the company that ever reported."""
    rows = await db.fetch(_WORKERS_OF_COMPANY, company)
    return {row["worker"]: row["id"] for row in rows}


async def metrics_by_name(db, company: str, names: list[str], kind: int = METRIC) -> dict[str, int]:
    """{name: id} of the company's metrics (or queue pseudo-metrics) of these names."""
    rows = await db.fetch(_METRICS_BY_NAME, company, names, kind)
    return {row["name"]: row["id"] for row in rows}


async def queues_of_company(db, company: str) -> dict[str, int]:
    """{queue: id of its pseudo-metric} of every queue the company's reports named."""
    rows = await db.fetch(_QUEUES_OF_COMPANY, company)
    return {row["name"]: row["id"] for row in rows}


async def queue_metrics(db, metric_ids) -> set[int]:
    """Which of these metric ids are queue pseudo-metrics."""
    return {row["id"] for row in await db.fetch(_QUEUE_METRICS, [int(metric) for metric in metric_ids])}


async def metrics_by_id(db, metric_ids) -> dict[int, tuple[str, str]]:
    """{metric id: (company, name)}."""
    rows = await db.fetch(_METRICS_BY_ID, list(metric_ids))
    return {row["id"]: (row["company"], row["name"]) for row in rows}

