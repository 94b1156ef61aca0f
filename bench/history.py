"""A fleet's history of status reports, as NDJSON for `python -m server import`.

    python -m bench.history --workers N --hours H [--period 10] [--end EPOCH_SECONDS] [--company NAME]
                            [--seed S] [--out FILE|-]

One line per status report, in time order: each is the body a `clearml-agent` daemon sends
(server/demo.py's agent-shaped machines) plus "company". Worker n (`bench-<n>`, from 0)
reports from a random phase within the first period on, then again after each period
plus the agent's delay: its loop sends at the first half-second sample after the period
has passed, a few milliseconds of work later. The same options give the same file.
"""

import argparse
import heapq
import sys
import time
from collections.abc import Iterator
from operator import itemgetter

import orjson

from server import demo

DEFAULT_SEED = 1
DEFAULT_PERIOD = 10.0
DEFAULT_COMPANY = "bench"
SAMPLE_SECONDS = 1 / demo.SAMPLES_PER_SECOND
SEND_SECONDS = 0.015  # the agent's work between its last sample and the report's timestamp, at most


def worker_id(number: int) -> str:
    return f"bench-{number}"


def machines(workers: int, period: float = DEFAULT_PERIOD, seed: int = DEFAULT_SEED) -> list[demo.Machine]:
    return [
        demo.machine(number, seed, period=period, worker=worker_id(number), tag="bench") for number in range(workers)
    ]


def reports(machine: demo.Machine, start: float, end: float) -> Iterator[tuple[int, dict]]:
    """(timestamp in ms, report) of one machine in [start, end)."""
    rng, period = machine.rng, machine.period
    moment = start + rng.uniform(0, period)
    while moment < end:
        report = machine.report(moment)
        yield report["timestamp"], report
        moment += period + rng.uniform(0, SAMPLE_SECONDS) + rng.uniform(0, SEND_SECONDS)


def history(workers: int, start: float, end: float, period: float, seed: int = DEFAULT_SEED) -> Iterator[dict]:
    """Every report of the fleet in [start, end), in time order."""
    streams = [reports(machine, start, end) for machine in machines(workers, period, seed)]
    return map(itemgetter(1), heapq.merge(*streams, key=itemgetter(0)))


def write(out, company: str, fleet_reports: Iterator[dict]) -> int:
    """Write each report with its company as a line of `out` (binary); how many."""
    count = 0
    for report in fleet_reports:
        report["company"] = company
        out.write(orjson.dumps(report) + b"\n")
        count += 1
    return count


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, required=True, help="fleet size")
    parser.add_argument("--hours", type=float, required=True, help="hours of history, ending at --end")
    parser.add_argument("--period", type=float, default=DEFAULT_PERIOD,
                        help=f"seconds between a worker's reports (default {DEFAULT_PERIOD:g})")
    parser.add_argument("--end", type=float, help="epoch seconds where the history ends (default: now)")
    parser.add_argument("--company", default=DEFAULT_COMPANY, help=f"company id or name (default {DEFAULT_COMPANY})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"the fleet (default {DEFAULT_SEED})")
    parser.add_argument("--out", default="-", help="the NDJSON file (default -: standard output)")
    args = parser.parse_args(argv)
    for name in ("workers", "hours", "period"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    end = time.time() if args.end is None else args.end
    began = time.monotonic()
    fleet_reports = history(args.workers, end - args.hours * 3600, end, args.period, args.seed)
    if args.out == "-":
        count = write(sys.stdout.buffer, args.company, fleet_reports)
        sys.stdout.buffer.flush()
    else:
        with open(args.out, "wb", buffering=1 << 20) as out:
            count = write(out, args.company, fleet_reports)
    elapsed = time.monotonic() - began
    print(f"{count:,} reports of {args.workers} workers in {elapsed:,.1f} s ({count / elapsed:,.0f} reports/s)",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
