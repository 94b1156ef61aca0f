"""`workers.get_queues` (an extension, docs/queues.md): per queue the company's workers listen
to, its live, busy and idle workers now (their registrations), and over a range the distinct
workers listening and busy per bucket (the reports' queue pseudo-metrics, storage/queue_charts.py),
with get_activity_report's interval rules. A heavy read: it runs in a reader process, on a
replica when WORKERS_READ_DSN names one (a dashboard's view: its "now" may be as far behind as
WORKERS_READ_MAX_LAG_SECONDS)."""

from .. import errors, schemas
from ..config import Settings
from ..errors import ApiError
from ..protocol import Call
from ..replicas import on_replica
from ..storage import queue_charts, registrations
from .workers import chart_sources, check_dates, heavy_read, with_partial

_NOBODY = {"workers": 0, "cores": 0, "gpus": 0, "memory": 0.0}


async def get_queues(call: Call) -> dict:
    body = schemas.load(schemas.queues_request, call.body)
    given = [name for name in schemas.RANGE_FIELDS if name in body]
    if given and len(given) < len(schemas.RANGE_FIELDS):
        missing = [name for name in schemas.RANGE_FIELDS if name not in body]
        raise ApiError(
            errors.MISSING_FIELDS,
            f"Missing required fields: {', '.join(missing)} (a range needs from_date, to_date and interval)",
        )
    if given:
        check_dates(body)
    return await heavy_read(call, queues, body)


@on_replica
async def queues(pool, settings: Settings, company: str, body: dict) -> dict:
    now: dict[str, dict] = {}
    for row in await registrations.queues_now(pool, company):
        entry = now.setdefault(row["queue"], {"live": dict(_NOBODY), "busy": dict(_NOBODY), "idle": dict(_NOBODY)})
        part = {"workers": row["workers"], "cores": row["cores"], "gpus": row["gpus"], "memory": row["memory"]}
        entry["busy" if row["busy"] else "idle"] = part
        entry["live"] = {name: entry["live"][name] + value for name, value in part.items()}
    if "from_date" not in body:
        return {"queues": [{"queue": name, **now[name]} for name in sorted(now)]}
    buckets, plan = await chart_sources(pool, settings, company, body, [])
    charted = await queue_charts.chart(pool, company, plan, buckets=buckets)
    nothing = [0] * len(buckets)
    answer = {
        "queues": [
            {
                "queue": name,
                **now.get(name, {"live": _NOBODY, "busy": _NOBODY, "idle": _NOBODY}),
                "chart": dict(zip(("listening", "busy"), charted.get(name, (nothing, nothing)))),
            }
            for name in sorted(now.keys() | charted.keys())
        ],
        "dates": [bucket * 1000 for bucket in buckets],  # milliseconds, as get_activity_report's
    }
    return with_partial(answer, body, plan.interval, buckets)


ENDPOINTS = {"workers.get_queues": get_queues}
