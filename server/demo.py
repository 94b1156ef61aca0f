"""`python -m server demo-fleet`: simulated worker daemons, for the quick start.

N workers of varied machines (4 to 64 cores, 0 to 8 GPUs), a few queues and tags, running
tasks for minutes to hours and idle in between (see Machine), talk to a running server through its public HTTP API as
`clearml-agent daemon` does: one login for a token, `workers.register` each, then one
`workers.status_report` per worker and period (GET with a JSON body, millisecond
timestamps, the agent's statistics keys), the workers' reports spread over the period;
on Ctrl-C or SIGTERM every worker unregisters.
"""

import asyncio
import base64
import logging
import math
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import orjson

log = logging.getLogger("demo-fleet")

DEFAULT_CREDENTIALS = Path(__file__).resolve().parents[1] / ".local" / "credentials"
DEFAULT_PERIOD = 5.0  # seconds between one worker's reports

# The fleet's machines: (choices, weights).
CORES = ((4, 8, 16, 32, 64), (1, 3, 3, 2, 1))
GPUS = ((0, 1, 2, 4, 8), (4, 2, 2, 1, 1))
MEMORY_GIB = (16, 32, 64, 128, 256)
GPU_MEMORY_MIB = (16_384, 24_576, 40_960, 81_920)
RACKS = ("rack-a", "rack-b", "spot")

# The agent's resource monitor samples psutil twice a second and reports each period the
# average of its samples, every value rounded to 3 decimals (clearml_agent/helper/resource_monitor.py).
SAMPLES_PER_SECOND = 2
# A task runs BUSY[0] seconds plus an exponential of mean BUSY[1]; the machine then idles likewise.
BUSY = (300.0, 3600.0)
IDLE = (100.0, 1200.0)
BUSY_SHARE = (BUSY[0] + BUSY[1]) / (sum(BUSY) + sum(IDLE))  # of a fleet's machines at any moment
# A core is idle, bursty or pinned: its load level moves towards the role's target by a
# third of the way per report (AR(1)) plus an innovation; the report adds sampling noise.
# Percentages by role (idle, bursty, pinned):
CORE_TARGET = np.array([1.0, 60.0, 99.0])
CORE_INNOVATION = np.array([0.3, 8.0, 0.4])
CORE_NOISE = np.array([0.4, 3.0, 0.5])
IDLE_CORE, BURSTY_CORE, PINNED_CORE = 0, 1, 2
GPU_IDLE_MEMORY_MIB = 3.0
GPU_REALLOCATION = 0.05  # chance per report that a task's GPU allocation changes a little


class DemoError(Exception):
    pass


@dataclass(eq=False)
class Machine:
    """One simulated daemon: its hardware, and what it reports, shaped as `clearml-agent`'s
    reports are (per-core CPU averaged over the period's samples, memory and GPU memory in
    MiB, disk and network rates in MB/s, integer GPU readings). Tasks start and finish; the
    load, memory, temperatures and rates follow them. All randomness comes from `rng`."""

    worker: str
    cores: int
    gpus: int
    memory_mb: int
    queues: list[str]
    tags: list[str]
    gpu_memory_mb: int = 24_576
    period: float = DEFAULT_PERIOD
    rng: np.random.Generator = field(default_factory=np.random.default_rng, repr=False)
    task: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        rng = self.rng
        self._change_at: float | None = None  # when the task starts or finishes; set at the first report
        self._level = rng.uniform(0.2, 2.0, self.cores)  # per-core load, percent
        self._roles(np.full(self.cores, IDLE_CORE))
        self._cpu_temperature = 40.0
        self._memory_base = self.memory_mb * rng.uniform(0.05, 0.12)
        self._cache = self.memory_mb * rng.uniform(0.1, 0.3)
        self._task_memory = self._task_memory_target = 0.0
        self._disk_used = self._disk_used_before_task = rng.uniform(20, 80)  # percent
        self._gpu_temperature = np.full(self.gpus, 35.0)
        self._gpu_memory = np.full(self.gpus, GPU_IDLE_MEMORY_MIB)
        self._gpu_memory_target = self._gpu_memory.copy()
        if rng.random() < BUSY_SHARE:
            self._start_task()
            self._settle()

    def _roles(self, roles: np.ndarray) -> None:
        self._target, self._innovation, self._noise = CORE_TARGET[roles], CORE_INNOVATION[roles], CORE_NOISE[roles]

    def _start_task(self) -> None:
        """A task: some cores busy (a quarter of them pinned, the rest bursty), a working set
        to reach, files written now and then, GPU memory allocated at once."""
        rng = self.rng
        self.task = rng.bytes(16).hex()
        used = max(1, int(self.cores * rng.uniform(0.2, 1.0)))
        chosen = rng.choice(self.cores, used, replace=False)
        roles = np.full(self.cores, IDLE_CORE)
        roles[chosen] = BURSTY_CORE
        roles[chosen[: max(1, used // 4)]] = PINNED_CORE
        self._roles(roles)
        self._task_memory_target = self.memory_mb * rng.uniform(0.2, 0.7)
        self._disk_used_before_task = self._disk_used
        self._gpu_memory_target = self.gpu_memory_mb * rng.uniform(0.3, 0.95, self.gpus)
        self._gpu_memory = self._gpu_memory_target.copy()

    def _end_task(self) -> None:
        self.task = None
        self._roles(np.full(self.cores, IDLE_CORE))
        self._task_memory_target = 0.0
        self._disk_used = self._disk_used_before_task  # its scratch files deleted
        self._gpu_memory = self._gpu_memory_target = np.full(self.gpus, GPU_IDLE_MEMORY_MIB)

    def _settle(self) -> None:
        """As if the task had been running for a while (a machine found busy at the start)."""
        self._level = self._target.copy()
        self._task_memory = self._task_memory_target
        self._cpu_temperature = 40 + 45 * float(self._target.mean()) / 100
        self._gpu_temperature[:] = 35 + 0.45 * 94

    def _follow_schedule(self, now: float) -> None:
        if self._change_at is not None and now < self._change_at:
            return
        if self._change_at is not None:
            self._end_task() if self.task else self._start_task()
        least, mean = BUSY if self.task else IDLE
        self._change_at = now + least + self.rng.exponential(mean)

    def report(self, now: float | None = None) -> dict:
        """The status report body sent at `now` (epoch seconds; default: the clock's time)."""
        now = time.time() if now is None else now
        self._follow_schedule(now)
        rng, cores, busy = self.rng, self.cores, self.task is not None
        samples = max(1, round(self.period * SAMPLES_PER_SECOND) + int(rng.integers(-1, 2)))
        normal, uniform = rng.standard_normal(2 * cores + 4), rng.random(9).tolist()

        self._level += 0.3 * (self._target - self._level) + self._innovation * normal[:cores]
        self._level.clip(0.0, 100.0, out=self._level)
        cpu = (self._level + self._noise * normal[cores : 2 * cores]).clip(0.0, 100.0)
        # The average of `samples` readings of one decimal each.
        cpu = np.round(np.round(cpu * (10 * samples)) / (10 * samples), 3)
        z = normal[2 * cores :].tolist()
        self._cpu_temperature += 0.2 * (40 + 45 * float(cpu.sum()) / cores / 100 - self._cpu_temperature) + 0.3 * z[0]

        self._task_memory += 0.1 * (self._task_memory_target - self._task_memory) + (2.0 * z[1] if busy else 0.0)
        self._cache = max(0.0, self._cache + 0.5 * z[2])
        used = self._memory_base + max(0.0, self._task_memory) + 0.3 * z[3]
        if busy and uniform[0] < 0.02:
            self._disk_used = min(99.0, self._disk_used + 0.1)

        lognormal = np.exp(rng.standard_normal(4) * (1.0, 1.0, 1.5, 1.5) + (1.5, 0.0, 0.5, 0.0)).tolist()
        stats = {
            "cpu_usage": cpu.tolist(),
            "cpu_temperature": round(round(self._cpu_temperature * samples) / samples, 3),
            "memory_used": round(used, 3),
            "memory_free": round(self.memory_mb - used - 0.3 * self._cache, 3),
            "disk_free_home": round(100 - round(self._disk_used, 1), 3),
            "disk_read": round(lognormal[2] if busy and uniform[1] < 0.5
                               else 0.0 if uniform[2] < 0.7 else _exponential(0.05, uniform[3]), 3),
            "disk_write": round(lognormal[3] if busy and uniform[4] < 0.3
                                else 0.0 if uniform[5] < 0.8 else _exponential(0.05, uniform[6]), 3),
            "network_rx": round(lognormal[0] if busy else _exponential(0.004, uniform[7]), 3),
            "network_tx": round(lognormal[1] if busy else _exponential(0.002, uniform[8]), 3),
        }  # fmt: skip
        if self.gpus:
            stats |= self._gpu_stats(busy)
        return {
            "worker": self.worker, "timestamp": int(now * 1000), "machine_stats": stats,
            "task": self.task, "queue": self.queues[0] if self.task else None, "queues": self.queues,
            "tags": self.tags, "is_daemon": True,
        }  # fmt: skip

    def _gpu_stats(self, busy: bool) -> dict:
        rng, gpus = self.rng, self.gpus
        normal = rng.standard_normal(3 * gpus)
        usage = (94 + 4 * normal[:gpus]).clip(0, 100) if busy else np.zeros(gpus)
        usage = np.rint(usage).astype(int)
        self._gpu_temperature += 0.1 * (35 + 0.45 * usage - self._gpu_temperature) + 0.3 * normal[gpus : 2 * gpus]
        if busy:
            moved = rng.random(gpus) < GPU_REALLOCATION
            allocation = self._gpu_memory_target + 50 * normal[2 * gpus :]
            allocation = allocation.clip(GPU_IDLE_MEMORY_MIB, self.gpu_memory_mb)
            self._gpu_memory = np.where(moved, allocation, self._gpu_memory)
        memory = np.rint(self._gpu_memory).astype(int)
        return {
            "gpu_usage": usage.tolist(),
            "gpu_temperature": np.rint(self._gpu_temperature).astype(int).tolist(),
            "gpu_memory_used": memory.tolist(),
            "gpu_memory_free": (self.gpu_memory_mb - memory).tolist(),
        }


def _exponential(mean: float, uniform: float) -> float:
    return -mean * math.log1p(-uniform)


def machine(number: int, seed: int, *, period: float = DEFAULT_PERIOD, worker: str | None = None,
            tag: str = "demo") -> Machine:
    """Machine `number` of the fleet `seed`: its hardware and its behaviour come from its own
    generator, seeded with (seed, number). Worker id `demo-NNN:gpu:0` (or `:cpu:`) unless
    given; tags `tag` and a rack."""
    rng = np.random.default_rng([seed, number])
    cores = int(rng.choice(CORES[0], p=np.divide(CORES[1], sum(CORES[1]))))
    gpus = int(rng.choice(GPUS[0], p=np.divide(GPUS[1], sum(GPUS[1]))))
    kind = "gpu" if gpus else "cpu"
    return Machine(
        worker=worker or f"demo-{number:03d}:{kind}:0",
        cores=cores,
        gpus=gpus,
        memory_mb=int(rng.choice(MEMORY_GIB)) * 1024,
        gpu_memory_mb=int(rng.choice(GPU_MEMORY_MIB)),
        queues=[kind, "default"],
        tags=[tag, RACKS[number % len(RACKS)]],
        period=period,
        rng=rng,
    )


def fleet(size: int, seed: int | None = None, *, period: float = DEFAULT_PERIOD) -> list[Machine]:
    """Machines 1 to `size` of the fleet `seed` (None: a new one)."""
    seed = secrets.randbits(64) if seed is None else seed
    return [machine(number, seed, period=period) for number in range(1, size + 1)]


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
    machines = fleet(size, period=period)
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
