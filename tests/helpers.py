"""What the tests share besides fixtures: calling the API and reading what is stored."""

import base64
import time
from dataclasses import dataclass

import orjson


# The eight endpoints of SPEC §2.
WORKER_ENDPOINTS = [
    "workers.register",
    "workers.unregister",
    "workers.status_report",
    "workers.get_all",
    "workers.get_count",
    "workers.get_metric_keys",
    "workers.get_stats",
    "workers.get_activity_report",
]


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret: str
    company: str
    company_id: str
    user: str
    user_id: str


def basic_auth(access_key: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{access_key}:{secret}".encode()).decode()


async def call(client, endpoint: str, body=None, *, method: str = "POST", raw: bytes | None = None, headers=None):
    """Call an endpoint; return (result code, result subcode, message, data).

    Checks the envelope every response must have: the HTTP status equals result_code.
    """
    payload = raw if raw is not None else (orjson.dumps(body) if body is not None else b"")
    response = await client.request(
        method, f"/{endpoint}", data=payload, headers={"Content-Type": "application/json", **(headers or {})}
    )
    envelope = orjson.loads(await response.read())
    meta = envelope["meta"]
    assert response.status == meta["result_code"], envelope
    assert set(meta) >= {"id", "trx", "endpoint", "result_code", "result_subcode", "result_msg"}
    return meta["result_code"], meta["result_subcode"], meta["result_msg"], envelope["data"]


async def ok(client, endpoint: str, body=None, **kwargs):
    """Call an endpoint that must succeed; return its data."""
    code, subcode, message, data = await call(client, endpoint, body, **kwargs)
    assert (code, subcode) == (200, 0), message
    return data


def now_ms() -> int:
    return int(time.time() * 1000)


async def table_snapshot(conn) -> dict:
    """Everything the service stores, to show that a rejected request changed nothing."""
    return {
        table: [tuple(row) for row in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1, 2, 3")]
        for table in ("worker_registrations", "worker_stats", "worker_metric_keys")
    }
