"""Schemathesis against the server as in production (`python -m server serve`) on the test
database: every operation of /openapi.json, with bodies generated valid and invalid.

For every answer: no 5xx; the status, the headers and the body conform to the document; the
HTTP status equals `meta.result_code`; without credentials the answer is 401. And an answer
that is not a success changed nothing that is stored.
"""

import asyncio
import os

import asyncpg
import orjson
import pytest
import schemathesis
from conftest import create_credentials
from helpers import start_server, stop_server, table_snapshot, wait_until_ready
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi import checks as openapi_checks

from server import auth, openapi
from server.config import Settings

EXAMPLES_PER_OPERATION = 12  # 66 operations (11 endpoints x 2 paths x 3 methods): sized for CI
# The same examples every run (CI stays reproducible); WORKERS_FUZZ_RANDOM=1 explores anew.
DETERMINISTIC = os.environ.get("WORKERS_FUZZ_RANDOM", "") != "1"
QUIET_BACKGROUND = {"WORKERS_EXPIRY_SWEEP_SECONDS": "86400", "WORKERS_RETENTION_SWEEP_SECONDS": "86400"}


# The credentials schemathesis sends (and leaves out for the ignored-auth check): made here,
# stored by the fixture, so that schemathesis knows them before it generates anything.
ACCESS_KEY, SECRET = auth.new_access_key(), auth.new_secret()


@pytest.fixture(scope="module")
def served(database_dsn, tmp_path_factory):
    """The server's base URL, and what it stores (for the fuzzed company's credentials)."""
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    # No expiry sweep or retention while fuzzing: they change what is stored on their own.
    process, base = start_server(database_dsn, log, env=QUIET_BACKGROUND)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(create_credentials(database_dsn, "fuzzed company", "fuzzer", ACCESS_KEY, SECRET))
    conn = loop.run_until_complete(asyncpg.connect(database_dsn))
    try:
        wait_until_ready(base, process)
        yield base, lambda: distinct_rows(loop.run_until_complete(table_snapshot(conn)))
    finally:
        stop_server(process)
        loop.run_until_complete(conn.close())
        loop.close()
        print(log.read_text()[-5000:])


def distinct_rows(snapshot: dict) -> dict:
    """What is stored, each distinct row once: the fuzzer sends the same report again and again,
    and a copy of a report of an hour already packed is a row of late_reports (shown by the
    views) until the refresher's compaction drops it (migration 014), on its own time."""
    return {table: sorted(set(map(_hashable, rows)), key=repr) for table, rows in snapshot.items()}


def _hashable(value):
    return tuple(map(_hashable, value)) if isinstance(value, (list, tuple)) else value


def result_code_is_status(ctx, response, case):
    meta = orjson.loads(response.content)["meta"]
    status, code = response.status_code, meta["result_code"]
    assert code == status, f"HTTP {status}, result_code {code}"


# The document a server with the default settings serves (test_openapi.py shows it is the
# one served), made here so that pytest lists one test per operation.
schema = schemathesis.openapi.from_dict(openapi.document(Settings()))
schema.config.update(basic_auth=(ACCESS_KEY, SECRET))
schema.config.generation.update(
    max_examples=EXAMPLES_PER_OPERATION, with_security_parameters=False, deterministic=DETERMINISTIC
)

CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.ignored_auth,
    result_code_is_status,
]


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=DETERMINISTIC,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation(case, served):
    base, stored = served
    before = stored()
    response = case.call(base_url=base)
    assert response.status_code != 401, response.text  # the credentials went with it
    case.validate_response(response, checks=CHECKS)
    if response.status_code != 200:
        assert stored() == before, f"answered {response.status_code} but changed what is stored"
