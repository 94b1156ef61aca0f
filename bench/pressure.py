"""Reads beside ingest: what open dashboards cost the fleet's status reports.

    bench/pressure.sh [--clients 0,1,2,8] [--seconds 20] [--connections 8] [--get-all 8000]
                      [--runs 10] [--writer-gather-ms 0] [--against-env NAME=VALUE ...]
                      [--workers 200] [--days 1] [--database workers_bench_reads]

(`bench/pressure.sh` prepares the venv, wrk and the local database, then runs
`python -m bench.pressure` with the same arguments.)

1. the reads benchmark's history (bench/reads.py: --workers agent-shaped workers, --days of
   reports every 10 s, in its database; loaded once, then reused and topped up to now), its
   rollups refreshed, copied into a database of this benchmark's own (the --database name
   with `_pressure` after it, recreated each run), so that the status reports sent here stay
   out of the reads benchmark's history;
2. starts `python -m server serve --processes 1` on it, its writer's gather at
   --writer-gather-ms (default 0: wrk's connections each wait for their answer, so a 25 ms
   gather would hold them to 8 reports per 25 ms, and the phases would measure that wait
   instead of the CPU that reads take from reports); with --against-env a second server
   with those variables too (e.g. WORKERS_READ_PROCESSES=0: heavy reads computed in the server
   process, as before server/readers.py); the servers take turns, one phase each;
3. each read alone, nothing else running, --runs times: the server's CPU per read (the
   serving processes and the reader processes apart), PostgreSQL's, the answer's size, and
   the event loop's lag (the server's /metrics histogram);
4. phases: wrk -c{--connections} sending status reports (bench/report.lua) of a company of
   its own for --seconds, alone and beside each count of --clients chart clients, each
   asking for the mix in turn and waiting for every answer: the fleet chart (every worker,
   cpu_usage avg and max, 24 h at 600 s), 20 workers (cpu_usage and memory_used, 6 h at
   40 s) and the activity report (7 days at 1 h), of the history's company: another
   company's dashboards. With --get-all N, the same with clients polling workers.get_all of a
   third company with N registered workers;
5. prints per phase: status reports/s and the ratio to that server's ingest alone, their
   p99, the reads answered and their median and p99, the CPU of the serving processes, the
   readers (also per read) and PostgreSQL, and the event loop's lag samples over 10 ms.
   (Beside the reports, the serving process's few milliseconds per read are below the
   noise of its ingest: step 3 measures them.)

Exit status 1 when a read failed or a status report was answered other than 200.
"""

import argparse
import asyncio
import itertools
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

from bench import reads as reads_bench
from bench.common import (
    ApiClient,
    ServerProcess,
    chart_body,
    create_credentials,
    database_dsn,
    descendants,
    is_refresher,
    listed_children,
    log,
    login,
    median,
    percentile,
    require_wrk,
    resolve_dsn,
    set_company_limits,
    total_cpu,
)
from bench.history import worker_id
from bench.ingest import postgres_cpu_seconds, register_fleet, run_wrk

DAY = 86400
WARM_SECONDS = 2  # chart clients ask this long before wrk starts
DRAIN_SECONDS = 2
REPORT_LATENCY_LIMIT_S = 10
READ_TIMEOUT = 120
LOOP_LAG_LIMIT_MS = 10
INGEST_WORKERS = 2000
TARGET_RATIO = 0.8
TARGET_P99_MS = 50

FLEET_CHART, TWENTY_WORKERS, ACTIVITY, GET_ALL = "fleet chart 24 h", "20 workers 6 h", "activity 7 d", "get_all"


@dataclass(frozen=True)
class Read:
    name: str
    endpoint: str
    body: dict


def chart_mix(workers: int, to_date: float) -> list[Read]:
    return [
        Read(FLEET_CHART, "workers.get_stats",
             chart_body(to_date - DAY, to_date, 600, [("cpu_usage", "avg"), ("cpu_usage", "max")], [])),
        Read(TWENTY_WORKERS, "workers.get_stats",
             chart_body(to_date - 6 * 3600, to_date, 40, [("cpu_usage", "avg"), ("memory_used", "avg")],
                        [worker_id(number) for number in range(min(20, workers))])),
        Read(ACTIVITY, "workers.get_activity_report", {"from_date": to_date - 7 * DAY, "to_date": to_date, "interval": 3600}),
    ]  # fmt: skip


# ------------------------------------------------------------------------- the chart clients (a process of their own)


@dataclass(frozen=True)
class ClientsPlan:
    url: str
    token: str
    clients: int
    reads: list[Read]
    stop_at: float  # time.monotonic()


@dataclass(frozen=True)
class Answered:
    name: str
    began: float  # time.monotonic()
    ms: float
    status: int
    size: int


def clients_process(plan: ClientsPlan, pipe) -> None:
    try:
        pipe.send(("done", asyncio.run(run_clients(plan))))
    except Exception as error:
        pipe.send(("error", repr(error)))


async def run_clients(plan: ClientsPlan) -> list[Answered]:
    answered: list[Answered] = []

    async def one(number: int) -> None:
        client = ApiClient(plan.url, plan.token, READ_TIMEOUT)
        try:
            mix = itertools.islice(itertools.cycle(plan.reads), number % len(plan.reads), None)
            for read in mix:
                if time.monotonic() >= plan.stop_at:
                    return
                began = time.monotonic()
                try:
                    ms, status, content = await client.call(read.endpoint, read.body)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ms, status, content = (time.monotonic() - began) * 1000, 0, b""
                answered.append(Answered(read.name, began, ms, status, len(content)))
        finally:
            await client.close()

    await asyncio.gather(*(one(number) for number in range(plan.clients)))
    return answered


def start_clients(plan: ClientsPlan) -> tuple[multiprocessing.Process, object]:
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe(duplex=False)
    process = context.Process(target=clients_process, args=(plan, child_end), daemon=True)
    process.start()
    return process, parent_end


# ------------------------------------------------------------------------- measuring


@dataclass
class Cpu:
    serving: float  # the gunicorn master and workers
    readers: float  # their reader processes (server/readers.py)
    postgres: float

    def __sub__(self, other: "Cpu") -> "Cpu":
        return Cpu(self.serving - other.serving, self.readers - other.readers, self.postgres - other.postgres)


def cpu_of(server: ServerProcess) -> Cpu:
    """CPU used so far by the server's serving processes (the master and its workers, not the
    rollup refresher), by their reader processes, and by PostgreSQL (every backend)."""
    pids = server.pids()
    if not pids:
        return Cpu(math.nan, math.nan, postgres_cpu_seconds())
    workers = [pid for pid in listed_children(pids[0]) if not is_refresher(pid)]
    readers = [reader for worker in workers for reader in descendants(worker)]
    return Cpu(total_cpu([pids[0], *workers]), total_cpu(readers), postgres_cpu_seconds())


_LAG_BUCKET = re.compile(r'^workers_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)


@dataclass
class Lag:
    """The event loop lag histogram's cumulative counts, by upper bound (seconds)."""

    buckets: dict[float, float] = field(default_factory=dict)

    def __sub__(self, other: "Lag") -> "Lag":
        return Lag({bound: count - other.buckets.get(bound, 0.0) for bound, count in self.buckets.items()})

    @property
    def samples(self) -> float:
        return self.buckets.get(math.inf, 0.0)

    def over(self, ms: float) -> float:
        at_most = self.buckets.get(ms / 1000)
        return math.nan if at_most is None else self.samples - at_most

    @property
    def longest(self) -> str:
        """The bucket the longest lag fell in."""
        previous = 0.0
        for bound in sorted(self.buckets):
            if self.buckets[bound] >= self.samples:
                return f"<= {bound * 1000:g} ms" if bound != math.inf else f"> {previous * 1000:g} ms"
            previous = bound
        return "-"


async def lag_of(server: ServerProcess) -> Lag:
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/metrics") as answer:
        text = await answer.text()
    return Lag({float(bound): float(count) for bound, count in _LAG_BUCKET.findall(text)})


# ------------------------------------------------------------------------- one read alone


@dataclass
class Alone:
    read: Read
    times_ms: list[float]
    size: int
    cpu: Cpu
    lag: Lag
    failed: str = ""


async def read_alone(server: ServerProcess, token: str, read: Read, runs: int) -> Alone:
    client = ApiClient(server.url, token, READ_TIMEOUT)
    try:
        await client.call(read.endpoint, read.body)  # the reader process starts on the first read
        lag_before, cpu_before = await lag_of(server), cpu_of(server)
        times, size, failed = [], 0, ""
        for _ in range(runs):
            ms, status, content = await client.call(read.endpoint, read.body)
            times.append(ms)
            size = len(content)
            if status != 200:
                failed = f"{status} {content[:200]!r}"
        cpu = cpu_of(server) - cpu_before
        lag = await lag_of(server) - lag_before
    finally:
        await client.close()
    return Alone(read, times, size, Cpu(cpu.serving / runs, cpu.readers / runs, cpu.postgres / runs), lag, failed)


# ------------------------------------------------------------------------- phases


@dataclass
class Phase:
    server: str
    clients: int
    kind: str  # "charts" or GET_ALL
    wrk: dict
    cpu: Cpu
    lag: Lag
    answered: list[Answered]
    failed: str = ""

    @property
    def rate(self) -> float:
        return self.wrk["ok_in_window"] / self.wrk["window_s"]

    @property
    def reads(self) -> int:
        return len(self.answered)


@dataclass
class Target:
    name: str
    server: ServerProcess
    token: str  # of the history's company: the charts
    get_all_token: str | None
    ingest_token: str
    index: int = 0  # the next wrk request index (each phase its own range)


def run_phase(target: Target, args, clients: int, reads: list[Read], kind: str, token: str) -> Phase:
    process = pipe = None
    if clients:
        stop_at = time.monotonic() + WARM_SECONDS + args.seconds + DRAIN_SECONDS
        process, pipe = start_clients(ClientsPlan(target.server.url, token, clients, reads, stop_at))
        time.sleep(WARM_SECONDS)
    lag_before, cpu_before = asyncio.run(lag_of(target.server)), cpu_of(target.server)
    began = time.monotonic()
    result = run_wrk(
        target.server, token=target.ingest_token, fleet=INGEST_WORKERS, start_ms=int(time.time() * 1000),
        index_base=target.index, send_seconds=args.seconds, drain_seconds=DRAIN_SECONDS, connections=args.connections,
        latency_limit_s=REPORT_LATENCY_LIMIT_S, timeline=False, log_path=args.workdir / "wrk.log",
    )  # fmt: skip
    sent_until = began + result["window_s"]
    cpu = cpu_of(target.server) - cpu_before
    lag = asyncio.run(lag_of(target.server)) - lag_before
    target.index = result["index_end"] + 1000
    answered, failed = [], ""
    if process is not None:
        kind_of_answer, payload = pipe.recv() if pipe.poll(READ_TIMEOUT + 30) else ("error", "no answer from the clients")
        process.join(10)
        if kind_of_answer == "error":
            failed = payload
        else:
            answered = [item for item in payload if began <= item.began + item.ms / 1000 <= sent_until]
            bad = [item for item in answered if item.status != 200]
            if bad:
                failed = f"{len(bad)} read(s) answered other than 200, e.g. {bad[0].name}: {bad[0].status}"
    return Phase(target.name, clients, kind, result, cpu, lag, answered, failed)


# ------------------------------------------------------------------------- output


def _ms(values: list[float], fraction: float) -> str:
    return f"{percentile(values, fraction):,.0f}" if values else "-"


def print_alone(results: dict[str, list[Alone]]) -> None:
    print()
    print("EACH READ ALONE (nothing else running; CPU per read; loop lag: samples every 0.1 s while reading)")
    print(f"  {'server':<10}{'read':<18}{'answer':>10}{'median':>9}{'serving':>10}{'readers':>10}{'PostgreSQL':>11}"
          f"  {'loop lag > 10 ms':<17}longest lag")  # fmt: skip
    for name, alones in results.items():
        for alone in alones:
            print(f"  {name:<10}{alone.read.name:<18}{alone.size / 1000:>8,.0f}kB{median(alone.times_ms):>7,.0f}ms"
                  f"{alone.cpu.serving * 1000:>8,.1f}ms{alone.cpu.readers * 1000:>8,.1f}ms{alone.cpu.postgres * 1000:>9,.1f}ms"
                  f"  {alone.lag.over(LOOP_LAG_LIMIT_MS):>4,.0f} of {alone.lag.samples:<8,.0f}{alone.lag.longest}"
                  + (f"  FAILED {alone.failed}" if alone.failed else ""))  # fmt: skip


def print_phases(phases: list[Phase], args) -> None:
    print()
    print(f"STATUS REPORTS BESIDE READS (wrk -c{args.connections}, {args.seconds:g} s a phase; the reads are another "
          f"company's; CPU in % of one core over the phase, the readers' also per read; loop lag: samples over "
          f"{LOOP_LAG_LIMIT_MS} ms, of all)")  # fmt: skip
    print(f"  {'server':<10}{'clients':<14}{'reports/s':>10}{'ratio':>7}{'p99':>8}{'reads':>7}{'median':>9}{'p99':>9}"
          f"{'serving':>9}{'readers':>9}{'per read':>10}{'PostgreSQL':>11}  loop lag")  # fmt: skip
    alone_of = {phase.server: phase for phase in phases if phase.clients == 0}
    for phase in phases:
        alone = alone_of[phase.server]
        seconds = phase.wrk["window_s"]
        times = [item.ms for item in phase.answered]
        clients = "none" if not phase.clients else f"{phase.clients} {'get_all' if phase.kind == GET_ALL else 'charts'}"
        per_read = f"{phase.cpu.readers / phase.reads * 1000:,.1f}ms" if phase.reads else "-"
        print(f"  {phase.server:<10}{clients:<14}{phase.rate:>10,.0f}{phase.rate / alone.rate:>7.2f}"
              f"{phase.wrk['p99_ms']:>6,.0f}ms{phase.reads:>7}{_ms(times, 0.5):>7}ms{_ms(times, 0.99):>7}ms"
              f"{phase.cpu.serving / seconds:>9.0%}{phase.cpu.readers / seconds:>9.0%}{per_read:>10}"
              f"{phase.cpu.postgres / seconds:>11.0%}  {phase.lag.over(LOOP_LAG_LIMIT_MS):,.0f} of {phase.lag.samples:,.0f}"
              + (f"  FAILED {phase.failed}" if phase.failed else ""))  # fmt: skip
    print()
    print(f"  targets: beside 8 clients, status reports >= {TARGET_RATIO:.0%} of their rate alone and p99 < {TARGET_P99_MS} ms")
    for phase in phases:
        if phase.clients == 8:
            ok = phase.rate / alone_of[phase.server].rate >= TARGET_RATIO and phase.wrk["p99_ms"] < TARGET_P99_MS
            print(f"    {phase.server}, 8 {phase.kind}: {'met' if ok else 'NOT met'}")


# ------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pressure", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="0,1,2,8", help="chart clients of each phase (default 0,1,2,8)")
    parser.add_argument("--seconds", type=float, default=20, help="seconds of status reports a phase (default 20)")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    parser.add_argument("--get-all", type=int, default=8000, help="workers of the get_all phases (default 8000; 0: none)")
    parser.add_argument("--runs", type=int, default=10, help="runs of each read alone (default 10)")
    parser.add_argument(
        "--writer-gather-ms", type=float, default=0,
        help="WORKERS_WRITER_GATHER_MS of the servers (default 0: wrk's few connections each wait for their "
        "answer, and the writer's gather would cap them at connections per gather, not the CPU)",
    )  # fmt: skip
    parser.add_argument("--against-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a second server with these variables (repeatable), e.g. WORKERS_READ_PROCESSES=0")  # fmt: skip
    parser.add_argument("--workers", type=int, default=200, help="the history's workers (default 200)")
    parser.add_argument("--days", type=float, default=1, help="days of history (default 1)")
    parser.add_argument("--period", type=int, default=10, help="seconds between a worker's reports (default 10)")
    parser.add_argument("--reload", action="store_true", help="load the history afresh")
    parser.add_argument("--database", default=reads_bench.DEFAULT_DATABASE, help="the reads benchmark's database")
    args = parser.parse_args(argv)
    try:
        args.clients = sorted({int(text) for text in args.clients.split(",")} | {0})
    except ValueError:
        parser.error("--clients: numbers separated by commas")
    for setting in args.against_env:
        if "=" not in setting:
            parser.error(f"--against-env {setting}: NAME=VALUE")
    if not args.database.startswith(reads_bench.DEFAULT_DATABASE):
        parser.error(f"--database must start with {reads_bench.DEFAULT_DATABASE}")
    return args


def prepare_targets(args, dsn: str, history, servers: dict[str, ServerProcess]) -> list[Target]:
    """Credentials of the three companies, their limits lifted, the get_all company's workers."""
    charts = create_credentials(dsn, history.company_name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ingest_name, get_all_name = f"bench-pressure-ingest-{stamp}", f"bench-pressure-get-all-{stamp}"
    ingest = create_credentials(dsn, ingest_name)
    set_company_limits(dsn, ingest_name, "--workers", "1000000", "--reports-per-second", "1000000")
    get_all = create_credentials(dsn, get_all_name) if args.get_all else None
    if get_all is not None:
        set_company_limits(dsn, get_all_name, "--workers", str(args.get_all * 2))
    time.sleep(6)  # every server process reads the new limits (WORKERS_LIMITS_REFRESH_SECONDS)
    targets = []
    for name, server in servers.items():
        server.wait_ready(1)
        token, _ = login(server, charts["access_key"], charts["secret_key"])
        ingest_token, _ = login(server, ingest["access_key"], ingest["secret_key"])
        get_all_token = login(server, get_all["access_key"], get_all["secret_key"])[0] if get_all else None
        targets.append(Target(name, server, token, get_all_token, ingest_token))
    if get_all is not None:
        log(f"registering {args.get_all:,} workers of {get_all_name}")
        asyncio.run(register_fleet(targets[0].server.url, targets[0].get_all_token, args.get_all))
    return targets


async def copy_database(cluster_dsn: str, source: str, target: str) -> None:
    """`target` recreated as a copy of `source`. A template must have no session while it is
    copied, TimescaleDB's scheduler included: connections to it are refused meanwhile."""
    conn = await asyncpg.connect(cluster_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
        await conn.execute(f'ALTER DATABASE "{source}" WITH ALLOW_CONNECTIONS false')
        try:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", source)
            await asyncio.sleep(0.5)
            await conn.execute(f'CREATE DATABASE "{target}" TEMPLATE "{source}"')
        finally:
            await conn.execute(f'ALTER DATABASE "{source}" WITH ALLOW_CONNECTIONS true')
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_wrk()
    cluster_dsn, _ = resolve_dsn()
    dsn = database_dsn(cluster_dsn, args.database)
    args.workdir = Path(tempfile.mkdtemp(prefix="workers-bench-pressure-"))
    log(f"database {dsn}; logs in {args.workdir}")
    history, since, _ = reads_bench.prepare_history(cluster_dsn, dsn, args)
    reads_bench.refresh_rollups(dsn, since)
    reads_bench.catch_up(dsn, history)
    mix = chart_mix(history.workers, history.end)
    copy = f"{args.database}_pressure"
    log(f"copying {args.database} into {copy}")
    asyncio.run(copy_database(cluster_dsn, args.database, copy))
    dsn = database_dsn(cluster_dsn, copy)

    writer = {"WORKERS_WRITER_GATHER_MS": f"{args.writer_gather_ms:g}"}
    servers = {"this": reads_bench.start_server("this", dsn, args.workdir, writer)}
    if args.against_env:
        against = dict(setting.split("=", 1) for setting in args.against_env)
        servers["against"] = reads_bench.start_server("against", dsn, args.workdir, {**writer, **against})
    try:
        targets = prepare_targets(args, dsn, history, servers)
        get_all = [Read(GET_ALL, "workers.get_all", {})] if args.get_all else []
        alone: dict[str, list[Alone]] = {}
        for target in targets:
            log(f"{target.name}: each read alone")
            alone[target.name] = [asyncio.run(read_alone(target.server, target.token, read, args.runs)) for read in mix]
            alone[target.name] += [asyncio.run(read_alone(target.server, target.get_all_token, read, args.runs)) for read in get_all]
        phases = []
        kinds = [("charts", mix, "token")] + ([(GET_ALL, get_all, "get_all_token")] if get_all else [])
        for kind, reads, token_name in kinds:
            for clients in args.clients:
                if kind == GET_ALL and clients == 0:
                    continue  # ingest alone was measured with the charts
                for target in targets:
                    log(f"{target.name}: status reports beside {clients} {kind} client(s)")
                    phases.append(run_phase(target, args, clients, reads, kind, getattr(target, token_name)))
    finally:
        for server in servers.values():
            server.stop()

    print(f"SETUP: {os.cpu_count()} cores; WORKERS_WRITER_GATHER_MS={args.writer_gather_ms:g}; history of {history.workers} workers x {args.days:g} days "
          f"({history.rows:,} reports), company {history.company_name}; servers: "
          + ", ".join(f"{name} ({' '.join(args.against_env) if name == 'against' else 'as configured'})" for name in servers))  # fmt: skip
    print_alone(alone)
    print_phases(phases, args)
    failed = [phase for phase in phases if phase.failed] + [a for items in alone.values() for a in items if a.failed]
    bad_reports = [phase for phase in phases if set(phase.wrk["statuses"]) - {"200"}]
    for phase in bad_reports:
        print(f"FAILURE: {phase.server}, {phase.clients} clients: status reports answered {phase.wrk['statuses']}")
    return 1 if failed or bad_reports else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        sys.exit(130)
