"""PostgreSQL reads the blocks exactly as the server does: the PL/pgSQL decoders of
migrations/006_compact_storage.sql and 008_faster_sql_decoding.sql against storage/codec.py and
storage/blocks.py, value by value (float64 equality, the sign of zero included)."""

import numpy as np
from test_codec import SPECIALS, same

from server.storage import aggregate, blocks


async def test_ieee_bits_become_the_same_float64(db_conn):
    rng = np.random.default_rng(11)
    values = np.concatenate([
        np.array(SPECIALS),
        rng.normal(0, 1, 300) * 10.0 ** rng.integers(-300, 300, 300),
        rng.integers(0, 2**52, 50).astype(np.float64) * 2.0**-1074,  # subnormal
    ])
    found = await db_conn.fetchval("SELECT array_agg(codec_ieee(b) ORDER BY o) FROM unnest($1::bigint[]) WITH ORDINALITY AS u (b, o)",
                                   values.view(np.int64).tolist())
    assert same(found, values)


async def test_report_blocks_read_in_sql_as_in_python(db_conn):
    rng = np.random.default_rng(5)
    count = 360
    times = 1_765_000_000_000_000 + np.cumsum(rng.integers(9_900_000, 10_600_000, count)) // 1000 * 1000
    present = [None, None, np.array([0, 5, 359]), None]
    values = [np.round(rng.normal(50, 9, count), 3), rng.choice(SPECIALS, count), np.array([-0.0, 1e-300, 7.0]),
              rng.integers(0, 100, count).astype(np.float64)]
    reports = blocks.Reports(
        times=times, tasks=[None] * 100 + ["a"] * 200 + ["b"] * 60,
        metrics=np.array([3, 4, 5, 6]), variants=np.array([0, -1, 2, 1]), values=values, present=present)
    [(data, tasks)] = blocks.encode_reports([reports])
    rows = await db_conn.fetch("SELECT at, task, metric, variant, value FROM report_block_points($1)", data)
    expected = []
    for s, (metric, variant) in enumerate(zip(reports.metrics, reports.variants)):
        indices = np.arange(count) if present[s] is None else present[s]
        for index, value in zip(indices, values[s]):
            task = reports.tasks[index]
            expected.append((int(times[index]), 0 if task is None else tasks.index(task) + 1, int(metric), int(variant), value))
    got = [(_micros(row["at"]), row["task"], row["metric"],
            row["variant"], row["value"]) for row in rows]
    assert [g[:4] for g in got] == [e[:4] for e in expected]
    assert same([g[4] for g in got], [e[4] for e in expected])


def _micros(moment) -> int:
    delta = moment - moment.replace(year=1970, month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


_ROLLUP_ROWS = """
SELECT r.variant, u.bucket, codec_float(r.min_kind, u.min) AS min, codec_float(r.max_kind, u.max) AS max,
       codec_float(r.sum_kind, u.sum) AS sum, u.count
FROM rollup_group_lanes($1, $2) AS r, unnest(r.buckets, r.mins, r.maxs, r.sums, r.counts) AS u (bucket, min, max, sum, count)
ORDER BY variant, bucket
"""


async def test_rollup_blocks_read_in_sql_as_in_python(db_conn):
    rng = np.random.default_rng(9)
    parts = []
    every_bucket = np.sort(rng.choice(144, 40, replace=False))
    for worker in (2, 5, 8, 11):
        for variant in (blocks.COMBINED, 0, 1, 3):
            # Worker 11's variants have every bucket (no scalar rows); the others' buckets differ.
            buckets = every_bucket if worker == 11 else np.sort(rng.choice(144, int(rng.integers(1, 144)), replace=False))
            mins = np.round(rng.normal(40, 10, len(buckets)), 3) if worker != 5 else rng.normal(0, 1, len(buckets))
            parts.append(blocks.Aggregates(
                metrics=np.full(len(buckets), 1), workers=np.full(len(buckets), worker), variants=np.full(len(buckets), variant), buckets=buckets,
                mins=mins, maxs=mins + 0.5, sums=mins * 6, exact_sums=np.round(mins * 6000).astype(np.int64),
                scales=np.full(len(buckets), 3 if worker != 5 else -1), counts=rng.integers(1, 9, len(buckets))))
    rows = blocks.concatenate(parts)
    block = blocks.encode_rollup(rows)
    expected = blocks.decode_rollup(block, 1)
    for index, worker in enumerate(block.workers):
        end = block.offsets[index + 1] if index + 1 < len(block.offsets) else len(block.data)
        lanes = block.data[block.offsets[index]:end]
        mine = expected.take(expected.workers == worker)
        for per_variant, rows in ((False, mine.take(mine.variants == blocks.COMBINED)), (True, aggregate.split(mine))):
            found = await db_conn.fetch(_ROLLUP_ROWS, lanes, per_variant)
            rows = rows.take(np.lexsort((rows.buckets, rows.variants)))
            assert [(r["variant"], r["bucket"], r["count"]) for r in found] == list(
                zip(rows.variants.tolist(), rows.buckets.tolist(), rows.counts.tolist()))
            assert same([r["min"] for r in found], rows.mins) and same([r["max"] for r in found], rows.maxs)
            assert same([r["sum"] for r in found], rows.sums)
