"""Two API hosts on one database behind the shipped routing proxy, one of them killed.

Two `python -m server serve` (each its gunicorn master, two server processes, their reader
processes and the rollup refresher), on 127.0.0.2 and 127.0.0.3, behind a real nginx whose
`workers_service` upstream names both (deploy/nginx/clearml-workers.conf, its server line
repeated per host: nginx_proxy.py). A fleet of simulated daemons sends status reports through
it (unique timestamps; GET with a body as clearml-agent sends them, and POST), each recording
the reports answered 200 and sending the others again, as the daemon does on 502/503 and on
connection errors. Midway one host's whole process group is killed with SIGKILL.

Afterwards: every report answered 200 is stored (a report is stored twice at most when its
host died between the commit and the answer: at most one per daemon), the survivor answered
everything after the kill, and the periodic work was done once across the hosts: each expired
registration and each chunk past retention counted by one host only (before the kill by
either, after it by the survivor), and the 1-minute rollups hold each stored report exactly
once (two refreshes of the same reports would count them twice; one that collided with
another would fail and say so in its host's log).
"""

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import aiohttp
import psutil
import pytest
from conftest import create_credentials
from helpers import basic_auth, free_port, start_server, stop_server, wait_until_ready
from nginx_proxy import eventually, running_nginx
from server.config import Settings
from server.keys import POOL

HOSTS = ("127.0.0.2", "127.0.0.3")
DAEMONS = 6
RUN_SECONDS = 6  # the fleet reports at least this long before the kill, and as long after it
BEHIND_MS = 90_000  # the daemons' clocks are behind: every report is behind the rollups' watermark
EXPIRING = 3  # registrations that expire before the kill, and as many after it
DELIVERY_SECONDS = 20  # how long a daemon keeps sending one report again
SETTINGS = {
    "WORKERS_EXPIRY_SWEEP_SECONDS": "0.5",
    "WORKERS_RETENTION_SWEEP_SECONDS": "1",
    "WORKERS_ROLLUP_REFRESH_SECONDS": "1",
    "WORKERS_ROLLUP_LAG_SECONDS": "1",
    "WORKERS_COMPANY_REPORTS_PER_SECOND": "0",
    "WORKERS_TRUST_PROXY_HEADERS": "true",
    "WORKERS_LOG_LEVEL": "INFO",
    **{f"WORKERS_{tier}_RETENTION_DAYS": "20" for tier in ("RAW", "ROLLUP_1M", "ROLLUP_10M", "ROLLUP_1H")},
}
EXPIRED = re.compile(r"expired (\d+) worker registrations")
DROPPED = re.compile(r"retention dropped (\d+) statistics chunks")


@pytest.fixture
def hosts(dsn, tmp_path):
    """Both hosts, each `serve` in a process group of its own; {address: (process, base url, log)}."""
    started = {}
    try:
        for address in HOSTS:
            log = tmp_path / f"{address}.log"
            process, base = start_server(dsn, log, processes=2, env=SETTINGS, own_group=True, host=address)
            started[address] = (process, base, log)
        for process, base, _ in started.values():
            wait_until_ready(base, process, timeout=60)
        yield started
    finally:
        for process, _, _ in started.values():
            stop_server(process)


async def old_chunk(db_conn, days: float) -> None:
    """A block of raw reports `days` old, alone in its chunk, for retention to drop."""
    await db_conn.execute(
        "INSERT INTO report_blocks (start, worker, reports, tasks, data) "
        "VALUES (time_bucket('1 hour', now() - make_interval(days => $1)), -1, 0, '{}', '')", days
    )


async def no_old_chunks(db_conn) -> bool:
    return not await db_conn.fetchval(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'report_blocks' "
        "AND range_end < now() - interval '20 days'"
    )


class Daemon:
    """A simulated daemon: a report every few milliseconds, each sent until it is answered 200."""

    def __init__(self, session: aiohttp.ClientSession, proxy: str, worker: str, method: str):
        self.session, self.proxy, self.worker, self.method = session, proxy, worker, method
        self.answered: list[int] = []  # timestamps (ms) of the reports answered 200
        self.refused = Counter()  # what a failed attempt got: a status, or the error's class

    async def run(self, stop: asyncio.Event) -> None:
        last = 0
        while not stop.is_set():
            last = max(last + 1, int(time.time() * 1000) - BEHIND_MS)
            await self.deliver(last)
            self.answered.append(last)
            await asyncio.sleep(0.02)

    async def deliver(self, timestamp: int) -> None:
        body = {"worker": self.worker, "timestamp": timestamp, "machine_stats": {"cpu_usage": [timestamp % 100]}}
        deadline = time.monotonic() + DELIVERY_SECONDS
        while True:
            try:
                async with self.session.request(self.method, f"{self.proxy}/workers.status_report", json=body) as answer:
                    if answer.status == 200:
                        return
                    assert answer.status in (502, 503, 504), (answer.status, await answer.text())
                    self.refused[answer.status] += 1
                    pause = float(answer.headers.get("Retry-After", 0.2))
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                self.refused[type(error).__name__] += 1
                pause = 0.2
            assert time.monotonic() < deadline, f"{self.worker}: report {timestamp} not stored in {DELIVERY_SECONDS} s"
            await asyncio.sleep(min(pause, 1.0))


def logged(log: Path, pattern: re.Pattern, since: int = 0) -> int:
    """The sum of the numbers `pattern` finds in `log` from byte `since` on."""
    return sum(int(found) for found in pattern.findall(log.read_bytes()[since:].decode()))


async def test_two_hosts_one_killed_lose_no_report_and_share_the_periodic_work(hosts, dsn, db_conn, tmp_path):
    caller = await create_credentials(dsn, "hosts", "daemon")
    await old_chunk(db_conn, 30)  # dropped by whichever host's retention comes first
    (victim, victim_base, victim_log), (survivor, survivor_base, survivor_log) = hosts.values()
    upstreams = [base.removeprefix("http://") for _, base, _ in hosts.values()]
    basic = {"Authorization": basic_auth(caller.access_key, caller.secret)}

    async with running_nginx(tmp_path / "nginx", free_port(), "127.0.0.1:9", upstreams) as proxy, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        async with session.post(f"{proxy}/workers.get_all", json={}, headers=basic) as answer:  # through the proxy
            assert answer.status == 200, await answer.text()
        async with session.post(f"{survivor_base}/auth.login", headers=basic) as answer:
            assert answer.status == 200, await answer.text()
            token = (await answer.json())["data"]["token"]
        session.headers["Authorization"] = f"Bearer {token}"

        async def call(endpoint: str, body: dict) -> dict:
            async with session.post(f"{proxy}/{endpoint}", json=body) as answer:
                assert answer.status == 200, await answer.text()
                return (await answer.json())["data"]

        async def expire(prefix: str) -> None:
            """Registrations of 1 s, gone within seconds (each host sweeps every 0.5 s)."""
            for i in range(EXPIRING):
                await call("workers.register", {"worker": f"{prefix}-{i}", "timeout": 1})

            async def gone():
                return not await db_conn.fetchval(
                    "SELECT count(*) FROM worker_registrations WHERE worker LIKE $1", f"{prefix}-%")

            await eventually(gone, f"the {prefix} registrations to expire", timeout=15)

        daemons = [Daemon(session, proxy, f"fleet-{i}", "GET" if i % 2 else "POST") for i in range(DAEMONS)]
        started, stop_fleet = time.monotonic(), asyncio.Event()
        fleet = asyncio.gather(*(daemon.run(stop_fleet) for daemon in daemons))
        for base in (victim_base, survivor_base) * 2:  # heavy reads: reader processes on both hosts
            async with session.post(f"{base}/workers.get_all", json={}) as answer:
                assert answer.status == 200, await answer.text()
        await expire("expiring-before")
        await eventually(lambda: no_old_chunks(db_conn), "the first old chunk to be dropped", timeout=15)

        await asyncio.sleep(max(0.0, started + RUN_SECONDS - time.monotonic()))
        group = [p.pid for p in psutil.process_iter() if _group_of(p.pid) == victim.pid]
        assert len(group) >= 5, group  # gunicorn's master, two server processes, their readers, the refresher
        answered_before = sum(len(daemon.answered) for daemon in daemons)
        stored_before = _stored(survivor_base)
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at, killed_monotonic, survivor_log_at = time.time(), time.monotonic(), survivor_log.stat().st_size
        victim.wait(10)
        await eventually(lambda: _group_left(victim.pid), "the victim's processes to go", timeout=10)

        await old_chunk(db_conn, 40)  # only the survivor can drop this one
        await expire("expiring-after")
        await asyncio.sleep(max(0.0, killed_monotonic + RUN_SECONDS - time.monotonic()))
        stop_fleet.set()
        await fleet
        listed = {worker["id"] for worker in (await call("workers.get_all", {}))["workers"]}
        assert {daemon.worker for daemon in daemons} <= listed

    # Every report answered 200 is stored: twice at most when its host died between the
    # commit and the answer (one report in flight per daemon).
    rows = await db_conn.fetch(
        "SELECT worker, round(extract(epoch FROM time) * 1000)::bigint AS ms FROM worker_stats WHERE company = $1",
        caller.company_id,
    )
    stored = Counter((row["worker"], row["ms"]) for row in rows)
    answered = Counter((daemon.worker, ms) for daemon in daemons for ms in daemon.answered)
    assert set(answered) == set(stored), (len(set(answered) - set(stored)), len(set(stored) - set(answered)))
    twice = {report: count for report, count in stored.items() if count > 1}
    assert all(count == 2 for count in twice.values()) and len(twice) <= DAEMONS, twice
    refused = sum((daemon.refused for daemon in daemons), Counter())
    after_kill = sum(len(daemon.answered) for daemon in daemons) - answered_before
    assert answered_before > 50 and after_kill > 50, (answered_before, after_kill, refused)

    # nginx: both hosts answered reports before the kill, the survivor alone after it.
    calls = [line.split(maxsplit=4) for line in (tmp_path / "nginx" / "access.log").read_text().splitlines()]
    reports = [(float(at), status, upstream.split(", ")[-1]) for at, _, uri, status, upstream in calls
               if uri.endswith("workers.status_report")]
    victim_address, survivor_address = upstreams
    assert {upstream for at, status, upstream in reports if status == "200" and at < killed_at - 1} == set(upstreams)
    assert {upstream for at, status, upstream in reports if status == "200" and at > killed_at + 0.5} == {
        survivor_address}
    # (The victim may have stored the reports in flight at the kill: one per daemon.)
    assert _stored(survivor_base) - stored_before >= after_kill - DAEMONS

    # The periodic work, once across the hosts: every expired registration and every old chunk
    # counted by one host; after the kill by the survivor.
    assert logged(victim_log, EXPIRED) + logged(survivor_log, EXPIRED) == 2 * EXPIRING
    assert logged(survivor_log, EXPIRED, since=survivor_log_at) == EXPIRING
    await eventually(lambda: no_old_chunks(db_conn), "the second old chunk to be dropped", timeout=15)
    assert logged(victim_log, DROPPED) + logged(survivor_log, DROPPED) == 2
    assert logged(survivor_log, DROPPED, since=survivor_log_at) == 1

    # The rollups: every late report rolled up, once (the survivor refreshes what came after the kill).
    async def refreshed():
        pending = await db_conn.fetchval("SELECT count(*) FROM rollup_invalidations")
        materialized = await db_conn.fetchval("SELECT extract(epoch FROM materialized) FROM rollup_watermark")
        return not pending and materialized >= max(ms for _, ms in stored) // 60_000 * 60 + 60

    await eventually(refreshed, "the survivor to roll the late reports up", timeout=30, log=survivor_log)
    since, until = min(ms for _, ms in stored) / 1000 - 120, max(ms for _, ms in stored) / 1000 + 120
    raw = await db_conn.fetch(
        "SELECT time_bucket('1 minute', time) AS minute, worker, count(*) AS reports FROM worker_stats "
        "WHERE time BETWEEN to_timestamp($1) AND to_timestamp($2) AND company = $3 GROUP BY 1, 2",
        since, until, caller.company_id)
    rolled = await db_conn.fetch(
        "SELECT time AS minute, worker, reports FROM worker_activity_1m(to_timestamp($1), to_timestamp($2)) "
        "WHERE company = $3", since, until, caller.company_id)
    assert sum(row["reports"] for row in raw) == sum(stored.values())
    assert {(r["minute"], r["worker"]): r["reports"] for r in rolled} == {
        (r["minute"], r["worker"]): r["reports"] for r in raw}
    for log in (victim_log, survivor_log):
        assert "rollup refresh failed" not in log.read_text(), log.read_text()[-3000:]


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


async def _group_left(pgid: int) -> bool:
    """Whether no process of group `pgid` runs (zombies waiting for init to reap them aside)."""
    for process in psutil.process_iter():
        try:
            if _group_of(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def _stored(base: str) -> float:
    """workers_reports_stored_total of a host, all its processes (its /metrics)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("workers_reports_stored_total"))


async def test_a_server_process_holds_at_most_db_pool_size_pooled_connections(make_client):
    client = await make_client(db_pool_size=2)
    answers = await asyncio.gather(*(client.post("/workers.get_count", json={}) for _ in range(20)))
    assert [answer.status for answer in answers] == [200] * 20
    pool = client.server.app[POOL]
    assert pool.get_max_size() == 2 and pool.get_size() <= 2


def test_the_pool_size_is_at_least_one():
    with pytest.raises(SystemExit, match="WORKERS_DB_POOL_SIZE"):
        Settings.from_env({"WORKERS_DB_POOL_SIZE": "0"})
