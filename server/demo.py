"""`python -m server demo-fleet`: simulated worker daemons, for the quick start.

N workers of varied machines (4 to 32 cores, 0 to 4 GPUs), a few queues and tags, some
running tasks and some idle, talk to a running server through its public HTTP API as
`clearml-agent daemon` does: one login for a token, `workers.register` each, then one
`workers.status_report` per worker and period (GET with a JSON body, millisecond
timestamps, the agent's statistics keys), the workers' reports spread over the period;
on Ctrl-C or SIGTERM every worker unregisters.
"""

import asyncio
import base64
import logging
import math
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

log = logging.getLogger("demo-fleet")

DEFAULT_CREDENTIALS = Path(__file__).resolve().parents[1] / ".local" / "credentials"
CORES = (4, 8, 16, 32)
GPUS = (0, 0, 1, 2, 4)
TAGS = ("rack-a", "rack-b", "spot")
GPU_MEMORY_MB = 24_576


class DemoError(Exception):
    pass


@dataclass
class Machine:
    """One simulated daemon: its hardware, what it is doing, and smoothly varying load."""

    worker: str
    cores: int
    gpus: int
    memory_mb: int
    queues: list[str]
    tags: list[str]
    task: str | None = None
    load: float = field(default_factory=random.random)

    def step(self) -> None:
        """Between two reports: tasks start and finish now and then; the load drifts."""
        if self.task is None and random.random() < 0.1:
            self.task = uuid.uuid4().hex
        elif self.task is not None and random.random() < 0.05:
            self.task = None
        target = 0.85 if self.task else 0.05
        self.load = min(1.0, max(0.0, self.load + 0.3 * (target - self.load) + random.gauss(0, 0.05)))

    def _around(self, level: float, spread: float = 8.0) -> float:
        return round(min(100.0, max(0.0, random.gauss(level, spread))), 3)

    def report(self) -> dict:
        self.step()
        used = self.memory_mb * (0.1 + 0.7 * self.load)
        stats = {
            "cpu_usage": [self._around(100 * self.load) for _ in range(self.cores)],
            "memory_used": round(used, 3),
            "memory_free": round(self.memory_mb - used, 3),
            "disk_free_home": round(60 + 10 * math.sin(time.time() / 3600), 3),
            "network_rx": round(random.uniform(0, 50) * self.load, 3),
            "network_tx": round(random.uniform(0, 20) * self.load, 3),
        }
        if self.gpus:
            gpu_used = [GPU_MEMORY_MB * self.load * random.uniform(0.8, 1.0) for _ in range(self.gpus)]
            stats |= {
                "gpu_usage": [self._around(95 * self.load, 5) for _ in range(self.gpus)],
                "gpu_temperature": [round(35 + 45 * self.load + random.uniform(-2, 2), 3) for _ in range(self.gpus)],
                "gpu_memory_used": [round(m, 3) for m in gpu_used],
                "gpu_memory_free": [round(GPU_MEMORY_MB - m, 3) for m in gpu_used],
            }
        return {
            "worker": self.worker, "timestamp": int(time.time() * 1000), "machine_stats": stats,
            "task": self.task, "queue": self.queues[0] if self.task else None, "queues": self.queues,
            "tags": None, "is_daemon": True,
        }


def fleet(size: int, seed: int | None = None) -> list[Machine]:
    rng = random.Random(seed)
    machines = []
    for i in range(size):
        gpus = rng.choice(GPUS)
        machine = Machine(
            worker=f"demo-{i + 1:03d}:{'gpu' if gpus else 'cpu'}:0",
            cores=rng.choice(CORES),
            gpus=gpus,
            memory_mb=rng.choice((16, 32, 64, 128)) * 1024,
            queues=["gpu" if gpus else "cpu", "default"],
            tags=["demo", TAGS[i % len(TAGS)]],
        )
        machine.task = uuid.uuid4().hex if rng.random() < 0.5 else None
        machines.append(machine)
    return machines


def read_credentials(path: Path) -> tuple[str, str]:
    """access_key and secret_key from a file written by `credentials ensure` (`name value` lines)."""
    try:
        fields = dict(line.split(None, 1) for line in path.read_text().splitlines() if " " in line)
    except OSError as error:
        raise DemoError(f"cannot read credentials: {error} (scripts/serve-local.sh writes {DEFAULT_CREDENTIALS})")
    if not {"access_key", "secret_key"} <= fields.keys():
        raise DemoError(f"{path} has no access_key and secret_key lines")
    return fields["access_key"].strip(), fields["secret_key"].strip()


class Api:
    """The public HTTP API, the way the daemon calls it: GET with a JSON body."""

    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session, self.url, self.headers = session, url.rstrip("/"), {}

    async def call(self, endpoint: str, body: dict | None = None) -> dict:
        async with self.session.get(f"{self.url}/{endpoint}", data=orjson.dumps(body or {}), headers={
            "Content-Type": "application/json", **self.headers,
        }) as response:
            try:
                envelope = orjson.loads(await response.read())
                meta = envelope["meta"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise DemoError(f"{endpoint}: HTTP {response.status}, not an API answer") from None
        if meta["result_code"] != 200:
            raise DemoError(f"{endpoint}: {meta['result_code']}/{meta['result_subcode']} {meta['result_msg']}")
        return envelope["data"]

    async def login(self, access_key: str, secret_key: str) -> None:
        basic = base64.b64encode(f"{access_key}:{secret_key}".encode()).decode()
        self.headers = {"Authorization": f"Basic {basic}"}
        token = (await self.call("auth.login"))["token"]
        self.headers = {"Authorization": f"Bearer {token}"}


async def _report_forever(api: Api, machine: Machine, start: float, period: float) -> None:
    """One report per period, at this machine's offset within it."""
    next_at = start
    while True:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        try:
            await api.call("workers.status_report", machine.report())
        except (DemoError, aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.warning("%s: report failed: %s", machine.worker, error)
        next_at = max(next_at + period, time.monotonic())


async def run_fleet(url: str, access_key: str, secret_key: str, size: int, period: float,
                    stop: asyncio.Event) -> None:
    machines = fleet(size)
    timeout = max(60, int(period * 10))  # a fleet killed without unregistering expires soon
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        api = Api(session, url)
        await api.login(access_key, secret_key)
        for machine in machines:
            await api.call("workers.register", {"worker": machine.worker, "queues": machine.queues,
                                                "tags": machine.tags, "timeout": timeout})
        print(f"{size} demo workers registered on {url}, each reporting every {period:g} s; Ctrl-C stops them",
              flush=True)
        start = time.monotonic()
        reporters = [asyncio.create_task(_report_forever(api, machine, start + i * period / size, period))
                     for i, machine in enumerate(machines)]
        try:
            await stop.wait()
        finally:
            for reporter in reporters:
                reporter.cancel()
            await asyncio.gather(*reporters, return_exceptions=True)
            unregistered = 0
            for machine in machines:
                try:
                    await api.call("workers.unregister", {"worker": machine.worker})
                    unregistered += 1
                except (DemoError, aiohttp.ClientError, asyncio.TimeoutError) as error:
                    log.warning("%s: unregister failed: %s", machine.worker, error)
            print(f"{unregistered} of {size} demo workers unregistered", flush=True)


async def demo_fleet(settings, args) -> int:
    """The `demo-fleet` command."""
    url = args.url or f"http://127.0.0.1:{settings.port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        access_key, secret_key = read_credentials(Path(args.credentials))
        await run_fleet(url, access_key, secret_key, args.workers, args.period, stop)
    except DemoError as error:
        print(f"demo-fleet: {error}", file=sys.stderr)
        return 1
    except aiohttp.ClientError as error:
        print(f"demo-fleet: {url}: {error} (is the server running? scripts/serve-local.sh)", file=sys.stderr)
        return 1
    return 0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise ValueError(text)
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def add_command(commands) -> None:
    demo = commands.add_parser("demo-fleet", help="simulated worker daemons reporting to a running server")
    demo.add_argument("--workers", type=_positive(int), default=12, metavar="N", help="how many (default: 12)")
    demo.add_argument("--period", type=_positive(float), default=5.0, metavar="S",
                      help="seconds between one worker's reports (default: 5)")
    demo.add_argument("--url", help="the server (default: http://127.0.0.1:WORKERS_PORT)")
    demo.add_argument("--credentials", default=str(DEFAULT_CREDENTIALS), metavar="FILE",
                      help="file with access_key and secret_key lines (default: .local/credentials)")
    demo.set_defaults(action=demo_fleet)
