"""The wire protocol (SPEC §1): paths and versions, methods, bodies, the envelope and error mapping."""

import asyncio
import logging
import re

import orjson
import pytest
from helpers import call, ok, table_snapshot

from server.keys import ENDPOINTS

SERVER_VERSION = "2.30"
COUNT = "workers.get_count"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
SMALL_BODY_LIMIT = 1000
SECRET = "secret detail of the failure"


async def request(client, path: str, body=None, *, method: str = "POST", raw: bytes | None = None):
    """Call a raw path; return (HTTP status, Content-Type, decoded envelope)."""
    payload = raw if raw is not None else (orjson.dumps(body) if body is not None else b"")
    response = await client.request(method, path, data=payload, headers={"Content-Type": "application/json"})
    return response.status, response.content_type, orjson.loads(await response.read())


async def failing_endpoint(call_):
    raise RuntimeError(SECRET)


# --- paths and versions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, requested, actual",
    [
        (f"/{COUNT}", SERVER_VERSION, SERVER_VERSION),
        (f"/v2.30/{COUNT}", "2.30", "2.30"),
        (f"/v999.0/{COUNT}", "999.0", SERVER_VERSION),
        (f"/v2.4/{COUNT}", "2.4", "2.4"),  # 2.4 < 2.30: versions compare as numbers, not text
    ],
)
async def test_path_versions_are_reported_in_the_envelope(client, path, requested, actual):
    status, _, envelope = await request(client, path, {})
    assert status == 200
    assert envelope["meta"]["endpoint"] == {"name": COUNT, "requested_version": requested, "actual_version": actual}
    assert envelope["data"] == {"count": 0}


async def test_success_envelope(client):
    await ok(client, "workers.register", {"worker": "w1"})
    status, content_type, envelope = await request(client, f"/{COUNT}", {})
    meta = envelope["meta"]
    assert (status, content_type) == (200, "application/json")
    assert set(envelope) == {"meta", "data"}
    assert HEX_ID.match(meta["id"]) and meta["trx"] == meta["id"]
    assert {key: value for key, value in meta.items() if key not in ("id", "trx")} == {
        "endpoint": {"name": COUNT, "requested_version": SERVER_VERSION, "actual_version": SERVER_VERSION},
        "result_code": 200,
        "result_subcode": 0,
        "result_msg": "OK",
        "error_stack": None,
        "error_data": {},
    }
    assert envelope["data"] == {"count": 1}


async def test_object_endpoints_return_empty_data(client):
    assert await ok(client, "workers.register", {"worker": "w1"}) == {}
    assert await ok(client, "workers.unregister", {"worker": "w1"}) == {}


async def test_call_ids_are_unique(client):
    ids = set()
    for _ in range(5):
        _, _, envelope = await request(client, f"/{COUNT}", {})
        ids.add(envelope["meta"]["id"])
    assert len(ids) == 5


async def test_error_envelope(client):
    status, content_type, envelope = await request(client, "/workers.register", {})
    meta = envelope["meta"]
    assert (status, content_type) == (400, "application/json")
    assert HEX_ID.match(meta["id"]) and meta["trx"] == meta["id"]
    assert meta["endpoint"]["name"] == "workers.register"
    assert (meta["result_code"], meta["result_subcode"]) == (400, 11)
    assert "worker" in meta["result_msg"]
    assert meta["error_stack"] is None
    assert meta["error_data"] == {}
    assert envelope["data"] == {}


# --- methods and bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
async def test_methods_accept_a_json_body(client, method):
    await ok(client, "workers.register", {"worker": f"w-{method}", "tags": ["t"]}, method=method)
    await ok(client, "workers.register", {"worker": "other"}, method=method)
    assert await ok(client, COUNT, {"tags": ["t"]}, method=method) == {"count": 1}
    data = await ok(client, "workers.get_all", {"worker_pattern": "w-*"}, method=method)
    assert [worker["id"] for worker in data["workers"]] == [f"w-{method}"]


async def test_empty_body_means_empty_object(client):
    await ok(client, "workers.register", {"worker": "w1"})
    assert await ok(client, COUNT, raw=b"", method="GET") == {"count": 1}
    code, subcode, message, _ = await call(client, "workers.register", raw=b"")
    assert (code, subcode) == (400, 11) and "worker" in message


async def test_whitespace_alone_is_not_a_json_body(client):
    code, subcode, message, _ = await call(client, COUNT, raw=b"  \n", method="GET")
    assert (code, subcode) == (400, 12) and "malformed JSON" in message


@pytest.mark.parametrize("method", ["DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_give_an_enveloped_error(client, db_conn, method):
    await ok(client, "workers.register", {"worker": "w1"})
    before = await table_snapshot(db_conn)
    response = await client.request(method, "/v2.30/workers.unregister", data=orjson.dumps({"worker": "w1"}))
    meta = (await response.json())["meta"]
    assert (response.status, meta["result_code"], meta["result_subcode"]) == (405, 405, 0)
    assert response.headers["Allow"] == "GET, POST, PUT"
    assert method in meta["result_msg"]
    assert await table_snapshot(db_conn) == before


async def test_head_of_an_endpoint_is_a_405_with_allow(client):
    response = await client.head(f"/{COUNT}")
    assert response.status == 405
    assert response.headers["Allow"] == "GET, POST, PUT"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/metrics", "/", "/static/app.js"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_routes_beside_the_api_answer_other_methods_405_with_allow(client, path, method):
    assert (await client.get(path)).status == 200
    status, _, envelope = await request(client, path, {}, method=method)
    meta = envelope["meta"]
    assert (status, meta["result_code"], meta["result_subcode"]) == (405, 405, 0)
    assert meta["result_msg"] == f"method {method} is not allowed on {path}: use GET or HEAD"
    assert envelope["data"] == {}
    response = await client.request(method, path)
    assert response.headers["Allow"] == "GET, HEAD"


# --- unknown endpoints ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, name",
    [
        ("/workers.nope", "workers.nope"),
        ("/v2.30/workers.nope", "workers.nope"),
        ("/queues.get_all", "queues.get_all"),
        ("/foo", "foo"),
        ("/healthz/", "healthz/"),
        # Found by schemathesis: a newline anywhere in the path is not an endpoint's.
        ("/v%0A/workers.get_all", "v\n/workers.get_all"),
        ("/workers.get_all%0A", "workers.get_all\n"),
    ],
)
async def test_unknown_endpoint(client, path, name):
    status, _, envelope = await request(client, path, {})
    meta = envelope["meta"]
    assert (status, meta["result_code"], meta["result_subcode"]) == (400, 400, 1)
    assert meta["endpoint"]["name"] == name
    assert "not supported" in meta["result_msg"]
    assert name in meta["result_msg"]
    assert envelope["data"] == {}


# --- body size limit --------------------------------------------------------------------------


async def test_body_over_the_limit_gives_413(make_client, db_conn):
    client = await make_client(max_body_bytes=SMALL_BODY_LIMIT)
    body = {"worker": "w1", "tags": ["x" * 500, "y" * 500]}
    assert len(orjson.dumps(body)) > SMALL_BODY_LIMIT
    code, subcode, message, data = await call(client, "workers.register", body)
    assert (code, subcode, data) == (413, 0, {})
    assert str(SMALL_BODY_LIMIT) in message
    assert await table_snapshot(db_conn) == {"worker_registrations": [], "worker_stats": [], "worker_metric_keys": []}


async def test_body_under_the_limit_is_accepted(make_client):
    client = await make_client(max_body_bytes=SMALL_BODY_LIMIT)
    body = {"worker": "w1", "tags": ["x" * 400, "y" * 400]}
    assert len(orjson.dumps(body)) < SMALL_BODY_LIMIT
    await ok(client, "workers.register", body)
    assert await ok(client, COUNT) == {"count": 1}


async def test_body_not_in_its_content_encoding_is_a_validation_error(client, db_conn, caplog):
    caplog.set_level(logging.DEBUG)
    before = await table_snapshot(db_conn)
    raw = orjson.dumps({"worker": "w1"})
    response = await client.post(
        "/workers.register", data=raw, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    meta = (await response.json())["meta"]
    assert (response.status, meta["result_code"], meta["result_subcode"]) == (400, 400, 12)
    assert meta["result_msg"] == "Validation error: unreadable request body: Can not decode content-encoding: gzip"
    # aiohttp's parser stopped on the body: the connection takes no further request.
    assert response.headers["Connection"] == "close"
    assert await table_snapshot(db_conn) == before
    await ok(client, COUNT)  # on a new connection
    await asyncio.sleep(0.2)  # aiohttp would log its traceback after the answer
    # A client's mistake: one line below ERROR (beside the test server's access log).
    assert "Traceback" not in caplog.text
    assert all(record.levelno < logging.ERROR and not record.exc_info for record in caplog.records)
    told = [record for record in caplog.records if record.name != "aiohttp.access"]
    assert [(record.levelname, record.getMessage().count("\n")) for record in told] == [("INFO", 0)]
    assert "Can not decode content-encoding: gzip" in told[0].getMessage()


# --- unexpected errors ------------------------------------------------------------------------


async def test_unexpected_error_gives_500_without_stack(client, monkeypatch):
    monkeypatch.setitem(client.app[ENDPOINTS], COUNT, failing_endpoint)
    status, _, envelope = await request(client, f"/{COUNT}", {})
    meta = envelope["meta"]
    assert (status, meta["result_code"], meta["result_subcode"]) == (500, 500, 0)
    assert meta["endpoint"]["name"] == COUNT
    assert meta["error_stack"] is None
    assert SECRET not in orjson.dumps(envelope).decode()
    assert envelope["data"] == {}


async def test_unexpected_error_in_debug_mode_includes_the_stack(make_client, monkeypatch):
    client = await make_client(debug=True)
    monkeypatch.setitem(client.app[ENDPOINTS], COUNT, failing_endpoint)
    status, _, envelope = await request(client, f"/{COUNT}", {})
    meta = envelope["meta"]
    assert (status, meta["result_code"], meta["result_subcode"]) == (500, 500, 0)
    assert "Traceback" in meta["error_stack"]
    assert f"RuntimeError: {SECRET}" in meta["error_stack"]


async def test_server_keeps_serving_after_an_unexpected_error(client, monkeypatch):
    monkeypatch.setitem(client.app[ENDPOINTS], COUNT, failing_endpoint)
    code, *_ = await call(client, COUNT, {})
    assert code == 500
    monkeypatch.undo()
    assert await ok(client, COUNT, {}) == {"count": 0}
