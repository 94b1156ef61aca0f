"""The eight `workers.*` endpoints (SPEC §2): validate the body, call storage, shape the answer."""

import asyncio
import time
from collections import defaultdict
from datetime import datetime

import numpy as np

from .. import errors, limits, schemas
from ..apiserver import NO_NAMES, Names
from ..errors import ApiError
from ..config import Settings
from ..keys import APISERVER, LIMITS, METRICS, POOL, READERS, REPLICAS, WRITER
from ..metrics import observe_replicas
from ..protocol import Call, client_ip
from ..replicas import on_replica
from ..storage import charts, registrations, rollups, statistics
from ..storage.registrations import WorkerFilter
from ..storage.writer import Report

GET_ALL_DEFAULT_LAST_SEEN = 3600
# In the body all_workers reads: the apiserver's names (server/apiserver.py), when asked for.
APISERVER_NAMES = "apiserver_names"


async def register(call: Call) -> dict:
    body = schemas.load(schemas.register_request, call.body)
    timeout = body.get("timeout") or call.settings.default_timeout
    if timeout < 0:
        raise ApiError(errors.REGISTRATION_FAILED, "Worker registration failed: timeout must not be negative")
    await call.request.app[LIMITS].register(
        call.request.app[POOL],
        call.identity.company,
        body["worker"],
        user=call.identity.user,
        ip=client_ip(call.request, call.settings.trust_proxy_headers),
        timeout=timeout,
        queues=body.get("queues"),
        tags=body.get("tags"),
        system_tags=body.get("system_tags"),
    )
    return {}


async def unregister(call: Call) -> dict:
    body = schemas.load(schemas.unregister_request, call.body)
    removed = await registrations.unregister(call.request.app[POOL], call.identity.company, body["worker"])
    call.request.app[LIMITS].forget(call.identity.company, body["worker"])
    if not removed and not call.settings.auto_unregister:
        raise ApiError(errors.WORKER_NOT_REGISTERED, f"Worker is not registered: {body['worker']}")
    return {}


async def status_report(call: Call) -> dict:
    limiter = call.request.app[LIMITS]
    body = schemas.load(limiter.report_schema, call.body)
    company, worker = call.identity.company, body["worker"]
    if not call.settings.auto_register and not await registrations.is_registered(
        call.request.app[POOL], company, worker
    ):
        raise ApiError(errors.INVALID_WORKER_ID, f"Invalid worker id: {worker} is not registered")
    report = Report(
        company=company,
        worker=worker,
        user_id=call.identity.user,
        ip=client_ip(call.request, call.settings.trust_proxy_headers),
        timeout=call.settings.default_timeout,
        time=body["timestamp"],
        task=body.get("task"),
        queue=body.get("queue"),
        queues=body.get("queues"),
        tags=body.get("tags"),
        system_tags=body.get("system_tags"),
        metrics=body.get("machine_stats", {}),
    )
    await limiter.admit_report(call.request.app[POOL], report)
    await call.request.app[WRITER].write(report)
    return {}


def _split_tags(tags: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Tags to include, and those given with a leading '-' to exclude."""
    include = tuple(tag for tag in tags if not tag.startswith("-"))
    exclude = tuple(tag[1:] for tag in tags if tag.startswith("-"))
    return include, exclude


def _worker_filter(body: dict, default_last_seen: int) -> WorkerFilter:
    include_tags, exclude_tags = _split_tags(body.get("tags", []))
    include_system_tags, exclude_system_tags = _split_tags(body.get("system_tags", []))
    pattern = body.get("worker_pattern")
    return WorkerFilter(
        last_seen=body.get("last_seen", default_last_seen),
        include_tags=include_tags,
        exclude_tags=exclude_tags,
        include_system_tags=include_system_tags,
        exclude_system_tags=exclude_system_tags,
        like_pattern=registrations.glob_to_like(pattern) if pattern is not None else None,
    )


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _worker_entry(row, names: Names = NO_NAMES) -> dict:
    """A worker as get_all answers it; its task, project and queues as `names` has them."""
    project = names.project(row["task"]) if row["task"] else None
    return {
        "id": row["worker"],
        "key": f"worker_{row['company']}_{row['worker']}",
        "user": {"id": row["user_id"], "name": row["user_name"]},
        "company": {"id": row["company"], "name": row["company_name"]},
        "ip": row["ip"],
        "register_time": _iso(row["register_time"]),
        "register_timeout": row["register_timeout"],
        "last_activity_time": _iso(row["last_activity_time"]),
        "last_report_time": _iso(row["last_report_time"]),
        "task": names.task(row["task"]) if row["task"] else None,
        **({"project": project} if project is not None else {}),
        "queue": names.queue(row["queue"]) if row["queue"] else None,
        "queues": [names.queue(queue) for queue in row["queues"]],
        "tags": list(row["tags"]),
        "system_tags": list(row["system_tags"]),
    }


def _health_entry(row) -> dict:
    """The extension `health` of a worker (docs/health.md)."""
    return {
        "report_period": _rounded(row["report_period"]),
        "silent": row["silent"],
        "silent_since": _iso(row["silent_since"]) if row["silent"] else None,
        "cpu_usage": _rounded(row["cpu_usage"]),
        "gpu_usage": _rounded(row["gpu_usage"]),
        "gpus": [
            {"index": index, "idle": idle, "below_threshold_since": _iso(since)}
            for index, (since, idle) in enumerate(zip(row["gpu_idle_since"], row["gpu_idle"]))
        ],
    }


def _rounded(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


async def get_all(call: Call) -> dict:
    body = schemas.load(schemas.all_workers_request, call.body)
    names = await _apiserver_names(call, body)
    return await heavy_read(call, all_workers, {**body, APISERVER_NAMES: names} if names is not None else body)


async def _apiserver_names(call: Call, body: dict) -> Names | None:
    """Beside a ClearML server (WORKERS_APISERVER_URL), for a caller holding the apiserver's
    token: the apiserver's names of the tasks and queues the listed workers name, asked in the
    server process (the reader that builds the answer has no apiserver client) within
    WORKERS_APISERVER_TIMEOUT_MS. None otherwise."""
    apiserver, token = call.request.app[APISERVER], call.identity.apiserver_token
    if apiserver is None or not token:
        return None
    company = call.identity.company
    where = _worker_filter(body, GET_ALL_DEFAULT_LAST_SEEN)
    task_ids, queue_ids = await registrations.named_ids(call.request.app[POOL], company, where)
    return await apiserver.names(company, token, task_ids, queue_ids)


async def all_workers(pool, settings: Settings, company: str, body: dict) -> dict:
    health = settings.health if body["health"] else None
    rows = await registrations.find(pool, company, _worker_filter(body, GET_ALL_DEFAULT_LAST_SEEN), health)
    names = body.get(APISERVER_NAMES, NO_NAMES)
    workers = [_worker_entry(row, names) for row in rows]
    if health is None:
        return {"workers": workers}
    for worker, row in zip(workers, rows):
        worker["health"] = _health_entry(row)
    rules = {
        "silent_periods": settings.silent_periods,
        "idle_gpu_percent": settings.idle_gpu_percent,
        "idle_gpu_minutes": settings.idle_gpu_minutes,
        "utilisation_minutes": settings.utilisation_minutes,
    }
    return {"workers": workers, "health": rules}


async def heavy_read(call: Call, read, body: dict):
    """`read`'s answer, computed by a reader process in its turn (server/readers.py)."""
    app = call.request.app
    return await app[READERS].run(read, app[POOL], call.identity.company, body)


async def _on_replica(call: Call, read_on):
    """`read_on(pool)` in this process, on a replica when one can serve it (server/replicas.py)."""
    app = call.request.app
    if app[REPLICAS] is None:
        return await read_on(app[POOL])
    answer, cause = await app[REPLICAS].run(read_on, app[POOL])
    observe_replicas(app[METRICS], cause, app[REPLICAS].health())
    return answer


async def get_count(call: Call) -> dict:
    body = schemas.load(schemas.worker_filter_request, call.body)
    count = await registrations.count(call.request.app[POOL], call.identity.company, _worker_filter(body, 0))
    return {"count": count}


async def get_metric_keys(call: Call) -> dict:
    body = schemas.load(schemas.metric_keys_request, call.body)
    _check_worker_ids(call, body)
    keys = await _on_replica(call, lambda pool: statistics.metric_keys(pool, call.identity.company, body.get("worker_ids", [])))
    if not keys:
        raise ApiError(errors.WORKER_STATS_NOT_FOUND, "Worker stats not found for the requested workers")
    by_category = defaultdict(list)
    for key in keys:
        by_category[key.split("_", 1)[0]].append(key)
    return {
        "categories": [{"name": name, "metric_keys": sorted(by_category[name])} for name in sorted(by_category)]
    }


THREADED_ANSWER_SERIES = 100  # get_stats answers of more series than this are made in a thread


def _bucket_starts(from_date: float, to_date: float, interval: int, limit: int, partial: bool = False) -> list[int]:
    """The start of every bucket to return (SPEC §2, get_stats): aligned to the epoch, from
    the one holding from_date to the one holding to_date, the last dropped when it starts
    later than to_date - 0.9 * interval (unless `partial`: the extension that keeps it)."""
    first = rollups.floor_to(from_date, interval)
    last = rollups.floor_to(to_date, interval)
    if not partial and last > to_date - 0.9 * interval:
        last -= interval
    count = (last - first) // interval + 1
    if count > limit:
        raise ApiError(
            errors.INVALID_FIELD_VALUES,
            f"Invalid field values: {count} buckets of {interval} s requested, "
            f"the limit is {limit} (WORKERS_MAX_CHART_BUCKETS): use a larger interval or a shorter range",
        )
    return list(range(first, last + 1, interval))


async def _workers_asked(pool, company: str, worker_ids: list[str]) -> int:
    """How many workers a chart covers: those asked for, or the company's registered workers."""
    return len(worker_ids) or await registrations.count(pool, company, WorkerFilter())


def check_dates(body: dict) -> None:
    if body["from_date"] >= body["to_date"]:
        raise ApiError(errors.INVALID_FIELD_VALUES, "Invalid field values: from_date must be less than to_date")


async def chart_sources(
    pool, settings: Settings, company: str, body: dict, worker_ids: list[str], split_by_variant: bool = False
) -> tuple[list[int], charts.Plan]:
    """The buckets, and what the chart reads to fill them (storage/charts.py: which sources
    serve what is decided in the read's own snapshot)."""
    from_date, to_date = body["from_date"], body["to_date"]
    interval = max(body["interval"], settings.min_chart_interval)
    now = time.time()
    if settings.read_from_rollups:
        raw_affordable = True
        if interval % charts.tiers_for(split_by_variant)[0].seconds:
            workers = await _workers_asked(pool, company, worker_ids)
            raw_affordable = charts.raw_worker_hours(interval, workers) <= settings.raw_read_budget_worker_hours
        interval = charts.choose_interval(interval, from_date, now, settings.retention, raw_affordable, split_by_variant)
    buckets = _bucket_starts(from_date, to_date, interval, settings.max_chart_buckets, body["include_partial_bucket"])
    if not buckets:
        return buckets, charts.Plan(from_date, from_date, interval, split_by_variant)
    end = buckets[-1] + interval
    if not settings.read_from_rollups:
        high = min(to_date + charts.RESOLUTION, end)
        return buckets, charts.Plan(from_date, high, interval, split_by_variant, from_rollups=False)
    low, high = charts.read_range(from_date, to_date, buckets[0], end, now, settings.retention)
    return buckets, charts.Plan(low, high, interval, split_by_variant)


def with_partial(answer: dict, body: dict, interval: int, buckets: list[int]) -> dict:
    """The extension's mark of a last bucket that ends after to_date (include_partial_bucket)."""
    if body["include_partial_bucket"] and buckets and buckets[-1] + interval > body["to_date"]:
        answer["partial_since"] = buckets[-1] * 1000
    return answer


def _variant_order(variant: str | None):
    return (0, int(variant), "") if variant is not None and variant.isdigit() else (1, 0, variant or "")


def _check_worker_ids(call: Call, body: dict) -> None:
    worker_ids = len(body.get("worker_ids", []))
    limits.check_count(worker_ids, call.settings.max_stats_worker_ids, "worker_ids", "WORKERS_MAX_STATS_WORKER_IDS")


async def get_stats(call: Call) -> dict:
    body = schemas.load(schemas.stats_request, call.body)
    _check_worker_ids(call, body)
    limits.check_count(len(body["items"]), call.settings.max_stats_items, "items", "WORKERS_MAX_STATS_ITEMS")
    check_dates(body)
    return await heavy_read(call, stats, body)


@on_replica
async def stats(pool, settings: Settings, company: str, body: dict) -> dict:
    worker_ids = body.get("worker_ids", [])
    buckets, plan = await chart_sources(pool, settings, company, body, worker_ids, body["split_by_variant"])
    aggregations: dict[str, list[str]] = {}
    for item in body["items"]:
        wanted = aggregations.setdefault(item["key"], [])
        if item["aggregation"] not in wanted:
            wanted.append(item["aggregation"])
    # Before the read: the workers asked for (or the company's registered workers) x metrics;
    # after it: the series found (variants, and workers no longer registered, included).
    workers = await _workers_asked(pool, company, worker_ids)
    limits.check_series_buckets(settings, workers * len(aggregations), len(buckets))
    found = await charts.stats(pool, company, plan, buckets=buckets, metrics=list(aggregations), worker_ids=worker_ids)
    limits.check_series_buckets(settings, len(found), len(buckets))
    # With reads in the server process (WORKERS_READ_PROCESSES=0), a fleet's answer of
    # thousands of series is made in a thread, so that the event loop answers status reports
    # meanwhile (in a reader process the thread costs little and changes nothing).
    empty = None if body["empty_buckets"] == "null" else 0.0
    if len(found) > THREADED_ANSWER_SERIES:
        workers = await asyncio.to_thread(_stats_answer, found, buckets, aggregations, empty)
    else:
        workers = _stats_answer(found, buckets, aggregations, empty)
    return with_partial({"workers": workers}, body, plan.interval, buckets)


def _stats_answer(
    found: charts.Series, buckets: list[int], aggregations: dict[str, list[str]], empty: float | None = 0.0
) -> list[dict]:
    """get_stats' `workers`: per worker (sorted), its metrics (in the order asked for, then by
    variant), each with its dates and one list of values per aggregation asked for, `empty`
    where the worker sent no value in the bucket."""
    series: dict[str, dict[tuple[str, str | None], dict[str, np.ndarray]]] = defaultdict(dict)  # by worker
    for (worker, metric, variant), values in found.items():
        series[worker][(metric, variant)] = values
    metric_order = {metric: index for index, metric in enumerate(aggregations)}
    dates = [bucket * 1000 for bucket in buckets]  # milliseconds, as the reference server answers
    workers = []
    for worker in sorted(series):
        metrics = []
        for metric, variant in sorted(series[worker], key=lambda mv: (metric_order[mv[0]], _variant_order(mv[1]))):
            values = series[worker][(metric, variant)]
            entry = {"metric": metric}
            if variant is not None:
                entry["variant"] = variant
            entry["dates"] = dates
            entry["stats"] = [
                # 0 where the worker did not report (SPEC §2, as the reference server answers)
                {"aggregation": aggregation, "values": _filled(values[aggregation], empty)}
                for aggregation in aggregations[metric]
            ]
            metrics.append(entry)
        workers.append({"worker": worker, "metrics": metrics})
    return workers


def _filled(values: np.ndarray, empty: float | None) -> list:
    if empty is not None:
        return np.nan_to_num(values, nan=empty).tolist()
    filled = values.tolist()
    for index in np.flatnonzero(np.isnan(values)).tolist():
        filled[index] = None
    return filled


async def get_activity_report(call: Call) -> dict:
    body = schemas.load(schemas.activity_request, call.body)
    _check_worker_ids(call, body)
    check_dates(body)
    return await heavy_read(call, activity, body)


@on_replica
async def activity(pool, settings: Settings, company: str, body: dict) -> dict:
    worker_ids = body.get("worker_ids", [])
    buckets, plan = await chart_sources(pool, settings, company, body, worker_ids)
    total, active = await charts.activity(pool, company, plan, buckets=buckets, worker_ids=worker_ids)
    dates = [bucket * 1000 for bucket in buckets]  # milliseconds, as the reference server answers
    answer = {"total": {"dates": dates, "counts": total}, "active": {"dates": dates, "counts": active}}
    return with_partial(answer, body, plan.interval, buckets)


ENDPOINTS = {
    "workers.register": register,
    "workers.unregister": unregister,
    "workers.status_report": status_report,
    "workers.get_all": get_all,
    "workers.get_count": get_count,
    "workers.get_metric_keys": get_metric_keys,
    "workers.get_stats": get_stats,
    "workers.get_activity_report": get_activity_report,
}
