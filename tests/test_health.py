"""Silent workers and idle GPUs (docs/health.md): each worker's report period estimated at
ingest, silence after `WORKERS_SILENT_PERIODS` of its own periods, a GPU idle after
`WORKERS_IDLE_GPU_MINUTES` below `WORKERS_IDLE_GPU_PERCENT`, the recent usage means, and the
get_all extension `health` that answers them.

Time passes by `pass_time`, which moves every registration's times into the past (the
reads compare them with the database's clock); one test lets real time pass instead."""

import asyncio
import math
from datetime import datetime, timedelta

import pytest
from helpers import call, now_ms, ok, pass_time

from server.storage import health, tenants
from server.storage.writer import Report, ReportWriter

WORKER_FIELDS = {
    "id", "key", "user", "company", "ip", "register_time", "register_timeout", "last_activity_time",
    "last_report_time", "task", "queue", "queues", "tags", "system_tags",
}  # fmt: skip


async def report(client, worker: str, **machine_stats) -> None:
    body = {"worker": worker, "timestamp": now_ms()}
    if machine_stats:
        body["machine_stats"] = machine_stats
    await ok(client, "workers.status_report", body)


async def reports_every(client, conn, worker: str, period: float, count: int, **machine_stats) -> None:
    """`count` reports of `worker`, `period` seconds apart (the last one just now)."""
    for number in range(count):
        if number:
            await pass_time(conn, period)
        await report(client, worker, **machine_stats)


async def healths(client, **body) -> dict:
    data = await ok(client, "workers.get_all", {"last_seen": 0, "health": True, **body})
    return {worker["id"]: worker["health"] for worker in data["workers"]}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# --- report periods and silence ---------------------------------------------------------------


async def test_a_worker_is_silent_after_three_of_its_periods_not_before(client, db_conn):
    await reports_every(client, db_conn, "w1", 10, 6)
    state = (await healths(client))["w1"]
    assert state["report_period"] == pytest.approx(10, abs=0.5)
    assert state["silent"] is False and state["silent_since"] is None

    await pass_time(db_conn, 25)  # under 3 periods
    assert (await healths(client))["w1"]["silent"] is False
    await pass_time(db_conn, 10)  # 35 s: over 3 periods
    state = (await healths(client))["w1"]
    assert state["silent"] is True
    (worker,) = (await ok(client, "workers.get_all", {"last_seen": 0}))["workers"]
    silent_for = at(state["silent_since"]) - at(worker["last_report_time"])
    assert silent_for.total_seconds() == pytest.approx(3 * state["report_period"], abs=0.01)

    await report(client, "w1")  # it reports again: no longer silent
    assert (await healths(client))["w1"]["silent"] is False


async def test_a_worker_with_a_long_period_is_not_silent_after_a_short_gap(client, db_conn):
    await reports_every(client, db_conn, "fast", 10, 4)
    await pass_time(db_conn, 1)
    for number in range(4):
        if number:
            await pass_time(db_conn, 120)
        await report(client, "slow")
    await pass_time(db_conn, 60)  # the fast worker 61 s, the slow one 60 s since their last reports
    states = await healths(client)
    assert states["fast"]["silent"] is True
    assert states["slow"]["silent"] is False
    assert states["slow"]["report_period"] == pytest.approx(120, abs=0.5)
    await pass_time(db_conn, 301)  # over 3 x 120 s
    assert (await healths(client))["slow"]["silent"] is True


async def test_the_silent_periods_setting(make_client, db_conn):
    client = await make_client(silent_periods=10)
    await reports_every(client, db_conn, "w1", 5, 4)
    await pass_time(db_conn, 45)
    assert (await healths(client))["w1"]["silent"] is False
    await pass_time(db_conn, 10)
    assert (await healths(client))["w1"]["silent"] is True


async def test_the_period_follows_a_change_of_pace(client, db_conn):
    """Each gap moves the estimate a quarter of the way: a worker that slows from 10 s to 60 s
    is estimated at 60 s within a dozen reports, and not silent meanwhile after the first."""
    await reports_every(client, db_conn, "w1", 10, 5)
    periods = []
    for _ in range(12):
        await pass_time(db_conn, 60)
        await report(client, "w1")
        periods.append((await healths(client))["w1"]["report_period"])
    expected = 10.0
    for period in periods:
        expected = 0.75 * expected + 0.25 * 60
        assert period == pytest.approx(expected, abs=1)  # each gap has the test's own seconds too
    assert periods[-1] == pytest.approx(60, abs=3)


async def test_a_worker_with_one_report_has_no_period_and_is_never_silent(client, db_conn):
    await ok(client, "workers.register", {"worker": "registered", "timeout": 3600})
    await report(client, "once")
    await pass_time(db_conn, 500)
    states = await healths(client)
    for worker in ("registered", "once"):
        assert states[worker]["report_period"] is None and states[worker]["silent"] is False


async def test_registering_again_starts_the_estimate_afresh(client, db_conn):
    await reports_every(client, db_conn, "w1", 10, 3, gpu_usage=[1])
    await ok(client, "workers.register", {"worker": "w1"})
    assert (await healths(client))["w1"] == {
        "report_period": None, "silent": False, "silent_since": None, "cpu_usage": None, "gpu_usage": None, "gpus": [],
    }  # fmt: skip


async def test_an_expired_registration_starts_afresh(client, db_conn):
    await reports_every(client, db_conn, "w1", 10, 3, gpu_usage=[1])
    await pass_time(db_conn, 601)  # past the 600 s timeout, not swept yet
    assert "w1" not in await healths(client)
    await report(client, "w1", gpu_usage=[1])
    state = (await healths(client))["w1"]
    assert state["report_period"] is None
    assert datetime.now(at(state["gpus"][0]["below_threshold_since"]).tzinfo) - at(
        state["gpus"][0]["below_threshold_since"]
    ) < timedelta(seconds=30)


async def test_silence_in_real_time(make_client):
    """No time travel: reports half a second apart, then none."""
    client = await make_client()
    await healths(client)  # the first read starts the reader process: a second or two
    for number in range(5):
        if number:
            await asyncio.sleep(0.5)
        await report(client, "w1")
    state = (await healths(client))["w1"]
    assert 0.45 < state["report_period"] < 1.0
    assert state["silent"] is False
    await asyncio.sleep(3 * state["report_period"] + 0.5)
    assert (await healths(client))["w1"]["silent"] is True


# --- idle GPUs --------------------------------------------------------------------------------


def gpus(state: dict) -> dict[int, bool]:
    return {gpu["index"]: gpu["idle"] for gpu in state["gpus"]}


async def test_a_gpu_below_the_threshold_for_the_window_is_idle(client, db_conn):
    # 30 minutes of reports every minute: GPU 0 at 2 %, GPU 1 at 90 %, GPU 2 at 4.9 %
    await reports_every(client, db_conn, "w1", 60, 31, gpu_usage=[2, 90, 4.9])
    assert gpus((await healths(client))["w1"]) == {0: True, 1: False, 2: True}


async def test_a_gpu_reported_for_less_than_the_window_is_not_idle(client, db_conn):
    await reports_every(client, db_conn, "w1", 60, 30, gpu_usage=[0])  # 29 minutes
    assert gpus((await healths(client))["w1"]) == {0: False}
    await pass_time(db_conn, 60)
    await report(client, "w1", gpu_usage=[0])
    assert gpus((await healths(client))["w1"]) == {0: True}


async def test_one_busy_report_resets_the_window(client, db_conn):
    await reports_every(client, db_conn, "w1", 60, 31, gpu_usage=[0, 0])
    await pass_time(db_conn, 60)
    await report(client, "w1", gpu_usage=[5, 0])  # the threshold itself is busy
    state = (await healths(client))["w1"]
    assert gpus(state) == {0: False, 1: True}
    assert state["gpus"][0]["below_threshold_since"] is None
    await pass_time(db_conn, 60)
    await report(client, "w1", gpu_usage=[0, 0])
    state = (await healths(client))["w1"]
    first_below = at(state["gpus"][0]["below_threshold_since"])
    assert abs(datetime.now(first_below.tzinfo) - first_below) < timedelta(seconds=30)
    await reports_every(client, db_conn, "w1", 60, 30, gpu_usage=[0, 0])  # 29 more minutes
    assert gpus((await healths(client))["w1"]) == {0: False, 1: True}
    await pass_time(db_conn, 60)
    await report(client, "w1", gpu_usage=[0, 0])
    state = (await healths(client))["w1"]
    assert gpus(state) == {0: True, 1: True}
    # since the first report below the threshold, moved back with the rest by the 30 minutes
    assert at(state["gpus"][0]["below_threshold_since"]) == first_below - timedelta(minutes=30)


async def test_some_gpus_busy_and_others_not(client, db_conn):
    """Reports that change which GPUs are busy (the upsert's general case)."""
    await reports_every(client, db_conn, "w1", 60, 31, gpu_usage=[0, 90, 0, 90])
    assert gpus((await healths(client))["w1"]) == {0: True, 1: False, 2: True, 3: False}
    await pass_time(db_conn, 60)
    await report(client, "w1", gpu_usage=[90, 0, 0, 90])
    assert gpus((await healths(client))["w1"]) == {0: False, 1: False, 2: True, 3: False}
    await reports_every(client, db_conn, "w1", 60, 31, gpu_usage=[0, 0, 0, 90])
    assert gpus((await healths(client))["w1"]) == {0: True, 1: True, 2: True, 3: False}


async def test_the_idle_settings(make_client, db_conn):
    client = await make_client(idle_gpu_percent=50, idle_gpu_minutes=5)
    await reports_every(client, db_conn, "w1", 60, 6, gpu_usage=[40, 60])
    assert gpus((await healths(client))["w1"]) == {0: True, 1: False}


async def test_a_silent_workers_gpus_are_not_idle(client, db_conn):
    await reports_every(client, db_conn, "w1", 60, 31, gpu_usage=[0])
    assert gpus((await healths(client))["w1"]) == {0: True}
    await pass_time(db_conn, 181)
    state = (await healths(client))["w1"]
    assert state["silent"] is True and gpus(state) == {0: False}


async def test_reports_without_gpu_values_keep_what_is_known(client, db_conn):
    await reports_every(client, db_conn, "w1", 60, 31, gpu_usage=[0, 0, 0])
    await pass_time(db_conn, 60)
    await report(client, "w1")  # no machine_stats
    await pass_time(db_conn, 60)
    await report(client, "w1", cpu_usage=[50])  # no GPUs
    await pass_time(db_conn, 60)
    await report(client, "w1", gpu_usage=[1, 2, 3])
    assert gpus((await healths(client))["w1"]) == {0: True, 1: True, 2: True}
    await pass_time(db_conn, 60)
    # a null value is not below the threshold: that GPU's window starts again
    body = {"worker": "w1", "timestamp": now_ms(), "machine_stats": {"gpu_usage": [None, 0, 0]}}
    await ok(client, "workers.status_report", body)
    assert gpus((await healths(client))["w1"]) == {0: False, 1: True, 2: True}
    await pass_time(db_conn, 60)
    await report(client, "w1", gpu_usage=[0, 0])  # one GPU fewer: the last is no longer tracked
    assert gpus((await healths(client))["w1"]) == {0: False, 1: True}
    await pass_time(db_conn, 60)
    await report(client, "w1", gpu_usage=[0, 0, 0])  # and is new again
    assert gpus((await healths(client))["w1"]) == {0: False, 1: True, 2: False}


async def test_a_worker_without_gpus_has_none(client, db_conn):
    await reports_every(client, db_conn, "cpu-only", 60, 31, cpu_usage=[1, 2])
    assert (await healths(client))["cpu-only"]["gpus"] == []


# --- usage means ------------------------------------------------------------------------------


async def test_usage_is_a_mean_over_the_recent_reports(client, db_conn):
    await ok(client, "workers.register", {"worker": "w1", "timeout": 2_000_000})  # no expiry below
    await report(client, "w1", cpu_usage=[10, 30], gpu_usage=[90, 70])
    state = (await healths(client))["w1"]
    assert (state["cpu_usage"], state["gpu_usage"]) == (20, 80)
    await pass_time(db_conn, 600)  # one time constant (WORKERS_UTILISATION_MINUTES, 10)
    await report(client, "w1", cpu_usage=[80, 80])  # and no GPU values: the GPU mean stays
    state = (await healths(client))["w1"]
    # a gap of 600 s and the few seconds the test took meanwhile
    assert 80 - 60 * math.exp(-600 / 600) <= state["cpu_usage"] <= 80 - 60 * math.exp(-610 / 600)
    assert state["gpu_usage"] == 80
    await pass_time(db_conn, 10**6)  # long ago: the newest report alone
    await report(client, "w1", cpu_usage=[5])
    assert (await healths(client))["w1"]["cpu_usage"] == 5


async def test_reports_of_one_worker_in_one_batch(dsn, db_conn):
    """Stored by one statement: busy where either report was, the later report's means."""
    writer = ReportWriter(dsn, gather=1.0)
    await writer.start()
    try:
        base = dict(user_id="u", ip=None, timeout=600, task=None, queue=None, queues=None, tags=None, system_tags=None)
        company = await tenants.company_named(db_conn, "writers")
        first = Report(company=company, worker="w1", time=1.0, metrics={"gpu_usage": {"0": 90, "1": 0}}, **base)
        second = Report(
            company=company, worker="w1", time=2.0, metrics={"gpu_usage": {"0": 0, "1": 1}, "cpu_usage": {"0": 7}}, **base
        )
        await asyncio.gather(writer.write(first), writer.write(second))
    finally:
        await writer.close()
    row = await db_conn.fetchrow("SELECT * FROM worker_registrations WHERE worker = 'w1'")
    assert row["gpu_idle_since"][0] is None and row["gpu_idle_since"][1] is not None
    assert (row["cpu_usage"], row["gpu_usage"]) == (7, 0.5)


def test_a_reports_gpus():
    assert health.gpu_busy(None, 5) is None
    assert health.gpu_busy({"total": 50}, 5) is None
    assert health.gpu_busy({"0": 4.99, "1": 5}, 5) == [False, True]
    assert health.gpu_busy({"0": 4.99, "2": 5}, 5) == [False, None, True]
    assert health.gpu_busy({"1": 1, "2": 1}, 5) == [None, False, False]
    assert len(health.gpu_busy({"0": 1, str(health.MAX_GPUS): 1}, 5)) == 1
    assert health.merge_gpu_busy([True, None, False], [False, False, False, None]) == [True, None, False, None]
    assert health.merge_gpu_busy([True, False], [False]) == [True]
    assert health.merge_gpu_busy(None, [False]) == [False] and health.merge_gpu_busy([True], None) == [True]


# --- the API extension ------------------------------------------------------------------------


async def test_get_all_answers_as_before_unless_asked(client, db_conn):
    await report(client, "w1", gpu_usage=[1])
    for body in ({}, {"health": False}, {"health": None}):
        data = await ok(client, "workers.get_all", body)
        assert set(data) == {"workers"}
        assert set(data["workers"][0]) == WORKER_FIELDS
    data = await ok(client, "workers.get_all", {"health": True})
    assert set(data["workers"][0]) == WORKER_FIELDS | {"health"}
    assert data["health"] == {"silent_periods": 3, "idle_gpu_percent": 5, "idle_gpu_minutes": 30, "utilisation_minutes": 10}


async def test_the_health_extension_keeps_get_alls_filters(client, db_conn):
    await ok(client, "workers.register", {"worker": "a-1", "tags": ["gpu"]})
    await ok(client, "workers.register", {"worker": "b-1"})
    assert list(await healths(client, tags=["gpu"])) == ["a-1"]
    assert list(await healths(client, worker_pattern="b-*")) == ["b-1"]


async def test_health_is_a_boolean(client, db_conn):
    for value in ("yes", 1):
        code, subcode, message, _ = await call(client, "workers.get_all", {"health": value})
        assert (code, subcode) == (400, 12) and "health" in message


async def test_a_company_sees_its_own_workers_health(make_client, db_conn):
    mine = await make_client(company="mine")
    theirs = await make_client(company="theirs")
    await reports_every(mine, db_conn, "same-name", 60, 31, gpu_usage=[0])
    await report(theirs, "same-name", gpu_usage=[90])
    assert gpus((await healths(mine))["same-name"]) == {0: True}
    assert gpus((await healths(theirs))["same-name"]) == {0: False}
