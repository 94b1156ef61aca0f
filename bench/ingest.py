"""Status-report ingest benchmark: the real server against the bare-handler ceiling.

    bench/run.sh [--processes 1] [--rounds 3] [--seconds 10] [--connections 64]
                 [--workers 2000] [--fault] [--url URL]
                 [--against-env NAME=VALUE ...] [--against-tree DIR]

(`bench/run.sh` prepares the venv, wrk and the local database, then runs
`python -m bench.ingest` with the same arguments.)

Against the database in WORKERS_DB_DSN (default: the local cluster of
scripts/local-timescaledb.sh, started if it is not running), it:

1. creates a fresh company's credentials (`python -m server credentials create`) and
   raises its limits (`python -m server companies set`) to the fleet's size and a rate
   far beyond the machine's: limits are checked on every report, never refuse one;
2. starts the real server (`python -m server serve`; with --url, uses the one already
   running there, on the same database) and the bare server (`python -m bench.bare_app`:
   parse the JSON, answer the envelope, store nothing) on free loopback ports with the
   same process count and gunicorn machinery;
3. logs in (auth.login, Basic) for a token and registers the fleet of N workers;
4. runs `wrk -t1 -c{connections} --latency -s bench/report.lua` rounds, alternating bare
   and real, each on its own range of report indices, while sampling the memory of every
   server process;
   With --against-env or --against-tree, a third server takes its turn in every round: the
   real server with those environment variables (e.g. WORKERS_METRICS=false), or the one
   of another checkout (e.g. `git worktree add /tmp/before HEAD~3`), so that a change's
   cost is measured in one run, beside the ceiling, as a ratio. Another checkout's server
   gets a database of its own (AGAINST_DATABASE on the same cluster, recreated, migrated,
   and given its company's credentials and limits by that checkout's code), so that a
   checkout from before a migration runs on the schema it knows;
5. with --fault, runs one more real round during which the database is stopped and
   started again (local cluster only);
6. prints the summary and the LOSS CHECK: the 200 answers of each real round equal the
   rows stored for it, and every stored value equals what bench/report.lua sent.

Exit status: 0 when the loss check holds and no answer other than 200 (and 503 while the
database is down) was seen, else 1.
"""

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import orjson

from bench.common import (
    GPU_KEYS,
    HOST,
    LIMITS_REFRESH_SECONDS,
    LOOPBACK,
    ROOT,
    SCALARS,
    ServerProcess,
    create_credentials,
    database_dsn,
    every_process,
    free_port,
    http_json,
    listening_processes,
    local_db,
    log,
    login,
    median,
    mib,
    parent_of,
    recreate_database,
    require_wrk,
    resolve_dsn,
    set_company_limits,
    total_cpu,
    tree_env,
    worker_shape,
)

LUA_SCRIPT = ROOT / "bench" / "report.lua"
# The values of bench/report.lua (keep the two in step).
MODULUS, STEP_IDX, STEP_K = 100_000, 7919, 104_729

DRAIN_SECONDS = 2  # normal rounds: wrk runs this long after it stops sending
ROUND_LATENCY_LIMIT_S = 10  # normal rounds: wrk --timeout (a slower answer is a wrk "timeout")
FAULT_SECONDS = 20
FAULT_STOP_AT = 5.0
FAULT_START_AT = 10.0
FAULT_ANSWER_TIMEOUT = 5  # WORKERS_WRITER_ANSWER_TIMEOUT of the server in a --fault run
HANG_MARGIN_S = 2.0  # a fault-round answer may take the answer timeout plus this
AGAINST_DATABASE = "workers_bench_against"  # another checkout's server's own database (recreated)
BENCH_RATE = 1_000_000  # the benchmark company's reports per second (its limit is raised to it)


def expected_report(idx: int, fleet: int) -> tuple[str, dict]:
    """The worker id and stored metrics `{metric: {variant: value}}` of report `idx`."""
    worker_number = idx % fleet
    cores, gpus = worker_shape(worker_number)
    base = idx * STEP_IDX
    k = 0

    def value() -> float:
        nonlocal k
        m = (base + k * STEP_K) % MODULUS
        k += 1
        return m / 1000

    metrics = {"cpu_usage": {str(i): value() for i in range(cores)}, "cpu_temperature": {"0": value()}}
    for key in SCALARS:
        metrics[key] = {"total": value()}
    if gpus:
        for key in GPU_KEYS:
            metrics[key] = {str(i): value() for i in range(gpus)}
    return f"bench-{worker_number}", metrics


# ------------------------------------------------------------------------- helpers


def postgres_cpu_seconds() -> float:
    """CPU time of every PostgreSQL process, and of the backends they have reaped."""
    total = sum(
        sum(int(value) for value in fields_after_comm[11:15])
        for _, name, fields_after_comm in every_process()
        if name == "postgres"
    )
    return total / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------- servers


class RunningServer(ServerProcess):
    """A server started elsewhere (--url): measured as it is, never started or stopped here.

    Its processes, for memory and CPU, are those listening on its port on this machine
    (none when it runs on another machine or in a container)."""

    def __init__(self, url: str):
        parsed = urllib.parse.urlsplit(url)
        super().__init__("running", [], parsed.port or 80, {}, Path(os.devnull))
        self._url = url.rstrip("/")
        self._pids: list[int] = []

    @property
    def url(self) -> str:
        return self._url

    def start(self) -> None:
        self._pids = listening_processes(self.port) if urllib.parse.urlsplit(self._url).hostname in LOOPBACK else []
        for pid in self._pids:
            self.roles[pid] = "worker" if parent_of(pid) in self._pids else "master"

    def wait_ready(self, processes: int, timeout: float = 30) -> None:
        try:
            http_json(f"{self.url}/workers.get_count", {}, timeout=timeout)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            raise SystemExit(f"bench: no server answers at {self.url}: {error}") from None
        workers = sum(1 for role in self.roles.values() if role == "worker") or len(self._pids)
        if self._pids and workers != processes:
            log(f"note: {workers} process(es) serve {self.url}; the bare ceiling runs with --processes {processes}")

    def pids(self) -> list[int]:
        return [pid for pid in self._pids if os.path.exists(f"/proc/{pid}")]

    def stop(self, timeout: float = 45) -> None:
        self.sample()


class MemorySampler(threading.Thread):
    """Polls the RSS of every process of the given servers every `interval` seconds."""

    def __init__(self, servers: list[ServerProcess], interval: float = 0.2):
        super().__init__(name="rss-sampler", daemon=True)
        self.servers, self.interval = servers, interval
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for server in self.servers:
                with contextlib.suppress(Exception):
                    server.sample()
            self.halt.wait(self.interval)


# ------------------------------------------------------------------------- rounds


@dataclass
class Round:
    label: str  # "bare 1", "server 2", "against 1", "fault"
    kind: str  # "bare" | "server" | "against" | "fault"
    result: dict
    events: dict = field(default_factory=dict)  # fault round: seconds since wrk's start
    cpu: dict = field(default_factory=dict)  # percent of one core over the round: server, postgres, wrk

    @property
    def statuses(self) -> dict[int, int]:
        return {int(code): int(count) for code, count in self.result["statuses"].items()}

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def rate(self) -> float:
        """200 answers per second while wrk was sending."""
        return self.result["ok_in_window"] / self.result["window_s"]

    @property
    def socket_errors(self) -> dict[str, int]:
        return {name: count for name, count in self.result["errors"].items() if name != "status" and count}


class CpuMeter:
    """CPU used during a round by the server's processes, PostgreSQL and wrk.

    As a percentage of one core over the time wrk was sending (the drain after it is idle).
    """

    def __init__(self, server: "ServerProcess"):
        self.server = server

    def _server_cpu(self) -> float:
        return total_cpu(self.server.pids())

    @staticmethod
    def _children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def __enter__(self):
        self.start = (time.monotonic(), self._server_cpu(), postgres_cpu_seconds(), self._children_cpu())
        return self

    def __exit__(self, *exc):
        self.end = (time.monotonic(), self._server_cpu(), postgres_cpu_seconds(), self._children_cpu())
        return False

    def percent_over(self, seconds: float) -> dict[str, float]:
        """NaN where unknown: a counter went backwards (PostgreSQL restarted in the fault round)."""
        percent = {}
        for index, name in enumerate(("server", "postgres", "wrk"), start=1):
            used = self.end[index] - self.start[index]
            percent[name] = 100 * used / seconds if seconds > 0 and used >= 0 else float("nan")
        return percent


def run_wrk(
    server: ServerProcess,
    *,
    token: str,
    fleet: int,
    start_ms: int,
    index_base: int,
    send_seconds: float,
    drain_seconds: int,
    connections: int,
    latency_limit_s: float,
    timeline: bool,
    log_path: Path,
) -> dict:
    env = {
        **os.environ,
        "BENCH_TOKEN": token,
        "BENCH_WORKERS": str(fleet),
        "BENCH_START_MS": str(start_ms),
        "BENCH_INDEX_BASE": str(index_base),
        "BENCH_THREADS": "1",
        "BENCH_SEND_MS": str(int(send_seconds * 1000)),
        "BENCH_TIMELINE": "1" if timeline else "0",
    }
    duration = int(send_seconds) + drain_seconds
    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", f"{int(latency_limit_s)}s",
        "--latency", "-s", str(LUA_SCRIPT), f"{server.url}/",
    ]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60)
    with open(log_path, "a") as out:
        out.write(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}\n")
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    raise RuntimeError(f"wrk gave no BENCH_RESULT (exit {done.returncode}): {done.stderr.strip()[-2000:]}")


class DatabaseFault(threading.Thread):
    """Stops the local cluster `stop_at` s after `origin` and starts it `start_at` s after."""

    def __init__(self, origin: float, stop_at: float, start_at: float):
        super().__init__(name="db-fault", daemon=True)
        self.origin, self.stop_at, self.start_at = origin, stop_at, start_at
        self.events: dict[str, float] = {}
        self.database_down = False
        self.error: str | None = None
        self.abort = threading.Event()

    def _at(self, moment: float) -> bool:
        return not self.abort.wait(max(0.0, self.origin + moment - time.monotonic()))

    def _mark(self, name: str) -> None:
        self.events[name] = time.monotonic() - self.origin

    def run(self) -> None:
        try:
            if not self._at(self.stop_at):
                return
            self._mark("stop issued")
            self.database_down = True
            code, _ = local_db("stop", timeout=120)
            self._mark("stopped")
            if code != 0:
                self.error = f"local-timescaledb.sh stop exited {code}"
            self._at(self.start_at)  # start again even when aborted
            self.restart()
        except Exception as error:  # reported by the caller
            self.error = repr(error)

    def restart(self) -> None:
        if not self.database_down:
            return
        self._mark("start issued")
        code, _ = local_db("start", timeout=300)
        self._mark("started")
        if code != 0:
            self.error = f"local-timescaledb.sh start exited {code}"
        else:
            self.database_down = False


# ------------------------------------------------------------------------- setup


async def register_fleet(url: str, token: str, fleet: int, concurrency: int = 64) -> None:
    failures: list[str] = []
    semaphore = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=60)

    async def register(session: aiohttp.ClientSession, number: int) -> None:
        async with semaphore:
            body = {"worker": f"bench-{number}", "timeout": 3600, "tags": ["bench"]}
            async with session.post(f"{url}/workers.register", json=body, headers=headers) as answer:
                if answer.status != 200:
                    failures.append(f"bench-{number}: {answer.status} {(await answer.text())[:200]}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(register(session, number) for number in range(fleet)))
    if failures:
        raise SystemExit(f"{len(failures)} registrations failed, e.g. {failures[0]}")


# ------------------------------------------------------------------------- loss check


@dataclass
class RoundCheck:
    label: str
    ok: int
    stored: int = 0
    values: int = 0  # values in the stored rows


@dataclass
class LossCheck:
    rounds: list[RoundCheck]
    mismatched: int = 0
    duplicates: int = 0
    outside: int = 0  # rows of this company that no real round sent
    examples: list[str] = field(default_factory=list)

    @property
    def exact_counts(self) -> bool:
        return all(check.ok == check.stored for check in self.rounds)

    @property
    def passed(self) -> bool:
        return self.exact_counts and not (self.mismatched or self.duplicates or self.outside)


def merged(first: LossCheck, second: LossCheck) -> LossCheck:
    """The loss checks of two databases as one."""
    return LossCheck(
        first.rounds + second.rounds,
        first.mismatched + second.mismatched,
        first.duplicates + second.duplicates,
        first.outside + second.outside,
        (first.examples + second.examples)[:5],
    )


async def loss_check(dsn: str, company: str, fleet: int, start_ms: int, rounds: list[Round]) -> LossCheck:
    ranges = [(r.result["index_base"], r.result["index_end"], RoundCheck(r.label, r.ok)) for r in rounds]
    check = LossCheck([entry[2] for entry in ranges])
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        rows = await conn.fetch(
            "SELECT worker, extract(epoch FROM time) * 1000 AS ms, metrics::text AS metrics "
            "FROM worker_stats WHERE company = $1",
            company,
            timeout=600,
        )
    finally:
        await conn.close()
    seen: set[int] = set()

    def example(text: str) -> None:
        if len(check.examples) < 5:
            check.examples.append(text)

    for row in rows:
        ms = row["ms"]
        if not isinstance(ms, Decimal):
            ms = Decimal(str(ms))
        if ms != ms.to_integral_value():
            check.mismatched += 1
            example(f"{row['worker']}: time is not a whole millisecond: {ms}")
            continue
        idx = int(ms) - start_ms
        target = next((entry[2] for entry in ranges if entry[0] <= idx < entry[1]), None)
        if target is None:
            check.outside += 1
            example(f"{row['worker']}: stored report at index {idx} was sent by no real round")
            continue
        if idx in seen:
            check.duplicates += 1
            example(f"{row['worker']}: report {idx} stored more than once")
            continue
        seen.add(idx)
        target.stored += 1
        worker, metrics = expected_report(idx, fleet)
        stored_metrics = orjson.loads(row["metrics"])
        target.values += sum(len(variants) for variants in stored_metrics.values())
        if row["worker"] != worker or stored_metrics != metrics:
            check.mismatched += 1
            example(f"report {idx}: stored {row['worker']} {row['metrics'][:160]} expected {worker} {metrics}")
    return check


# ------------------------------------------------------------------------- output


def status_text(statuses: dict[int, int]) -> str:
    return " ".join(f"{code}:{count}" for code, count in sorted(statuses.items()))


def print_round_table(rounds: list[Round], values_per: dict[str, float]) -> None:
    print(
        f"{'round':<10}{'answers/s':>11}{'points/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'CPU% srv/pg/wrk':>17}  statuses / errors"
    )
    for r in rounds:
        points = f"{r.rate * values_per[r.label]:>11,.0f}" if r.label in values_per else f"{'':>11}"
        extra = status_text(r.statuses)
        if r.socket_errors:
            extra += "  socket errors " + " ".join(f"{k}:{v}" for k, v in r.socket_errors.items())
        if r.result["unanswered"]:
            extra += f"  unanswered at stop: {r.result['unanswered']}"
        cpu = "/".join(
            "?" if r.cpu[name] != r.cpu[name] else f"{r.cpu[name]:.0f}" for name in ("server", "postgres", "wrk")
        ) if r.cpu else ""  # fmt: skip
        print(
            f"{r.label:<10}{r.rate:>11,.0f}{points}{r.result['p50_ms']:>9.2f}{r.result['p99_ms']:>9.2f}"
            f"{r.result['max_ms']:>9.1f}{cpu:>17}  {extra}"
        )


def print_fault_timeline(fault: Round) -> None:
    by_second: dict[int, dict[int, int]] = {}
    for key, count in fault.result["timeline"].items():
        second, status = key.split(":")
        by_second.setdefault(int(second), {})[int(status)] = int(count)
    events = fault.events
    print("  second  200s   503s   other   (database events)")
    for second in sorted(by_second):
        row = by_second[second]
        other = sum(count for status, count in row.items() if status not in (200, 503))
        marks = [f"{name} at {at:.2f} s" for name, at in events.items() if second <= at < second + 1]
        print(f"  {second:>6}{row.get(200, 0):>6}{row.get(503, 0):>7}{other:>8}   {', '.join(marks)}")


def fault_verdict(fault: Round, answer_timeout: float) -> tuple[bool, list[str]]:
    lines, good = [], True
    statuses = fault.statuses
    unexpected = {code: count for code, count in statuses.items() if code not in (200, 503)}
    lines.append(f"statuses: {status_text(statuses)}")
    if unexpected:
        good = False
        lines.append(f"FAIL: answers other than 200/503: {status_text(unexpected)}")
    if fault.socket_errors:
        good = False
        lines.append(f"FAIL: socket errors/timeouts: {fault.socket_errors}")
    if not statuses.get(503):
        good = False
        lines.append("FAIL: no 503 at all: the outage did not reach the server")
    limit_ms = (answer_timeout + HANG_MARGIN_S) * 1000
    slowest = fault.result["max_ms"]
    verdict = "ok" if slowest <= limit_ms else "FAIL"
    good &= slowest <= limit_ms
    lines.append(
        f"max latency {slowest:,.0f} ms (limit: answer timeout {answer_timeout:g} s + {HANG_MARGIN_S:g} s): {verdict}"
    )
    by_second: dict[int, dict[int, int]] = {}
    for key, count in fault.result["timeline"].items():
        second, status = key.split(":")
        by_second.setdefault(int(second), {})[int(status)] = int(count)
    up_at = fault.events.get("started")
    if up_at is None:
        good = False
        lines.append("FAIL: the database was not started again")
    else:
        failing = [second for second, row in by_second.items() if any(status != 200 for status in row)]
        first_failure = min(failing) if failing else None
        resumed_from = max(failing) + 1 if failing else 0
        after = sum(row.get(200, 0) for second, row in by_second.items() if second >= resumed_from)
        if failing:
            lines.append(
                f"non-200 answers from second {first_failure} to second {resumed_from - 1}; "
                f"database down at {fault.events.get('stopped', float('nan')):.1f} s, up again at {up_at:.1f} s"
            )
        if after:
            lines.append(f"recovered by itself: {after:,} answers 200 from second {resumed_from} on")
        else:
            good = False
            lines.append("FAIL: no 200 answer after the database came back")
    return good, lines


# ------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1, help="server processes, real and bare (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each server (default 3)")
    parser.add_argument("--seconds", type=int, default=10, help="seconds of load per round (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--workers", type=int, default=2000, help="fleet size: distinct worker ids (default 2000)")
    parser.add_argument("--fault", action="store_true", help="add a round that stops and restarts the local database")
    parser.add_argument(
        "--against-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="also measure the real server with this environment variable set (repeatable)",
    )
    parser.add_argument(
        "--against-tree", type=Path, metavar="DIR", help="also measure the server of this checkout (another commit)"
    )
    parser.add_argument(
        "--url",
        help="measure the server already running at this URL (on WORKERS_DB_DSN's database) instead of starting one",
    )
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.against_env):
        parser.error("--against-env takes NAME=VALUE")
    if args.url and (args.against_env or args.against_tree):
        parser.error("--against-* starts its own servers: not with --url")
    for name in ("processes", "rounds", "seconds", "connections", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_wrk()
    dsn, local = resolve_dsn()
    if args.fault and not local:
        raise SystemExit("--fault stops and starts the database: only with the local cluster (unset WORKERS_DB_DSN)")

    workdir = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    company_name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    # A server this run starts gets a shorter answer timeout for the fault round; one
    # already running (--url) has its own (give it as WORKERS_WRITER_ANSWER_TIMEOUT).
    answer_timeout = float(
        os.environ.get("WORKERS_WRITER_ANSWER_TIMEOUT", FAULT_ANSWER_TIMEOUT if args.fault and not args.url else 10)
    )
    server_env = {**os.environ, "WORKERS_DB_DSN": dsn, "PYTHONUNBUFFERED": "1"}
    if args.fault:
        server_env["WORKERS_WRITER_ANSWER_TIMEOUT"] = f"{answer_timeout:g}"
    real_port, bare_port = free_port(), free_port()
    if args.url:
        real = RunningServer(args.url)
    else:
        real = ServerProcess(
            "real",
            [sys.executable, "-m", "server", "serve", "--host", HOST, "--port", str(real_port),
             "--processes", str(args.processes)],
            real_port, server_env, workdir / "server.log",
        )  # fmt: skip
    bare = ServerProcess(
        "bare",
        [sys.executable, "-m", "bench.bare_app", "--host", HOST, "--port", str(bare_port),
         "--processes", str(args.processes)],
        bare_port, server_env, workdir / "bare.log",
    )  # fmt: skip
    against = None
    against_dsn = dsn
    if args.against_tree:
        against_dsn = database_dsn(dsn, AGAINST_DATABASE)
        asyncio.run(recreate_database(dsn, AGAINST_DATABASE))
    if args.against_env or args.against_tree:
        against_port = free_port()
        against = ServerProcess(
            "against",
            [sys.executable, "-m", "server", "serve", "--host", HOST, "--port", str(against_port),
             "--processes", str(args.processes)],
            against_port,
            {**server_env, "WORKERS_DB_DSN": against_dsn, **tree_env(args.against_tree or ROOT),
             **dict(item.split("=", 1) for item in args.against_env)},
            workdir / "against.log",
            cwd=(args.against_tree or ROOT).resolve(),
        )  # fmt: skip
    sampler = MemorySampler([real, bare])
    fault_thread: DatabaseFault | None = None
    rounds: list[Round] = []
    wrk_log = workdir / "wrk.log"
    print(
        f"bench: {args.processes} process(es), wrk -t1 -c{args.connections}, {args.rounds} x {args.seconds} s rounds "
        f"per server, fleet {args.workers:,} workers{', + fault round' if args.fault else ''}",
        flush=True,
    )
    print(f"bench: database {dsn}; logs in {workdir}", flush=True)
    try:
        credentials = create_credentials(dsn, company_name)
        log(f"company {company_name}: access key {credentials['access_key']}")
        # The limits stay on, checked on every report; this company's are raised to its fleet
        # and far beyond any machine's rate, so that the benchmark measures the ceiling.
        limits = ("--workers", str(args.workers), "--reports-per-second", str(BENCH_RATE))
        set_company_limits(dsn, company_name, *limits)
        against_credentials = credentials
        if against_dsn != dsn:  # by the other checkout's code, which migrates its database first
            subprocess.run([sys.executable, "-m", "server", "migrate"], cwd=args.against_tree,
                           env={**os.environ, "WORKERS_DB_DSN": against_dsn, **tree_env(args.against_tree)},
                           check=True, capture_output=True, timeout=600)  # fmt: skip
            against_credentials = create_credentials(against_dsn, company_name, args.against_tree)
            set_company_limits(against_dsn, company_name, *limits, tree=args.against_tree)
        if args.url:
            time.sleep(LIMITS_REFRESH_SECONDS + 1)  # the running server applies them
        contenders = [bare, real] + ([against] if against else [])
        for server in contenders:
            server.start()
        for server in contenders:
            server.wait_ready(args.processes)
        sampler.start()
        token, company = login(real, credentials["access_key"], credentials["secret_key"])
        log(f"registering {args.workers:,} workers")
        asyncio.run(register_fleet(real.url, token, args.workers))
        tokens = {"bare": token, "server": token}
        against_company = company
        if against is not None:
            tokens["against"], against_company = login(against, against_credentials["access_key"], against_credentials["secret_key"])
            if against_dsn != dsn:
                asyncio.run(register_fleet(against.url, tokens["against"], args.workers))

        start_ms = int(time.time() * 1000)  # report times: from now on, as a live fleet's
        next_index = 0
        common = dict(fleet=args.workers, start_ms=start_ms, connections=args.connections)
        for number in range(1, args.rounds + 1):
            for kind, server in zip(("bare", "server", "against"), contenders):
                label = f"{kind} {number}"
                log(f"round {label}: {args.seconds} s")
                with CpuMeter(server) as meter:
                    result = run_wrk(
                        server, token=tokens[kind], index_base=next_index, send_seconds=args.seconds,
                        drain_seconds=DRAIN_SECONDS, latency_limit_s=ROUND_LATENCY_LIMIT_S, timeline=False,
                        log_path=wrk_log, **common,
                    )  # fmt: skip
                rounds.append(Round(label, kind, result, cpu=meter.percent_over(result["window_s"])))
                next_index = result["index_end"] + 1000
                log(f"  {Round(label, kind, result).rate:,.0f} answers 200/s, statuses {result['statuses']}")

        if args.fault:
            log(f"fault round: {FAULT_SECONDS} s; database stopped at {FAULT_STOP_AT:g} s, started at {FAULT_START_AT:g} s")
            fault_thread = DatabaseFault(time.monotonic(), FAULT_STOP_AT, FAULT_START_AT)
            fault_thread.start()
            with CpuMeter(real) as meter:
                result = run_wrk(
                    real, token=token, index_base=next_index, send_seconds=FAULT_SECONDS,
                    drain_seconds=int(answer_timeout + 3), latency_limit_s=answer_timeout + 5, timeline=True,
                    log_path=wrk_log, **common,
                )  # fmt: skip
            fault_thread.join(timeout=300)
            # Event times relative to wrk's own start.
            shift = result["t0_monotonic_ms"] / 1000 - fault_thread.origin
            events = {name: at - shift for name, at in fault_thread.events.items()}
            rounds.append(Round("fault", "fault", result, events, meter.percent_over(result["window_s"])))
            if fault_thread.error:
                log(f"fault thread: {fault_thread.error}")
            time.sleep(1.0)  # let the writer settle before counting rows
        sampler.halt.set()
        sampler.join(5)
        real.sample()

        log("loss check: reading the stored rows")
        if against_dsn == dsn:
            check = asyncio.run(loss_check(dsn, company, args.workers, start_ms, [r for r in rounds if r.kind != "bare"]))
        else:
            check = merged(
                asyncio.run(loss_check(dsn, company, args.workers, start_ms, [r for r in rounds if r.kind in ("server", "fault")])),
                asyncio.run(loss_check(against_dsn, against_company, args.workers, start_ms, [r for r in rounds if r.kind == "against"])),
            )
        return summarize(args, rounds, check, real, bare, answer_timeout, company_name, against)
    finally:
        sampler.halt.set()
        if fault_thread is not None:
            fault_thread.abort.set()
            fault_thread.join(timeout=300)
            if fault_thread.database_down:
                fault_thread.restart()
        for server in filter(None, (real, bare, against)):
            with contextlib.suppress(Exception):
                server.stop()


def summarize(args, rounds: list[Round], check: LossCheck, real, bare, answer_timeout, company_name, against) -> int:
    by_label = {c.label: c for c in check.rounds}
    values_per = {label: (c.values / c.stored if c.stored else float("nan")) for label, c in by_label.items()}
    bare_rounds = [r for r in rounds if r.kind == "bare"]
    server_rounds = [r for r in rounds if r.kind == "server"]
    fault = next((r for r in rounds if r.kind == "fault"), None)
    failures: list[str] = []
    against_rounds = [r for r in rounds if r.kind == "against"]
    for r in bare_rounds + server_rounds + against_rounds:
        unexpected = {code: n for code, n in r.statuses.items() if code != 200 and not (r.kind != "bare" and code == 503)}
        if unexpected:
            failures.append(f"{r.label}: answers {status_text(unexpected)}")
        if r.socket_errors:
            failures.append(f"{r.label}: socket errors/timeouts {r.socket_errors}")

    bare_rate = median([r.rate for r in bare_rounds])
    server_rate = median([r.rate for r in server_rounds])
    values_each = median([values_per[r.label] for r in server_rounds])
    points = median([r.rate * values_per[r.label] for r in server_rounds])
    p50 = median([r.result["p50_ms"] for r in server_rounds])
    p99 = median([r.result["p99_ms"] for r in server_rounds])
    ratio = server_rate / bare_rate if bare_rate else float("nan")

    print()
    print_round_table(rounds, values_per)
    print()
    print(f"SUMMARY ({args.processes} process(es), wrk -t1 -c{args.connections}, "
          f"median of {args.rounds} x {args.seconds} s rounds each, fleet {args.workers:,})")  # fmt: skip
    print(f"  bare ceiling               {bare_rate:>10,.0f} req/s")
    print(f"  server                     {server_rate:>10,.0f} reports/s   "
          f"({'n/a' if ratio != ratio else f'{ratio:.2f}'} of the ceiling; target >= 0.60: "
          f"{'met' if ratio >= 0.6 else 'NOT met'})")  # fmt: skip
    if against_rounds:
        against_rate = median([r.rate for r in against_rounds])
        what = " ".join(args.against_env + ([f"tree {args.against_tree}"] if args.against_tree else []))
        print(f"  against ({what})")
        print(f"                             {against_rate:>10,.0f} reports/s   "
              f"({against_rate / bare_rate:.2f} of the ceiling; server / against: {server_rate / against_rate:.3f})")  # fmt: skip
    print(f"  points                     {points:>10,.0f} values/s    ({values_each:.2f} values per report)")
    print(f"  latency p50 / p99          {p50:>7.2f} / {p99:.2f} ms (target p99 < 50 ms: {'met' if p99 < 50 else 'NOT met'})")
    print(f"  fleet at 1 report / 5 s    {server_rate * 5:>10,.0f} workers")
    real_peaks = sorted(real.peak_kib.items(), key=lambda item: (real.roles.get(item[0]) != "master", item[0]))
    worker_peaks = [kib for pid, kib in real_peaks if real.roles.get(pid) != "master"]
    for pid, kib in real_peaks:
        role = real.roles.get(pid, "worker")
        print(f"  peak RSS server {role:<7}    {mib(kib):>10}   (pid {pid}; {real.cpu.get(pid, 0):.1f} s CPU in the whole run)")
    if worker_peaks:
        worst = max(worker_peaks) / 1024
        print(f"  memory target < 250 MiB per worker process: {'met' if worst < 250 else 'NOT met'} (largest {worst:.0f} MiB)")
    bare_workers = [kib for pid, kib in bare.peak_kib.items() if bare.roles.get(pid) != "master"]
    if bare_workers:
        bare_cpu = [bare.cpu.get(pid, 0) for pid in bare.peak_kib if bare.roles.get(pid) != "master"]
        print(f"  (bare server workers' peak RSS: {', '.join(mib(k) for k in sorted(bare_workers))}; "
              f"CPU: {', '.join(f'{c:.1f} s' for c in sorted(bare_cpu))})")

    if fault is not None:
        print()
        print(f"FAULT ROUND ({FAULT_SECONDS} s of load; database stopped at ~{FAULT_STOP_AT:g} s, started at "
              f"~{FAULT_START_AT:g} s; server WORKERS_WRITER_ANSWER_TIMEOUT={answer_timeout:g})")  # fmt: skip
        print_fault_timeline(fault)
        good, lines = fault_verdict(fault, answer_timeout)
        for line in lines:
            print(f"  {line}")
        if not good:
            failures.append("fault round: " + "; ".join(line for line in lines if line.startswith("FAIL")))

    print()
    print(f"LOSS CHECK (company {company_name})")
    for c in check.rounds:
        unanswered = next(r.result["unanswered"] for r in rounds if r.label == c.label)
        note = f"   ({unanswered} requests unanswered when wrk stopped)" if unanswered else ""
        print(f"  {c.label:<10} answers 200: {c.ok:>8,}   rows stored: {c.stored:>8,}   "
              f"{'equal' if c.ok == c.stored else 'DIFFERENT'}{note}")  # fmt: skip
    total_ok = sum(c.ok for c in check.rounds)
    total_stored = sum(c.stored for c in check.rounds)
    print(f"  total      answers 200: {total_ok:>8,}   rows stored: {total_stored:>8,}")
    print(f"  stored rows whose worker or values differ from what was sent: {check.mismatched}")
    print(f"  reports stored twice: {check.duplicates}; rows no round sent: {check.outside}")
    for text in check.examples:
        print(f"    e.g. {text}")
    print(f"  LOSS CHECK: {'PASS' if check.passed else 'FAIL'}")
    if failures:
        print()
        for text in failures:
            print(f"FAILURE: {text}")
    return 0 if check.passed and not failures else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        sys.exit(130)
