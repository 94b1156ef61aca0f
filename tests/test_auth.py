"""Authentication (SPEC §1): auth.login, Bearer and Basic credentials, every 401, revocation,
secrets at rest, the credentials command, and isolation between companies."""

import asyncio
import base64
import os
import subprocess
import sys
import time

import asyncpg
import jwt
import orjson
import pytest
from conftest import ROOT
from helpers import WORKER_ENDPOINTS, basic_auth, call, now_ms, ok, table_snapshot

from server.keys import SIGNING_KEY
from server.protocol import API_VERSION, SERVER_VERSION
from server.storage import credentials

THIRTY_DAYS = 30 * 24 * 3600


@pytest.fixture
async def anonymous(make_client):
    """A client that sends no credentials of its own; `anonymous.credentials` are valid ones."""
    return await make_client(authenticated=False)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def basic(caller) -> dict:
    return {"Authorization": basic_auth(caller.access_key, caller.secret)}


async def login(client, headers, body=None, path="auth.login") -> str:
    return (await ok(client, path, body, headers=headers))["token"]


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def token_signed(client, claims: dict, key: str | None = None, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key if key is not None else client.app[SIGNING_KEY], algorithm=algorithm)


def valid_claims(client, **changes) -> dict:
    caller = client.credentials
    now = int(time.time())
    claims = {
        "identity": {"company": caller.company_id, "user": caller.user_id, "role": "user"},
        "iat": now,
        "exp": now + 3600,
    }
    return {**claims, **changes}


async def test_login_returns_a_signed_token_with_the_documented_claims(anonymous):
    token = await login(anonymous, basic(anonymous.credentials))
    claims = jwt.decode(token, anonymous.app[SIGNING_KEY], algorithms=["HS256"])
    caller = anonymous.credentials
    assert claims["identity"]["company"] == caller.company_id
    assert claims["identity"]["user"] == caller.user_id
    assert claims["identity"]["role"] == "user"
    assert (claims["identity"]["company_name"], claims["identity"]["user_name"]) == ("default", "tester")
    assert claims["api_version"] == API_VERSION
    assert claims["server_version"] == SERVER_VERSION
    assert claims["feature_set"] == "basic"
    assert abs(claims["iat"] - time.time()) < 5
    assert claims["exp"] - claims["iat"] == THIRTY_DAYS


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
async def test_login_with_any_method_and_a_versioned_path(anonymous, method):
    token = await login(anonymous, basic(anonymous.credentials), path="v2.5/auth.login")
    assert claims_of(token)["identity"]["user"] == anonymous.credentials.user_id
    code, *_ = await call(anonymous, "auth.login", method=method, headers=basic(anonymous.credentials))
    assert code == 200


@pytest.mark.parametrize(("requested", "lifetime"), [(60, 60), (THIRTY_DAYS * 2, THIRTY_DAYS)])
async def test_login_expiration_is_capped_by_the_configured_lifetime(anonymous, requested, lifetime):
    token = await login(anonymous, basic(anonymous.credentials), {"expiration_sec": requested})
    claims = claims_of(token)
    assert claims["exp"] - claims["iat"] == lifetime


async def test_login_expiration_as_the_daemon_sends_it_in_the_query(anonymous):
    token = await login(anonymous, basic(anonymous.credentials), path="auth.login?expiration_sec=120")
    claims = claims_of(token)
    assert claims["exp"] - claims["iat"] == 120


@pytest.mark.parametrize("value", ["0", "2147483648", "soon", "²", ""])
async def test_login_rejects_an_invalid_expiration_in_the_query(anonymous, value):
    code, subcode, message, _ = await call(
        anonymous, f"auth.login?expiration_sec={value}", {"expiration_sec": 60}, headers=basic(anonymous.credentials)
    )
    assert (code, subcode) == (400, 12)
    assert "expiration_sec" in message


async def test_configured_token_lifetime(make_client):
    client = await make_client(authenticated=False, token_lifetime_seconds=600)
    claims = claims_of(await login(client, basic(client.credentials)))
    assert claims["exp"] - claims["iat"] == 600


async def test_a_token_works_on_every_endpoint(anonymous):
    token = await login(anonymous, basic(anonymous.credentials))
    await ok(anonymous, "workers.register", {"worker": "w1"}, headers=bearer(token))
    await ok(anonymous, "workers.status_report", {"worker": "w1", "timestamp": now_ms()}, headers=bearer(token))
    assert (await ok(anonymous, "workers.get_count", {}, headers=bearer(token)))["count"] == 1


@pytest.mark.parametrize("endpoint", ["auth.login", *WORKER_ENDPOINTS])
async def test_missing_credentials_is_401_20_and_changes_nothing(anonymous, db_conn, endpoint):
    await ok(anonymous, "workers.register", {"worker": "w1"}, headers=basic(anonymous.credentials))
    before = await table_snapshot(db_conn)
    body = {"worker": "w1", "timestamp": now_ms(), "from_date": 0, "to_date": 100, "interval": 10,
            "items": [{"key": "cpu_usage"}]}
    assert (await call(anonymous, endpoint, body))[:2] == (401, 20)
    assert await table_snapshot(db_conn) == before


@pytest.mark.parametrize(
    "header",
    [
        "Basic",
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"no-colon-here").decode(),
        "Basic " + base64.b64encode(b":secret-without-key").decode(),
        "Bearer",
        "Bearer not-a-jwt",
        "Bearer a.b.c",
        "Token abcdef",
        "Digest username=x",
    ],
)
async def test_malformed_credentials_are_401_21(anonymous, header):
    assert (await call(anonymous, "workers.get_count", {}, headers={"Authorization": header}))[:2] == (401, 21)


async def test_wrong_secret_and_unknown_key_are_401_22(anonymous):
    caller = anonymous.credentials
    wrong_secret = {"Authorization": basic_auth(caller.access_key, caller.secret + "x")}
    unknown_key = {"Authorization": basic_auth("NOSUCHKEY", caller.secret)}
    for headers in (wrong_secret, unknown_key):
        assert (await call(anonymous, "workers.get_count", {}, headers=headers))[:2] == (401, 22)
        assert (await call(anonymous, "auth.login", headers=headers))[:2] == (401, 22)


async def test_expired_token_is_401_30(anonymous):
    past = int(time.time()) - 7200
    token = token_signed(anonymous, valid_claims(anonymous, iat=past, exp=past + 60))
    code, subcode, message, _ = await call(anonymous, "workers.get_count", {}, headers=bearer(token))
    assert (code, subcode) == (401, 30)
    assert "expired" in message


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda client: token_signed(client, valid_claims(client), key="another-key-that-is-long-enough-for-hs256"), id="other-key"),
        pytest.param(lambda client: token_signed(client, valid_claims(client), key="", algorithm="none"), id="alg-none"),
        pytest.param(lambda client: token_signed(client, valid_claims(client), algorithm="HS512"), id="alg-hs512"),
        pytest.param(lambda client: token_signed(client, {"iat": int(time.time()), "exp": int(time.time()) + 60}),
                     id="no-identity"),
        pytest.param(lambda client: token_signed(client, valid_claims(client, identity="admin")), id="identity-text"),
        pytest.param(lambda client: token_signed(client, {"identity": valid_claims(client)["identity"]}), id="no-exp"),
    ],
)
async def test_forged_tokens_are_401_30(anonymous, forge):
    token = forge(anonymous)
    assert (await call(anonymous, "workers.get_count", {}, headers=bearer(token)))[:2] == (401, 30)


@pytest.mark.parametrize(
    "endpoint, body",
    [
        ("workers.register", {"worker": "w1"}),
        ("workers.status_report", {"worker": "w1", "timestamp": now_ms(), "machine_stats": {"cpu_usage": 1}}),
    ],
)
async def test_token_of_a_company_that_no_longer_exists_is_401_30(anonymous, db_conn, endpoint, body):
    # Signed with the server's key, so valid, but for a company deleted since it was issued.
    ghost = valid_claims(anonymous, identity={"company": "deleted-company", "user": "u", "role": "user"})
    before = await table_snapshot(db_conn)
    code, subcode, message, _ = await call(anonymous, endpoint, body, headers=bearer(token_signed(anonymous, ghost)))
    assert (code, subcode) == (401, 30), message
    assert await table_snapshot(db_conn) == before


async def test_tampered_claims_break_the_signature(anonymous):
    token = await login(anonymous, basic(anonymous.credentials))
    header, payload, signature = token.split(".")
    claims = claims_of(token)
    claims["identity"]["company"] = "someone-else"
    forged_payload = base64.urlsafe_b64encode(orjson.dumps(claims)).decode().rstrip("=")
    forged = f"{header}.{forged_payload}.{signature}"
    assert (await call(anonymous, "workers.get_all", {}, headers=bearer(forged)))[:2] == (401, 30)


async def test_revoked_key_stops_working_at_once(anonymous, db_conn):
    caller = anonymous.credentials
    await ok(anonymous, "workers.get_count", {}, headers=basic(caller))  # verified and cached
    assert await credentials.revoke(db_conn, caller.access_key)
    assert (await call(anonymous, "workers.get_count", {}, headers=basic(caller)))[:2] == (401, 22)
    assert (await call(anonymous, "auth.login", headers=basic(caller)))[:2] == (401, 22)
    assert not await credentials.revoke(db_conn, caller.access_key)


async def test_secrets_are_stored_only_as_salted_hashes(make_client, db_conn):
    first, second = await make_client(), await make_client(user="other")
    rows = await db_conn.fetch("SELECT access_key, secret_hash FROM credentials")
    hashes = {row["access_key"]: row["secret_hash"] for row in rows}
    for caller in (first.credentials, second.credentials):
        stored = hashes[caller.access_key]
        assert stored.startswith("scrypt$")
        assert caller.secret not in stored
    assert len(set(hashes.values())) == 2


def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", "credentials", *args],
        cwd=ROOT,
        env={**os.environ, "WORKERS_DB_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_credentials_command_creates_lists_and_revokes(anonymous, dsn):
    created = _cli(dsn, "create", "--company", "Acme", "--user", "alice")
    assert created.returncode == 0, created.stderr
    printed = dict(line.split(None, 1) for line in created.stdout.splitlines())
    access_key, secret = printed["access_key"].strip(), printed["secret_key"].strip()
    headers = {"Authorization": basic_auth(access_key, secret)}
    claims = claims_of(await login(anonymous, headers))
    assert (claims["identity"]["company_name"], claims["identity"]["user_name"]) == ("Acme", "alice")

    again = dict(line.split(None, 1) for line in _cli(dsn, "create", "--company", "Acme", "--user", "alice")
                 .stdout.splitlines())
    assert again["access_key"].strip() != access_key
    again_headers = {"Authorization": basic_auth(again["access_key"].strip(), again["secret_key"].strip())}
    again_claims = claims_of(await login(anonymous, again_headers))
    assert again_claims["identity"]["company"] == claims["identity"]["company"]
    assert again_claims["identity"]["user"] == claims["identity"]["user"]

    listed = _cli(dsn, "list")
    assert listed.returncode == 0
    line = next(line for line in listed.stdout.splitlines() if line.startswith(access_key))
    assert "Acme" in line and "alice" in line and line.endswith("active")
    assert secret not in listed.stdout

    revoked = _cli(dsn, "revoke", access_key)
    assert revoked.returncode == 0
    assert (await call(anonymous, "workers.get_count", {}, headers=headers))[:2] == (401, 22)
    assert _cli(dsn, "revoke", access_key).returncode == 1
    assert "revoked" in next(line for line in _cli(dsn, "list").stdout.splitlines() if line.startswith(access_key))


async def test_credentials_ensure_keeps_working_credentials_and_replaces_revoked_ones(anonymous, dsn, tmp_path):
    saved = tmp_path / "credentials"
    ensure = ("ensure", "--file", str(saved), "--company", "local")

    def printed(result) -> dict:
        assert result.returncode == 0, result.stderr
        return {name: value.strip() for name, value in (line.split(None, 1) for line in result.stdout.splitlines())}

    first = printed(_cli(dsn, *ensure))
    assert saved.stat().st_mode & 0o777 == 0o600
    assert printed(_cli(dsn, *ensure)) == first
    headers = {"Authorization": basic_auth(first["access_key"], first["secret_key"])}
    assert claims_of(await login(anonymous, headers))["identity"]["user_name"] == "admin"

    assert _cli(dsn, "revoke", first["access_key"]).returncode == 0
    replaced = printed(_cli(dsn, *ensure))
    assert replaced["access_key"] != first["access_key"]
    assert printed(_cli(dsn, *ensure)) == replaced


async def test_servers_starting_together_on_a_new_database_agree_on_the_signing_key(dsn):
    """The first server's key is stored but not committed yet when the second asks: the
    second waits for it and answers the same key, not none (every login of that process
    failed before)."""
    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await first.execute("DELETE FROM token_signing_key")
        async with first.transaction():
            stored = await credentials.signing_key(first, "the-first-server's-key")
            waiting = asyncio.create_task(credentials.signing_key(second, "the-second-server's-key"))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # blocked on the first's uncommitted row
        assert stored == "the-first-server's-key"
        assert await asyncio.wait_for(waiting, 10) == stored
    finally:
        await first.close()
        await second.close()
