"""The ClearML web UI's workers page, replayed (SPEC §1-§2): the requests clearml-web's
workers effects make (`webapp-common/workers-and-queues/`), with the apiserver's token in
its session cookie and no Authorization header, and every field the page reads checked.

The page polls `get_all {}` (its table shows each worker's task, project, running time,
iteration and queues by name: this service asks them of the apiserver, here its stand-in),
and charts either the company's activity (no worker selected)
or the selected worker's statistics for one key set, over a range R chosen from six, at
`interval = max(floor(R / maxPoints), 40, or 10 with a worker)` (maxPoints: at most 1000,
0.8 of the chart's width in pixels). The first load asks for [now - R, now]; each refresh
asks from the last date it holds (milliseconds, floored to seconds) minus the interval."""

import math
import time
from dataclasses import dataclass, field
from datetime import datetime

import pytest
from apiserver_standin import ApiServer, create_app
from conftest import TEST_SETTINGS
from helpers import basic_auth, ok, refresh_rollups
from test_apiserver_tokens import SECRET, apiserver_token, new_id

from server.config import Settings

HOUR, DAY = 3600, 86400
RANGES = {"3 hours": 3 * HOUR, "6 hours": 6 * HOUR, "12 hours": 12 * HOUR, "1 day": DAY, "1 week": 7 * DAY,
          "1 month": 30 * DAY}
KEY_SETS = ["cpu_usage;gpu_usage", "memory_used", "gpu_memory_used", "network_rx;network_tx"]
MAX_POINTS = (1000, 640)  # a wide chart, and one 800 pixels wide
REPORT_AGES = (3 * DAY, 20 * HOUR, 5 * HOUR, 90 * 60, 10 * 60, 2 * 60)  # seconds before the test starts


@dataclass(frozen=True)
class Worker:
    stats: dict
    task: str | None = None
    queue: str | None = None  # the queue its task came from
    queues: list[str] = field(default_factory=list)

    def average(self, key: str) -> float | None:
        """What a bucket of this worker's reports averages to (every report is the same)."""
        value = self.stats.get(key)
        if value is None:
            return None
        return sum(value) / len(value) if isinstance(value, list) else value


WORKERS = {
    "gpu-box-1": Worker(
        {"cpu_usage": [10, 30], "gpu_usage": [50, 70], "memory_used": 2048, "gpu_memory_used": [1000, 3000],
         "network_rx": 5, "network_tx": 7},
        task="task-1",
        queue="gpu-queue",
        queues=["gpu-queue"],
    ),
    "gpu-box-2": Worker(
        {"cpu_usage": [20, 20, 20, 40], "gpu_usage": [90], "memory_used": 4096, "gpu_memory_used": [8000],
         "network_rx": 1.5, "network_tx": 0.5},
    ),
    "cpu-box-1": Worker({"cpu_usage": [40, 60], "memory_used": 1024, "network_rx": 3, "network_tx": 4}, task="task-2"),
    "cpu-box-2": Worker({"cpu_usage": [5], "memory_used": 512, "network_rx": 0.25, "network_tx": 0.125}),
}


# The apiserver's records of those tasks and queues, and what get_all answers of them.
PROJECTS = {"project-1": "Vision", "project-2": "Data"}
TASKS = {
    "task-1": {"name": "train resnet", "project": "project-1", "active_duration": 5400, "last_iteration": 42,
               "started": "2026-01-01T09:00:00+00:00"},
    "task-2": {"name": "nightly etl", "project": "project-2", "active_duration": 61,
               "started": "2026-01-01T10:00:00+00:00"},
    "task-3": {"name": "waiting job", "project": "project-1"},
}
QUEUES = {"gpu-queue": {"name": "gpu", "entries": [{"task": "task-3", "added": "2026-01-01T10:30:00+00:00"}]}}
NAMED_TASKS = {
    "task-1": {"id": "task-1", "name": "train resnet", "running_time": 5_400_000, "last_iteration": 42},
    "task-2": {"id": "task-2", "name": "nightly etl", "running_time": 61_000},
}
NAMED_PROJECTS = {"task-1": {"id": "project-1", "name": "Vision"}, "task-2": {"id": "project-2", "name": "Data"}}
NAMED_QUEUES = {"gpu-queue": {"id": "gpu-queue", "name": "gpu", "num_tasks": 1,
                              "next_task": {"id": "task-3", "name": "waiting job"}}}


def apiserver_of(company: str) -> ApiServer:
    standin = ApiServer(SECRET, access_key="KEY", secret_key="secret", company=company)
    standin.projects.update({id_: {"id": id_, "company": company, "name": name} for id_, name in PROJECTS.items()})
    standin.tasks.update({id_: {"id": id_, "company": company, **task} for id_, task in TASKS.items()})
    standin.queues += [{"id": id_, "company": company, "tags": [], "system_tags": [], **queue}
                       for id_, queue in QUEUES.items()]
    return standin


class WebUI:
    """The page's requests: POST /v999.0/workers.X with the session cookie only."""

    def __init__(self, client, token: str):
        self.client, self.cookie = client, {"Cookie": f"clearml_token_basic={token}"}

    async def post(self, action: str, body: dict) -> dict:
        assert "Authorization" not in self.client.session.headers
        return await ok(self.client, f"v999.0/workers.{action}", body, headers=self.cookie)


@pytest.fixture
async def fleet(make_client, aiohttp_server):
    """Four workers of an apiserver company report at REPORT_AGES (the daemons with their
    apiserver token as Bearer), and one of another company at the same times."""
    company = new_id()
    standin = await aiohttp_server(create_app(apiserver_of(company)), host="127.0.0.1")
    defaults = {name: getattr(Settings, name) for name in TEST_SETTINGS}  # the server's own chart and retention settings
    client = await make_client(authenticated=False, apiserver_token_secret=SECRET,
                               apiserver_url=f"http://127.0.0.1:{standin.port}", **defaults)
    token = apiserver_token(company, new_id(), company_name="Acme", user_name="Alice")
    daemon = {"Authorization": f"Bearer {token}"}
    other_company = {"Authorization": basic_auth(client.credentials.access_key, client.credentials.secret)}
    started = int(time.time())
    report_times = [started - age for age in REPORT_AGES]
    await ok(client, "workers.register", {"worker": "gpu-box-1", "queues": WORKERS["gpu-box-1"].queues}, headers=daemon)
    for moment in report_times:
        for worker_id, worker in WORKERS.items():
            body = {"worker": worker_id, "timestamp": moment * 1000, "machine_stats": worker.stats}
            if worker.task:
                body["task"] = worker.task
            if worker.queue:
                body["queue"] = worker.queue
            await ok(client, "workers.status_report", body, headers=daemon)
        elsewhere = {"worker": "elsewhere", "timestamp": moment * 1000, "task": "x", "machine_stats": {"cpu_usage": [99]}}
        await ok(client, "workers.status_report", elsewhere, headers=other_company)
    return client, WebUI(client, token), report_times


# --- what the page reads --------------------------------------------------------------------------

def check_dates(dates: list[int], from_date: int, to_date: int) -> int | None:
    """Milliseconds, ascending and evenly spaced, from the bucket holding from_date to at most
    to_date; returns the spacing in seconds (None for a single date)."""
    assert all(isinstance(date, int) and date % 1000 == 0 for date in dates)
    seconds = [date // 1000 for date in dates]
    steps = {b - a for a, b in zip(seconds, seconds[1:])}
    assert len(steps) <= 1 and all(step > 0 for step in steps), steps
    interval = steps.pop() if steps else None
    if seconds:
        assert seconds[0] <= from_date and seconds[-1] <= to_date
        if interval:
            assert from_date < seconds[0] + interval
    return interval


def bucket_reports(start: int, interval: int | None, from_date: int, to_date: int, report_times: list[int]) -> bool:
    """Whether a report falls in the bucket starting at `start` and in [from_date, to_date]."""
    end = start + interval if interval else to_date + 1
    return any(max(start, from_date) <= moment < end and moment <= to_date for moment in report_times)


def check_series(dates, values, expected: float, from_date, to_date, report_times, *, single_date_zeros=False):
    interval = check_dates(dates, from_date, to_date)
    assert len(values) == len(dates)
    for start, value in zip((date // 1000 for date in dates), values):
        if bucket_reports(start, interval, from_date, to_date, report_times):
            assert math.isclose(value, expected, rel_tol=1e-9), (start, value, expected)
        elif interval or single_date_zeros:
            assert value == 0, (start, value)
        else:
            assert value in (0, expected)
    return interval


async def check_get_all(ui: WebUI, started: int) -> None:
    entries = (await ui.post("get_all", {}))["workers"]
    assert sorted(entry["id"] for entry in entries) == sorted(WORKERS)
    for entry in entries:
        worker = WORKERS[entry["id"]]
        assert entry["key"]  # the page keys its rows by `key || id` and asks get_stats for `id`
        assert abs(datetime.fromisoformat(entry["last_report_time"]).timestamp() - started) < 120
        # "Currently running task", "Task running time", "Iteration", and the queues' names.
        assert entry["task"] == (NAMED_TASKS[worker.task] if worker.task else None)
        assert entry.get("project") == (NAMED_PROJECTS[worker.task] if worker.task else None)
        assert entry["queue"] == (NAMED_QUEUES[worker.queue] if worker.queue else None)
        assert entry["queues"] == [NAMED_QUEUES[queue] for queue in worker.queues]
        assert entry["company"]["name"] == "Acme" and entry["user"]["name"] == "Alice"


def ui_window(range_: int, max_points: int, worker: bool, last_dates: list[list[int]]) -> tuple[int, int, int]:
    """(from_date, to_date, interval) as the page computes them; `last_dates`: the dates it holds."""
    now = int(time.time())
    granularity = max(range_ // max_points, 10 if worker else 40)
    if any(len(dates) > 1 for dates in last_dates):
        last = max(dates[-1] // 1000 for dates in last_dates if dates)
        return last - granularity, now, granularity
    return now - range_, now, granularity


async def replay_worker_chart(ui, worker_id, keys, range_, max_points, report_times) -> None:
    held: list[list[int]] = []
    for load in ("first", "refresh"):
        from_date, to_date, interval = ui_window(range_, max_points, True, held)
        body = {"from_date": from_date, "to_date": to_date, "worker_ids": [worker_id],
                "items": [{"key": key} for key in keys], "interval": interval}
        answer = (await ui.post("get_stats", body))["workers"]
        worker = WORKERS[worker_id]
        expected_keys = [key for key in keys if worker.average(key) is not None]
        if not expected_keys:
            assert answer == []  # a worker without these metrics is left out
            continue
        if not answer:
            # Nor is one without data in the returned buckets: none in the range, or only in
            # its last bucket, dropped as incomplete (its interval at most the next whole hour).
            longest = math.ceil(interval / HOUR) * HOUR
            assert not any(from_date <= moment <= to_date - 0.9 * longest for moment in report_times)
            assert load == "refresh"
            continue
        [entry] = answer
        assert entry["worker"] == worker_id
        assert [metric["metric"] for metric in entry["metrics"]] == expected_keys
        for metric in entry["metrics"]:
            [stat] = metric["stats"]
            assert stat["aggregation"] == "avg"
            check_series(metric["dates"], stat["values"], worker.average(metric["metric"]), from_date, to_date,
                         report_times)
            if load == "first":
                assert any(value for value in stat["values"]), (load, metric)
            held.append(metric["dates"])


async def replay_activity_chart(ui, range_, max_points, report_times) -> None:
    held: list[list[int]] = []
    for load in ("first", "refresh"):
        from_date, to_date, interval = ui_window(range_, max_points, False, held)
        answer = await ui.post("get_activity_report", {"from_date": from_date, "to_date": to_date, "interval": interval})
        total, active = answer["total"], answer["active"]
        assert total["dates"] == active["dates"]
        busy = sum(1 for worker in WORKERS.values() if worker.task)
        check_series(total["dates"], total["counts"], len(WORKERS), from_date, to_date, report_times)
        check_series(active["dates"], active["counts"], busy, from_date, to_date, report_times)
        if load == "first":
            assert len(WORKERS) in total["counts"]
        held.append(total["dates"])


async def replay_page(ui: WebUI, range_: int, report_times: list[int], started: int) -> None:
    await check_get_all(ui, started)
    for max_points in MAX_POINTS:
        await replay_activity_chart(ui, range_, max_points, report_times)
        for worker_id in WORKERS:
            for key_set in KEY_SETS:
                await replay_worker_chart(ui, worker_id, key_set.split(";"), range_, max_points, report_times)


@pytest.mark.parametrize("range_", RANGES.values(), ids=RANGES.keys())
async def test_the_workers_page(fleet, dsn, range_):
    client, ui, report_times = fleet
    started = report_times[-1] + REPORT_AGES[-1]
    await replay_page(ui, range_, report_times, started)  # rollups behind: read from raw reports
    await refresh_rollups(dsn, Settings().retention)
    await replay_page(ui, range_, report_times, started)  # rollups up to date


async def test_a_refresh_continues_the_first_load_on_the_same_buckets(fleet):
    # The page appends a refresh's new dates to those it holds: both must come at the same
    # interval. A week at 1,000 points asks for 604 s, which the server raises to 660 s for
    # the first load and for its refresh, a few minutes long, alike (the raw read budget is
    # judged by the interval, not the range).
    _, ui, _ = fleet
    held: list[int] = []
    for _ in ("first", "refresh"):
        from_date, to_date, interval = ui_window(7 * DAY, 1000, True, [held])
        body = {"from_date": from_date, "to_date": to_date, "worker_ids": ["gpu-box-1"],
                "items": [{"key": "memory_used"}], "interval": interval}
        [entry] = (await ui.post("get_stats", body))["workers"] or [{"metrics": [{"dates": []}]}]
        held += [date for date in entry["metrics"][0]["dates"] if date not in held]
    check_dates(held, held[0] // 1000, held[-1] // 1000)
