"""Beside a ClearML server (SPEC §1): tokens the apiserver issued are accepted when its token
secret is configured, their company and user exist here from first sight, tenancy and roles
as the apiserver has them on workers.*, and the web UI's session cookie."""

import asyncio
import base64
import time
import uuid

import jwt
import orjson
import pytest
from helpers import WORKER_ENDPOINTS, basic_auth, call, now_ms, ok

from server.keys import SIGNING_KEY
from server.storage import tenants

SECRET = "the-apiserver-token-secret-" + "0123456789abcdef" * 3  # 64 bytes: enough for HS512 too
OTHER_SECRET = "another-apiserver-token-secret-0123456789ab"
COOKIE = "clearml_token_basic"


def apiserver_token(
    company: str,
    user: str,
    *,
    company_name: str | None = None,
    user_name: str | None = None,
    role: str = "user",
    lifetime: int | None = 3600,
    issued: int | None = None,
    secret: str = SECRET,
) -> str:
    """A token laid out as the apiserver's auth.login makes it (no exp for role `system`)."""
    issued = int(time.time()) if issued is None else issued
    claims = {
        "identity": {
            "user": user,
            "company": company,
            "role": role,
            "user_name": user_name or f"{user} name",
            "company_name": company_name or f"{company} name",
        },
        "iat": issued,
        "session_id": uuid.uuid4().hex,
        "env": "<unknown>",
        "entities": {},
        "api_version": "2.31",
        "server_version": "2.0.0",
        "server_build": "613",
        "feature_set": "basic",
    }
    if lifetime is not None:
        claims["exp"] = issued + lifetime
    return jwt.encode(claims, secret, algorithm="HS256")


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def cookie(token: str, name: str = COOKIE) -> dict:
    return {"Cookie": f"{name}={token}"}


def new_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def beside(make_client):
    """A server configured with the apiserver's token secret; the client sends no credentials."""
    return await make_client(authenticated=False, apiserver_token_secret=SECRET)


async def worker_ids(client, headers) -> list[str]:
    return [worker["id"] for worker in (await ok(client, "workers.get_all", {}, headers=headers))["workers"]]


async def test_an_apiserver_token_is_accepted_and_its_company_and_user_created(beside, db_conn):
    company, user = new_id(), new_id()
    token = apiserver_token(company, user, company_name="Acme", user_name="Alice", role="admin")
    await ok(beside, "workers.register", {"worker": "w1", "queues": ["q1"]}, headers=bearer(token))
    await ok(beside, "workers.status_report", {"worker": "w1", "timestamp": now_ms(), "task": "t1"},
             headers=bearer(token))

    [worker] = (await ok(beside, "workers.get_all", {}, headers=bearer(token)))["workers"]
    assert worker["id"] == "w1"
    assert worker["company"] == {"id": company, "name": "Acme"}
    assert worker["user"] == {"id": user, "name": "Alice"}
    assert worker["task"] == {"id": "t1"} and worker["queues"] == [{"id": "q1"}]
    assert await db_conn.fetch("SELECT id, name FROM companies WHERE id = $1", company) == [(company, "Acme")]
    assert await db_conn.fetch("SELECT company, id, name, role FROM users WHERE company = $1", company) == [
        (company, user, "Alice", "admin")
    ]


async def test_a_second_user_of_the_same_company(beside, db_conn):
    company, alice, bob = new_id(), new_id(), new_id()
    alice_token = apiserver_token(company, alice, company_name="Acme", user_name="Alice")
    bob_token = apiserver_token(company, bob, company_name="Acme", user_name="Bob")
    await ok(beside, "workers.register", {"worker": "w-alice"}, headers=bearer(alice_token))
    await ok(beside, "workers.register", {"worker": "w-bob"}, headers=bearer(bob_token))

    workers = (await ok(beside, "workers.get_all", {}, headers=bearer(bob_token)))["workers"]
    assert {w["id"]: w["user"]["name"] for w in workers} == {"w-alice": "Alice", "w-bob": "Bob"}
    assert {w["company"]["id"] for w in workers} == {company}
    assert await db_conn.fetchval("SELECT count(*) FROM companies WHERE id = $1", company) == 1
    assert sorted(await db_conn.fetch("SELECT id, name FROM users WHERE company = $1", company)) == sorted(
        [(alice, "Alice"), (bob, "Bob")]
    )


async def test_concurrent_first_requests_of_a_new_company_create_it_once(make_client, db_conn):
    # Two servers on one database stand for two processes or hosts; neither has seen the company.
    servers = [await make_client(authenticated=False, apiserver_token_secret=SECRET) for _ in range(2)]
    company = new_id()
    users = [new_id() for _ in range(3)]
    tokens = [apiserver_token(company, user, company_name="Fresh", user_name=f"user {i}") for i, user in enumerate(users)]
    answers = await asyncio.gather(
        *(
            call(servers[i % 2], "workers.status_report",
                 {"worker": f"w{i}", "timestamp": now_ms(), "machine_stats": {"cpu_usage": [i]}},
                 headers=bearer(tokens[i % 3]))
            for i in range(30)
        )
    )
    assert [answer[:2] for answer in answers] == [(200, 0)] * 30
    assert await db_conn.fetch("SELECT id, name FROM companies WHERE name LIKE 'Fresh%'") == [(company, "Fresh")]
    assert sorted(await db_conn.fetch("SELECT id, name FROM users WHERE company = $1", company)) == sorted(
        (user, f"user {i}") for i, user in enumerate(users)
    )
    assert len(await worker_ids(servers[0], bearer(tokens[0]))) == 30


async def test_tenants_are_ensured_once_per_process(beside, monkeypatch):
    writes = []

    async def counting(db, company, name):
        writes.append(company)
        await ensure_company(db, company, name)

    ensure_company = tenants.ensure_company
    monkeypatch.setattr(tenants, "ensure_company", counting)
    company = new_id()
    token = apiserver_token(company, new_id())
    for _ in range(5):
        await ok(beside, "workers.status_report", {"worker": "w1", "timestamp": now_ms()}, headers=bearer(token))
    await ok(beside, "workers.get_all", {}, headers=bearer(apiserver_token(company, new_id())))
    assert writes == [company, company]  # one per (company, user)


async def test_a_system_token_without_exp_is_accepted(beside):
    token = apiserver_token(new_id(), new_id(), role="system", lifetime=None)
    assert "exp" not in jwt.decode(token, options={"verify_signature": False})
    await ok(beside, "workers.register", {"worker": "service-agent"}, headers=bearer(token))
    assert await worker_ids(beside, bearer(token)) == ["service-agent"]


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    claims["identity"]["company"] = "someone-else"
    forged = base64.urlsafe_b64encode(orjson.dumps(claims)).decode().rstrip("=")
    return f"{header}.{forged}.{signature}"


def _claims(**identity) -> dict:
    now = int(time.time())
    return {"identity": identity, "iat": now, "exp": now + 60}


@pytest.mark.parametrize(
    "make_token, expected",
    [
        pytest.param(lambda: apiserver_token(new_id(), new_id(), issued=int(time.time()) - 7200, lifetime=60),
                     (401, 30), id="expired"),
        pytest.param(lambda: apiserver_token(new_id(), new_id(), secret=OTHER_SECRET), (401, 30), id="other-secret"),
        pytest.param(lambda: _tampered(apiserver_token(new_id(), new_id())), (401, 30), id="tampered"),
        pytest.param(lambda: jwt.encode(_claims(company="c", user="u", role="user"), SECRET, algorithm="HS512"),
                     (401, 30), id="alg-hs512"),
        pytest.param(lambda: jwt.encode(_claims(company="c", user="u", role="user"), "", algorithm="none"),
                     (401, 30), id="alg-none"),
        pytest.param(lambda: jwt.encode(_claims(company="c", user="u"), SECRET, algorithm="HS256"),
                     (401, 30), id="no-role"),
        pytest.param(lambda: jwt.encode(_claims(company="", user="u", role="user"), SECRET, algorithm="HS256"),
                     (401, 30), id="empty-company"),
        pytest.param(lambda: jwt.encode({"iat": int(time.time())}, SECRET, algorithm="HS256"), (401, 30),
                     id="no-identity"),
        pytest.param(lambda: "not-a-jwt", (401, 21), id="malformed"),
    ],
)
async def test_rejected_tokens_get_the_usual_401_and_create_nothing(beside, db_conn, make_token, expected):
    companies_before = await db_conn.fetch("SELECT * FROM companies ORDER BY id")
    token = make_token()
    for headers in (bearer(token), cookie(token)):
        code, subcode, message, _ = await call(beside, "workers.register", {"worker": "w1"}, headers=headers)
        assert (code, subcode) == expected, message
    assert await db_conn.fetch("SELECT * FROM companies ORDER BY id") == companies_before
    assert await db_conn.fetchval("SELECT count(*) FROM worker_registrations") == 0


async def test_apiserver_tokens_are_refused_when_no_secret_is_configured(make_client):
    client = await make_client(authenticated=False)
    token = apiserver_token(new_id(), new_id())
    assert (await call(client, "workers.get_all", {}, headers=bearer(token)))[:2] == (401, 30)


async def test_our_tokens_and_basic_credentials_keep_working_beside_them(beside):
    ours = beside.credentials
    basic = {"Authorization": basic_auth(ours.access_key, ours.secret)}
    our_token = (await ok(beside, "auth.login", headers=basic))["token"]
    theirs = apiserver_token(new_id(), new_id())
    await ok(beside, "workers.register", {"worker": "ours-basic"}, headers=basic)
    await ok(beside, "workers.register", {"worker": "ours-token"}, headers=bearer(our_token))
    await ok(beside, "workers.register", {"worker": "theirs"}, headers=bearer(theirs))
    assert sorted(await worker_ids(beside, bearer(our_token))) == ["ours-basic", "ours-token"]
    assert sorted(await worker_ids(beside, basic)) == ["ours-basic", "ours-token"]
    assert await worker_ids(beside, bearer(theirs)) == ["theirs"]
    # An expired token of ours is still refused, not retried with the apiserver's secret.
    expired = jwt.encode(
        {"identity": {"company": ours.company_id, "user": ours.user_id}, "iat": 1, "exp": 2},
        beside.app[SIGNING_KEY],
        algorithm="HS256",
    )
    code, subcode, message, _ = await call(beside, "workers.get_all", {}, headers=bearer(expired))
    assert (code, subcode) == (401, 30) and "expired" in message


async def test_one_secret_for_both(make_client):
    client = await make_client(authenticated=False, auth_secret=SECRET, apiserver_token_secret=SECRET)
    caller = client.credentials
    ours = (await ok(client, "auth.login", headers={"Authorization": basic_auth(caller.access_key, caller.secret)}))["token"]
    await ok(client, "workers.register", {"worker": "ours"}, headers=bearer(ours))
    system = apiserver_token(new_id(), new_id(), role="system", lifetime=None)
    await ok(client, "workers.register", {"worker": "theirs"}, headers=bearer(system))
    assert await worker_ids(client, bearer(ours)) == ["ours"]
    assert await worker_ids(client, bearer(system)) == ["theirs"]
    forged = jwt.encode({"identity": {"company": caller.company_id, "user": caller.user_id, "role": "user"}},
                        OTHER_SECRET, algorithm="HS256")
    assert (await call(client, "workers.get_all", {}, headers=bearer(forged)))[:2] == (401, 30)


async def test_a_login_with_an_apiserver_token_gives_one_of_ours(beside):
    company, user = new_id(), new_id()
    theirs = apiserver_token(company, user, company_name="Acme", user_name="Alice")
    ours = (await ok(beside, "auth.login", headers=bearer(theirs)))["token"]
    identity = jwt.decode(ours, options={"verify_signature": False})["identity"]
    assert (identity["company"], identity["user"], identity["company_name"]) == (company, user, "Acme")
    await ok(beside, "workers.register", {"worker": "w1"}, headers=bearer(ours))
    assert await worker_ids(beside, bearer(theirs)) == ["w1"]


# --- the session cookie ------------------------------------------------------------------------

async def test_the_token_in_the_session_cookie(beside):
    theirs = apiserver_token(new_id(), new_id())
    await ok(beside, "workers.register", {"worker": "w1"}, headers=cookie(theirs))
    assert await worker_ids(beside, cookie(theirs)) == ["w1"]
    ours = (await ok(beside, "auth.login", headers={
        "Authorization": basic_auth(beside.credentials.access_key, beside.credentials.secret)}))["token"]
    await ok(beside, "workers.register", {"worker": "w2"}, headers=cookie(ours))
    assert await worker_ids(beside, cookie(ours)) == ["w2"]


async def test_the_authorization_header_takes_precedence_over_the_cookie(beside):
    theirs = apiserver_token(new_id(), new_id())
    other = apiserver_token(new_id(), new_id())
    await ok(beside, "workers.register", {"worker": "w1"}, headers=cookie(theirs))
    assert await worker_ids(beside, {**cookie(theirs), **bearer(other)}) == []
    headers = {**cookie(theirs), "Authorization": "Bearer not-a-jwt"}
    assert (await call(beside, "workers.get_all", {}, headers=headers))[:2] == (401, 21)


async def test_cookie_errors_and_the_configured_cookie_name(make_client):
    client = await make_client(authenticated=False, apiserver_token_secret=SECRET, token_cookie="session")
    token = apiserver_token(new_id(), new_id())
    assert (await call(client, "workers.get_all", {}, headers=cookie(token)))[:2] == (401, 20)
    await ok(client, "workers.get_all", {}, headers=cookie(token, "session"))
    assert (await call(client, "workers.get_all", {}, headers=cookie("garbage", "session")))[:2] == (401, 21)
    expired = apiserver_token(new_id(), new_id(), issued=int(time.time()) - 7200, lifetime=60)
    assert (await call(client, "workers.get_all", {}, headers=cookie(expired, "session")))[:2] == (401, 30)


# --- tenancy and names --------------------------------------------------------------------------

async def test_two_apiserver_companies_stay_apart(beside):
    a = apiserver_token(new_id(), new_id(), company_name="A")
    b = apiserver_token(new_id(), new_id(), company_name="B")
    report = {"worker": "shared", "timestamp": now_ms(), "machine_stats": {"cpu_usage": [50]}}
    await ok(beside, "workers.status_report", report, headers=bearer(a))
    assert await worker_ids(beside, bearer(b)) == []
    assert (await ok(beside, "workers.get_count", {}, headers=bearer(b)))["count"] == 0
    assert (await call(beside, "workers.get_metric_keys", {}, headers=bearer(b)))[:2] == (400, 1005)
    await ok(beside, "workers.unregister", {"worker": "shared"}, headers=bearer(b))
    assert await worker_ids(beside, bearer(a)) == ["shared"]
    await ok(beside, "workers.register", {"worker": "shared"}, headers=bearer(b))
    [seen_by_a] = (await ok(beside, "workers.get_all", {}, headers=bearer(a)))["workers"]
    [seen_by_b] = (await ok(beside, "workers.get_all", {}, headers=bearer(b)))["workers"]
    assert (seen_by_a["company"]["name"], seen_by_b["company"]["name"]) == ("A", "B")


async def test_a_company_name_taken_by_another_id_gets_the_id_added(make_client, db_conn):
    local = await make_client(company="local", apiserver_token_secret=SECRET)  # our own `local`, by Basic
    await ok(local, "workers.register", {"worker": "ours"})
    company, alice, other_alice = new_id(), new_id(), new_id()
    theirs = apiserver_token(company, alice, company_name="local", user_name="Alice")
    await ok(local, "workers.register", {"worker": "theirs"}, headers=bearer(theirs))
    await ok(local, "workers.register", {"worker": "theirs-2"},
             headers=bearer(apiserver_token(company, other_alice, company_name="local", user_name="Alice")))

    workers = (await ok(local, "workers.get_all", {}, headers=bearer(theirs)))["workers"]
    assert {w["id"]: w["company"] for w in workers} == {
        "theirs": {"id": company, "name": f"local ({company})"},
        "theirs-2": {"id": company, "name": f"local ({company})"},
    }
    assert {w["id"]: w["user"]["name"] for w in workers} == {"theirs": "Alice", "theirs-2": f"Alice ({other_alice})"}
    assert await worker_ids(local, {}) == ["ours"]
    assert await db_conn.fetchval("SELECT id FROM companies WHERE name = 'local'") == local.credentials.company_id


# --- roles ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["guest", "annotator", "user", "superuser", "admin", "root", "system"])
async def test_every_role_may_call_every_workers_endpoint(beside, role):
    # workers.conf sets no allow_roles, so the apiserver's default ["*"] applies to all of them.
    token = apiserver_token(new_id(), new_id(), role=role)
    now = int(time.time())
    bodies = {
        "workers.register": {"worker": "w1"},
        "workers.status_report": {"worker": "w1", "timestamp": now * 1000, "machine_stats": {"cpu_usage": [5]}},
        "workers.get_stats": {"from_date": now - 600, "to_date": now, "interval": 60, "items": [{"key": "cpu_usage"}]},
        "workers.get_activity_report": {"from_date": now - 600, "to_date": now, "interval": 60},
        "workers.unregister": {"worker": "w1"},
        "workers.set_runtime_properties": {"worker": "w1", "runtime_properties": [{"key": "force", "value": "on"}]},
        "workers.get_runtime_properties": {"worker": "w1"},
    }
    for endpoint in WORKER_ENDPOINTS:
        await ok(beside, endpoint, bodies.get(endpoint, {}), headers=bearer(token))
