"""Limits (issue #12, docs/limits.md): per status report (400/12), per company (429 with
Retry-After: live workers, distinct metric keys, reports per second; defaults and overrides
set with `python -m server companies ...`), and per get_stats (400/16)."""

import asyncio
import time

import orjson
import pytest
from clearml_agent.backend_api.services import workers as agent_workers
from helpers import call, now_ms, ok, table_snapshot
from test_clearml_agent import agent_env, agent_session  # noqa: F401 (agent_env is a fixture)

from server import __main__ as cli
from server.config import Settings
from server.limits import REFUSAL_HOLD_SECONDS
from server.storage.limits import COMPANY_LOCK

DEFAULTS = Settings()
REFRESH = 0.1  # WORKERS_LIMITS_REFRESH_SECONDS of the test servers: overrides arrive quickly
BASE = 1_700_000_000


def agent_report(worker: str, cores: int = 4, gpus: int = 0, **fields) -> dict:
    """A status report shaped as clearml-agent's: per-core and per-GPU lists, scalars."""
    stats = {"cpu_usage": [12.5] * cores, "cpu_temperature": 55.0}
    for key in ("memory_used", "memory_free", "disk_free_home", "disk_read", "disk_write", "network_tx", "network_rx"):
        stats[key] = 1.5
    for key in ("gpu_usage", "gpu_temperature", "gpu_memory_used", "gpu_memory_free", "gpu_fraction"):
        stats[key] = [50.0] * gpus
    return {"worker": worker, "timestamp": now_ms(), "machine_stats": stats, **fields}


def report(worker: str, machine_stats: dict | None = None) -> dict:
    return {"worker": worker, "timestamp": now_ms(), "machine_stats": machine_stats or {"cpu_usage": [1.0]}}


async def answer(client, endpoint: str, body: dict) -> tuple[int, int, str, dict]:
    """(HTTP status, result subcode, message, headers) of one call, its envelope checked."""
    response = await client.post(f"/{endpoint}", data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    envelope = orjson.loads(await response.read())
    assert envelope["meta"]["result_code"] == response.status, envelope
    return response.status, envelope["meta"]["result_subcode"], envelope["meta"]["result_msg"], response.headers


async def companies(dsn: str, *argv: str) -> int:
    """`python -m server companies ARGV...`, run in this event loop."""
    args = cli._parser().parse_args(["companies", *argv])
    return await args.action(Settings(db_dsn=dsn), args)


async def override(client, dsn: str, *options: str) -> None:
    """Set the client's company's limits with the command line, and wait until the server applies them."""
    assert await companies(dsn, "set", client.credentials.company, *options) == 0
    await asyncio.sleep(REFRESH * 4)


async def stored(db_conn, worker: str) -> dict:
    return {
        "registered": await db_conn.fetchval("SELECT count(*) FROM worker_registrations WHERE worker = $1", worker),
        "reports": await db_conn.fetchval("SELECT count(*) FROM worker_stats WHERE worker = $1", worker),
        "keys": await db_conn.fetchval("SELECT count(*) FROM worker_metric_keys WHERE worker = $1", worker),
    }


NOTHING = {"registered": 0, "reports": 0, "keys": 0}


# --- per status report: 400/12 naming the limit and the field, nothing stored ---------------------

TOO_LARGE = [
    # (settings, machine_stats beyond them, the setting the message names)
    ({}, {f"k{n}": 1.0 for n in range(DEFAULTS.max_metric_keys_per_report + 1)}, "WORKERS_MAX_METRIC_KEYS_PER_REPORT"),
    ({}, {"cpu_usage": [1.0] * (DEFAULTS.max_values_per_metric + 1)}, "WORKERS_MAX_VALUES_PER_METRIC"),
    ({}, {"cpu_usage": [1.0] * 60_000}, "WORKERS_MAX_VALUES_PER_METRIC"),  # the report
    ({}, {f"m{n}": [1.0] * 1000 for n in range(3)}, "WORKERS_MAX_VALUES_PER_REPORT"),
    ({"max_metric_keys_per_report": 3}, {"a": 1, "b": 2, "c": 3, "d": 4}, "WORKERS_MAX_METRIC_KEYS_PER_REPORT"),
    ({"max_values_per_metric": 4}, {"cpu_usage": [1, 2, 3, 4, 5]}, "WORKERS_MAX_VALUES_PER_METRIC"),
    ({"max_values_per_report": 5}, {"cpu_usage": [1, 2, 3], "gpu_usage": [1, 2], "memory_used": 3},
     "WORKERS_MAX_VALUES_PER_REPORT"),
]


@pytest.mark.parametrize(("settings", "machine_stats", "setting"), TOO_LARGE)
async def test_a_report_beyond_a_limit_is_400_12_naming_it_and_changes_nothing(
    make_client, db_conn, settings, machine_stats, setting
):
    client = await make_client(**settings)
    await ok(client, "workers.register", {"worker": "w1", "tags": ["before"]})
    before = await table_snapshot(db_conn)
    code, subcode, message, _ = await call(client, "workers.status_report", report("w1", machine_stats))
    assert (code, subcode) == (400, 12)
    assert setting in message and "machine_stats" in message, message
    if setting == "WORKERS_MAX_VALUES_PER_METRIC":
        assert "'cpu_usage'" in message, message
    assert await table_snapshot(db_conn) == before


AT_THE_LIMITS = [
    {f"key_{n}": 1.0 for n in range(DEFAULTS.max_metric_keys_per_report)},
    {"cpu_usage": [1.0] * DEFAULTS.max_values_per_metric, "gpu_usage": [2.0] * DEFAULTS.max_values_per_metric},
]


@pytest.mark.parametrize("machine_stats", AT_THE_LIMITS, ids=["keys", "values"])
async def test_a_report_at_the_limits_is_stored(client, db_conn, machine_stats):
    await ok(client, "workers.status_report", report("w1", machine_stats))
    metrics = orjson.loads(await db_conn.fetchval("SELECT metrics FROM worker_stats"))
    assert metrics.keys() == machine_stats.keys()
    assert sum(len(variants) for variants in metrics.values()) == sum(
        len(value) if isinstance(value, list) else 1 for value in machine_stats.values()
    )


async def test_a_256_core_8_gpu_machine_passes_the_defaults_comfortably(client, db_conn):
    body = agent_report("big-box", cores=256, gpus=8)
    values = sum(len(value) if isinstance(value, list) else 1 for value in body["machine_stats"].values())
    assert values * 4 < DEFAULTS.max_values_per_report
    assert len(body["machine_stats"]) * 4 < DEFAULTS.max_metric_keys_per_report
    assert 256 * 2 < DEFAULTS.max_values_per_metric
    await ok(client, "workers.status_report", body)
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stats") == 1


# --- per company: live workers -----------------------------------------------------------------


async def _seed_workers(db_conn, credentials, count: int) -> None:
    await db_conn.execute(
        """INSERT INTO worker_registrations (company, worker, user_id, register_time, register_timeout,
                                             last_activity_time, expires_at)
           SELECT $1, 'seed-' || n, $2, now(), 600, now(), now() + interval '600 s' FROM generate_series(1, $3) AS n""",
        credentials.company_id, credentials.user_id, count,
    )  # fmt: skip


@pytest.mark.parametrize("endpoint", ["workers.status_report", "workers.register"])
async def test_the_default_worker_limit_refuses_one_more_worker_with_429(make_client, db_conn, endpoint):
    client = await make_client(limits_refresh_seconds=REFRESH)
    await _seed_workers(db_conn, client.credentials, DEFAULTS.company_max_workers)
    status, subcode, message, headers = await answer(client, endpoint, report("one-too-many"))
    assert (status, subcode) == (429, 1)
    assert "WORKERS_COMPANY_MAX_WORKERS" in message and str(DEFAULTS.company_max_workers) in message, message
    assert headers["Retry-After"] == "60"
    assert await stored(db_conn, "one-too-many") == NOTHING
    await ok(client, "workers.status_report", report("seed-1"))  # a registered worker keeps reporting


async def test_a_worker_limit_set_with_the_cli_admits_n_workers_and_refuses_the_next(make_client, dsn, db_conn):
    client = await make_client(limits_refresh_seconds=REFRESH)
    await override(client, dsn, "--workers", "2")
    await ok(client, "workers.register", {"worker": "w1"})
    await ok(client, "workers.status_report", report("w2"))  # registered by its first report
    for endpoint in ("workers.status_report", "workers.register"):
        status, subcode, message, headers = await answer(client, endpoint, report("w3"))
        assert (status, subcode, headers.get("Retry-After")) == (429, 1, "60"), message
        assert "2 live workers" in message and "limit is 2" in message, message
    assert await stored(db_conn, "w3") == NOTHING
    for _ in range(3):  # the two admitted keep reporting, and registering again
        await ok(client, "workers.status_report", report("w1"))
        await ok(client, "workers.status_report", report("w2"))
    await ok(client, "workers.register", {"worker": "w2"})
    # Room appears when a worker leaves: the refused worker's retry then succeeds.
    await ok(client, "workers.unregister", {"worker": "w1"})
    await ok(client, "workers.status_report", report("w3"))
    assert (await stored(db_conn, "w3"))["reports"] == 1
    assert await db_conn.fetchval("SELECT count(*) FROM worker_registrations WHERE expires_at > now()") == 2


async def test_an_unregistered_worker_is_counted_again_when_it_comes_back(make_client, dsn):
    client = await make_client(limits_refresh_seconds=REFRESH)
    await override(client, dsn, "--workers", "1")
    await ok(client, "workers.status_report", report("w1"))
    await ok(client, "workers.unregister", {"worker": "w1"})
    await ok(client, "workers.register", {"worker": "w2"})
    assert (await answer(client, "workers.status_report", report("w1")))[:2] == (429, 1)


async def test_an_expired_worker_makes_room(make_client, dsn, db_conn):
    client = await make_client(limits_refresh_seconds=REFRESH)
    await override(client, dsn, "--workers", "1")
    await ok(client, "workers.register", {"worker": "short", "timeout": 1})
    assert (await answer(client, "workers.status_report", report("next")))[:2] == (429, 1)
    await asyncio.sleep(1.5)
    await ok(client, "workers.status_report", report("next"))


async def test_concurrent_new_workers_never_exceed_the_limit(make_client, dsn, db_conn):
    client = await make_client(limits_refresh_seconds=REFRESH)
    await override(client, dsn, "--workers", "5")
    answers = await asyncio.gather(*(answer(client, "workers.status_report", report(f"w{n}")) for n in range(60)))
    assert sorted(status for status, *_ in answers) == [200] * 5 + [429] * 55
    assert await db_conn.fetchval("SELECT count(*) FROM worker_registrations") == 5
    assert await db_conn.fetchval("SELECT count(DISTINCT worker) FROM worker_stats") == 5


async def test_new_workers_and_keys_are_admitted_under_the_companys_lock(make_client, dsn, db_conn):
    """What keeps the count exact across processes and hosts: another admission holding the
    company's lock holds up a new worker or key until it commits."""
    client = await make_client(limits_refresh_seconds=REFRESH)
    await ok(client, "workers.status_report", report("w1", {"cpu_usage": [1]}))
    for body in (report("w2", {"cpu_usage": [1]}), report("w1", {"gpu_usage": [1]})):
        async with db_conn.transaction():
            company = client.credentials.company_id
            await db_conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", COMPANY_LOCK, company)
            waiting = asyncio.ensure_future(answer(client, "workers.status_report", body))
            await asyncio.sleep(0.5)
            assert not waiting.done()
        assert (await waiting)[0] == 200
    await ok(client, "workers.status_report", report("w1", {"cpu_usage": [1]}))  # nothing new: no lock needed


# --- per company: distinct metric keys -----------------------------------------------------------


async def test_the_default_metric_key_limit_refuses_a_new_key_with_429(make_client, db_conn):
    client = await make_client(limits_refresh_seconds=REFRESH)
    await db_conn.execute(
        "INSERT INTO worker_metric_keys SELECT $1, 'seed', 'key_' || n, now() FROM generate_series(1, $2) AS n",
        client.credentials.company_id, DEFAULTS.company_max_metric_keys,
    )  # fmt: skip
    status, subcode, message, headers = await answer(client, "workers.status_report", report("w1", {"new_key": 1}))
    assert (status, subcode, headers.get("Retry-After")) == (429, 2, "60")
    assert "WORKERS_COMPANY_MAX_METRIC_KEYS" in message and str(DEFAULTS.company_max_metric_keys) in message, message
    assert await stored(db_conn, "w1") == NOTHING
    await ok(client, "workers.status_report", report("w1", {"key_1": 1, "key_2": 2}))  # known keys still pass


async def test_a_metric_key_limit_set_with_the_cli(make_client, dsn, db_conn):
    client = await make_client(limits_refresh_seconds=REFRESH)
    await override(client, dsn, "--metric-keys", "3")
    await ok(client, "workers.status_report", report("w1", {"cpu_usage": [1], "memory_used": 2}))
    await ok(client, "workers.status_report", report("w2", {"cpu_usage": [1], "gpu_usage": [3]}))  # 3 keys
    new_key = report("w3", {"cpu_usage": [1], "disk_read": 1})
    status, subcode, message, _ = await answer(client, "workers.status_report", new_key)
    assert (status, subcode) == (429, 2)
    assert "3 distinct metric keys" in message and "adds 1" in message, message
    assert await stored(db_conn, "w3") == NOTHING
    await ok(client, "workers.status_report", report("w3", {"gpu_usage": [1], "memory_used": 1}))
    assert await db_conn.fetchval("SELECT count(DISTINCT metric) FROM worker_metric_keys") == 3
    assert await companies(dsn, "unset", client.credentials.company, "--metric-keys") == 0
    await asyncio.sleep(REFRESH * 4)
    await ok(client, "workers.status_report", report("w3", {"disk_read": 1}))


# --- per company: reports per second ---------------------------------------------------------------


async def test_the_default_rate_refuses_a_flood_with_429(make_client, db_conn):
    rate = DEFAULTS.company_reports_per_second  # the tests' servers have none unless told (conftest)
    client = await make_client(limits_refresh_seconds=REFRESH, company_reports_per_second=rate)
    burst = rate * DEFAULTS.company_report_burst_seconds
    started = time.monotonic()
    # Each report its own values: identical reports (same worker, time and values) are stored once.
    flood = (answer(client, "workers.status_report", report(f"w{n % 50}", {"cpu_usage": [float(n)]})) for n in range(1500))
    answers = await asyncio.gather(*flood)
    elapsed = time.monotonic() - started
    accepted = sum(status == 200 for status, *_ in answers)
    refused = [(subcode, headers["Retry-After"]) for status, subcode, _, headers in answers if status == 429]
    assert accepted + len(refused) == 1500
    assert burst <= accepted <= burst + rate * elapsed + 1, (accepted, elapsed)
    assert refused and set(refused) == {(0, "1")}, (refused[:3], elapsed)
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stats") == accepted


async def test_a_rate_set_with_the_cli_refuses_then_the_retry_succeeds(make_client, dsn, db_conn):
    client = await make_client(limits_refresh_seconds=REFRESH)
    await override(client, dsn, "--reports-per-second", "1", "--burst", "2")
    await ok(client, "workers.status_report", report("w1"))
    await ok(client, "workers.status_report", report("w1"))
    late = report("w1")
    started = time.monotonic()
    status, subcode, message, headers = await answer(client, "workers.status_report", late)
    assert (status, subcode, headers.get("Retry-After")) == (429, 0, "1")
    assert time.monotonic() - started >= REFUSAL_HOLD_SECONDS * 0.9  # held: a client retrying at once is slowed
    assert "1 reports per second" in message and "WORKERS_COMPANY_REPORTS_PER_SECOND" in message, message
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stats") == 2
    await asyncio.sleep(int(headers["Retry-After"]))
    await ok(client, "workers.status_report", late)
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stats") == 3


async def test_only_a_valid_report_takes_a_token(make_client, dsn):
    client = await make_client(limits_refresh_seconds=REFRESH)
    await override(client, dsn, "--reports-per-second", "1", "--burst", "1")
    assert (await answer(client, "workers.status_report", report("w1", {"cpu_usage": "busy"})))[:2] == (400, 12)
    await ok(client, "workers.status_report", report("w1"))
    assert (await answer(client, "workers.status_report", report("w1")))[:2] == (429, 0)


async def test_without_a_burst_override_the_bucket_holds_the_default_seconds_of_the_rate(make_client, dsn):
    client = await make_client(limits_refresh_seconds=REFRESH)
    await override(client, dsn, "--reports-per-second", "2")
    burst = int(2 * DEFAULTS.company_report_burst_seconds)
    answers = [await answer(client, "workers.status_report", report("w1")) for _ in range(burst + 1)]
    assert [status for status, *_ in answers] == [200] * burst + [429]


async def test_each_of_n_processes_holds_its_share_of_the_rate(make_client, dsn):
    client = await make_client(limits_refresh_seconds=REFRESH, processes=2)
    await override(client, dsn, "--reports-per-second", "4", "--burst", "4")
    answers = [await answer(client, "workers.status_report", report("w1")) for _ in range(3)]
    assert [status for status, *_ in answers] == [200, 200, 429]


async def test_an_override_of_0_lifts_the_rate_limit(make_client, dsn):
    rate = DEFAULTS.company_reports_per_second
    client = await make_client(limits_refresh_seconds=REFRESH, company_reports_per_second=rate)
    await override(client, dsn, "--reports-per-second", "0")
    flood = int(rate * DEFAULTS.company_report_burst_seconds * 2)
    answers = await asyncio.gather(*(answer(client, "workers.status_report", report("w1")) for _ in range(flood)))
    assert {status for status, *_ in answers} == {200}


async def test_the_agents_retry_on_429_succeeds_once_the_rate_allows(make_client, dsn, agent_env, db_conn):  # noqa: F811
    """The daemon's own session (its retry list holds 429) waits Retry-After and sends again."""
    client = await make_client(limits_refresh_seconds=REFRESH)
    await override(client, dsn, "--reports-per-second", "1", "--burst", "1")
    session = await asyncio.to_thread(agent_session, client, client.credentials.access_key, client.credentials.secret)

    def status_report():
        stats = {"cpu_usage": [5.0]}
        request = agent_workers.StatusReportRequest(worker="agent-1", timestamp=now_ms(), machine_stats=stats)
        started = time.monotonic()
        result = session.send(request)
        return result.ok(), time.monotonic() - started

    first, second = await asyncio.to_thread(status_report), await asyncio.to_thread(status_report)
    assert first[0] and second[0]
    assert second[1] >= 0.9, second  # refused once, retried after Retry-After: 1
    assert await db_conn.fetchval("SELECT count(*) FROM worker_stats") == 2


# --- per get_stats: 400/16 naming the limit ---------------------------------------------------------

STATS = {"from_date": BASE, "to_date": BASE + 300, "interval": 100, "items": [{"key": "cpu_usage"}]}


@pytest.mark.parametrize(
    ("endpoint", "body", "setting"),
    [
        ("workers.get_stats", {**STATS, "worker_ids": [f"w{n}" for n in range(DEFAULTS.max_stats_worker_ids + 1)]},
         "WORKERS_MAX_STATS_WORKER_IDS"),
        ("workers.get_metric_keys", {"worker_ids": [f"w{n}" for n in range(DEFAULTS.max_stats_worker_ids + 1)]},
         "WORKERS_MAX_STATS_WORKER_IDS"),
        ("workers.get_stats", {**STATS, "items": [{"key": f"k{n}"} for n in range(DEFAULTS.max_stats_items + 1)]},
         "WORKERS_MAX_STATS_ITEMS"),
        # 21 workers x 10,000 buckets: beyond the default 200,000 before anything is read
        ("workers.get_stats",
         {**STATS, "to_date": BASE + 100_000, "interval": 10, "worker_ids": [f"w{n}" for n in range(21)]},
         "WORKERS_MAX_STATS_SERIES_BUCKETS"),
    ],
    ids=["stats-worker_ids", "metric_keys-worker_ids", "stats-items", "stats-series_x_buckets"],
)  # fmt: skip
async def test_a_read_beyond_a_default_limit_is_400_16_naming_it(client, endpoint, body, setting):
    code, subcode, message, _ = await call(client, endpoint, body)
    assert (code, subcode) == (400, 16)
    assert setting in message, message


async def test_reads_at_the_default_limits_are_answered(client):
    await ok(client, "workers.status_report", {**report("w1"), "timestamp": BASE + 5})
    ids = [f"w{n}" for n in range(DEFAULTS.max_stats_worker_ids)]
    await ok(client, "workers.get_metric_keys", {"worker_ids": ids})
    items = [{"key": f"k{n}"} for n in range(DEFAULTS.max_stats_items - 1)] + [{"key": "cpu_usage"}]
    data = await ok(client, "workers.get_stats", {**STATS, "worker_ids": ids, "items": items, "interval": 1000})
    assert [entry["worker"] for entry in data["workers"]] == ["w1"]


async def test_series_found_beyond_the_limit_are_refused_after_the_read(make_client):
    client = await make_client(max_stats_series_buckets=10)
    await ok(client, "workers.status_report", {**report("w1", {"cpu_usage": [1, 2, 3, 4]}), "timestamp": BASE + 5})
    body = {**STATS, "worker_ids": ["w1"]}  # 1 worker x 1 metric x 3 buckets: within the limit
    assert len((await ok(client, "workers.get_stats", body))["workers"][0]["metrics"]) == 1
    code, subcode, message, _ = await call(client, "workers.get_stats", {**body, "split_by_variant": True})  # 4 series
    assert (code, subcode) == (400, 16)
    assert "4 series x 3 buckets" in message and "WORKERS_MAX_STATS_SERIES_BUCKETS" in message, message


async def test_a_fleet_chart_counts_the_registered_workers_before_the_read(make_client):
    client = await make_client(max_stats_series_buckets=10)
    for worker in ("w1", "w2", "w3", "w4"):
        await ok(client, "workers.register", {"worker": worker})
    code, subcode, message, _ = await call(client, "workers.get_stats", STATS)  # 4 workers x 3 buckets
    assert (code, subcode) == (400, 16)
    assert "4 series x 3 buckets" in message, message


# --- the command line ---------------------------------------------------------------------------------


async def test_companies_list_shows_limits_and_usage(make_client, dsn, capsys):
    acme = await make_client(company="acme", limits_refresh_seconds=REFRESH)
    await make_client(company="globex")
    await ok(acme, "workers.status_report", report("w1", {"cpu_usage": [1], "memory_used": 2}))
    await ok(acme, "workers.status_report", report("w2", {"cpu_usage": [1]}))
    assert await companies(dsn, "set", "acme", "--workers", "5", "--reports-per-second", "10") == 0
    assert await companies(dsn, "set", acme.credentials.company_id, "--burst", "30") == 0  # by id
    capsys.readouterr()
    await companies(dsn, "list")
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    default_keys = str(DEFAULTS.company_max_metric_keys)
    assert lines["acme"][1:] == [acme.credentials.company_id, "2", "/", "5*", "2", "/", default_keys, "0.0", "/", "10*", "30*"]
    default_rate = f"{DEFAULTS.company_reports_per_second:g}"
    default_burst = f"{DEFAULTS.company_reports_per_second * DEFAULTS.company_report_burst_seconds:g}"
    default_workers = str(DEFAULTS.company_max_workers)
    assert lines["globex"][2:] == ["0", "/", default_workers, "0", "/", default_keys, "0.0", "/", default_rate, default_burst]
    assert await companies(dsn, "unset", "acme") == 0
    capsys.readouterr()
    await companies(dsn, "list")
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert lines["acme"][4] == str(DEFAULTS.company_max_workers) and "*" not in " ".join(lines["acme"])


async def test_companies_set_names_an_existing_company_and_some_limit(make_client, dsn, capsys):
    await make_client(company="acme")
    assert await companies(dsn, "set", "nobody", "--workers", "1") == 1
    assert await companies(dsn, "set", "acme") == 2
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["companies", "set", "acme", "--workers", "-1"])
