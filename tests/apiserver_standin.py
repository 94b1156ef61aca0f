"""A stand-in for ClearML's apiserver, for tests only: what `clearml-agent daemon` calls
outside `workers.*`, and the lookups of the workers service's `get_all`, answered the way the
apiserver answers.

`auth.login` takes Basic credentials and issues a token in the apiserver's layout (claims
`identity {user, company, role, user_name, company_name}`, `iat`, `exp`, `env`,
`entities`, `session_id`, version claims), signed HS256 with the apiserver's token secret
(`secure.auth.token_secret`), which the workers service is configured with. Every other
call needs that token. The daemon's queue calls find one queue, `default`; it never gets a
task. `workers.*` must never arrive here (the proxy sends them to the workers service):
such a call, like any unknown endpoint, is answered 400/1. Every call is recorded.

`tasks.get_all_ex` and `queues.get_all_ex` answer from `tasks`, `projects` and `queues`
(records as the apiserver keeps them, each with its `company`), as the apiserver's schema
(`apiserver/schema/services/tasks.conf`, `queues.conf`) and code do: the caller's company
only; `id` filters; at most 500 records (the apiserver's default page size); a task has only
the fields `only_fields` names (and `id`), `project.name` joining the project as
`{id, name}`; a queue has all its fields and every entry, each entry's task joined as
`{id, name}`, and `workers` (empty here). `delay` makes those two calls slow, `failing`
answers them 500.
"""

import asyncio

import base64
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field

import jwt
import orjson
from aiohttp import web

API_VERSION = "2.31"
SERVER_VERSION = "2.0.0"
STANDIN = web.AppKey("standin", object)
MAX_PAGE_SIZE = 500
LOOKUPS = ("tasks.get_all_ex", "queues.get_all_ex")
PATH = re.compile(r"^/(?:v(\d+\.\d+)/)?([a-z_]+\.[a-z_]+)$")


@dataclass
class ApiServer:
    token_secret: str
    access_key: str
    secret_key: str
    company: str = field(default_factory=lambda: uuid.uuid4().hex)
    user: str = field(default_factory=lambda: uuid.uuid4().hex)
    queue: dict = field(default_factory=lambda: {"id": uuid.uuid4().hex, "name": "default", "tags": [],
                                                 "system_tags": [], "entries": []})
    tasks: dict[str, dict] = field(default_factory=dict)  # id -> {id, company, name, project, ...}
    projects: dict[str, dict] = field(default_factory=dict)  # id -> {id, company, name}
    queues: list[dict] = field(default_factory=list)  # `queue` first
    delay: float = 0.0  # seconds before answering a lookup (LOOKUPS)
    failing: bool = False  # lookups answered 500
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, endpoint)
    lookups: list[tuple[str, str, dict]] = field(default_factory=list)  # (endpoint, token, body)

    def __post_init__(self):
        self.queue.setdefault("company", self.company)
        self.queues.insert(0, self.queue)

    def token(self) -> str:
        now = int(time.time())
        return jwt.encode({
            "identity": {"user": self.user, "company": self.company, "role": "user",
                         "user_name": "Daemon Owner", "company_name": "clearml"},
            "entities": {}, "env": "test", "iat": now, "exp": now + 30 * 24 * 3600,
            "session_id": secrets.token_hex(16), "api_version": API_VERSION,
            "server_version": SERVER_VERSION, "server_build": "1", "feature_set": "basic",
        }, self.token_secret, algorithm="HS256")

    def login(self, request: web.Request, body: dict) -> dict:
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        given = base64.b64decode(encoded).decode() if scheme == "Basic" else ""
        if given != f"{self.access_key}:{self.secret_key}":
            raise Failure(401, 22, "Unauthorized (invalid credentials)")
        return {"token": self.token()}

    def check_token(self, request: web.Request) -> str:
        """The company of the caller's token."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            claims = jwt.decode(token, self.token_secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            raise Failure(401, 30, "Unauthorized (invalid token)") from None
        if scheme != "Bearer":
            raise Failure(401, 21, "Unauthorized (malformed credentials)")
        return claims["identity"]["company"]

    def find_queues(self, body: dict, company: str) -> list[dict]:
        ids, name = body.get("id"), body.get("name")
        return [queue for queue in self.queues if queue["company"] == company and (not ids or queue["id"] in ids)
                and re.search(name or "", queue["name"])][:MAX_PAGE_SIZE]

    def queue_infos(self, body: dict, company: str) -> list[dict]:
        """queues.get_all_ex: every field, each entry's task as {id, name}, and `workers`."""
        infos = []
        for queue in self.find_queues(body, company):
            entries = [{**entry, "task": self.reference(self.tasks, entry["task"], company)}
                       for entry in queue["entries"]]
            infos.append({**queue, "entries": entries, "workers": []})
        return infos

    @staticmethod
    def reference(records: dict, record_id: str, company: str) -> dict:
        """A joined reference: {id, name}, or {id} when the record is not the company's."""
        record = records.get(record_id)
        if record is None or record["company"] != company:
            return {"id": record_id}
        return {"id": record_id, "name": record["name"]}

    def find_tasks(self, body: dict, company: str) -> list[dict]:
        """tasks.get_all_ex: the tasks of these ids, with the fields of only_fields."""
        ids, only = body.get("id"), body.get("only_fields")
        found = [task for task in self.tasks.values() if task["company"] == company and (not ids or task["id"] in ids)]
        answered = []
        for task in found[:MAX_PAGE_SIZE]:
            if not only:
                answered.append(dict(task))
                continue
            fields = {"id": task["id"]}
            for name in only:
                top = name.split(".", 1)[0]
                if top not in task:
                    continue
                if top == "project":  # a reference field: joined when a field of it is asked for
                    fields["project"] = (self.reference(self.projects, task["project"], company) if "." in name
                                         else {"id": task["project"]})
                else:
                    fields[top] = task[top]
            answered.append(fields)
        return answered

    async def lookup(self, endpoint: str, request: web.Request, body: dict) -> dict:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        self.lookups.append((endpoint, token, body))
        company = self.check_token(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failing:
            raise Failure(500, 100, "General data error")
        if endpoint == "tasks.get_all_ex":
            return {"tasks": self.find_tasks(body, company)}
        return {"queues": self.queue_infos(body, company)}

    async def answer(self, endpoint: str, request: web.Request, body: dict) -> dict:
        if endpoint in LOOKUPS:
            return await self.lookup(endpoint, request, body)
        handlers = {
            "auth.login": lambda: self.login(request, body),
            "queues.get_all": lambda: {"queues": self.find_queues(body, self.check_token(request))},
            "queues.get_by_id": lambda: {"queue": self.queue},
            "queues.get_default": lambda: {"id": self.queue["id"], "name": self.queue["name"]},
            "queues.get_next_task": lambda: {},
        }
        if endpoint not in handlers:
            raise Failure(400, 1, "Invalid request path")
        if endpoint != "auth.login":
            self.check_token(request)
        return handlers[endpoint]()


class Failure(Exception):
    def __init__(self, code: int, subcode: int, message: str):
        super().__init__(message)
        self.code, self.subcode, self.message = code, subcode, message


async def handle(request: web.Request) -> web.Response:
    apiserver = request.app[STANDIN]
    matched = PATH.match(request.path)
    endpoint, version = (matched[2], matched[1] or API_VERSION) if matched else (request.path, API_VERSION)
    apiserver.calls.append((request.method, endpoint))
    raw = await request.read()
    code, subcode, message, data = 200, 0, "OK", None
    try:
        data = await apiserver.answer(endpoint, request, orjson.loads(raw) if raw else {})
    except Failure as failure:
        code, subcode, message = failure.code, failure.subcode, failure.message
    trx = uuid.uuid4().hex
    meta = {"id": trx, "trx": trx, "endpoint": {"name": endpoint, "requested_version": version,
                                                "actual_version": version},
            "result_code": code, "result_subcode": subcode, "result_msg": message, "error_stack": None,
            "error_data": {}}
    return web.json_response({"meta": meta, "data": data}, status=code, dumps=lambda v: orjson.dumps(v).decode())


def create_app(apiserver: ApiServer) -> web.Application:
    app = web.Application()
    app[STANDIN] = apiserver
    app.router.add_route("*", "/{path:.*}", handle)
    return app
