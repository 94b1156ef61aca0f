"""Soak benchmark: what a fleet costs at its real rate.

    bench/soak.sh [--workers 2000] [--period 5] [--minutes 10] [--warmup 60] [--reader-period 10]
                  [--processes 1] [--database workers_bench_soak] [--tree PATH] [--seed 1] [--floor 60]
                  [--replica DSN]

(`bench/soak.sh` prepares the venv and the local database, then runs `python -m bench.soak`
with the same arguments.)

The saturated ingest benchmark (bench/run.sh) stores reports in large batches; at a fleet's
real rate (2,000 daemons, one report every 5 s: 400 reports/s) nearly every report is its
own transaction. This benchmark runs such a fleet and measures what it costs:

1. recreates its own database (--database) on the cluster of WORKERS_DB_DSN (default the
   local one) and starts `python -m server serve --processes N` on it (which migrates it
   and starts the rollup refresher), from this checkout or, with --tree, from another one
   (its code, with PATH as working directory and PYTHONPATH; this checkout's venv);
   creates credentials and lifts the company's limits for the fleet by that code;
2. the fleet, in a process of its own (its CPU is not counted, and nothing here starves
   it): the demo fleet's machines (server/demo.py, this checkout's) reporting through the
   public HTTP API as `python -m server demo-fleet` does: one login for a token, a
   workers.register per worker, then one workers.status_report per worker every --period
   seconds, spread evenly over the period, GET with a JSON body, each worker waiting for
   its answer before its next report (a slot missed by a whole period is skipped). Each
   report's latency is counted from its scheduled time, so a stalled server shows;
3. the reader, in this process: every --reader-period seconds the fleet page's 1 h charts,
   workers.get_stats of the whole fleet (cpu_usage avg and max, interval 15 s, which the
   server raises) and workers.get_activity_report (same range and interval);
4. over the measured window (--minutes, after --warmup seconds of reports), from /proc:
   the CPU of the server processes (gunicorn master and workers), of the refresher, of
   PostgreSQL (the postmaster and every process it started, those it reaped included;
   others share the cluster, so its processes are sampled 20 times a second and the CPU of
   other databases' backends is left out: see PostgresCpu), of the fleet and of this
   process (reported, not counted), and of the whole machine (/proc/stat: what the rest of
   it used tells whether the run was disturbed); what the reads cost beyond the ingest's
   rate (CPU sampled around each read); with --replica (a streaming standby's cluster DSN: the
   server's chart reads go there, WORKERS_READ_DSN) the whole standby cluster's CPU, reported
   beside the others and not counted in their sum; the rollup lag (now() - materialized of
   rollup_watermark, every 5 s); the database's size at the window's start and end; and,
   after it, the stored rows of the window against the answers 200 (when worker_stats is a
   table to count);
5. the HTTP floors (--floor seconds each, after the run): the same fleet, not registering, against
   bench/bare_app.py, which parses each body and answers the envelope and stores nothing, served
   the same way (gunicorn, uvloop, the same process count): the server CPU a request costs at this
   rate before any work of ours, measured in the same run as the server's own figure; then
   against nginx answering every request with a fixed envelope (when nginx is installed): what
   this machine charges a compiled event-driven server for the same requests;
6. prints the figures per stored report beside the targets, and stops everything.

Exit status 1 when any report was answered other than 200 (there is no fault here, so a 503
counts too) or not answered, or a read failed; a target not met does not change it.
"""

import argparse
import asyncio
import math
import multiprocessing
import os
import re
import shutil
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, NamedTuple

import aiohttp
import asyncpg
import orjson

from bench.common import (
    HOST,
    LIMITS_REFRESH_SECONDS,
    LOOPBACK,
    ROOT,
    ApiClient,
    ServerProcess,
    chart_body,
    command_line,
    cpu_seconds,
    create_credentials,
    database_dsn,
    free_port,
    is_refresher,
    listed_children,
    listening_processes,
    load_average,
    log,
    login,
    machine_cpu_seconds,
    median,
    percentile,
    reaped_cpu_seconds,
    recreate_database,
    resolve_dsn,
    set_company_limits,
    total_cpu,
    tree_env,
)
from server import demo, serving

DEFAULT_DATABASE = "workers_bench_soak"
REQUEST_TIMEOUT = 30  # seconds: the demo fleet's client timeout
COUNT_TIMEOUT = 60  # seconds: the database check's count of stored reports
LAG_SAMPLE_SECONDS = 5
POSTGRES_SAMPLE_SECONDS = 0.05  # how often PostgreSQL's processes are attributed to a database
RATE_MARGIN = 10  # the company's reports/s limit: this many times the fleet's rate
CHART_RANGE = 3600
CHART_INTERVAL = 15  # what the fleet page asks for 1 h (300 points, rounded up to a nice step)
FLOOR_WARMUP_SECONDS = 10  # of a floor server's requests, before its window
FLOOR_SERVERS = {
    "bare handler": "bench/bare_app.py (parses the body, answers, stores nothing)",
    "nginx": "nginx (a fixed answer)",
}
CATCH_UP_SECONDS = 2  # after the reader's calls, before a quiet stretch begins
LATE_SEND_MS = 50  # a send's p99 lateness beyond this: the fleet did not keep its schedule
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
NO_ANSWER, SKIPPED = 0, -1  # statuses of a report that got no answer, of a slot never sent

TARGET_CPU_US = 200
TARGET_LAG_S = 120
TARGET_P99_MS = 50
TARGET_CHART_MS = 200


class Sent(NamedTuple):
    """One report slot of one worker; times in seconds of time.monotonic()."""

    due: float
    lateness: float  # when it was sent, after `due`
    latency: float  # when its answer arrived, after `due`
    status: int  # HTTP status, NO_ANSWER or SKIPPED
    timestamp_ms: int  # the report's own timestamp (wall clock)


# ------------------------------------------------------------------------- the fleet (its own process)


@dataclass(frozen=True)
class FleetPlan:
    url: str
    token: str
    workers: int
    period: float
    seed: int
    seconds: float  # how long to report, from the first slot
    register: bool = True  # workers.register each worker first (not for the bare handler)


def fleet_process(plan: FleetPlan, pipe) -> None:
    """The fleet process: ("started", first slot, registration seconds), then ("done", the
    report slots as plain tuples) or ("error", text) on `pipe`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops this process
    loop = serving.new_event_loop()
    try:
        sent = loop.run_until_complete(run_fleet(plan, pipe))
        pipe.send(("done", [tuple(slot) for slot in sent]))
    except Exception as error:
        pipe.send(("error", repr(error)))
    finally:
        loop.close()


async def run_fleet(plan: FleetPlan, pipe) -> list[Sent]:
    machines = demo.fleet(plan.workers, plan.seed)
    client = ApiClient(plan.url, plan.token, REQUEST_TIMEOUT, method="GET")
    try:
        began = time.monotonic()
        if plan.register:
            await register(client, machines, plan.period)
        start = time.monotonic() + 1.0
        pipe.send(("started", start, start - 1.0 - began))
        sent: list[Sent] = []
        stop_at = start + plan.seconds
        spacing = plan.period / len(machines)
        await asyncio.gather(*(
            keep_reporting(client, machine, start + number * spacing, plan.period, stop_at, sent)
            for number, machine in enumerate(machines)
        ))  # fmt: skip
        return sent
    finally:
        await client.close()


async def register(client: ApiClient, machines: list[demo.Machine], period: float) -> None:
    """Each worker in turn, as demo-fleet registers them."""
    timeout = max(60, int(period * 10))
    for machine in machines:
        body = {"worker": machine.worker, "queues": machine.queues, "tags": machine.tags, "timeout": timeout}
        _, status, content = await client.call("workers.register", body)
        if status != 200:
            raise RuntimeError(f"workers.register {machine.worker}: {status} {content[:200]!r}")


async def keep_reporting(
    client: ApiClient, machine: demo.Machine, due: float, period: float, stop_at: float, sent: list[Sent]
) -> None:
    """One report per period at this machine's slot, the next only after the last answer."""
    while due < stop_at:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        body = machine.report()
        began = time.monotonic()
        status = await send_report(client, body)
        answered = time.monotonic()
        sent.append(Sent(due, began - due, answered - due, status, body["timestamp"]))
        due += period
        if answered - due >= period:  # a daemon does not catch up on the slots it missed
            missed = int((answered - due) // period)
            sent.extend(Sent(due + slot * period, math.nan, math.nan, SKIPPED, 0) for slot in range(missed))
            due += missed * period


async def send_report(client: ApiClient, body: dict) -> int:
    try:
        _, status, _ = await client.call("workers.status_report", body)
        return status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return NO_ANSWER


def start_fleet(plan: FleetPlan) -> tuple[multiprocessing.Process, object]:
    parent_end, child_end = multiprocessing.Pipe(duplex=False)  # the parent receives, the fleet sends
    # fork: no event loop or thread runs in this process yet.
    process = multiprocessing.get_context("fork").Process(target=fleet_process, args=(plan, child_end), name="fleet")
    process.start()
    child_end.close()
    return process, parent_end


def receive(pipe, process: multiprocessing.Process, kind: str, timeout: float) -> tuple:
    """The fleet's next message, which must be `kind`."""
    deadline = time.monotonic() + timeout
    while not pipe.poll(1.0):
        if not process.is_alive() or time.monotonic() > deadline:
            raise SystemExit(f"the fleet process {'exited' if not process.is_alive() else 'did not answer'}"
                             f" before sending {kind!r}")  # fmt: skip
    message = pipe.recv()
    if message[0] == "error":
        raise SystemExit(f"the fleet process failed: {message[1]}")
    if message[0] != kind:
        raise SystemExit(f"the fleet process sent {message[0]!r}, not {kind!r}")
    return message[1:]


# ------------------------------------------------------------------------- the reader


@dataclass
class Read:
    name: str
    at: float  # monotonic, when asked
    ms: float  # until the whole answer arrived
    interval: float | None  # seconds between the answer's dates
    workers: int | None = None  # series of workers answered (get_stats)
    error: str = ""


@dataclass
class Quiet:
    """A stretch of a reader period without reads: from CATCH_UP_SECONDS after the reader's
    calls (the reports they held up are stored by then) to its next calls."""

    at: float  # monotonic
    seconds: float
    cpu: tuple[float, ...]  # CPU seconds of the server, of PostgreSQL (this database), in it


FLEET_CHART = "fleet chart"
ACTIVITY = "activity report"


def chart_reads(now: int) -> list[tuple[str, str, dict]]:
    """The fleet page's two 1 h reads of the whole fleet: (name, endpoint, body)."""
    cpu = [("cpu_usage", "avg"), ("cpu_usage", "max")]
    return [
        (FLEET_CHART, "workers.get_stats", chart_body(now - CHART_RANGE, now, CHART_INTERVAL, cpu, [])),
        (ACTIVITY, "workers.get_activity_report",
         {"from_date": now - CHART_RANGE, "to_date": now, "interval": CHART_INTERVAL}),
    ]  # fmt: skip


CpuProbe = Callable[[], tuple[float, float]]  # CPU seconds used so far by the server, by PostgreSQL


async def keep_reading(
    client: ApiClient, probe: CpuProbe, start: float, period: float, stop_at: float, reads: list[Read],
    quiet: list[Quiet],
) -> None:  # fmt: skip
    """The charts every `period` from `start` until `stop_at`, and the quiet stretches between."""
    at = start
    while at < stop_at:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        for name, endpoint, body in chart_reads(int(time.time())):
            reads.append(await timed_read(client, name, endpoint, body))
        at += period
        if at >= stop_at:
            break
        await asyncio.sleep(CATCH_UP_SECONDS)
        began, before = time.monotonic(), probe()
        if began < at:
            await asyncio.sleep(at - began)
            used = tuple(after - earlier for after, earlier in zip(probe(), before))
            quiet.append(Quiet(began, time.monotonic() - began, used))


async def timed_read(client: ApiClient, name: str, endpoint: str, body: dict) -> Read:
    at = time.monotonic()
    try:
        ms, status, content = await client.call(endpoint, body)
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        return Read(name, at, (time.monotonic() - at) * 1000, None, error=repr(error))
    answer = orjson.loads(content)
    if status != 200:
        return Read(name, at, ms, None, error=f"{status}: {answer.get('meta', {}).get('result_msg')}")
    data = answer["data"]
    if endpoint == "workers.get_stats":
        dates = data["workers"][0]["metrics"][0]["dates"] if data["workers"] else []
        return Read(name, at, ms, date_spacing(dates), workers=len(data["workers"]))
    return Read(name, at, ms, date_spacing(data["total"]["dates"]))


def date_spacing(dates: list[int]) -> float | None:
    return (dates[1] - dates[0]) / 1000 if len(dates) > 1 else None


# ------------------------------------------------------------------------- measuring


def serve_processes(server: ServerProcess) -> tuple[list[int], int | None]:
    """The server processes of `serve` (gunicorn master and workers, and the workers' reader
    processes: server/readers.py), and its refresher."""
    pids = server.pids()
    refresher = next((pid for pid in pids[1:] if is_refresher(pid)), None)
    return [pid for pid in pids if pid != refresher], refresher


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


THIS_DATABASE, OTHER_DATABASES, BACKGROUND, BENCH = "this database", "other databases", "background", "bench"


class PostgresCpu:
    """CPU of a PostgreSQL cluster running on this machine: the postmaster, every process it
    started, and those it has reaped. Sampled per process (every POSTGRES_SAMPLE_SECONDS), each
    process's CPU goes to a role: this database (its backends, autovacuum workers and
    TimescaleDB scheduler), other databases, the cluster's background processes, or the
    bench's own connection. What ended processes used after their last sample, or processes
    that lived between two samples, is shared like the CPU of the ended processes that were
    seen (other databases' short connections, the refresher's)."""

    def __init__(self, postmaster: int, database: str, database_oid: int, bench_backend: int):
        self.postmaster, self.database, self.oid = postmaster, database, str(database_oid)
        self.bench_backend = bench_backend
        self.roles: dict[int, str] = {postmaster: BACKGROUND}
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.ended: set[int] = set()
        self.total_first = 0.0

    def total(self) -> float:
        return cluster_cpu(self.postmaster)

    def start(self) -> float:
        self.total_first = self.total()
        self.sample()
        self.first = dict(self.last)
        return self.total_first

    def sample(self) -> None:
        alive = [self.postmaster, *listed_children(self.postmaster)]
        for pid in alive:
            used = cpu_seconds(pid)
            role = self.roles.get(pid) or self._role(pid)
            if used is not None and role is not None:
                self.roles[pid], self.last[pid] = role, used
        self.ended |= self.last.keys() - set(alive)

    def counted(self) -> float:
        """CPU seconds of this database's and the background processes, as last sampled (an
        ended process keeps its last sample)."""
        return sum(used for pid, used in self.last.items() if self.roles[pid] in (THIS_DATABASE, BACKGROUND))

    def shares(self, total_last: float) -> tuple[dict[str, float], float]:
        """CPU seconds since start() by role, and the part of them shared out as ended processes'."""
        shares, ended = defaultdict(float), defaultdict(float)
        for pid, used in self.last.items():
            seen = used - self.first.get(pid, 0.0)  # not there at the start: born since
            shares[self.roles[pid]] += seen
            if pid in self.ended:
                ended[self.roles[pid]] += seen
        unseen = total_last - self.total_first - sum(shares.values())
        weights = sum(ended.values())
        for role, seen in (ended.items() if weights > 0 else [(THIS_DATABASE, 1.0)]):
            shares[role] += unseen * seen / (weights or 1.0)
        return dict(shares), unseen

    def _role(self, pid: int) -> str | None:
        """None until the process has its title (a backend has the postmaster's at first)."""
        if pid == self.bench_backend:
            return BENCH
        title = command_line(pid)
        if not title.startswith("postgres: "):
            return None
        title = title.removeprefix("postgres: ")
        if found := re.match(r"parallel worker for PID (\d+)", title):
            return self.roles.get(int(found[1]), BACKGROUND)
        if found := re.search(r"for database (\d+)", title):  # TimescaleDB's scheduler
            return THIS_DATABASE if found[1] == self.oid else OTHER_DATABASES
        found = re.match(r"autovacuum worker (\S+)", title) or re.match(r"\S+ (\S+) (\S+\(\d+\)|\[local\])", title)
        if found is None:
            return BACKGROUND
        return THIS_DATABASE if found[1] == self.database else OTHER_DATABASES


def cluster_cpu(postmaster: int) -> float:
    """CPU seconds of a whole cluster: its postmaster, the processes it started and those it reaped."""
    own = (cpu_seconds(postmaster) or 0.0) + (reaped_cpu_seconds(postmaster) or 0.0)
    return own + total_cpu(listed_children(postmaster))


def find_postmaster(dsn: str) -> int | None:
    """The postmaster of the DSN's cluster when it runs on this machine (found by its port)."""
    parts = urllib.parse.urlsplit(dsn)
    if (parts.hostname or "localhost") not in LOOPBACK:
        return None
    listening = listening_processes(parts.port or 5432)  # the postmaster alone holds its listening socket
    return listening[0] if listening else None


@dataclass
class Snapshot:
    at: float  # monotonic
    wall: float  # time.time()
    server: float
    server_pids: list[int]
    refresher: float | None
    postgres: float | None  # the whole cluster
    postgres_counted: float | None  # PostgresCpu.counted()
    replica: float | None  # the whole replica cluster (--replica), when it runs on this machine
    fleet: float | None
    bench: float
    machine_busy: float
    machine_total: float
    load: str
    database_bytes: int


@dataclass
class Measured:
    first: Snapshot
    last: Snapshot
    lags: list[float]
    notes: list[str]  # what could not be measured
    reads: list[Read]
    quiet: list[Quiet]
    postgres_shares: dict[str, float]  # by role (PostgresCpu)
    postgres_unseen: float  # of which shared out as the ended processes'
    refresher_pid: int | None


class Meters:
    def __init__(
        self, server: ServerProcess, postgres: PostgresCpu | None, fleet_pid: int, conn: asyncpg.Connection, replica: int | None
    ):
        self.server, self.postgres, self.fleet_pid, self.conn = server, postgres, fleet_pid, conn
        self.replica = replica  # the replica's postmaster
        self.refresher_pid: int | None = None

    async def snapshot(self, first: bool) -> Snapshot:
        server_pids, refresher = serve_processes(self.server)
        if first:
            self.refresher_pid = refresher
        postgres = counted = None
        if self.postgres is not None:
            postgres = self.postgres.start() if first else self.postgres.total()
            counted = self.postgres.counted()
        busy, total = machine_cpu_seconds()
        return Snapshot(
            at=time.monotonic(), wall=time.time(), server=total_cpu(server_pids), server_pids=server_pids,
            refresher=cpu_seconds(self.refresher_pid) if self.refresher_pid else None, postgres=postgres,
            postgres_counted=counted, replica=cluster_cpu(self.replica) if self.replica else None, fleet=cpu_seconds(self.fleet_pid), bench=own_cpu(), machine_busy=busy, machine_total=total,
            load=load_average(), database_bytes=await self.conn.fetchval("SELECT pg_database_size(current_database())"),
        )  # fmt: skip


async def rollup_lag(conn: asyncpg.Connection) -> float:
    return await conn.fetchval("SELECT extract(epoch FROM now() - materialized)::float8 FROM rollup_watermark")


async def sample_lag(conn: asyncpg.Connection, stop_at: float, lags: list[float]) -> str:
    """Rollup lag every LAG_SAMPLE_SECONDS until `stop_at`; a note when it cannot be read."""
    while time.monotonic() < stop_at:
        try:
            lags.append(await rollup_lag(conn))
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as error:
            return f"rollup lag not measured: {error}"
        await asyncio.sleep(min(LAG_SAMPLE_SECONDS, max(0.0, stop_at - time.monotonic())))
    return ""


async def sample_postgres(postgres: PostgresCpu | None, stop_at: float) -> None:
    while postgres is not None and time.monotonic() < stop_at:
        postgres.sample()
        await asyncio.sleep(min(POSTGRES_SAMPLE_SECONDS, max(0.0, stop_at - time.monotonic())))


async def measure(args, server: ServerProcess, dsn: str, token: str, start: float, fleet_pid: int) -> Measured:
    """Read the charts from `start` on; measure the window after the warm-up."""
    window_start = start + args.warmup
    window_end = window_start + args.minutes * 60
    conn = await asyncpg.connect(dsn)
    reader = ApiClient(server.url, token, REQUEST_TIMEOUT)
    reads: list[Read] = []
    try:
        postmaster = find_postmaster(dsn)
        postgres = None
        if postmaster is not None:
            oid = await conn.fetchval("SELECT oid FROM pg_database WHERE datname = current_database()")
            postgres = PostgresCpu(postmaster, args.database, oid, conn.get_server_pid())
        def probe() -> tuple[float, float]:
            server_pids, _ = serve_processes(server)  # reader processes start with the first read
            return total_cpu(server_pids), postgres.counted() if postgres is not None else math.nan

        quiet: list[Quiet] = []
        reading = asyncio.create_task(keep_reading(reader, probe, start, args.reader_period, window_end, reads, quiet))
        replica = find_postmaster(args.replica) if args.replica else None
        meters = Meters(server, postgres, fleet_pid, conn, replica)
        await asyncio.sleep(max(0.0, window_start - time.monotonic()))
        first = await meters.snapshot(first=True)
        lags: list[float] = []
        lag_note, _ = await asyncio.gather(sample_lag(conn, window_end, lags), sample_postgres(postgres, window_end))
        await asyncio.sleep(max(0.0, window_end - time.monotonic()))
        if postgres is not None:
            postgres.sample()
        last = await meters.snapshot(first=False)
        await reading
        shares, unseen = postgres.shares(last.postgres) if postgres is not None else ({}, 0.0)
        notes = [lag_note] if lag_note else []
        if postmaster is None:
            notes.append("PostgreSQL's CPU not measured: its cluster does not run on this machine")
        if args.replica and replica is None:
            notes.append("the replica's CPU not measured: its cluster does not run on this machine")
        return Measured(first, last, lags, notes, reads, quiet, shares, unseen, meters.refresher_pid)
    finally:
        await reader.close()
        await conn.close()


async def stored_rows(dsn: str, company: str, low_ms: int, high_ms: int) -> int | None:
    """Rows of worker_stats of the company with a time in [low_ms, high_ms); None when the
    storage has no such table or counting them takes too long."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM worker_stats WHERE company = $1 AND time >= $2 AND time < $3",
            company, EPOCH + timedelta(milliseconds=low_ms), EPOCH + timedelta(milliseconds=high_ms),
            timeout=COUNT_TIMEOUT,
        )  # fmt: skip
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError, asyncio.TimeoutError):
        return None
    finally:
        await conn.close()


# ------------------------------------------------------------------------- results


@dataclass
class ReadCost:
    """What the window's reads cost: the CPU of the server and PostgreSQL (this database)
    over the window, less what the ingest alone uses in as long, measured in the window's
    quiet stretches. An estimate: the ingest is steady, the reads are not."""

    pairs: int  # fleet charts (each with its activity report)
    quiet_seconds: float
    server: float
    postgres: float


def read_cost(measured: Measured, seconds: float) -> ReadCost:
    first, last = measured.first, measured.last
    quiet = [stretch for stretch in measured.quiet if first.at <= stretch.at and stretch.at + stretch.seconds <= last.at]
    quiet_seconds = sum(stretch.seconds for stretch in quiet)

    def beyond_ingest(whole: float | None, part: int) -> float:
        if whole is None or quiet_seconds <= 0:
            return math.nan
        return whole - sum(stretch.cpu[part] for stretch in quiet) / quiet_seconds * seconds

    counted = None if first.postgres_counted is None else last.postgres_counted - first.postgres_counted
    return ReadCost(
        pairs=len(window_reads(measured, FLEET_CHART)),
        quiet_seconds=quiet_seconds,
        server=beyond_ingest(last.server - first.server, 0),
        postgres=beyond_ingest(counted, 1),
    )


@dataclass
class Results:
    seconds: float
    due: int  # report slots in the window
    statuses: Counter  # of the window's slots
    run_statuses: Counter  # of every slot of the run, warm-up included
    latencies_ms: list[float]  # from the scheduled time
    lateness_ms: list[float]
    service_ms: list[float]  # from the send
    stored_client: int  # answers 200 with a report timestamp in the window (wall clock)
    stored_database: int | None
    cpu: dict[str, float | None] = field(default_factory=dict)  # seconds in the window
    reads: ReadCost | None = None

    @property
    def stored(self) -> int:
        return self.statuses[200]

    def per_report_us(self, seconds: float | None) -> float:
        return math.nan if seconds is None or not self.stored else seconds / self.stored * 1e6


def window_ms(measured: Measured) -> tuple[int, int]:
    """The window in wall-clock milliseconds, as the reports' timestamps are."""
    return int(measured.first.wall * 1000), int(measured.last.wall * 1000)


def window_slots(sent: list[Sent], measured: Measured) -> list[Sent]:
    return [slot for slot in sent if measured.first.at <= slot.due < measured.last.at]


class Floor(NamedTuple):
    """The same fleet against a server that stores nothing: what its HTTP requests alone cost."""

    name: str
    cpu: float  # seconds, the bare server's processes in the window
    answered: int  # requests answered 200 in the window
    seconds: float

    @property
    def per_request_us(self) -> float:
        return self.cpu / self.answered * 1e6 if self.answered else math.nan


def cpu_used(measured: Measured) -> dict[str, float | None]:
    first, last = measured.first, measured.last

    def delta(name: str) -> float | None:
        low, high = getattr(first, name), getattr(last, name)
        return None if low is None or high is None else high - low

    postgres = delta("postgres")
    if postgres is not None:  # other databases' backends and the bench's own connection are not the fleet's
        postgres -= measured.postgres_shares.get(OTHER_DATABASES, 0.0) + measured.postgres_shares.get(BENCH, 0.0)
    return {
        "server": delta("server"), "refresher": delta("refresher"), "postgres": postgres, "replica": delta("replica"),
        "fleet": delta("fleet"), "bench": delta("bench"), "machine": delta("machine_busy"),
    }  # fmt: skip


def results_of(sent: list[Sent], measured: Measured, stored_database: int | None) -> Results:
    slots = window_slots(sent, measured)
    answered = [slot for slot in slots if slot.status != SKIPPED]
    low_ms, high_ms = window_ms(measured)
    return Results(
        seconds=measured.last.at - measured.first.at,
        due=len(slots),
        statuses=Counter(slot.status for slot in slots),
        run_statuses=Counter(slot.status for slot in sent),
        latencies_ms=[slot.latency * 1000 for slot in answered],
        lateness_ms=[slot.lateness * 1000 for slot in answered],
        service_ms=[(slot.latency - slot.lateness) * 1000 for slot in answered],
        stored_client=sum(1 for slot in sent if slot.status == 200 and low_ms <= slot.timestamp_ms < high_ms),
        stored_database=stored_database,
        cpu=cpu_used(measured),
        reads=read_cost(measured, measured.last.at - measured.first.at),
    )


def checkout_of(tree: Path) -> str:
    """`tree`'s commit, and whether its files differ from it."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return f"{tree} (not a git checkout)"
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return f"{tree} at {head.stdout.strip()}" + (" with uncommitted changes" if dirty else "")


def cores() -> int:
    """The cores this process may run on, as nproc counts them."""
    return len(os.sched_getaffinity(0))


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else "met" if ok else "NOT met"


def status_text(statuses: Counter) -> str:
    names = {NO_ANSWER: "no answer", SKIPPED: "skipped slots"}
    return ", ".join(f"{names.get(code, code)}: {count:,}" for code, count in sorted(statuses.items(), reverse=True))


def print_setup(args, tree: Path, dsn: str, registered_s: float, measured: Measured) -> None:
    rate = args.workers / args.period
    print(f"SOAK: {args.workers:,} workers x one report per {args.period:g} s ({rate:,.1f} reports/s offered), "
          f"{args.minutes:g} min measured after {args.warmup:g} s of warm-up; {args.processes} server process(es); "
          f"a reader every {args.reader_period:g} s")  # fmt: skip
    print(f"  server: {checkout_of(tree)}")
    print(f"  fleet, reader and measuring: {checkout_of(ROOT)}")
    print(f"  database: {dsn}")
    print(f"  machine: {cores()} cores; load average at the window's start {measured.first.load}, "
          f"at its end {measured.last.load}")  # fmt: skip
    print(f"  fleet: {args.workers:,} demo workers (seed {args.seed}) registered one by one in {registered_s:,.1f} s")


def print_reports(args, results: Results) -> None:
    seconds = results.seconds
    print()
    print(f"REPORTS (window of {seconds:,.1f} s)")
    print(f"  offered   {results.due / seconds:>9,.1f} reports/s ({results.due:,} slots due)")
    print(f"  stored    {results.stored / seconds:>9,.1f} reports/s ({results.stored:,} answered 200)")
    print(f"  answers   {status_text(results.statuses)}")
    if results.stored_database is None:
        print(f"  database check: not made (no worker_stats table, or counting took over {COUNT_TIMEOUT} s)")
    else:
        same = "equal" if results.stored_database == results.stored_client else "DIFFERENT"
        print(f"  database check: {results.stored_database:,} rows with a time in the window, "
              f"{results.stored_client:,} reports with such a time answered 200: {same}")  # fmt: skip
    print(f"  latency from the scheduled time, p50 / p99 / max: {spread(results.latencies_ms)}")
    print(f"  latency from the send (the fleet's own lateness left out): {spread(results.service_ms)}")
    late = results.lateness_ms
    print(f"  sends' lateness: {spread(late)}; slots skipped: {results.statuses[SKIPPED]:,}")
    if percentile(late, 0.99) > LATE_SEND_MS or results.statuses[SKIPPED]:
        print(f"  WARNING: the fleet did not keep its schedule (p99 lateness over {LATE_SEND_MS} ms or slots skipped)")


def spread(values_ms: list[float]) -> str:
    return (f"{percentile(values_ms, .5):,.1f} / {percentile(values_ms, .99):,.1f} / "
            f"{max(values_ms, default=math.nan):,.1f} ms")  # fmt: skip


def print_cpu(results: Results, measured: Measured, floors: list[Floor]) -> None:
    seconds, cpu = results.seconds, results.cpu
    count = cores()
    print()
    print("CPU IN THE WINDOW (from /proc; µs per stored report; % of one core)")
    rows = [
        (f"server ({len(measured.last.server_pids)} processes)", cpu["server"]),
        ("refresher" + ("" if measured.refresher_pid else " (not found)"), cpu["refresher"]),
        ("PostgreSQL", cpu["postgres"]),
    ]
    for name, used in rows:
        print(f"  {name:<26}{cpu_cell(results, used, seconds)}")
    counted = [used for _, used in rows]
    total = counted_cpu(results)
    print(f"  {'sum':<26}{cpu_cell(results, total, seconds)}   target <= {TARGET_CPU_US} µs: "
          f"{met(None if total is None else results.per_report_us(total) <= TARGET_CPU_US)}")  # fmt: skip
    if measured.postgres_shares:
        shares = measured.postgres_shares
        print(f"  PostgreSQL: {THIS_DATABASE} {shares.get(THIS_DATABASE, 0.0):,.1f} s, {BACKGROUND} "
              f"{shares.get(BACKGROUND, 0.0):,.1f} s (counted); {OTHER_DATABASES} {shares.get(OTHER_DATABASES, 0.0):,.1f} s, "
              f"the bench's connection {shares.get(BENCH, 0.0):,.1f} s (not counted); of all these, "
              f"{measured.postgres_unseen:,.1f} s used by processes after their last sample (shared as the "
              f"ended processes' CPU)")  # fmt: skip
    if measured.first.replica is not None:
        print(f"  {'replica (not counted)':<26}{cpu_cell(results, cpu['replica'], seconds)}   its whole cluster: "
              f"replaying the primary's WAL, and the chart reads it served")  # fmt: skip
    reads = results.reads
    print(f"  the reads ({reads.pairs} fleet charts and activity reports; the ingest alone measured in "
          f"{reads.quiet_seconds:,.0f} s of quiet stretches): server {reads.server:,.1f} s, PostgreSQL {reads.postgres:,.1f} s, "
          f"{(reads.server + reads.postgres) / reads.pairs * 1000 if reads.pairs else math.nan:,.0f} ms per pair; "
          f"{results.per_report_us(reads.server + reads.postgres):,.0f} µs per stored report (estimated); "
          f"the sum without them {results.per_report_us(without_reads(results)):,.0f} µs")  # fmt: skip
    for floor in floors:
        print(f"  the HTTP floor, {FLOOR_SERVERS[floor.name]}, under the same fleet: "
              f"{floor.answered:,} requests in {floor.seconds:,.0f} s: {floor.per_request_us:,.0f} µs per request "
              f"({floor.cpu:,.1f} s, {percent(floor.cpu, floor.seconds)}); the server above it "
              f"{results.per_report_us(cpu['server']) - floor.per_request_us:,.0f} µs per report")  # fmt: skip
    print(f"  not counted: fleet process {percent(cpu['fleet'], seconds)}, reader and measuring {percent(cpu['bench'], seconds)}")
    measured_sum = sum(used for used in (*counted, cpu["fleet"], cpu["bench"]) if used is not None)
    machine = cpu["machine"]
    print(f"  machine: {count} cores busy {machine / seconds / count * 100:,.0f}% ({percent(machine, seconds)}); "
          f"the processes above {percent(measured_sum, seconds)}, the rest of the machine (other databases' "
          f"backends included) {percent(machine - measured_sum, seconds)}")  # fmt: skip
    if measured.first.server_pids != measured.last.server_pids:
        print("  WARNING: the server's processes changed during the window (a worker restarted?)")


def counted_cpu(results: Results) -> float | None:
    """Server, refresher and PostgreSQL: what the fleet and its reader cost (None: one is not measured)."""
    parts = [results.cpu["server"], results.cpu["refresher"], results.cpu["postgres"]]
    return None if any(part is None for part in parts) else sum(parts)


def without_reads(results: Results) -> float | None:
    total = counted_cpu(results)
    return None if total is None else total - results.reads.server - results.reads.postgres


def cpu_cell(results: Results, used: float | None, seconds: float) -> str:
    if used is None:
        return f"{'not measured':>10}"
    return f"{results.per_report_us(used):>8,.0f} µs   ({used:,.1f} s, {percent(used, seconds)})"


def percent(used: float | None, seconds: float) -> str:
    return "n/a" if used is None else f"{used / seconds * 100:,.0f}% of a core"


def print_lag_and_storage(results: Results, measured: Measured) -> None:
    print()
    if measured.lags:
        print(f"ROLLUP LAG (now() - rollup_watermark.materialized, every {LAG_SAMPLE_SECONDS} s): median "
              f"{median(measured.lags):,.0f} s, max {max(measured.lags):,.0f} s; target <= {TARGET_LAG_S} s (max): "
              f"{met(max(measured.lags) <= TARGET_LAG_S)}")  # fmt: skip
    for note in measured.notes:
        print(f"  NOTE: {note}")
    growth = measured.last.database_bytes - measured.first.database_bytes
    per_report = growth / results.stored if results.stored else math.nan
    print(f"DATABASE: {measured.first.database_bytes / 1e6:,.1f} MB at the window's start, "
          f"{measured.last.database_bytes / 1e6:,.1f} MB at its end: {per_report:,.0f} bytes per stored report")  # fmt: skip


def window_reads(measured: Measured, name: str) -> list[Read]:
    return [read for read in measured.reads if read.name == name and measured.first.at <= read.at < measured.last.at]


def print_reads(args, measured: Measured) -> None:
    print()
    print(f"READS (every {args.reader_period:g} s, 1 h of the whole fleet, interval {CHART_INTERVAL} s asked; ms until "
          f"the whole answer arrived)")  # fmt: skip
    print(f"  {'read':<18}{'reads':>6}{'median':>9}{'p95':>9}{'max':>9}  {'interval answered':<18}{'workers':<9}target")
    for name in (FLEET_CHART, ACTIVITY):
        reads = window_reads(measured, name)
        times = [read.ms for read in reads if not read.error]
        intervals = sorted({f"{read.interval:g} s" for read in reads if read.interval is not None})
        workers = sorted({read.workers for read in reads if read.workers is not None})
        target = (f"median <= {TARGET_CHART_MS} ms: {met(median(times) <= TARGET_CHART_MS if times else None)}"
                  if name == FLEET_CHART else "-")  # fmt: skip
        print(f"  {name:<18}{len(reads):>6}{median(times):>9,.0f}{percentile(times, .95):>9,.0f}"
              f"{max(times, default=math.nan):>9,.0f}  {', '.join(intervals) or '-':<18}"
              f"{', '.join(map(str, workers)) or '-':<9}{target}")  # fmt: skip
        for read in reads:
            if read.error:
                print(f"    ERROR at {read.at - measured.first.at:,.0f} s: {read.error}")


def print_summary(results: Results, measured: Measured, floors: list[Floor]) -> None:
    cpu = results.cpu
    total = counted_cpu(results)
    fleet_chart = [read.ms for read in window_reads(measured, FLEET_CHART) if not read.error]
    p99 = percentile(results.latencies_ms, 0.99)
    lag = max(measured.lags) if measured.lags else None
    chart = median(fleet_chart) if fleet_chart else None
    rows = [
        ("stored reports/s", f"{results.stored / results.seconds:,.1f}", f"offered {results.due / results.seconds:,.1f}", ""),
        ("CPU per report: server", f"{results.per_report_us(cpu['server']):,.0f} µs", "", ""),
        ("  refresher", f"{results.per_report_us(cpu['refresher']):,.0f} µs", "", ""),
        ("  PostgreSQL", f"{results.per_report_us(cpu['postgres']):,.0f} µs", "", ""),
        ("  sum", f"{results.per_report_us(total):,.0f} µs", f"<= {TARGET_CPU_US} µs",
         met(None if total is None else results.per_report_us(total) <= TARGET_CPU_US)),
        ("  sum without the reads", f"{results.per_report_us(without_reads(results)):,.0f} µs", "(estimated)", ""),
        *((("replica (replay, reads)", f"{results.per_report_us(cpu['replica']):,.0f} µs", "", ""),)
          if cpu["replica"] is not None else ()),
        *((f"HTTP floor: {floor.name}", f"{floor.per_request_us:,.0f} µs", "(per request)", "") for floor in floors),
        ("report latency p99", f"{p99:,.1f} ms", f"< {TARGET_P99_MS} ms", met(p99 < TARGET_P99_MS if results.latencies_ms else None)),
        ("rollup lag, max", "-" if lag is None else f"{lag:,.0f} s", f"<= {TARGET_LAG_S} s", met(None if lag is None else lag <= TARGET_LAG_S)),
        ("fleet chart 1 h, median", "-" if chart is None else f"{chart:,.0f} ms", f"<= {TARGET_CHART_MS} ms",
         met(None if chart is None else chart <= TARGET_CHART_MS)),
        ("database per report", f"{(measured.last.database_bytes - measured.first.database_bytes) / results.stored:,.0f} B"
         if results.stored else "-", "", ""),
    ]  # fmt: skip
    print()
    print("SUMMARY")
    print(f"  {'':<26}{'figure':>12}   {'target':<14}met?")
    for name, figure, target, verdict in rows:
        print(f"  {name:<26}{figure:>12}   {target:<14}{verdict}")


def failures_of(results: Results, measured: Measured) -> list[str]:
    failures = []
    unexpected = Counter({code: count for code, count in results.run_statuses.items() if code not in (200, SKIPPED)})
    if unexpected:
        failures.append(f"reports answered other than 200 in the run (warm-up included): {status_text(unexpected)}")
    failed_reads = [read for read in measured.reads if read.error]
    if failed_reads:
        failures.append(f"{len(failed_reads)} read(s) failed, e.g. {failed_reads[0].name}: {failed_reads[0].error}")
    return failures


# ------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2000, help="simulated daemons (default 2000)")
    parser.add_argument("--period", type=float, default=5, help="seconds between a worker's reports (default 5)")
    parser.add_argument("--minutes", type=float, default=10, help="minutes measured (default 10)")
    parser.add_argument("--warmup", type=float, default=60, help="seconds of reports before measuring (default 60)")
    parser.add_argument("--reader-period", type=float, default=10, help="seconds between chart reads (default 10)")
    parser.add_argument("--processes", type=int, default=1, help="server processes (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="the demo fleet's seed (default 1)")
    parser.add_argument(
        "--database", default=DEFAULT_DATABASE,
        help=f"the bench's own database on WORKERS_DB_DSN's cluster, dropped and recreated (default {DEFAULT_DATABASE})",
    )  # fmt: skip
    parser.add_argument("--tree", type=Path, help="run the server of this checkout (e.g. a git worktree) instead")
    parser.add_argument(
        "--floor", type=float, default=60,
        help="seconds of the same fleet against bench/bare_app.py, then nginx, after the run: the HTTP floors "
        "(default 60 each; 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--replica", metavar="DSN", default="",
        help="a streaming standby of WORKERS_DB_DSN's cluster (e.g. the one of `scripts/local-timescaledb.sh standby "
        "start`): the server sends its chart reads there (WORKERS_READ_DSN) and the replica's CPU is measured",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("workers", "period", "minutes", "reader_period", "processes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0 or args.floor < 0:
        parser.error("--warmup and --floor must be 0 or more")
    if not args.database.startswith(DEFAULT_DATABASE):
        parser.error(f"--database must start with {DEFAULT_DATABASE}: the bench drops and recreates it")
    if args.tree is not None and not (args.tree / "server" / "__main__.py").is_file():
        parser.error(f"--tree {args.tree}: no server/__main__.py there")
    return args


def start_server(dsn: str, tree: Path, processes: int, workdir: Path, read_dsn: str = "") -> ServerProcess:
    port = free_port()
    env = {**os.environ, "WORKERS_DB_DSN": dsn, "WORKERS_READ_DSN": read_dsn, "PYTHONUNBUFFERED": "1", **tree_env(tree)}
    server = ServerProcess(
        "soak",
        [sys.executable, "-m", "server", "serve", "--host", HOST, "--port", str(port), "--processes", str(processes)],
        port, env, workdir / "server.log", cwd=tree,
    )  # fmt: skip
    server.start()
    return server


def prepare_company(server: ServerProcess, dsn: str, tree: Path, args) -> tuple[str, str]:
    """A company whose limits admit the fleet; a token of it and its id."""
    name = f"bench-soak-{time.strftime('%Y%m%d-%H%M%S')}"
    credentials = create_credentials(dsn, name, tree)
    rate = args.workers / args.period * RATE_MARGIN
    set_company_limits(dsn, name, "--workers", str(args.workers), "--reports-per-second", f"{rate:g}", tree=tree)
    time.sleep(LIMITS_REFRESH_SECONDS + 1)  # every server process reads the new limits
    return login(server, credentials["access_key"], credentials["secret_key"])


def stop_fleet(process: multiprocessing.Process | None) -> None:
    if process is not None and process.is_alive():
        process.terminate()
        process.join(10)


def measure_floors(args, workdir: Path) -> list[Floor]:
    """The fleet's reports at the same rate, to servers that store nothing: bench/bare_app.py
    (parses the body and answers the envelope: the same gunicorn + uvloop serving, the same
    process count), what a request costs our framework at this rate before any work of ours;
    and nginx answering a fixed envelope (when installed), what it costs a compiled server."""
    floors = [measure_floor(args, bare_app_server(args, workdir))]
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if os.access(nginx, os.X_OK):
        floors.append(measure_floor(args, nginx_server(nginx, args, workdir)))
    else:
        log("nginx is not installed: no compiled server's floor")
    return floors


def bare_app_server(args, workdir: Path) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_app", "--host", HOST, "--port", str(port), "--processes", str(args.processes)]
    return ServerProcess("bare handler", argv, port, {**os.environ, "PYTHONUNBUFFERED": "1"}, workdir / "bare.log")


def nginx_server(nginx: str, args, workdir: Path) -> ServerProcess:
    port, folder = free_port(), workdir / "nginx"
    folder.mkdir(exist_ok=True)
    answer = orjson.dumps({"meta": {"result_code": 0, "result_msg": "OK"}, "data": {}}).decode()
    (folder / "nginx.conf").write_text(
        f"worker_processes {args.processes};\ndaemon off;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} warn;\nevents {{ worker_connections {4 * args.workers + 64}; }}\n"
        f"http {{ access_log off; client_body_temp_path {folder / 'body'};\n"
        f"  server {{ listen {HOST}:{port}; location / {{ default_type application/json; return 200 '{answer}'; }} }} }}\n"
    )  # fmt: skip
    argv = [nginx, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(folder / "nginx.conf")]
    return ServerProcess("nginx", argv, port, dict(os.environ), workdir / "nginx.log")


def measure_floor(args, server: ServerProcess) -> Floor:
    """The server's CPU per request answered in `args.floor` seconds of the fleet, after
    FLOOR_WARMUP_SECONDS of it."""
    log(f"the HTTP floor: the same fleet against {FLOOR_SERVERS[server.name]} for {args.floor:g} s")
    server.start()
    fleet = None
    try:
        server.wait_ready(args.processes)
        plan = FleetPlan(server.url, "", args.workers, args.period, args.seed, FLOOR_WARMUP_SECONDS + args.floor, register=False)
        fleet, pipe = start_fleet(plan)
        start, _ = receive(pipe, fleet, "started", timeout=60)
        time.sleep(max(0.0, start + FLOOR_WARMUP_SECONDS - time.monotonic()))
        pids = server.pids()
        used, began = total_cpu(pids), time.monotonic()
        time.sleep(args.floor)
        used, ended = total_cpu(pids) - used, time.monotonic()
        (plain,) = receive(pipe, fleet, "done", timeout=REQUEST_TIMEOUT + 60)
    finally:
        stop_fleet(fleet)
        server.stop()
    answered = sum(1 for slot in map(Sent._make, plain) if slot.status == 200 and began <= slot.due + slot.latency < ended)
    return Floor(server.name, used, answered, ended - began)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tree = (args.tree or ROOT).resolve()
    cluster_dsn, _ = resolve_dsn()
    dsn = database_dsn(cluster_dsn, args.database)
    workdir = Path(tempfile.mkdtemp(prefix="workers-bench-soak-"))
    log(f"database {dsn} (recreated); server log in {workdir}")
    asyncio.run(recreate_database(cluster_dsn, args.database))
    read_dsn = database_dsn(args.replica, args.database) if args.replica else ""
    server = start_server(dsn, tree, args.processes, workdir, read_dsn)
    fleet = None
    try:
        server.wait_ready(args.processes)
        token, company = prepare_company(server, dsn, tree, args)
        seconds = args.warmup + args.minutes * 60
        fleet, pipe = start_fleet(FleetPlan(server.url, token, args.workers, args.period, args.seed, seconds))
        log(f"registering {args.workers:,} workers")
        start, registered_s = receive(pipe, fleet, "started", timeout=600)
        log(f"reporting: {args.warmup:g} s of warm-up, then {args.minutes:g} min measured")
        measured = asyncio.run(measure(args, server, dsn, token, start, fleet.pid))
        (plain,) = receive(pipe, fleet, "done", timeout=REQUEST_TIMEOUT + 60)
        fleet.join(30)
    finally:
        stop_fleet(fleet)
        server.stop()
    floors = measure_floors(args, workdir) if args.floor else []
    sent = [Sent(*slot) for slot in plain]
    stored = asyncio.run(stored_rows(dsn, company, *window_ms(measured)))
    results = results_of(sent, measured, stored)

    print_setup(args, tree, dsn, registered_s, measured)
    print_reports(args, results)
    print_cpu(results, measured, floors)
    print_lag_and_storage(results, measured)
    print_reads(args, measured)
    print_summary(results, measured, floors)
    failures = failures_of(results, measured)
    print()
    for text in failures:
        print(f"FAILURE: {text}")
    print(f"RESULT: {'no failure' if not failures else f'{len(failures)} failure(s)'}; targets: see SUMMARY")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; fleet and server stopped")
        sys.exit(130)
