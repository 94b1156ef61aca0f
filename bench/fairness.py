"""Fairness benchmark: one company floods status reports while another reports at a fleet's rate.

    bench/run.sh --fairness [--processes 1] [--seconds 20] [--connections 64]
                            [--fleet 500] [--period 5] [--flood-workers 200]

(`bench/run.sh --fairness` prepares the venv, wrk and the local database, then runs
`python -m bench.fairness` with the other arguments.)

It starts the server (`python -m server serve`, every limit at its default) and creates two
companies: "fleet", whose --fleet workers each report every --period seconds on an open-loop
schedule (every report sent at its time, whatever the answers so far: latency counts from
that time), and "flood", with --flood-workers workers. Four phases of --seconds each:

1. the fleet alone;
2. the fleet, and the flood sending at twice its company's default rate limit, open loop
   (a company at its maximum rate: the excess is answered 429);
3. the fleet, and the flood as fast as `wrk -c{connections}` sends (bench/report.lua, as the
   ingest benchmark), every refused report sent again at once, Retry-After ignored;
4. the same with the flood's rate limit lifted (`companies set FLOOD --reports-per-second
   0`): what the limit prevents.

For each phase it prints the fleet's answers (200, 429, 503, other) and latency p50 / p99 /
max, and the flood's stored reports per second, 429s, 503s and p99 (wrk's, in phases 3-4).
Exit status 1 when the fleet saw any answer but 200 in phases 1 to 3.
"""

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from bench.common import (
    HOST,
    ServerProcess,
    create_credentials,
    free_port,
    log,
    login,
    require_wrk,
    resolve_dsn,
    set_company_limits,
)
from bench.ingest import expected_report, register_fleet, run_wrk
from server.config import Settings

CONNECTIONS = 64  # the connections of each open-loop sender (the fleet's daemons share them)
LIMITS_REFRESH_SECONDS = 1.0  # the server's: phase 4's lifted limit applies within it
DRAIN_SECONDS = 2


@dataclass
class Answers:
    """What one company's reports of a phase got."""

    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds; open loop: from the scheduled time
    stored_per_second: float = 0.0

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000 if ordered else float("nan")

    @classmethod
    def of_wrk(cls, result: dict) -> "Answers":
        statuses = Counter({int(status): count for status, count in result["statuses"].items()})
        return cls(statuses, [result["p99_ms"] / 1000], result["ok_in_window"] / result["window_s"])


def agent_report(index: int, workers: int) -> bytes:
    """Report `index` of a fleet of `workers`, agent-shaped as the ingest benchmark's."""
    worker, metrics = expected_report(index, workers)
    machine_stats = {
        metric: variants["total"] if "total" in variants else [variants[str(i)] for i in range(len(variants))]
        for metric, variants in metrics.items()
    }
    return orjson.dumps({"worker": worker, "timestamp": int(time.time() * 1000), "machine_stats": machine_stats})


async def open_loop(url: str, token: str, workers: int, rate: float, seconds: float) -> Answers:
    """`rate` reports per second of `workers` workers, each sent at its scheduled time."""
    answers = Answers()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        origin = time.perf_counter()

        async def one(index: int) -> None:
            scheduled = origin + index / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            body = agent_report(index, workers)
            try:
                async with session.post(f"{url}/workers.status_report", data=body, headers=headers) as answer:
                    await answer.read()
                    answers.statuses[answer.status] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                answers.statuses[type(error).__name__] += 1
            answers.latencies.append(time.perf_counter() - scheduled)

        await asyncio.gather(*(one(index) for index in range(int(seconds * rate))))
        answers.stored_per_second = answers.statuses[200] / (time.perf_counter() - origin)
    return answers


def open_loop_in_a_process(url: str, token: str, workers: int, rate: float, seconds: float) -> Answers:
    """`open_loop` in a process of its own (the flood's sending must not slow the fleet's)."""
    return asyncio.run(open_loop(url, token, workers, rate, seconds))


@dataclass
class Phase:
    name: str
    fleet: Answers
    flood: Answers | None


async def run_phase(name: str, flood, server: ServerProcess, args, tokens: dict) -> Phase:
    """The fleet's reports for --seconds, beside `flood` (a coroutine giving Answers, or None)."""
    log(f"phase: {name} ({args.seconds} s)")
    fleet = open_loop(server.url, tokens["fleet"], args.fleet, args.fleet / args.period, args.seconds)
    if flood is None:
        return Phase(name, await fleet, None)
    fleet_answers, flood_answers = await asyncio.gather(fleet, flood)
    return Phase(name, fleet_answers, flood_answers)


async def hammer(server: ServerProcess, args, token: str, workdir: Path, index_base: int):
    """The flood as fast as wrk sends, each refused report sent again at once (Retry-After ignored)."""
    result = await asyncio.to_thread(
        run_wrk, server, token=token, fleet=args.flood_workers, start_ms=int(time.time() * 1000),
        index_base=index_base, send_seconds=args.seconds, drain_seconds=DRAIN_SECONDS, connections=args.connections,
        latency_limit_s=10, timeline=False, log_path=workdir / "wrk.log",
    )  # fmt: skip
    return Answers.of_wrk(result)


def print_phases(phases: list[Phase], args) -> bool:
    """The results table; True when the fleet saw only 200s while the flood had its limit."""
    print()
    print(f"{'phase':<44}{'fleet: 200':>11}{'429':>6}{'503':>6}{'other':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"   {'flood: stored/s':>15}{'429':>9}{'503':>8}{'p99 ms':>9}")  # fmt: skip
    fair = True
    for phase in phases:
        statuses = phase.fleet.statuses
        other = sum(count for status, count in statuses.items() if status not in (200, 429, 503))
        flood = "" if phase.flood is None else (
            f"   {phase.flood.stored_per_second:>15,.0f}{phase.flood.statuses[429]:>9,}"
            f"{phase.flood.statuses[503]:>8,}{phase.flood.percentile(0.99):>9.1f}"
        )  # fmt: skip
        print(f"{phase.name:<44}{statuses[200]:>11,}{statuses[429]:>6,}{statuses[503]:>6,}{other:>7,}"
              f"{phase.fleet.percentile(0.5):>9.1f}{phase.fleet.percentile(0.99):>9.1f}"
              f"{max(phase.fleet.latencies, default=0) * 1000:>9.1f}{flood}")  # fmt: skip
        if "no rate limit" not in phase.name and set(statuses) != {200}:
            fair = False
    print()
    fleet = f"{args.fleet} workers every {args.period:g} s = {args.fleet / args.period:,.0f} reports/s"
    verdict = "PASS: no" if fair else "FAIL: some"
    print(f"FAIRNESS (the fleet: {fleet}): {verdict} fleet report refused while the flood had its limit")
    return fair


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1, help="server processes (default 1)")
    parser.add_argument("--seconds", type=int, default=20, help="seconds per phase (default 20)")
    parser.add_argument("--connections", type=int, default=64, help="the flood's wrk connections (default 64)")
    parser.add_argument("--fleet", type=int, default=500, help="the fleet's workers (default 500)")
    parser.add_argument("--period", type=float, default=5.0, help="seconds between a worker's reports (default 5)")
    parser.add_argument("--flood-workers", type=int, default=200, help="the flood's distinct workers (default 200)")
    args = parser.parse_args(argv)
    for name in ("processes", "seconds", "connections", "fleet", "period", "flood_workers"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


async def measure(
    args, server: ServerProcess, dsn: str, names: dict, workdir: Path, sender: ProcessPoolExecutor
) -> list[Phase]:
    tokens = {}
    for role, name in names.items():
        credentials = create_credentials(dsn, name)
        tokens[role], _ = login(server, credentials["access_key"], credentials["secret_key"])
    await register_fleet(server.url, tokens["fleet"], args.fleet)
    await register_fleet(server.url, tokens["flood"], args.flood_workers)
    twice_the_limit = 2 * Settings().company_reports_per_second
    phases = [
        await run_phase("1. fleet alone", None, server, args, tokens),
        await run_phase(
            f"2. + flood at {twice_the_limit:g}/s (twice its limit)",
            asyncio.get_running_loop().run_in_executor(
                sender, open_loop_in_a_process, server.url, tokens["flood"], args.flood_workers, twice_the_limit,
                args.seconds,
            ),
            server, args, tokens,
        ),  # fmt: skip
        await run_phase(
            "3. + flood retrying at once (wrk)", hammer(server, args, tokens["flood"], workdir, 0), server, args, tokens
        ),
    ]
    set_company_limits(dsn, names["flood"], "--reports-per-second", "0")
    await asyncio.sleep(LIMITS_REFRESH_SECONDS * 2)
    unlimited = hammer(server, args, tokens["flood"], workdir, 10_000_000)
    phases.append(await run_phase("4. + flood retrying at once, no rate limit", unlimited, server, args, tokens))
    return phases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_wrk()
    dsn, _ = resolve_dsn()
    workdir = Path(tempfile.mkdtemp(prefix="workers-fairness-"))
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    names = {"fleet": f"fleet-{stamp}", "flood": f"flood-{stamp}"}
    port = free_port()
    env = {**os.environ, "WORKERS_DB_DSN": dsn, "PYTHONUNBUFFERED": "1",
           "WORKERS_LIMITS_REFRESH_SECONDS": f"{LIMITS_REFRESH_SECONDS:g}"}  # fmt: skip
    server = ServerProcess(
        "real",
        [sys.executable, "-m", "server", "serve", "--host", HOST, "--port", str(port), "--processes", str(args.processes)],
        port, env, workdir / "server.log",
    )  # fmt: skip
    rate = Settings().company_reports_per_second
    burst = rate * Settings().company_report_burst_seconds
    print(f"bench: fairness, {os.cpu_count()} cores, {args.processes} server process(es), {args.seconds} s per phase; "
          f"the flood's limits are the defaults ({rate:g} reports/s, burst {burst:g}); logs in {workdir}", flush=True)
    try:
        server.start()
        server.wait_ready(args.processes)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as sender:
            phases = asyncio.run(measure(args, server, dsn, names, workdir, sender))
    finally:
        server.stop()
    return 0 if print_phases(phases, args) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; server stopped")
        sys.exit(130)
