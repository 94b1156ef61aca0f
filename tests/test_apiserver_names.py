"""Beside a ClearML server (WORKERS_APISERVER_URL): `get_all` names the workers' tasks, projects
and queues as the apiserver has them, asked with the caller's own apiserver token; the
apiserver slow, failing or unreachable costs at most the bound and leaves the ids alone; our
own keys and tokens get the ids alone and cause no call."""

import logging
import time
import uuid

import pytest
from apiserver_standin import ApiServer, create_app
from helpers import basic_auth, free_port, now_ms, ok
from test_apiserver_tokens import SECRET, apiserver_token, bearer, cookie, new_id
from test_metrics import scrape

from server import apiserver, responses

LOGGER = "server.apiserver"


def task(company: str, name: str, **fields) -> dict:
    return {"id": new_id(), "company": company, "name": name, **fields}


@pytest.fixture
async def standin(aiohttp_server):
    standin = ApiServer(SECRET, access_key="KEY", secret_key="secret")
    standin.server = await aiohttp_server(create_app(standin), host="127.0.0.1")
    return standin


def url_of(standin: ApiServer) -> str:
    return f"http://127.0.0.1:{standin.server.port}"


@pytest.fixture
def beside(make_client, standin):
    """`await beside(**settings)`: a server asking the stand-in, with no credentials of its own."""

    async def make(**settings):
        settings = {"apiserver_token_secret": SECRET, "apiserver_url": url_of(standin), **settings}
        return await make_client(authenticated=False, **settings)

    return make


@pytest.fixture
def acme(standin):
    """A company of the apiserver with a project, three tasks (one never started, one
    elsewhere), and a queue with two tasks waiting, the first one deleted."""
    company = new_id()
    project = {"id": new_id(), "company": company, "name": "Vision"}
    training = task(company, "train resnet", project=project["id"], started="2026-01-01T10:00:00+00:00",
                    active_duration=3725, last_iteration=1200)
    pending = task(company, "not started yet", project=project["id"])
    foreign = task(new_id(), "another company's task", active_duration=5)
    gone = new_id()
    queue = {"id": new_id(), "company": company, "name": "gpu", "display_name": "GPU queue", "tags": [],
             "system_tags": [], "entries": [{"task": gone, "added": "2026-01-01T10:00:00+00:00"},
                                           {"task": pending["id"], "added": "2026-01-01T10:01:00+00:00"}]}
    idle = {"id": new_id(), "company": company, "name": "idle", "tags": [], "system_tags": [], "entries": []}
    standin.projects[project["id"]] = project
    for record in (training, pending, foreign):
        standin.tasks[record["id"]] = record
    standin.queues += [queue, idle]
    token = apiserver_token(company, new_id(), company_name="Acme", user_name="Alice")
    return {"company": company, "token": token, "project": project, "training": training, "pending": pending,
            "foreign": foreign, "queue": queue, "idle": idle}


async def report(client, token: str, worker: str, **fields) -> None:
    await ok(client, "workers.status_report", {"worker": worker, "timestamp": now_ms(), **fields}, headers=bearer(token))


async def fleet(client, acme) -> None:
    """Workers naming a known task, one not started, one of another company, one unknown to
    the apiserver, and no task; known and unknown queues."""
    token, queue, idle = acme["token"], acme["queue"]["id"], acme["idle"]["id"]
    unknown_queue = new_id()
    acme["unknown_queue"] = unknown_queue
    acme["unknown_task"] = new_id()
    await report(client, token, "w1", task=acme["training"]["id"], queue=queue, queues=[queue, idle])
    await report(client, token, "w2", task=acme["pending"]["id"], queue=unknown_queue, queues=[unknown_queue])
    await report(client, token, "w3", task=acme["foreign"]["id"])
    await report(client, token, "w4", task=acme["unknown_task"])
    await report(client, token, "w5", queues=[idle])


def by_id(answer: dict) -> dict:
    assert responses.Workers().validate(answer) == {}  # the fields the API description has
    return {worker["id"]: worker for worker in answer["workers"]}


async def get_all(client, token: str, body: dict | None = None) -> dict:
    return by_id(await ok(client, "workers.get_all", body or {}, headers=cookie(token)))


def lookups(standin: ApiServer) -> list[str]:
    return [endpoint for endpoint, _, _ in standin.lookups]


async def failures(client, cause: str) -> float:
    return (await scrape(client))[("workers_apiserver_lookups_failed_total", (("cause", cause),))]


async def test_get_all_names_the_tasks_projects_and_queues_as_the_apiserver_has_them(beside, standin, acme):
    client = await beside()
    await fleet(client, acme)
    workers = await get_all(client, acme["token"])
    training, pending, queue, idle = acme["training"], acme["pending"], acme["queue"], acme["idle"]
    gpu = {"id": queue["id"], "name": "gpu", "display_name": "GPU queue", "num_tasks": 2,
           "next_task": {"id": queue["entries"][0]["task"]}}  # a deleted task: its id alone
    idle_entry = {"id": idle["id"], "name": "idle", "num_tasks": 0}
    project = {"id": acme["project"]["id"], "name": "Vision"}

    # running_time: the task's active duration (seconds) in milliseconds, 0 when it has none.
    assert workers["w1"]["task"] == {"id": training["id"], "name": "train resnet", "running_time": 3_725_000,
                                     "last_iteration": 1200}
    assert workers["w1"]["project"] == project
    assert workers["w1"]["queue"] == gpu
    assert workers["w1"]["queues"] == [gpu, idle_entry]
    assert workers["w2"]["task"] == {"id": pending["id"], "name": "not started yet", "running_time": 0}
    assert workers["w2"]["project"] == project
    assert workers["w2"]["queue"] == {"id": acme["unknown_queue"]}
    assert workers["w2"]["queues"] == [{"id": acme["unknown_queue"]}]
    # The apiserver's permissions: another company's task is not answered to this caller.
    assert workers["w3"]["task"] == {"id": acme["foreign"]["id"]} and "project" not in workers["w3"]
    assert workers["w4"]["task"] == {"id": acme["unknown_task"]} and "project" not in workers["w4"]
    assert workers["w5"]["task"] is None and "project" not in workers["w5"]
    assert workers["w5"]["queues"] == [idle_entry]

    # One call per kind, with the caller's own token, for the ids the listed workers name.
    assert sorted(lookups(standin)) == ["queues.get_all_ex", "tasks.get_all_ex"]
    calls = {endpoint: (token, body) for endpoint, token, body in standin.lookups}
    (tasks_token, tasks_body), (queues_token, queues_body) = calls["tasks.get_all_ex"], calls["queues.get_all_ex"]
    assert tasks_token == queues_token == acme["token"]
    assert sorted(tasks_body["id"]) == sorted([training["id"], pending["id"], acme["foreign"]["id"],
                                               acme["unknown_task"]])
    assert set(tasks_body["only_fields"]) >= {"name", "last_iteration", "active_duration", "project.name"}
    assert sorted(queues_body["id"]) == sorted([queue["id"], idle["id"], acme["unknown_queue"]])

    # A filter asks for the ids of the workers it lists only.
    standin.lookups.clear()
    filtered = await ok(await beside(), "workers.get_all", {"worker_pattern": "w5"}, headers=cookie(acme["token"]))
    assert [worker["id"] for worker in filtered["workers"]] == ["w5"]
    assert [body for _, _, body in standin.lookups] == [{"id": [idle["id"]]}]


async def test_a_company_s_names_are_kept_for_a_few_seconds_while_they_cover_the_ids(beside, standin, acme):
    client = await beside(apiserver_cache_seconds=3600)
    await fleet(client, acme)
    first = await get_all(client, acme["token"])
    assert len(standin.lookups) == 2
    assert await get_all(client, acme["token"]) == first
    assert len(standin.lookups) == 2  # kept
    # Another user of the same company is answered from the company's names too.
    colleague = apiserver_token(acme["company"], new_id())
    assert (await get_all(client, colleague))["w1"]["task"] == first["w1"]["task"]
    assert len(standin.lookups) == 2
    # A task the kept names do not cover: asked again.
    fresh = task(acme["company"], "a fresh task")
    standin.tasks[fresh["id"]] = fresh
    await report(client, acme["token"], "w4", task=fresh["id"])
    assert (await get_all(client, acme["token"]))["w4"]["task"]["name"] == "a fresh task"
    assert sorted(lookups(standin)) == ["queues.get_all_ex"] * 2 + ["tasks.get_all_ex"] * 2
    # Without keeping them, every get_all asks.
    other = await beside(apiserver_cache_seconds=0)
    standin.lookups.clear()
    await get_all(other, acme["token"])
    await get_all(other, acme["token"])
    assert len(standin.lookups) == 4


async def test_more_ids_than_the_apiserver_answers_at_once_are_asked_in_several_calls(beside, standin, acme,
                                                                                      monkeypatch):
    monkeypatch.setattr(apiserver, "MAX_IDS_PER_CALL", 2)
    client = await beside()
    tasks = [task(acme["company"], f"task {number}", active_duration=number) for number in range(5)]
    for number, record in enumerate(tasks):
        standin.tasks[record["id"]] = record
        await report(client, acme["token"], f"w{number}", task=record["id"])
    workers = await get_all(client, acme["token"])
    assert [workers[f"w{number}"]["task"]["running_time"] for number in range(5)] == [0, 1000, 2000, 3000, 4000]
    assert lookups(standin) == ["tasks.get_all_ex"] * 3
    assert sorted(len(body["id"]) for _, _, body in standin.lookups) == [1, 2, 2]


async def test_our_own_keys_and_tokens_get_the_ids_alone_and_cause_no_call(beside, standin, acme):
    client = await beside()
    await fleet(client, acme)
    ours = await beside()
    credentials = ours.credentials  # a key of this service's own company `default`
    basic = {"Authorization": basic_auth(credentials.access_key, credentials.secret)}
    await ok(ours, "workers.status_report", {"worker": "ours", "timestamp": now_ms(), "task": acme["training"]["id"],
                                             "queues": [acme["queue"]["id"]]}, headers=basic)
    token = (await ok(ours, "auth.login", {}, headers=basic))["token"]
    for headers in (basic, bearer(token)):
        [worker] = (await ok(ours, "workers.get_all", {}, headers=headers))["workers"]
        assert worker["task"] == {"id": acme["training"]["id"]} and "project" not in worker
        assert worker["queues"] == [{"id": acme["queue"]["id"]}]
    assert standin.lookups == []


async def test_without_the_apiserver_s_address_nothing_is_asked(make_client, standin, acme):
    client = await make_client(authenticated=False, apiserver_token_secret=SECRET)
    await fleet(client, acme)
    workers = await get_all(client, acme["token"])
    assert workers["w1"]["task"] == {"id": acme["training"]["id"]}
    assert workers["w1"]["queues"] == [{"id": acme["queue"]["id"]}, {"id": acme["idle"]["id"]}]
    assert standin.lookups == []


def warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


async def ids_alone(client, acme) -> None:
    workers = await get_all(client, acme["token"])
    assert workers["w1"]["task"] == {"id": acme["training"]["id"]} and "project" not in workers["w1"]
    assert workers["w1"]["queues"] == [{"id": acme["queue"]["id"]}, {"id": acme["idle"]["id"]}]


async def test_a_slow_apiserver_costs_get_all_the_bound_and_leaves_the_ids(beside, standin, acme, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    client = await beside(apiserver_cache_seconds=0, apiserver_timeout_ms=300)
    await fleet(client, acme)
    assert (await get_all(client, acme["token"]))["w1"]["task"]["name"] == "train resnet"  # the reader started
    standin.delay = 5
    for attempt in range(2):
        started = time.monotonic()
        await ids_alone(client, acme)
        assert time.monotonic() - started < 2.5  # the bound (0.3 s), far from the apiserver's 5 s
    assert await failures(client, "timeout") == 2
    [down] = warnings(caplog)  # once per outage, not per get_all
    assert "timeout" in down and url_of(standin) in down
    standin.delay = 0
    assert (await get_all(client, acme["token"]))["w1"]["task"]["name"] == "train resnet"
    assert (await get_all(client, acme["token"]))["w1"]["queue"]["name"] == "gpu"
    assert len(warnings(caplog)) == 2 and "answers again" in warnings(caplog)[1]
    assert await failures(client, "timeout") == 2


async def test_a_failing_apiserver_leaves_the_ids(beside, standin, acme, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    client = await beside(apiserver_cache_seconds=0)
    await fleet(client, acme)
    standin.failing = True
    for attempt in range(3):
        await ids_alone(client, acme)
    assert await failures(client, "error") == 3
    assert len(warnings(caplog)) == 1
    standin.failing = False
    assert (await get_all(client, acme["token"]))["w1"]["project"]["name"] == "Vision"
    assert len(warnings(caplog)) == 2
    # A second outage is logged again.
    standin.failing = True
    await ids_alone(client, acme)
    assert len(warnings(caplog)) == 3


async def test_an_unreachable_apiserver_leaves_the_ids(make_client, acme, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    client = await make_client(authenticated=False, apiserver_token_secret=SECRET,
                               apiserver_url=f"http://127.0.0.1:{free_port()}")
    await fleet(client, acme)
    await ids_alone(client, acme)
    await ids_alone(client, acme)
    assert await failures(client, "unreachable") == 2
    assert len(warnings(caplog)) == 1


async def test_a_token_the_apiserver_refuses_leaves_the_ids_and_is_no_outage(beside, standin, acme, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    standin.token_secret = "the apiserver signs with another secret now " + uuid.uuid4().hex
    client = await beside()
    await fleet(client, acme)
    await ids_alone(client, acme)
    assert await failures(client, "refused") == 1
    assert not [message for message in warnings(caplog) if "no names" in message]


async def test_get_all_never_waits_on_the_apiserver_when_no_worker_names_anything(beside, standin, acme):
    client = await beside()
    await report(client, acme["token"], "bare")
    standin.delay = 5
    [worker] = (await get_all(client, acme["token"])).values()
    assert worker["task"] is None and worker["queues"] == []
    assert standin.lookups == []
