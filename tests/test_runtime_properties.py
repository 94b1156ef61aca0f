"""workers.set_runtime_properties / workers.get_runtime_properties against the real database:
the reference server's semantics (properties per company, calling user and worker; expiry
absent, counting down, 0 removing; `added`, `removed`, `errors`), isolation, validation,
the limits, the expiry sweep and the least API version, 2.10."""

import asyncio

import asyncpg
import pytest
from helpers import call, ok, table_snapshot

from server import background, responses

SET, GET = "workers.set_runtime_properties", "workers.get_runtime_properties"
WORKER = "gpu-box:gpu0,1"


def stored_key(client, key: str, worker: str = WORKER) -> str:
    """The key the answer names a property by: the reference server's storage key."""
    caller = client.credentials
    return f"worker_{caller.company_id}_{caller.user_id}_{worker}_prop_{key}"


async def set_properties(client, properties: list[dict], worker: str = WORKER, **kwargs) -> dict:
    answer = await ok(client, SET, {"worker": worker, "runtime_properties": properties}, **kwargs)
    assert responses.RuntimePropertiesChanged().validate(answer) == {}, answer
    return answer


async def get_properties(client, worker: str = WORKER, **kwargs) -> list[dict]:
    answer = await ok(client, GET, {"worker": worker}, **kwargs)
    assert responses.RuntimeProperties().validate(answer) == {}, answer
    return answer["runtime_properties"]


async def test_set_then_get_round_trip(client):
    answer = await set_properties(client, [
        {"key": "available_gpus", "value": "0_,1_"},
        {"key": "force", "value": "on", "expiry": 60},
    ])
    assert answer == {
        "added": [stored_key(client, "available_gpus"), stored_key(client, "force")],
        "removed": [],
        "errors": [],
    }
    assert await get_properties(client) == [
        {"key": "available_gpus", "value": "0_,1_", "expiry": None},
        {"key": "force", "value": "on", "expiry": 60},
    ]


async def test_a_worker_without_properties_has_none(client):
    assert await get_properties(client, "never-set") == []


async def test_setting_again_replaces_the_value_and_the_expiry(client):
    await set_properties(client, [{"key": "max_num_instances", "value": "2", "expiry": 600}])
    await set_properties(client, [{"key": "max_num_instances", "value": "3"}])
    assert await get_properties(client) == [{"key": "max_num_instances", "value": "3", "expiry": None}]
    await set_properties(client, [{"key": "max_num_instances", "value": "4", "expiry": 30, "ignored": True}])
    assert await get_properties(client) == [{"key": "max_num_instances", "value": "4", "expiry": 30}]


async def test_null_expiry_keeps_the_property_until_changed(client):
    await set_properties(client, [{"key": "force", "value": "off", "expiry": None}])
    assert await get_properties(client) == [{"key": "force", "value": "off", "expiry": None}]


async def test_expiry_counts_down_and_an_expired_property_is_never_read(make_client, db_conn):
    client = await make_client(expiry_sweep_seconds=3600)  # only the reads hide it
    await set_properties(client, [{"key": "short", "value": "a", "expiry": 2}, {"key": "kept", "value": "b"}])
    assert await get_properties(client) == [
        {"key": "kept", "value": "b", "expiry": None},
        {"key": "short", "value": "a", "expiry": 2},
    ]
    await asyncio.sleep(1.2)
    assert [prop["expiry"] for prop in await get_properties(client)] == [None, 1]  # seconds left, rounded up
    await asyncio.sleep(1.0)
    assert await get_properties(client) == [{"key": "kept", "value": "b", "expiry": None}]
    stored = await db_conn.fetch("SELECT key FROM worker_runtime_properties ORDER BY key")
    assert [row["key"] for row in stored] == ["kept", "short"]  # not swept yet, never read

    # Setting an expired key not swept yet makes it live again.
    await set_properties(client, [{"key": "short", "value": "again"}])
    assert await get_properties(client) == [
        {"key": "kept", "value": "b", "expiry": None},
        {"key": "short", "value": "again", "expiry": None},
    ]


async def test_the_expiry_sweep_deletes_expired_properties(client, db_conn, dsn):
    await set_properties(client, [{"key": "gone", "value": "a", "expiry": 1000}, {"key": "kept", "value": "b"}])
    await db_conn.execute("UPDATE worker_runtime_properties SET expires_at = now() - interval '1 second' "
                          "WHERE key = 'gone'")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        await background.sweep_expired(pool)
    finally:
        await pool.close()
    stored = await db_conn.fetch("SELECT key FROM worker_runtime_properties")
    assert [row["key"] for row in stored] == ["kept"]


async def test_the_servers_sweep_runs_on_its_own(make_client, db_conn):
    client = await make_client(expiry_sweep_seconds=0.2)
    await set_properties(client, [{"key": "gone", "value": "a", "expiry": 1}])
    for _ in range(50):
        await asyncio.sleep(0.1)
        if not await db_conn.fetchval("SELECT count(*) FROM worker_runtime_properties"):
            break
    assert await db_conn.fetchval("SELECT count(*) FROM worker_runtime_properties") == 0


async def test_expiry_zero_removes(client):
    await set_properties(client, [{"key": "a", "value": "1"}, {"key": "b", "value": "2"}])
    answer = await set_properties(client, [{"key": "a", "expiry": 0}, {"key": "never-set", "value": "x", "expiry": 0}])
    # As the reference (a Redis DELETE per entry): every removal is listed, set before or not.
    assert answer == {"added": [], "removed": [stored_key(client, "a"), stored_key(client, "never-set")], "errors": []}
    assert await get_properties(client) == [{"key": "b", "value": "2", "expiry": None}]


async def test_entries_that_cannot_be_stored_are_errors_and_the_others_are_stored(client):
    answer = await set_properties(client, [
        {"key": "negative", "value": "x", "expiry": -5},
        {"key": "no-value"},
        {"key": "null-value", "value": None, "expiry": 10},
        {"key": "fine", "value": "y"},
    ])
    assert answer["added"] == [stored_key(client, "fine")] and answer["removed"] == []
    assert len(answer["errors"]) == 3, answer
    negative, no_value, null_value = answer["errors"]
    assert "runtime_properties.0" in negative and "'negative'" in negative and "expiry" in negative
    assert "runtime_properties.1" in no_value and "'no-value'" in no_value and "value" in no_value
    assert "runtime_properties.2" in null_value and "value" in null_value
    assert await get_properties(client) == [{"key": "fine", "value": "y", "expiry": None}]


async def test_the_last_entry_of_a_key_decides(client):
    answer = await set_properties(client, [
        {"key": "k", "value": "first"},
        {"key": "k", "value": "second", "expiry": 100},
        {"key": "gone", "value": "set"},
        {"key": "gone", "expiry": 0},
    ])
    assert answer["added"] == [stored_key(client, "k"), stored_key(client, "k"), stored_key(client, "gone")]
    assert answer["removed"] == [stored_key(client, "gone")]
    assert await get_properties(client) == [{"key": "k", "value": "second", "expiry": 100}]


async def test_an_empty_list_changes_nothing(client):
    assert await set_properties(client, []) == {"added": [], "removed": [], "errors": []}


async def test_properties_are_per_worker_user_and_company(make_client):
    owner = await make_client(company="acme", user="daemon")
    colleague = await make_client(company="acme", user="operator")
    stranger = await make_client(company="globex", user="daemon")
    await set_properties(owner, [{"key": "force", "value": "on"}])
    await set_properties(owner, [{"key": "force", "value": "elsewhere"}], worker="other-worker")

    # The reference keys properties by company, calling user and worker.
    assert await get_properties(colleague) == []
    assert await get_properties(stranger) == []
    await set_properties(stranger, [{"key": "force", "value": "off"}])
    await set_properties(colleague, [{"key": "force", "value": "maybe"}])
    answer = await set_properties(stranger, [{"key": "force", "expiry": 0}])
    assert answer["removed"] == [stored_key(stranger, "force")] != [stored_key(owner, "force")]

    assert await get_properties(owner) == [{"key": "force", "value": "on", "expiry": None}]
    assert await get_properties(owner, "other-worker") == [{"key": "force", "value": "elsewhere", "expiry": None}]
    assert await get_properties(colleague) == [{"key": "force", "value": "maybe", "expiry": None}]
    assert await get_properties(stranger) == []


async def test_a_deleted_companys_properties_go_with_it(client, db_conn):
    await set_properties(client, [{"key": "force", "value": "on"}])
    await db_conn.execute("DELETE FROM companies WHERE id = $1", client.credentials.company_id)
    assert await db_conn.fetchval("SELECT count(*) FROM worker_runtime_properties") == 0


# --- bad requests: a clear error naming the field, nothing changed -------------------------------


async def rejected(client, db_conn, endpoint: str, body=None, **kwargs) -> tuple[int, int, str]:
    before = await table_snapshot(db_conn)
    code, subcode, message, data = await call(client, endpoint, body, **kwargs)
    assert data == {}
    assert await table_snapshot(db_conn) == before, "a rejected request changed what is stored"
    return code, subcode, message


@pytest.fixture
async def seeded(client):
    await set_properties(client, [{"key": "existing", "value": "v"}])


@pytest.mark.parametrize(
    "endpoint, body, missing",
    [
        (SET, {}, ["worker", "runtime_properties"]),
        (SET, {"worker": WORKER}, ["runtime_properties"]),
        (SET, {"worker": WORKER, "runtime_properties": None}, ["runtime_properties"]),
        (SET, {"runtime_properties": []}, ["worker"]),
        (SET, {"worker": WORKER, "runtime_properties": [{"value": "v"}]}, ["runtime_properties.0.key"]),
        (GET, {}, ["worker"]),
        (GET, {"worker": None}, ["worker"]),
    ],
)
async def test_missing_fields_are_named(client, db_conn, seeded, endpoint, body, missing):
    code, subcode, message = await rejected(client, db_conn, endpoint, body)
    assert (code, subcode) == (400, 11), message
    for field in missing:
        assert field in message, (field, message)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"worker": "", "runtime_properties": []}, "worker"),
        ({"worker": 5, "runtime_properties": []}, "worker"),
        ({"worker": "w" * 513, "runtime_properties": []}, "worker"),
        ({"worker": WORKER, "runtime_properties": {"key": "a", "value": "b"}}, "runtime_properties"),
        ({"worker": WORKER, "runtime_properties": [None]}, "runtime_properties.0"),
        ({"worker": WORKER, "runtime_properties": ["force=on"]}, "runtime_properties.0"),
        ({"worker": WORKER, "runtime_properties": [{"key": 1, "value": "b"}]}, "runtime_properties.0.key"),
        ({"worker": WORKER, "runtime_properties": [{"key": "", "value": "b"}]}, "runtime_properties.0.key"),
        ({"worker": WORKER, "runtime_properties": [{"key": "k" * 513, "value": "b"}]}, "runtime_properties.0.key"),
        ({"worker": WORKER, "runtime_properties": [{"key": "a\x00", "value": "b"}]}, "runtime_properties.0.key"),
        ({"worker": WORKER, "runtime_properties": [{"key": "a", "value": 2}]}, "runtime_properties.0.value"),
        ({"worker": WORKER, "runtime_properties": [{"key": "a", "value": "v" * 4097}]}, "runtime_properties.0.value"),
        ({"worker": WORKER, "runtime_properties": [{"key": "a", "value": "b\x00"}]}, "runtime_properties.0.value"),
        ({"worker": WORKER, "runtime_properties": [{"key": "a", "value": "b", "expiry": "60"}]},
         "runtime_properties.0.expiry"),
        ({"worker": WORKER, "runtime_properties": [{"key": "a", "value": "b", "expiry": 1.5}]},
         "runtime_properties.0.expiry"),
        ({"worker": WORKER, "runtime_properties": [{"key": "a", "value": "b", "expiry": 2**31}]},
         "runtime_properties.0.expiry"),
        # One bad entry rejects the call: the good ones before it are not stored either.
        ({"worker": WORKER, "runtime_properties": [{"key": "good", "value": "b"}, {"key": "a", "value": True}]},
         "runtime_properties.1.value"),
    ],
)
async def test_invalid_fields_are_named(client, db_conn, seeded, body, field):
    code, subcode, message = await rejected(client, db_conn, SET, body)
    assert (code, subcode) == (400, 12), message
    assert f"{field}:" in message, message


async def test_the_value_may_be_as_long_as_the_limit(client):
    await set_properties(client, [{"key": "k" * 512, "value": "v" * 4096}])
    assert await get_properties(client) == [{"key": "k" * 512, "value": "v" * 4096, "expiry": None}]


async def test_more_entries_than_the_limit_per_call(make_client, db_conn):
    client = await make_client(max_runtime_properties_per_call=3)
    properties = [{"key": f"k{index}", "value": "v"} for index in range(4)]
    code, subcode, message = await rejected(client, db_conn, SET, {"worker": WORKER, "runtime_properties": properties})
    assert (code, subcode) == (400, 16)
    assert "runtime_properties" in message and "WORKERS_MAX_RUNTIME_PROPERTIES_PER_CALL" in message
    await set_properties(client, properties[:3])


async def test_more_properties_than_the_limit_per_worker(make_client, db_conn):
    client = await make_client(max_runtime_properties_per_worker=3)
    await set_properties(client, [{"key": f"k{index}", "value": "v"} for index in range(3)])
    await set_properties(client, [{"key": "k0", "value": "changed"}])  # a key it has: no more properties
    code, subcode, message = await rejected(
        client, db_conn, SET, {"worker": WORKER, "runtime_properties": [{"key": "k1", "expiry": 0},
                                                                         {"key": "new", "value": "v"},
                                                                         {"key": "newer", "value": "v"}]}
    )
    assert (code, subcode) == (400, 16)
    assert "WORKERS_MAX_RUNTIME_PROPERTIES_PER_WORKER" in message and WORKER in message
    assert len(await get_properties(client)) == 3  # the removal in the refused call was undone too
    await set_properties(client, [{"key": "k1", "expiry": 0}, {"key": "new", "value": "v"}])
    await set_properties(client, [{"key": "other", "value": "v"}], worker="another-worker")  # per worker


# --- the least API version: 2.10, as the reference ----------------------------------------------


@pytest.mark.parametrize("endpoint", [SET, GET])
@pytest.mark.parametrize("version", ["2.9", "2.1", "1.99", "0.0", "02.09"])
async def test_a_version_before_2_10_finds_no_such_endpoint(client, db_conn, seeded, endpoint, version):
    body = {"worker": WORKER, "runtime_properties": [{"key": "new", "value": "v"}]}
    code, subcode, message = await rejected(client, db_conn, f"v{version}/{endpoint}", body)
    assert (code, subcode) == (400, 1)
    assert endpoint in message and "2.10" in message, message


@pytest.mark.parametrize("version", ["2.10", "2.010", "2.30", "3.0", "999.0"])
async def test_version_2_10_and_later_are_served(client, version):
    body = {"worker": WORKER, "runtime_properties": [{"key": f"v{version}", "value": "v"}]}
    assert (await ok(client, f"v{version}/{SET}", body))["added"] == [stored_key(client, f"v{version}")]
    [prop] = (await ok(client, f"v{version}/{GET}", {"worker": WORKER}))["runtime_properties"]
    assert prop["key"] == f"v{version}"


async def test_the_refusal_of_an_old_version_needs_no_credentials(make_client):
    anonymous = await make_client(authenticated=False)
    code, subcode, _, _ = await call(anonymous, f"v2.9/{GET}", {"worker": WORKER})
    assert (code, subcode) == (400, 1)
    code, subcode, _, _ = await call(anonymous, f"v2.10/{GET}", {"worker": WORKER})
    assert (code, subcode) == (401, 20)


async def test_every_method_is_served(client):
    for method in ("GET", "POST", "PUT"):
        await ok(client, SET, {"worker": WORKER, "runtime_properties": [{"key": method, "value": "v"}]}, method=method)
    assert [prop["key"] for prop in await get_properties(client, method="GET")] == ["GET", "POST", "PUT"]
