"""The codec and the blocks built on it (storage/codec.py, storage/blocks.py): every value
comes back exactly as it went in (float64 equality, the sign of zero included), whatever its
shape. No database here; tests/test_compact_sql.py reads the same bytes with PostgreSQL."""

import numpy as np
import pytest

from server.storage import blocks
from server.storage.codec import LanesWriter, SectionReader

SPECIALS = [1e-300, 1e100, -1e100, -0.0, 0.0, 0.1 + 0.2, float(2**53 + 1), 99999999.999, 12.345, 5e-324,
            1.7976931348623157e308, 2.0**-1074, 123456789.123456789, 0.001, -7.0]


def same(a, b) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


def sample(rng, kind: str, n: int) -> np.ndarray:
    if kind == "ints":
        scale = int(rng.choice([1, 100, 2**20, 2**50]))
        values = rng.integers(-scale, scale, n)
        return np.clip(np.cumsum(values) if rng.random() < 0.5 else values, -(2**53), 2**53)
    roll = rng.random()
    if roll < 0.3:
        return np.round(rng.normal(50, 20, n), 3)
    if roll < 0.5:
        return rng.normal(0, 1, n)
    if roll < 0.7:
        return rng.choice(SPECIALS, n)
    return np.round(np.cumsum(rng.normal(0, 3, n)), int(rng.integers(0, 6)))


def test_every_sequence_of_every_lane_reads_back_exactly():
    rng = np.random.default_rng(7)
    for _ in range(300):
        lanes = int(rng.integers(1, 6))
        writer = LanesWriter(lanes)
        expected = []
        for _ in range(int(rng.integers(1, 6))):
            kind = str(rng.choice(["ints", "floats"]))
            longest = int(rng.integers(0, 200))
            per_lane = [sample(rng, kind, int(rng.integers(0, longest + 1))) for _ in range(lanes)]
            getattr(writer, kind)(np.concatenate(per_lane), [len(values) for values in per_lane])
            expected.append((kind, per_lane))
        data, sizes = writer.to_bytes()
        reader = SectionReader(data, (np.cumsum(sizes) - sizes) * 8)
        for kind, per_lane in expected:
            found = reader.next()
            for lane, values in enumerate(per_lane):
                got = found.lane_values(lane, as_float=kind == "floats")
                assert np.array_equal(got, values) if kind == "ints" else same(got, values)


def test_a_subset_of_lanes_and_exact_scales():
    writer = LanesWriter(3)
    writer.floats([1.5, 2.25, 0.1 + 0.2], [2, 1], lanes=[0, 2])
    writer.decimals([12345, 1], [3, 0], [1, 1], lanes=[1, 2])
    writer.ints([7], [1], lanes=[1])
    data, sizes = writer.to_bytes()
    reader = SectionReader(data, (np.cumsum(sizes) - sizes) * 8)
    first = reader.next(lanes=[0, 2])
    assert same(first.lane_values(0), [1.5, 2.25]) and same(first.lane_values(1), [0.1 + 0.2])
    second = reader.next(lanes=[1, 2])
    assert same(second.lane_values(0), [12.345]) and same(second.lane_values(1), [1.0])
    assert list(reader.next(lanes=[1]).lane_values(0, as_float=False)) == [7]


@pytest.mark.parametrize("seed", range(5))
def test_report_blocks_round_trip(seed):
    rng = np.random.default_rng(seed)
    workers = []
    for _ in range(int(rng.integers(1, 6))):
        count = int(rng.integers(1, 400))
        times = 1_765_000_000_000_000 + np.cumsum(rng.integers(9_900_000, 10_600_000, count)) // 1000 * 1000
        series = int(rng.integers(1, 40))
        present = [None if rng.random() < 0.8 else np.sort(rng.choice(count, int(rng.integers(0, count + 1)), replace=False))
                   for _ in range(series)]
        values = [sample(rng, "floats", count if p is None else len(p)) for p in present]
        tasks = [None if rng.random() < 0.5 else f"task-{int(rng.integers(0, 3))}" for _ in range(count // 50 + 1)]
        workers.append(blocks.Reports(
            times=times,
            tasks=[tasks[i // 50] for i in range(count)],
            metrics=rng.integers(1, 30, series),
            variants=rng.integers(-1, 64, series),
            values=values,
            present=present,
        ))
    decoded = blocks.decode_reports(blocks.encode_reports(workers))
    for original, found in zip(workers, decoded, strict=True):
        assert np.array_equal(found.times, original.times)
        assert found.tasks == original.tasks
        assert np.array_equal(found.metrics, original.metrics) and np.array_equal(found.variants, original.variants)
        for values, found_values, present, found_present in zip(original.values, found.values, original.present,
                                                                found.present, strict=True):
            assert same(found_values, values)
            assert (found_present is None and (present is None or len(present) == 0)) or np.array_equal(found_present, present)
    # Some metrics only, or none: every report's time and task, the other series left out.
    wanted = np.array([3, 7, 11])
    for found, chosen in zip((blocks.decode_reports(blocks.encode_reports(workers), wanted),
                              blocks.decode_reports(blocks.encode_reports(workers), [])), (True, False)):
        for original, part in zip(workers, found, strict=True):
            assert np.array_equal(part.times, original.times) and part.tasks == original.tasks
            keep = np.isin(original.metrics, wanted) & chosen
            assert np.array_equal(part.metrics, original.metrics[keep]) and np.array_equal(part.variants, original.variants[keep])
            assert len(part.values) == len(part.present) == keep.sum()
            for values, found_values in zip([v for v, k in zip(original.values, keep) if k], part.values, strict=True):
                assert same(found_values, values)


    # The reports before a time only (a chart's partial minute): a prefix of each block, the
    # later values of its delta sequences not read.
    encoded = blocks.encode_reports(workers)
    for cut in rng.integers(1_765_000_000_000_000, 1_765_000_000_000_000 + 4_000_000_000, 6).tolist():
        for original, part in zip(workers, blocks.decode_reports(encoded, before_us=cut), strict=True):
            kept = int(np.searchsorted(original.times, cut))
            assert np.array_equal(part.times, original.times[:kept]) and part.tasks == original.tasks[:kept]
            for values, present, found_values, found_present in zip(original.values, original.present, part.values,
                                                                    part.present, strict=True):
                if present is None or len(present) == 0:
                    assert found_present is None and same(found_values, values[: kept if present is None else 0])
                else:
                    taken = int(np.searchsorted(present, kept))
                    assert np.array_equal(found_present, present[:taken]) and same(found_values, values[:taken])

    # A time range [since, before) (a chart's raw read): every value of its reports, whatever
    # else comes with them (earlier reports' values of delta sequences).
    for since in rng.integers(1_765_000_000_000_000, 1_765_000_000_000_000 + 4_000_000_000, 6).tolist():
        before = since + int(rng.integers(0, 100_000_000))
        columns = blocks.decode_report_columns(encoded, None, before, since)
        inside = (columns.times >= since) & (columns.times < before)
        chosen = inside[columns.reports]
        found = sorted(zip(columns.blocks[columns.reports[chosen]].tolist(), columns.times[columns.reports[chosen]].tolist(),
                           columns.metrics[chosen].tolist(), columns.variants[chosen].tolist(),
                           columns.values[chosen].view(np.int64).tolist()))
        expected = sorted(
            (index, int(original.times[report]), int(metric), int(variant), int(np.float64(value).view(np.int64)))
            for index, original in enumerate(workers)
            for metric, variant, values, present in zip(original.metrics, original.variants, original.values, original.present)
            for report, value in zip(np.arange(len(original.times)) if present is None else present, values)
            if since <= original.times[report] < before
        )
        assert found == expected
        assert np.array_equal(columns.times[inside], np.concatenate([w.times[(w.times >= since) & (w.times < before)] for w in workers]))

def test_rollup_blocks_round_trip():
    rng = np.random.default_rng(3)
    rows = []
    for worker in (4, 9, 17):
        for variant in [blocks.COMBINED, *([0, 1, 2] if worker != 9 else [])]:
            buckets = np.sort(rng.choice(60, int(rng.integers(1, 60)), replace=False))
            n = len(buckets)
            exact = rng.random() < 0.7
            mins = np.round(rng.normal(40, 10, n), 3) if exact else rng.normal(40, 10, n)
            rows.append(blocks.Aggregates(
                metrics=np.full(n, 5), workers=np.full(n, worker), variants=np.full(n, variant), buckets=buckets,
                mins=mins, maxs=mins + 1.5,
                sums=np.round(mins * 6, 3), exact_sums=np.round(mins * 6000).astype(np.int64),
                scales=np.full(n, 3 if exact else -1), counts=rng.integers(1, 12, n),
            ))
    original = blocks.concatenate(rows)
    block = blocks.encode_rollup(original)
    assert list(block.workers) == [4, 9, 17] and block.offsets[0] == 0
    found = blocks.decode_rollup(block, 5)
    for name in ("metrics", "workers", "variants", "buckets", "counts"):
        assert np.array_equal(getattr(found, name), getattr(original, name)), name
    assert same(found.mins, original.mins) and same(found.maxs, original.maxs)
    exact = original.scales >= 0
    assert same(found.exact_sums[exact] / 10.0 ** found.scales[exact], original.exact_sums[exact] / 1000)
    assert same(found.sums[~exact], original.sums[~exact])
    only = blocks.decode_rollup(block, 5, variants=False, workers=np.array([9, 17]))
    assert set(only.workers) == {9, 17} and set(only.variants) == {blocks.COMBINED}
    # Several blocks read in one pass: each block's rows, its buckets counted from its first.
    other = blocks.encode_rollup(blocks.concatenate(rows[:3]))
    together = blocks.decode_rollups([(block, 5, 100), (other, 6, 7)])
    for metric, first, alone in ((5, 100, found), (6, 7, blocks.decode_rollup(other, 6))):
        part = together.take(together.metrics == metric)
        assert np.array_equal(part.buckets, alone.buckets + first) and same(part.mins, alone.mins)
        assert np.array_equal(part.workers, alone.workers) and np.array_equal(part.counts, alone.counts)
