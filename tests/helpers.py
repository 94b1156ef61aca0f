"""What the tests share besides fixtures: calling the API and reading what is stored."""

import base64
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

ROOT = Path(__file__).resolve().parents[1]


# The workers.* endpoints: the eight of the original API, the runtime properties, and ours.
WORKER_ENDPOINTS = [
    "workers.register",
    "workers.unregister",
    "workers.status_report",
    "workers.get_all",
    "workers.get_count",
    "workers.get_metric_keys",
    "workers.get_stats",
    "workers.get_activity_report",
    "workers.set_runtime_properties",
    "workers.get_runtime_properties",
    "workers.get_queues",
]


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret: str
    company: str
    company_id: str
    user: str
    user_id: str


def basic_auth(access_key: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{access_key}:{secret}".encode()).decode()


async def call(client, endpoint: str, body=None, *, method: str = "POST", raw: bytes | None = None, headers=None):
    """Call an endpoint; return (result code, result subcode, message, data).

    Checks the envelope every response must have: the HTTP status equals result_code.
    """
    payload = raw if raw is not None else (orjson.dumps(body) if body is not None else b"")
    response = await client.request(
        method, f"/{endpoint}", data=payload, headers={"Content-Type": "application/json", **(headers or {})}
    )
    envelope = orjson.loads(await response.read())
    meta = envelope["meta"]
    assert response.status == meta["result_code"], envelope
    assert set(meta) >= {"id", "trx", "endpoint", "result_code", "result_subcode", "result_msg"}
    return meta["result_code"], meta["result_subcode"], meta["result_msg"], envelope["data"]


async def ok(client, endpoint: str, body=None, **kwargs):
    """Call an endpoint that must succeed; return its data."""
    code, subcode, message, data = await call(client, endpoint, body, **kwargs)
    assert (code, subcode) == (200, 0), message
    return data


def now_ms() -> int:
    return int(time.time() * 1000)


async def table_snapshot(conn) -> dict:
    """Everything the service stores, to show that a rejected request changed nothing. Rows
    are ordered whole: compaction may move reports of equal times from rows into a block
    meanwhile, and the order of equal keys is not kept."""
    return {
        table: [tuple(row) for row in await conn.fetch(f"SELECT * FROM {table} AS t ORDER BY t")]
        for table in ("worker_registrations", "worker_stats", "worker_metric_keys", "worker_runtime_properties")
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_server(
    dsn: str, log: Path, *, processes: int = 1, env: dict | None = None, own_group: bool = False,
    host: str = "127.0.0.1",
) -> tuple[subprocess.Popen, str]:
    """`python -m server serve` as in production, on a free port of `host`; (process, base url).
    Its output goes to `log`; `wait_until_ready` waits for it to answer. `own_group`: in a
    process group of its own, as a terminal's foreground job (Ctrl-C signals the group)."""
    port = free_port(host)
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--host", host, "--port", str(port),
             "--processes", str(processes)],
            cwd=ROOT,
            env={**os.environ, "WORKERS_DB_DSN": dsn, **(env or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
            process_group=0 if own_group else None,
        )
    return process, f"http://{host}:{port}"


def fetch(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """A blocking HTTP call: (status, headers, body), whatever the status."""
    request = urllib.request.Request(url, method=method, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def wait_until_ready(base: str, process: subprocess.Popen, timeout: float = 30) -> None:
    """Wait for GET /readyz to answer 200 (a server process started, the database reachable)."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the server was not ready within {timeout} s"
        time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains and cleans up), then SIGKILL if it is still there."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def set_database_open(dsn: str, open_: bool, *, keep_pid: int | None = None) -> None:
    """As in maintenance: `False` makes the database refuse connections and ends those it has
    (but the backend `keep_pid`); `True` opens it again."""
    database = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(with_database(dsn, "postgres"))
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(open_).lower()}')
        if not open_:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> $2",
                database,
                keep_pid or 0,
            )
    finally:
        await admin.close()


async def store_reports(conn, company: str, reports: list[tuple]) -> None:
    """Reports (epoch seconds, worker, task, {metric: {variant: value}}) stored as the writer
    would store them, but without it (no registration, no invalidation log): as a restore or
    a bulk load straight into the tables would."""
    from server.storage.ids import Ids, layout_key
    from server.storage.writer import pack_values

    ids = Ids()
    await ids.make(conn, {(company, worker) for _, worker, _, _ in reports},
                   {(company, layout_key(metrics)) for _, _, _, metrics in reports})
    compacted = await conn.fetchval("SELECT extract(epoch FROM compacted)::float8 FROM rollup_watermark")
    rows = [
        (moment, ids.worker(company, worker), ids.layout(company, layout_key(metrics)), task, pack_values(metrics))
        for moment, worker, task, metrics in reports
    ]
    for table, chosen in (("recent_reports", [r for r in rows if r[0] >= compacted]),
                          ("late_reports", [r for r in rows if r[0] < compacted])):
        if chosen:
            await conn.executemany(
                f"INSERT INTO {table} (time, worker, layout, task, values) VALUES (to_timestamp($1), $2, $3, $4, $5)",
                chosen,
            )


async def refresh_rollups(dsn: str, retention=None, lag: float = 0):
    """What `python -m server rollups refresh` does (the rollups up to date, then compaction),
    with the tiers kept as long as `retention` says (default: all); waits while another
    refresh holds the lock."""
    import asyncio

    from server import background
    from server.config import Settings

    days = {"raw_retention_days": 100_000, **{f"rollup_{tier}_retention_days": 100_000 for tier in ("1m", "10m", "1h")}}
    if retention is not None:
        days = {"raw_retention_days": retention.raw_days,
                **{f"rollup_{name}_retention_days": value for name, value in retention.tier_days.items()}}
    settings = Settings(db_dsn=dsn, rollup_lag_seconds=lag, **days)
    while (done := await background.refresh_rollups(dsn, settings)) is None:
        await asyncio.sleep(0.05)
    return done


async def pass_time(conn, seconds: float, workers: list[str] | None = None) -> None:
    """As if `seconds` had passed since every registration's times (reads compare them with the
    database's now()), or only those of `workers`: each moved that much into the past, the
    health columns' included."""
    await conn.execute(
        """UPDATE worker_registrations SET
               register_time = register_time - make_interval(secs => $1),
               last_activity_time = last_activity_time - make_interval(secs => $1),
               last_report_time = last_report_time - make_interval(secs => $1),
               expires_at = expires_at - make_interval(secs => $1),
               gpu_idle_since = CASE WHEN gpu_idle_since IS NOT NULL THEN ARRAY(
                   SELECT t - make_interval(secs => $1) FROM unnest(gpu_idle_since) WITH ORDINALITY AS u (t, i) ORDER BY i)
               END
           WHERE $2::text[] IS NULL OR worker = ANY($2::text[])""",
        float(seconds),
        workers,
    )


async def health_fleet(client, conn) -> None:
    """Reports every minute for 35 minutes (time passing by `pass_time`): `busy` (GPUs at 80 and
    1 %), `idle` (two GPUs at 0 %), `cpu` (no GPU) and `dead`, which stopped 5 minutes ago (its
    GPU at 0 %): `dead` is silent, and GPU 1 of `busy` and both of `idle` are idle."""
    stats = {"busy": {"gpu_usage": [80, 1]}, "idle": {"gpu_usage": [0, 0]}, "cpu": {"cpu_usage": [5]},
             "dead": {"gpu_usage": [0]}}  # fmt: skip
    for minute in range(36):
        if minute:
            await pass_time(conn, 60)
        for worker, machine_stats in stats.items():
            if worker != "dead" or minute <= 30:
                body = {"worker": worker, "timestamp": now_ms(), "machine_stats": machine_stats}
                await ok(client, "workers.status_report", body)
