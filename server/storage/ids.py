"""SQL of the dictionaries the statistics tables refer to (`stat_workers`, `stat_metrics`,
`report_layouts`), and a cache of their ids.

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
INSERT INTO stat_metrics AS m (company, name)
SELECT * FROM unnest($1::text[], $2::text[]) ORDER BY 1, 2
ON CONFLICT (company, name) DO UPDATE SET company = EXCLUDED.company
RETURNING m.id, m.company, m.name
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
_METRICS_BY_NAME = "SELECT id, name FROM stat_metrics WHERE company = $1 AND name = ANY($2::text[])"
_METRICS_BY_ID = "SELECT id, company, name FROM stat_metrics WHERE id = ANY($1::integer[])"

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

    def worker(self, company: str, worker: str) -> int | None:
        return self._workers.get((company, worker))

    def layout(self, company: str, key: tuple) -> int | None:
        return self._layouts.get((company, key))

    async def metrics(self, db, company: str, names) -> dict[str, int]:
        """Ids of the company's metrics of these names, made when new."""
        missing = sorted({name for name in names if (company, name) not in self._metrics})
        if missing:
            rows = await db.fetch(_METRIC_IDS, [company] * len(missing), missing)
            self._metrics.update(((row["company"], row["name"]), row["id"]) for row in rows)
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


async def metrics_by_name(db, company: str, names: list[str]) -> dict[str, int]:
    rows = await db.fetch(_METRICS_BY_NAME, company, names)
    return {row["name"]: row["id"] for row in rows}


async def metrics_by_id(db, metric_ids) -> dict[int, tuple[str, str]]:
    """{metric id: (company, name)}."""
    rows = await db.fetch(_METRICS_BY_ID, list(metric_ids))
    return {row["id"]: (row["company"], row["name"]) for row in rows}

