"""A stand-in for ClearML's apiserver, for tests only: what `clearml-agent daemon` calls
outside `workers.*`, answered the way the apiserver answers.

`auth.login` takes Basic credentials and issues a token in the apiserver's layout (claims
`identity {user, company, role, user_name, company_name}`, `iat`, `exp`, `env`,
`entities`, `session_id`, version claims), signed HS256 with the apiserver's token secret
(`secure.auth.token_secret`), which the workers service is configured with. Every other
call needs that token. The daemon's queue calls find one queue, `default`; it never gets a
task. `workers.*` must never arrive here (the proxy sends them to the workers service):
such a call, like any unknown endpoint, is answered 400/1. Every call is recorded.
"""

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
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, endpoint)

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

    def check_token(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            jwt.decode(token, self.token_secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            raise Failure(401, 30, "Unauthorized (invalid token)") from None
        if scheme != "Bearer":
            raise Failure(401, 21, "Unauthorized (malformed credentials)")

    def queues(self, body: dict) -> list[dict]:
        ids, name = body.get("id"), body.get("name")
        wanted = (not ids or self.queue["id"] in ids) and re.search(name or "", self.queue["name"])
        return [self.queue] if wanted else []

    def answer(self, endpoint: str, request: web.Request, body: dict) -> dict:
        handlers = {
            "auth.login": lambda: self.login(request, body),
            "queues.get_all": lambda: {"queues": self.queues(body)},
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
        data = apiserver.answer(endpoint, request, orjson.loads(raw) if raw else {})
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
