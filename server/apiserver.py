"""Names of tasks, projects and queues, from the ClearML apiserver, for `get_all`.

ClearML's own server answers `get_all` with each worker's task as `{id, name, running_time,
last_iteration}`, its project `{id, name}`, and its queues as `{id, name, display_name,
num_tasks, next_task {id, name}}`, read from its database; the web UI's workers table shows
them. Those records live in the apiserver. With WORKERS_APISERVER_URL set, a caller holding a
token the apiserver issued gets them: the server process asks the apiserver with that token
(so the apiserver's permissions apply), before the read goes to a reader process, which puts
them into the answer (server/endpoints/workers.py). Two calls, concurrently, each with at
most MAX_IDS_PER_CALL ids (the apiserver answers at most 500 records unless paged):

- `tasks.get_all_ex {id, only_fields: [name, last_iteration, active_duration, project.name]}`:
  the apiserver joins each task's project and its name;
- `queues.get_all_ex {id}`: each queue with all its entries, their tasks' names joined.

`running_time` is the task's `active_duration` (seconds) in milliseconds, 0 without one, as
the reference computes it. A company's names are kept WORKERS_APISERVER_CACHE_SECONDS and
reused while they cover the ids asked for. The apiserver slow or down costs a `get_all` at
most WORKERS_APISERVER_TIMEOUT_MS: the answer then carries the ids alone, the failure is
counted by its cause (the metric `workers_apiserver_lookups_failed_total`) and logged once
per outage, and once when the apiserver answers again.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from .config import Settings

log = logging.getLogger(__name__)

MAX_IDS_PER_CALL = 500  # the apiserver's default page size (services._mongo.max_page_size)
TASK_FIELDS = ["name", "last_iteration", "active_duration", "project.name"]
CACHED_COMPANIES = 1000  # past this many, expired entries are dropped

# Why a lookup gave no names: no answer within the bound; no connection; an answer other
# than 200 (a 5xx, or one this module does not understand); the caller's token refused
# (401/403: not an outage, so not logged as one).
TIMEOUT, UNREACHABLE, ERROR, REFUSED = "timeout", "unreachable", "error", "refused"
FAILURE_CAUSES = (TIMEOUT, UNREACHABLE, ERROR, REFUSED)


@dataclass(frozen=True)
class Names:
    """What the apiserver answered, as the answer's fragments: by task id its `task` and
    `project`, by queue id its queue entry. Ids it did not answer keep their id alone."""

    tasks: dict[str, dict] = field(default_factory=dict)
    projects: dict[str, dict] = field(default_factory=dict)
    queues: dict[str, dict] = field(default_factory=dict)

    def task(self, task_id: str) -> dict:
        return self.tasks.get(task_id) or {"id": task_id}

    def project(self, task_id: str) -> dict | None:
        return self.projects.get(task_id)

    def queue(self, queue_id: str) -> dict:
        return self.queues.get(queue_id) or {"id": queue_id}


NO_NAMES = Names()


class LookupFailed(Exception):
    def __init__(self, cause: str, detail: str):
        super().__init__(detail)
        self.cause = cause


# ------------------------------------------------------------------ the apiserver's records


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _id_and_name(value) -> dict | None:
    """A reference the apiserver joined (`{id, name}`), or left as its id alone."""
    if isinstance(value, str):
        value = {"id": value}
    if not isinstance(value, dict) or not _text(value.get("id")):
        return None
    name = _text(value.get("name"))
    return {"id": value["id"], "name": name} if name is not None else {"id": value["id"]}


def task_entry(record: dict) -> dict:
    entry = {"id": record["id"]}
    if _text(record.get("name")) is not None:
        entry["name"] = record["name"]
    duration = record.get("active_duration")
    entry["running_time"] = int(duration) * 1000 if isinstance(duration, (int, float)) else 0
    if isinstance(record.get("last_iteration"), int):
        entry["last_iteration"] = record["last_iteration"]
    return entry


def queue_entry(record: dict) -> dict:
    entries = record.get("entries")
    entries = entries if isinstance(entries, list) else []
    entry = {"id": record["id"]}
    for key in ("name", "display_name"):
        if _text(record.get(key)) is not None:
            entry[key] = record[key]
    entry["num_tasks"] = len(entries)
    next_task = _id_and_name(entries[0].get("task")) if entries and isinstance(entries[0], dict) else None
    if next_task is not None:
        entry["next_task"] = next_task
    return entry


def names_from(tasks: list[dict], queues: list[dict]) -> Names:
    names = Names()
    for record in tasks:
        names.tasks[record["id"]] = task_entry(record)
        project = _id_and_name(record.get("project"))
        if project is not None:
            names.projects[record["id"]] = project
    for record in queues:
        names.queues[record["id"]] = queue_entry(record)
    return names


def _records(envelope, key: str) -> list[dict]:
    """`data[key]`: a list of records with an id each, or LookupFailed."""
    data = envelope.get("data") if isinstance(envelope, dict) else None
    records = data.get(key) if isinstance(data, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) and _text(r.get("id")) for r in records):
        raise LookupFailed(ERROR, f"the answer has no list of {key}")
    return records


def _chunks(ids: list[str]) -> list[list[str]]:
    return [ids[start:start + MAX_IDS_PER_CALL] for start in range(0, len(ids), MAX_IDS_PER_CALL)]


# ------------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class _Cached:
    expires: float
    task_ids: frozenset[str]
    queue_ids: frozenset[str]
    names: Names

    def covers(self, task_ids: list[str], queue_ids: list[str]) -> bool:
        return self.task_ids.issuperset(task_ids) and self.queue_ids.issuperset(queue_ids)


class Apiserver:
    """The apiserver at WORKERS_APISERVER_URL, asked by one server process."""

    def __init__(self, settings: Settings, metrics=None):
        self.url = settings.apiserver_url.rstrip("/")
        self._timeout = settings.apiserver_timeout_ms / 1000
        self._cache_seconds = settings.apiserver_cache_seconds
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._cache: dict[str, _Cached] = {}
        self._down = False  # the last lookup failed for want of an answer (logged once)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def names(self, company: str, token: str, task_ids: list[str], queue_ids: list[str]) -> Names:
        """The apiserver's names of these tasks and queues, asked with `token` (or kept for
        the company from an earlier answer); NO_NAMES when it fails to answer in time."""
        if not task_ids and not queue_ids:
            return NO_NAMES
        cached = self._cache.get(company)
        now = time.monotonic()
        if cached is not None and cached.expires > now and cached.covers(task_ids, queue_ids):
            return cached.names
        try:
            async with asyncio.timeout(self._timeout):
                names = await self._ask(token, task_ids, queue_ids)
        except TimeoutError:
            self._failed(TIMEOUT, f"no answer within {self._timeout * 1000:g} ms")
            return NO_NAMES
        except LookupFailed as failure:
            self._failed(failure.cause, str(failure))
            return NO_NAMES
        self._answered()
        self._remember(company, _Cached(now + self._cache_seconds, frozenset(task_ids), frozenset(queue_ids), names))
        return names

    async def _ask(self, token: str, task_ids: list[str], queue_ids: list[str]) -> Names:
        calls = [self._call(token, "tasks.get_all_ex", {"id": ids, "only_fields": TASK_FIELDS}, "tasks")
                 for ids in _chunks(task_ids)]
        calls += [self._call(token, "queues.get_all_ex", {"id": ids}, "queues") for ids in _chunks(queue_ids)]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        tasks = [record for kind, records in answers if kind == "tasks" for record in records]
        queues = [record for kind, records in answers if kind == "queues" for record in records]
        return names_from(tasks, queues)

    async def _call(self, token: str, endpoint: str, body: dict, key: str) -> tuple[str, list[dict]]:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        try:
            async with self._session.post(f"{self.url}/{endpoint}", data=orjson.dumps(body), headers=headers) as response:
                raw = await response.read()
        except TimeoutError:
            raise  # the bound: counted as a timeout by names()
        except aiohttp.ClientError as error:
            raise LookupFailed(UNREACHABLE, f"{endpoint}: {error!r}") from None
        if response.status in (401, 403):
            raise LookupFailed(REFUSED, f"{endpoint}: {response.status}")
        if response.status != 200:
            raise LookupFailed(ERROR, f"{endpoint}: HTTP {response.status}")
        try:
            envelope = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise LookupFailed(ERROR, f"{endpoint}: the answer is not JSON") from None
        return key, _records(envelope, key)

    def _remember(self, company: str, cached: _Cached) -> None:
        if len(self._cache) >= CACHED_COMPANIES:
            now = time.monotonic()
            self._cache = {known: entry for known, entry in self._cache.items() if entry.expires > now}
        self._cache[company] = cached

    def _failed(self, cause: str, detail: str) -> None:
        if self._metrics is not None:
            self._metrics.apiserver_lookups_failed.labels(cause).inc()
        if cause == REFUSED:
            # The apiserver answers: it refused this caller's token (expired, revoked there).
            log.debug("the apiserver refused a caller's token: %s", detail)
            self._answered()
        elif not self._down:
            self._down = True
            log.warning(
                "the apiserver at %s gives no names (%s: %s): get_all answers the ids of tasks and queues "
                "alone until it answers", self.url, cause, detail,
            )

    def _answered(self) -> None:
        if self._down:
            self._down = False
            log.info("the apiserver at %s answers again: get_all names tasks and queues", self.url)
