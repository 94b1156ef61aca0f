"""Settings, read once from environment variables. Every setting and its default is listed in docs/operations.md."""

import os
from dataclasses import dataclass, fields

from .storage.registrations import HealthRules
from .storage.rollups import Retention

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:55432/workers"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Settings:
    db_dsn: str = DEFAULT_DSN
    # Connections of each server process's pool (registrations, credentials, the sweeps): the
    # largest term of a host's connection budget (docs/scaling.md).
    db_pool_size: int = 10
    host: str = "0.0.0.0"
    port: int = 8008
    processes: int = 1
    log_level: str = "INFO"
    # Registrations
    default_timeout: int = 600
    auto_register: bool = True
    auto_unregister: bool = True
    trust_proxy_headers: bool = False
    expiry_sweep_seconds: float = 10.0
    # Statistics
    min_chart_interval: int = 40
    max_chart_buckets: int = 10_000
    read_from_rollups: bool = True  # false: charts read raw reports only (for comparison)
    raw_read_budget_worker_hours: float = 120.0
    read_timeout_seconds: float = 30.0
    # Heavy reads (get_stats, get_activity_report, get_all; server/readers.py): computed in
    # this many reader processes per server process (0: in the server process itself), at
    # this niceness, one at a time each; a read that waits longer than read_queue_seconds is
    # answered 503, and a company with read_queue_per_company reads waiting gets 429.
    read_processes: int = 1
    read_nice: int = 10
    read_queue_seconds: float = 10.0
    read_queue_per_company: int = 16
    # Streaming replicas (docs/replicas.md): comma-separated DSNs that serve the chart reads
    # (empty: the primary serves them), while at most read_max_lag_seconds behind the primary.
    read_dsn: str = ""
    read_max_lag_seconds: float = 10.0
    # Retention of each tier, and the rollups' refresh
    # (docs/storage.md: what each costs per worker-day; raw reports are kept at least as long
    # as the 1-minute tier, which reads a variant's minutes from them)
    raw_retention_days: float = 14.0
    rollup_1m_retention_days: float = 14.0
    rollup_10m_retention_days: float = 90.0
    rollup_1h_retention_days: float = 400.0
    retention_sweep_seconds: float = 3600.0
    rollup_refresh_seconds: float = 10.0
    rollup_lag_seconds: float = 10.0
    rollup_refresh_nice: int = 10  # the refresher process's niceness: it yields the CPU to serving
    # Request handling
    max_body_bytes: int = 1024 * 1024
    debug: bool = False
    access_log: bool = False  # one line per request (server/access.py)
    # Authentication: the key that signs tokens (empty: one generated once and kept in the
    # database), and the longest lifetime of a token.
    auth_secret: str = ""
    token_lifetime_seconds: int = 30 * 24 * 3600
    # Beside a ClearML apiserver: its `secure.auth.token_secret`, so that the tokens it
    # issued are accepted too (empty: not), and the web UI's session cookie.
    apiserver_token_secret: str = ""
    token_cookie: str = "clearml_token_basic"
    # Beside a ClearML apiserver: its address, where get_all asks for the names of the tasks,
    # projects and queues its workers name, with the caller's apiserver token (empty: not
    # asked); how long a get_all waits for the answer (then it answers the ids alone), and
    # how long a company's answer is reused (server/apiserver.py).
    apiserver_url: str = ""
    apiserver_timeout_ms: float = 300.0
    apiserver_cache_seconds: float = 5.0
    # Prometheus metrics: off stops counting too. /metrics answers on the API's port without
    # credentials unless metrics_credentials (then as any API call) or metrics_bind
    # ("HOST:PORT": there alone, served by the `serve` command's master process).
    metrics: bool = True
    metrics_credentials: bool = False
    metrics_bind: str = ""
    # Limits (server/limits.py; docs/limits.md): 0 is no limit. Per status report ...
    max_metric_keys_per_report: int = 64
    max_values_per_metric: int = 1024
    max_values_per_report: int = 2048
    # ... per company, each overridden per company by `python -m server companies set` ...
    company_max_workers: int = 1000
    company_max_metric_keys: int = 1000
    company_reports_per_second: float = 200.0
    company_report_burst_seconds: float = 2.0  # the token bucket holds this many seconds of the rate
    limits_refresh_seconds: float = 5.0  # how often each process reads the overrides
    # ... and per get_stats
    max_stats_worker_ids: int = 1000
    max_stats_items: int = 64
    max_stats_series_buckets: int = 200_000
    # ... and per worker's runtime properties (per call, and kept per company, user and worker)
    max_runtime_properties_per_call: int = 100
    max_runtime_properties_per_worker: int = 100
    # The batching writer of status reports
    writer_connections: int = 2
    writer_batch_size: int = 500
    writer_gather_ms: float = 25.0
    writer_queue_limit: int = 10_000
    writer_answer_timeout: float = 10.0
    # Worker health (docs/health.md): a worker is silent when its last report is older than
    # silent_periods of its own report periods; a GPU is idle when every report of the last
    # idle_gpu_minutes had it below idle_gpu_percent; the usage means behind the busiest and
    # idlest workers weigh the reports of about the last utilisation_minutes (a time constant).
    # metrics_per_company: /metrics has the counts per company too.
    silent_periods: float = 3.0
    idle_gpu_percent: float = 5.0
    idle_gpu_minutes: float = 30.0
    utilisation_minutes: float = 10.0
    metrics_per_company: bool = False

    def __post_init__(self):
        if self.db_pool_size < 1:
            raise ValueError("WORKERS_DB_POOL_SIZE must be at least 1")
        for name in ("silent_periods", "idle_gpu_minutes", "utilisation_minutes", "read_max_lag_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"WORKERS_{name.upper()} must be greater than 0")

    @property
    def retention(self) -> Retention:
        return Retention(
            raw_days=self.raw_retention_days,
            tier_days={
                "1m": self.rollup_1m_retention_days,
                "10m": self.rollup_10m_retention_days,
                "1h": self.rollup_1h_retention_days,
            },
        )

    @property
    def health(self) -> HealthRules:
        return HealthRules(silent_periods=self.silent_periods, idle_gpu_minutes=self.idle_gpu_minutes)

    @classmethod
    def from_env(cls, environ=os.environ, **overrides) -> "Settings":
        """Each field `name` is read from `WORKERS_NAME` (upper case), falling back to the default."""
        values = {}
        for field in fields(cls):
            text = environ.get(f"WORKERS_{field.name.upper()}")
            if text is None:
                continue
            kind = type(field.default)
            try:
                values[field.name] = _bool(text) if kind is bool else kind(text)
            except ValueError as error:
                raise SystemExit(f"WORKERS_{field.name.upper()}: {error}") from None
        values.update(overrides)
        try:
            return cls(**values)
        except ValueError as error:
            raise SystemExit(str(error)) from None
