"""Prometheus metrics (prometheus-client), correct across several server processes.

`python -m server serve` sets PROMETHEUS_MULTIPROC_DIR before it forks the server processes
(serving.py): each process then writes its samples to files there, and `/metrics`, in any
process, sums every process's files. Without it (one process, the tests), samples live in
the application's own registry.

prometheus_client chooses between the two when it is first imported, so it is imported
here only when an application's metrics are created: in the server processes, after the
directory is set.
"""

import os
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .admission import REFUSAL_CAUSES
from .apiserver import FAILURE_CAUSES as APISERVER_FAILURE_CAUSES
from .replicas import FALLBACK_CAUSES as REPLICA_FALLBACK_CAUSES

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a status report's ~1 ms to a chart's tens of seconds (the read timeout).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds the event loop was late in waking a timer: how long something held it.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

# Why a status report was answered 503 (storage/writer.py).
SHUTTING_DOWN = "shutting_down"
DATABASE_DOWN = "database_down"
QUEUE_FULL = "queue_full"
NOT_STORED_IN_TIME = "not_stored_in_time"
UNAVAILABLE_CAUSES = (SHUTTING_DOWN, DATABASE_DOWN, QUEUE_FULL, NOT_STORED_IN_TIME)


@dataclass(frozen=True, slots=True)
class Metrics:
    registry: Any  # prometheus_client.CollectorRegistry
    requests: Any
    request_seconds: Any
    reports_stored: Any
    reports_unavailable: Any
    writer_queue: Any
    batch_size: Any
    commit_seconds: Any
    database_errors: Any
    registered_workers: Any
    silent_workers: Any
    gpus: Any
    idle_gpus: Any
    company_health: dict[str, Any] | None  # WORKERS_METRICS_PER_COMPANY: the gauges above per company
    event_loop_lag: Any
    reads_waiting: Any
    reads_refused: Any
    read_wait_seconds: Any
    apiserver_lookups_failed: Any
    replica_fallbacks: Any
    replica_up: Any
    replica_lag: Any
    companies_counted: set[str] = field(default_factory=set)  # those of the per-company gauges


# The fleet's health (docs/health.md), set by every expiry sweep: (name, help) of each count,
# by the column of registrations.health_counts that holds it.
HEALTH_GAUGES = {
    "live": ("registered_workers", "Live worker registrations"),
    "silent": ("silent_workers", "Live workers silent for WORKERS_SILENT_PERIODS of their report periods"),
    "gpus": ("gpus", "GPUs of live workers, as their reports list them"),
    "idle_gpus": ("idle_gpus", "GPUs of live workers below WORKERS_IDLE_GPU_PERCENT for WORKERS_IDLE_GPU_MINUTES"),
}


def create(known_endpoints, per_company: bool = False) -> Metrics:
    """The server's metrics; `per_company`: the health counts per company too (a series per
    company and count)."""
    import prometheus_client as prom

    registry = prom.CollectorRegistry()

    def health_gauge(column: str, labels=()):
        name, text = HEALTH_GAUGES[column]
        prefix, scope = ("workers_company_", "by company") if labels else ("workers_", "every company")
        return prom.Gauge(
            prefix + name, f"{text} ({scope}), as of the last expiry sweep", list(labels),
            registry=registry, multiprocess_mode="livemostrecent",
        )  # fmt: skip

    metrics = Metrics(
        registry=registry,
        requests=prom.Counter(
            "workers_requests",
            "API calls answered, by endpoint and result code",
            ["endpoint", "code"],
            registry=registry,
        ),
        request_seconds=prom.Histogram(
            "workers_request_duration_seconds",
            "Time to answer an API call, by endpoint",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        ),
        reports_stored=prom.Counter("workers_reports_stored", "Status reports stored", registry=registry),
        reports_unavailable=prom.Counter(
            "workers_reports_unavailable",
            "Status reports answered 503 (the daemon retries them), by cause",
            ["cause"],
            registry=registry,
        ),
        writer_queue=prom.Gauge(
            "workers_writer_queue_depth",
            "Status reports waiting for the batching writer",
            registry=registry,
            multiprocess_mode="livesum",
        ),
        batch_size=prom.Histogram(
            "workers_writer_batch_size",
            "Status reports per batch the writer stores",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        ),
        commit_seconds=prom.Histogram(
            "workers_writer_commit_duration_seconds",
            "Time to store one batch of status reports",
            buckets=DURATION_BUCKETS,
            registry=registry,
        ),
        database_errors=prom.Counter(
            "workers_database_errors",
            "Database errors: unavailable (connection lost, refused, timed out) or failed statements",
            ["kind"],
            registry=registry,
        ),
        registered_workers=health_gauge("live"),
        silent_workers=health_gauge("silent"),
        gpus=health_gauge("gpus"),
        idle_gpus=health_gauge("idle_gpus"),
        company_health={column: health_gauge(column, ["company"]) for column in HEALTH_GAUGES} if per_company else None,
        event_loop_lag=prom.Histogram(
            "workers_event_loop_lag_seconds",
            "How late a server process's event loop woke a timer (sampled every 0.1 s): how long "
            "something held the loop while status reports waited",
            buckets=LAG_BUCKETS,
            registry=registry,
        ),
        reads_waiting=prom.Gauge(
            "workers_reads_waiting",
            "Heavy reads (get_stats, get_activity_report, get_all) waiting for their turn",
            registry=registry,
            multiprocess_mode="livesum",
        ),
        reads_refused=prom.Counter(
            "workers_reads_refused",
            "Heavy reads refused while waiting for their turn, by cause: company_queue_full (429), "
            "waited_too_long (503)",
            ["cause"],
            registry=registry,
        ),
        read_wait_seconds=prom.Histogram(
            "workers_read_wait_seconds",
            "Time a heavy read waited for its turn (those admitted at once are not counted)",
            buckets=DURATION_BUCKETS,
            registry=registry,
        ),
        apiserver_lookups_failed=prom.Counter(
            "workers_apiserver_lookups_failed",
            "get_all answers that name no task or queue because the apiserver did not give the names "
            "(WORKERS_APISERVER_URL), by cause: timeout, unreachable, error, refused",
            ["cause"],
            registry=registry,
        ),
        replica_fallbacks=prom.Counter(
            "workers_replica_fallbacks",
            "Reads meant for a replica (WORKERS_READ_DSN) that the primary served, by cause: down (no "
            "replica answered), lag (none within WORKERS_READ_MAX_LAG_SECONDS), conflict (the replica "
            "cancelled the read while replaying)",
            ["cause"],
            registry=registry,
        ),
        replica_up=prom.Gauge(
            "workers_replica_up",
            "Whether each replica answered its last check (1) or not (0)",
            ["replica"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        ),
        replica_lag=prom.Gauge(
            "workers_replica_lag_seconds",
            "How far each replica's data was behind the primary at its last check (while it is up)",
            ["replica"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        ),
    )
    # Every series exists from the start at 0, so that rate() and ratios see their first samples.
    for endpoint in known_endpoints:
        metrics.request_seconds.labels(endpoint)
    for cause in UNAVAILABLE_CAUSES:
        metrics.reports_unavailable.labels(cause)
    for kind in ("unavailable", "statement"):
        metrics.database_errors.labels(kind)
    for cause in REFUSAL_CAUSES:
        metrics.reads_refused.labels(cause)
    for cause in APISERVER_FAILURE_CAUSES:
        metrics.apiserver_lookups_failed.labels(cause)
    for cause in REPLICA_FALLBACK_CAUSES:
        metrics.replica_fallbacks.labels(cause)
    return metrics


def observe_replicas(metrics: Metrics | None, cause: str | None, health: dict[str, tuple[bool, float | None]]) -> None:
    """A read meant for a replica: its fallback cause (None: a replica served it), and each
    replica's health as the process that read last checked it (replicas.Replicas.health)."""
    if metrics is None:
        return
    if cause is not None:
        metrics.replica_fallbacks.labels(cause).inc()
    for replica, (up, lag) in health.items():
        metrics.replica_up.labels(replica).set(up)
        if lag is not None:
            metrics.replica_lag.labels(replica).set(lag)


def set_health(metrics: Metrics, counts) -> None:
    """The health gauges from registrations.health_counts' rows (per company with live
    workers). A company no longer among them is set to 0: with several server processes a
    series cannot be removed."""
    for column, (name, _) in HEALTH_GAUGES.items():
        getattr(metrics, name).set(sum(row[column] for row in counts))
    if metrics.company_health is None:
        return
    present = {row["company"] for row in counts}
    for row in counts:
        for column, gauge in metrics.company_health.items():
            gauge.labels(row["company"]).set(row[column])
    for company in metrics.companies_counted - present:
        for gauge in metrics.company_health.values():
            gauge.labels(company).set(0)
    metrics.companies_counted.update(present)


def count_database_error(metrics: Metrics | None, kind: str) -> None:
    """`kind`: "unavailable" or "statement"; nothing when metrics are off."""
    if metrics is not None:
        metrics.database_errors.labels(kind).inc()


class RequestObserver:
    """Counts and times API calls; keeps each label set's children, so that an observation
    costs no label lookup."""

    def __init__(self, metrics: Metrics, known_endpoints):
        self._metrics = metrics
        self._known = frozenset(known_endpoints)
        self._counters: dict[tuple[str, int], Any] = {}
        self._timers: dict[str, Any] = {}

    def observe(self, endpoint: str, code: int, started: float) -> None:
        if endpoint not in self._known:
            endpoint = "unknown"  # the path is whatever a client sent: never a label value
        counter = self._counters.get((endpoint, code))
        if counter is None:
            counter = self._counters[(endpoint, code)] = self._metrics.requests.labels(endpoint, str(code))
        timer = self._timers.get(endpoint)
        if timer is None:
            timer = self._timers[endpoint] = self._metrics.request_seconds.labels(endpoint)
        counter.inc()
        timer.observe(time.perf_counter() - started)


def exposition(metrics: Metrics) -> bytes:
    """The text exposition of every server process's samples (or this process's alone)."""
    import prometheus_client as prom
    from prometheus_client import multiprocess

    directory = os.environ.get(MULTIPROCESS_DIR)
    if not directory:
        return prom.generate_latest(metrics.registry)
    registry = prom.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return prom.generate_latest(registry)


def text_response(body: bytes) -> web.Response:
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def process_exited(pid: int) -> None:
    """gunicorn's child_exit: the files of a process's live gauges go with it."""
    from prometheus_client import multiprocess

    if os.environ.get(MULTIPROCESS_DIR):
        multiprocess.mark_process_dead(pid)
