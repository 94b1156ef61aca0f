"""What the benchmarks in bench/ share: the agent-shaped report, the local database and the
benchmarks' own databases, the server processes they start, credentials and logging in, an
API client, CPU and process readings from /proc, small helpers.

The report shapes are those of bench/report.lua (keep the two in step): 4, 8 or 16 cores,
0 to 4 GPUs, the scalars below; 12 to 37 values per report.
"""

import base64
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
LOCAL_DB_SCRIPT = ROOT / "scripts" / "local-timescaledb.sh"
LOCAL_DSN = "postgresql://postgres@127.0.0.1:55432/workers"
HOST = "127.0.0.1"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

CORES = (4, 8, 16)
GPUS = (0, 0, 0, 1, 1, 2, 2, 4)
SCALARS = ("memory_used", "memory_free", "disk_free_home", "disk_read", "disk_write", "network_tx", "network_rx")
GPU_KEYS = ("gpu_usage", "gpu_temperature", "gpu_memory_used", "gpu_memory_free")


def worker_shape(worker_number: int) -> tuple[int, int]:
    return CORES[worker_number % 3], GPUS[(worker_number // 3) % 8]


def values_per_report(worker_number: int) -> int:
    cores, gpus = worker_shape(worker_number)
    return cores + 1 + len(SCALARS) + len(GPU_KEYS) * gpus


# ------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def local_db(command: str, timeout: float = 600) -> tuple[int, str]:
    """Run scripts/local-timescaledb.sh COMMAND; its exit status and last stdout line."""
    done = subprocess.run(
        [str(LOCAL_DB_SCRIPT), command], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode not in (0, 3):
        log(f"local-timescaledb.sh {command} failed ({done.returncode}):\n{done.stderr.strip()}")
    return done.returncode, (lines[-1] if lines else "")


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB (empty when it is gone)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    found[name] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return found


def stat_fields(pid: int | str) -> tuple[str, list[str]] | None:
    """A process's name and the fields of /proc/PID/stat after it (None: it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses.
    return text[text.find("(") + 1 : text.rfind(")")], text[text.rfind(")") + 2 :].split()


def every_process():
    """(pid, name, stat fields after the name) of every running process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := stat_fields(entry)) is not None:
            yield int(entry), *found


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far."""
    found = stat_fields(pid)
    if found is None:
        return None
    fields_after_comm = found[1]
    return (int(fields_after_comm[11]) + int(fields_after_comm[12])) / os.sysconf("SC_CLK_TCK")


def total_cpu(pids: list[int]) -> float:
    """User + system CPU time these processes have used so far (those gone count nothing)."""
    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


def reaped_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of the children a process has waited for (cutime + cstime)."""
    found = stat_fields(pid)
    if found is None:
        return None
    fields_after_comm = found[1]
    return (int(fields_after_comm[13]) + int(fields_after_comm[14])) / os.sysconf("SC_CLK_TCK")


def command_line(pid: int) -> str:
    """A process's command line (or title, as PostgreSQL sets it), arguments joined by
    spaces ("": it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds of the whole machine since boot, all cores: (busy, total). Busy is all
    but idle and iowait, niced work included."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]
    total = sum(ticks[:8])  # guest time is already counted in user
    return (total - idle) / os.sysconf("SC_CLK_TCK"), total / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, as /proc/loadavg gives them."""
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


def children_of(pid: int) -> list[int]:
    return [
        child
        for child, _, fields_after_comm in every_process()
        if len(fields_after_comm) > 1 and int(fields_after_comm[1]) == pid
    ]


def listed_children(pid: int) -> list[int]:
    """A process's children as the kernel lists them (/proc/PID/task/TID/children): cheaper
    than children_of, which reads every process; children_of where the kernel lists none."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found.extend(int(child) for child in children.read().split())
        except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN, or the thread ended
            if not os.path.exists(f"/proc/{pid}/task/{task}/children"):
                return children_of(pid)
        except OSError:
            pass
    return found


def descendants(pid: int) -> list[int]:
    """A process's children, theirs, and so on."""
    found, unvisited = [], listed_children(pid)
    while unvisited:
        child = unvisited.pop()
        found.append(child)
        unvisited.extend(listed_children(child))
    return found


def is_refresher(pid: int) -> bool:
    """`python -m server rollups refresh --every S`, which `serve` starts beside gunicorn."""
    arguments = command_line(pid).split()
    return "refresh" in arguments and "--every" in arguments


def parent_of(pid: int) -> int:
    """A process's parent (0: it is gone)."""
    found = stat_fields(pid)
    return int(found[1][1]) if found else 0


def listening_processes(port: int) -> list[int]:
    """Processes of this machine holding a TCP socket that listens on `port`, and their
    common parent when they share one (gunicorn's master, with one socket per worker)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                columns = line.split()
                if int(columns[1].rsplit(":", 1)[1], 16) == port and columns[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{columns[9]}]")
    found = []
    for pid, _, _ in every_process():
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                found.append(pid)
    parents = {parent_of(pid) for pid in found}
    if len(found) > 1 and len(parents) == 1 and (parent := parents.pop()) not in found and parent > 1:
        found.insert(0, parent)
    return found


def http_json(url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 5) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=orjson.dumps(body or {}), headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, orjson.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read() or b"{}")


class ApiClient:
    """Bearer-authenticated JSON requests to one server over a kept-alive connection (POST, or
    GET with a JSON body as the daemons send them)."""

    def __init__(self, url: str, token: str, timeout: float, method: str = "POST"):
        self.url, self.headers = url, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.method = method
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def call(self, endpoint: str, body: dict) -> tuple[float, int, bytes]:
        """Milliseconds until the whole answer arrived, its status and body."""
        payload = orjson.dumps(body)
        began = time.perf_counter()
        url = f"{self.url}/{endpoint}"
        async with self.session.request(self.method, url, data=payload, headers=self.headers) as answer:
            content = await answer.read()
        return (time.perf_counter() - began) * 1000, answer.status, content

    async def close(self) -> None:
        await self.session.close()


def chart_body(from_date: float, to_date: float, interval: int, items: list[tuple[str, str]], workers: list[str]) -> dict:
    """A get_stats request: `items` as (key, aggregation); no workers: the whole fleet."""
    body = {
        "from_date": from_date,
        "to_date": to_date,
        "interval": interval,
        "items": [{"key": key, "aggregation": aggregation} for key, aggregation in items],
    }
    if workers:
        body["worker_ids"] = workers
    return body


# ------------------------------------------------------------------------- servers


class ServerProcess:
    """A gunicorn server (master + workers) started as a subprocess in its own session."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict, log_path: Path, cwd: Path = ROOT):
        self.name, self.argv, self.port, self.env, self.log_path, self.cwd = name, argv, port, env, log_path, cwd
        self.process: subprocess.Popen | None = None
        self.peak_kib: dict[int, int] = {}  # pid -> peak RSS (KiB)
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds used (last sample)
        self.roles: dict[int, str] = {}

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.roles[self.process.pid] = "master"

    def wait_ready(self, processes: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.process.returncode}: see {self.log_path}")
            try:
                http_json(f"{self.url}/workers.get_count", {}, timeout=2)
                if len(children_of(self.process.pid)) >= processes:
                    time.sleep(1.0 if processes > 1 else 0.2)  # let the other workers finish starting
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server did not answer within {timeout:.0f} s: see {self.log_path}")

    def pids(self) -> list[int]:
        """The master and every process under it (workers, and their reader processes)."""
        if self.process is None or self.process.poll() is not None:
            return []
        return [self.process.pid, *descendants(self.process.pid)]

    def sample(self) -> None:
        for pid in self.pids():
            self.roles.setdefault(pid, "worker")
            status = read_status(pid)
            if status:
                self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), status.get("VmRSS", 0), status.get("VmHWM", 0))
            used = cpu_seconds(pid)
            if used is not None:
                self.cpu[pid] = used

    def stop(self, timeout: float = 45) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.sample()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} server did not stop within {timeout:.0f} s after SIGTERM: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._log.close()


# ------------------------------------------------------------------------- setup


def require_wrk() -> None:
    if subprocess.run(["sh", "-c", "command -v wrk"], capture_output=True).returncode != 0:
        raise SystemExit("wrk is not installed (bench/run.sh installs it: apt-get install wrk)")


def resolve_dsn() -> tuple[str, bool]:
    """The database DSN, and whether it is the local cluster (started when needed)."""
    dsn = os.environ.get("WORKERS_DB_DSN")
    if dsn is None:
        code, last = local_db("status")
        if code != 0:
            log("starting the local TimescaleDB (scripts/local-timescaledb.sh start)")
            code, last = local_db("start")
            if code != 0:
                raise SystemExit("could not start the local TimescaleDB")
        return last or LOCAL_DSN, True
    code, last = local_db("status")
    return dsn, code == 0 and last == dsn


def tree_env(tree: Path) -> dict[str, str]:
    """Environment variables that make `python -m server` (run with `tree` as its working
    directory) import that checkout's code: none for this one."""
    return {} if tree.resolve() == ROOT else {"PYTHONPATH": str(tree.resolve())}


def database_dsn(cluster_dsn: str, name: str) -> str:
    """`cluster_dsn` with its database replaced by `name`."""
    parts = urllib.parse.urlsplit(cluster_dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def recreate_database(cluster_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(cluster_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def run_server_command(dsn: str, *arguments: str, timeout: float = 7200) -> str:
    """Run `python -m server ARGUMENTS` on database `dsn`; its standard output (exit on failure)."""
    done = subprocess.run(
        [sys.executable, "-m", "server", *arguments],
        cwd=ROOT, env={**os.environ, "WORKERS_DB_DSN": dsn}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"python -m server {' '.join(arguments)} failed:\n{done.stderr.strip()[-3000:]}")
    return done.stdout.strip()


async def database_bytes(dsn: str) -> int:
    """pg_database_size of the database `dsn` names."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT pg_database_size(current_database())")
    finally:
        await conn.close()


def create_credentials(dsn: str, company: str, tree: Path = ROOT) -> dict[str, str]:
    """A new access key of the company (created if missing), by `tree`'s own code."""
    done = subprocess.run(
        [sys.executable, "-m", "server", "credentials", "create", "--company", company, "--user", "bench"],
        cwd=tree, env={**os.environ, "WORKERS_DB_DSN": dsn, **tree_env(tree)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"credentials create failed: {done.stderr.strip()}")
    found = dict(line.split(None, 1) for line in done.stdout.splitlines() if " " in line)
    return {"access_key": found["access_key"].strip(), "secret_key": found["secret_key"].strip()}


# How long a server running elsewhere (--url) may take to apply a company's new limits.
LIMITS_REFRESH_SECONDS = float(os.environ.get("WORKERS_LIMITS_REFRESH_SECONDS", "5"))


def set_company_limits(dsn: str, company: str, *options: str, tree: Path = ROOT) -> None:
    """`python -m server companies set COMPANY OPTIONS...` (e.g. "--reports-per-second", "0"),
    by `tree`'s own code."""
    done = subprocess.run(
        [sys.executable, "-m", "server", "companies", "set", company, *options],
        cwd=tree, env={**os.environ, "WORKERS_DB_DSN": dsn, **tree_env(tree)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"companies set failed: {done.stderr.strip()}")
    log(done.stdout.strip())


def login(server: ServerProcess, access_key: str, secret_key: str) -> tuple[str, str]:
    """A token, and the company id it carries."""
    basic = base64.b64encode(f"{access_key}:{secret_key}".encode()).decode()
    status, answer = http_json(f"{server.url}/auth.login", {}, {"Authorization": f"Basic {basic}"}, timeout=30)
    if status != 200:
        raise SystemExit(f"auth.login answered {status}: {answer.get('meta', {}).get('result_msg')}")
    token = answer["data"]["token"]
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return token, claims["identity"]["company"]


# ------------------------------------------------------------------------- output


def commit_of(tree: Path = ROOT) -> str:
    """`tree`'s commit (git rev-parse HEAD), or why there is none."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip() if head.returncode == 0 else f"{tree} (not a git checkout)"


def uncommitted_files(tree: Path = ROOT) -> list[str]:
    """The tracked files of `tree` that differ from its commit."""
    status = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True).stdout  # fmt: skip
    return [line[3:] for line in status.splitlines() if line.strip()]


def cores() -> int:
    """The cores this process may run on, as nproc counts them."""
    return len(os.sched_getaffinity(0))


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (NaN of nothing)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
