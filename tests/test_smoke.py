from helpers import ok, now_ms


async def test_register_report_and_read_back(client, db_conn):
    await ok(client, "workers.register", {"worker": "w1", "tags": ["gpu"]})
    await ok(
        client,
        "workers.status_report",
        {"worker": "w1", "timestamp": now_ms(), "task": "t1", "machine_stats": {"cpu_usage": [10, 20]}},
    )
    data = await ok(client, "workers.get_all", {})
    assert [worker["id"] for worker in data["workers"]] == ["w1"]
    assert data["workers"][0]["task"] == {"id": "t1"}
    assert data["workers"][0]["tags"] == ["gpu"]
    points = await db_conn.fetch("SELECT metric, variant, value FROM worker_stat_points ORDER BY variant")
    assert [tuple(p) for p in points] == [("cpu_usage", "0", 10.0), ("cpu_usage", "1", 20.0)]
