"""Blocks: the compacted form of statistics, built on the codec (storage/codec.py).

A block is a header lane followed by data lanes, each lane a byte-aligned section. Two kinds:

**Report blocks** hold one worker's status reports of one hour (table `report_blocks`):
    header: times (µs since the epoch) | task run lengths | task run values (0: no task,
            i: the block's tasks[i - 1]) | series metric ids | series variants (-1:
            "total", i: "i") | the series lanes' sizes in bytes
    a lane per series: the indices of the reports that carry it (empty: every report) |
            its values

**Rollup blocks** hold, for one company, metric and tier, every worker's buckets of a period
(tables `rollup_1m`, `rollup_10m`, `rollup_1h`; their `workers` and `offsets` columns say
where each worker's lanes start, so that one worker is read without the others):
    a lane per worker: its variants (codes as above) | its variant lanes' sizes in bytes |
            bucket indices | min | max | sum | count — over all the metric's variants (what
            get_stats answers without split_by_variant)
    then a lane per variant of that worker: bucket indices | min | max | sum | count
The activity of the workers (who reported, and ran a task) is the pseudo-metric ACTIVITY:
its sum is the number of reports that carried a task, its count the number of reports.

Sums of decimal values are kept as exact integers at the values' scale (`Aggregates.scale`),
so they stay exact however often buckets are combined.
"""

from dataclasses import dataclass

import numpy as np

from .codec import RAW, LanesWriter, SectionReader, Sequences, ranks, ranks_within

ACTIVITY = 0  # the metric id of the activity pseudo-metric
TOTAL = -1  # the variant code of a scalar metric's value


def variant_name(code: int) -> str:
    return "total" if code == TOTAL else str(code)


def variant_code(name: str) -> int:
    return TOTAL if name == "total" else int(name)


# --- report blocks -----------------------------------------------------------------------


@dataclass
class Reports:
    """One worker's reports, in time order, as columns."""

    times: np.ndarray  # int64 µs since the epoch
    tasks: list  # per report: the task id or None
    metrics: np.ndarray  # int64, per series
    variants: np.ndarray  # int64, per series
    values: list  # per series: float64 array (its reports' values)
    present: list  # per series: int64 indices of the reports carrying it, or None (all)


def _task_runs(tasks: list) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The distinct tasks, and the runs of equal tasks: (lengths, values: 0 none, i tasks[i-1])."""
    names: dict[str, int] = {}
    lengths, values = [], []
    previous = object()
    for task in tasks:
        if task == previous:
            lengths[-1] += 1
            continue
        previous = task
        lengths.append(1)
        values.append(0 if not task else names.setdefault(task, len(names) + 1))
    return list(names), np.array(lengths, dtype=np.int64), np.array(values, dtype=np.int64)


def encode_reports(blocks: list[Reports]) -> list[tuple[bytes, list[str]]]:
    """Each worker-hour's block: (data, its distinct tasks)."""
    series_counts = np.array([len(block.metrics) for block in blocks], dtype=np.int64)
    # Lanes: every block's header, then its series.
    lanes = len(blocks) + int(series_counts.sum())
    header_lanes = np.cumsum(series_counts + 1) - series_counts - 1
    series_lanes = np.setdiff1d(np.arange(lanes), header_lanes)
    writer = LanesWriter(lanes)
    runs = [_task_runs(block.tasks) for block in blocks]
    header = lambda arrays: (np.concatenate(arrays), [len(a) for a in arrays])  # noqa: E731
    for column in (
        [block.times for block in blocks],
        [lengths for _, lengths, _ in runs],
        [values for _, _, values in runs],
        [block.metrics for block in blocks],
        [block.variants for block in blocks],
    ):
        values, counts = header(column)
        writer.ints(values, counts, lanes=header_lanes)
    presence = [p if p is not None else np.zeros(0, np.int64) for block in blocks for p in block.present]
    writer.ints(*header(presence) if presence else (np.zeros(0, np.int64), []), lanes=series_lanes)
    values = [v for block in blocks for v in block.values]
    writer.floats(*header(values) if values else (np.zeros(0), []), lanes=series_lanes)
    series_sizes = writer.lane_bytes()[series_lanes]
    writer.ints(series_sizes, series_counts, lanes=header_lanes)
    data, sizes = writer.to_bytes()
    ends = np.cumsum(sizes)
    starts = ends - sizes
    result = []
    for index, block in enumerate(blocks):
        first = header_lanes[index]
        last = first + series_counts[index]
        result.append((data[starts[first] : ends[last]], runs[index][0]))
    return result


@dataclass
class ReportColumns:
    """The reports of many blocks as flat columns, a block's reports one after the other."""

    blocks: np.ndarray  # per report: the index of its block
    times: np.ndarray  # per report: int64 µs since the epoch
    tasks: list  # per report: the task id or None
    lane_blocks: np.ndarray  # per series lane read: its block's index
    lane_metrics: np.ndarray
    lane_variants: np.ndarray
    lane_counts: np.ndarray  # its values read
    lane_listed: np.ndarray  # bool: its reports are listed (else it has every report)
    reports: np.ndarray  # per value: the index of its report in these columns
    values: np.ndarray  # per value: float64

    @property
    def metrics(self) -> np.ndarray:
        return np.repeat(self.lane_metrics, self.lane_counts)

    @property
    def variants(self) -> np.ndarray:
        return np.repeat(self.lane_variants, self.lane_counts)


def decode_report_columns(
    blocks: list[tuple[bytes, list[str]]], metrics=None, before_us: int | None = None, since_us: int | None = None
) -> ReportColumns:
    """The reports of the blocks (data, tasks): every report, or those timed before
    `before_us`, with the values of `metrics` (ids; None: every series; empty: none, the
    reports' times and tasks only). The other series' lanes are not read, nor the values of
    the later reports; with `since_us`, some values of the reports timed before it may be
    left out too (those of FOR and raw sequences, read at their places): a chart's partial
    minute costs a fraction of its hour."""
    nothing = np.zeros(0, dtype=np.int64)
    if not blocks:
        return ReportColumns(nothing, nothing, [], nothing, nothing, nothing, nothing, np.zeros(0, bool), nothing, np.zeros(0))
    data = b"".join(block for block, _ in blocks)
    sizes = np.array([len(block) for block, _ in blocks], dtype=np.int64)
    reader = SectionReader(data, (np.cumsum(sizes) - sizes) * 8)
    times, run_lengths, run_values, series_metrics, variants, lane_sizes = (reader.next() for _ in range(6))
    series_counts = series_metrics.counts
    headers_end = (reader.cursors + 7) // 8  # bytes
    starts = np.repeat(headers_end, series_counts) + ranks_within(lane_sizes.integers, series_counts)
    wanted = np.ones(len(starts), dtype=bool) if metrics is None else np.isin(series_metrics.integers, np.asarray(metrics, dtype=np.int64))
    wanted_counts = np.bincount(np.repeat(np.arange(len(blocks)), series_counts)[wanted], minlength=len(blocks))
    # The reports kept: each block's first `kept`.
    report_block = np.repeat(np.arange(len(blocks)), times.counts)
    kept = times.counts if before_us is None else np.bincount(report_block[times.integers < before_us], minlength=len(blocks))
    keep = ranks(times.counts) < kept[report_block]
    # A report's task: its run's value, 0 (none) or i (its block's tasks[i - 1]).
    names = [name for _, tasks in blocks for name in (None, *tasks)]
    name_counts = np.array([len(tasks) + 1 for _, tasks in blocks], dtype=np.int64)
    name_starts = np.cumsum(name_counts) - name_counts
    task_of = (np.repeat(run_values.integers, run_lengths.integers) + name_starts[report_block])[keep]
    # The series lanes: which reports carry them (none listed: every report), then their values.
    series = SectionReader(data, starts[wanted] * 8)
    presence = series.next()
    lane_blocks = np.repeat(np.arange(len(blocks)), wanted_counts)
    lane_kept = kept[lane_blocks]
    presence_lane = np.repeat(np.arange(len(lane_kept)), presence.counts)
    presence_keep = presence.integers < lane_kept[presence_lane]
    listed = presence.counts > 0
    limits = np.where(listed, np.bincount(presence_lane[presence_keep], minlength=len(lane_kept)), lane_kept)
    firsts = None
    if since_us is not None:
        skipped = np.bincount(report_block[times.integers < since_us], minlength=len(blocks))  # per block
        lane_skipped = skipped[lane_blocks]
        before_since = presence_keep & (presence.integers < lane_skipped[presence_lane])
        firsts = np.where(listed, np.bincount(presence_lane[before_since], minlength=len(lane_kept)), lane_skipped)
    values = series.next(limits=limits, firsts=firsts)
    # A value's report within its block: its place in the lane, or as the lane lists them.
    in_block = ranks(values.counts) + np.repeat(values.firsts, values.counts)
    listed_rank = ranks(presence.counts)
    chosen = presence_keep & (listed_rank >= np.repeat(values.firsts, presence.counts))
    in_block[np.repeat(listed, values.counts)] = presence.integers[chosen]
    first_report = np.cumsum(kept) - kept
    return ReportColumns(
        blocks=report_block[keep],
        times=times.integers[keep],
        tasks=[names[i] for i in task_of.tolist()],
        lane_blocks=lane_blocks,
        lane_metrics=series_metrics.integers[wanted],
        lane_variants=variants.integers[wanted],
        lane_counts=values.counts,
        lane_listed=listed,
        reports=np.repeat(first_report[lane_blocks], values.counts) + in_block,
        values=values.floats(),
    )


def decode_reports(blocks: list[tuple[bytes, list[str]]], metrics=None, before_us: int | None = None) -> list[Reports]:
    """`decode_report_columns`, as each block's Reports."""
    columns = decode_report_columns(blocks, metrics, before_us)
    report_bounds = np.searchsorted(columns.blocks, np.arange(len(blocks) + 1))
    lane_bounds = np.searchsorted(columns.lane_blocks, np.arange(len(blocks) + 1))
    value_bounds = np.concatenate([[0], np.cumsum(columns.lane_counts)])
    result = []
    for index in range(len(blocks)):
        first, last = report_bounds[index], report_bounds[index + 1]
        lanes = range(lane_bounds[index], lane_bounds[index + 1])
        result.append(Reports(
            times=columns.times[first:last],
            tasks=columns.tasks[first:last],
            metrics=columns.lane_metrics[lanes.start : lanes.stop],
            variants=columns.lane_variants[lanes.start : lanes.stop],
            values=[columns.values[value_bounds[lane] : value_bounds[lane + 1]] for lane in lanes],
            present=[columns.reports[value_bounds[lane] : value_bounds[lane + 1]] - first if columns.lane_listed[lane] else None
                     for lane in lanes],
        ))  # fmt: skip
    return result


# --- rollup blocks -----------------------------------------------------------------------


@dataclass
class Aggregates:
    """Rows of (metric, worker, variant, bucket) aggregates, as columns. `scale` >= 0: the
    sum is exactly `exact_sum` / 10^scale; -1: only `sum` (float64) is. A rollup block holds
    one metric's rows, sorted by worker, variant (COMBINED first) and bucket."""

    metrics: np.ndarray
    workers: np.ndarray
    variants: np.ndarray  # COMBINED: over all variants
    buckets: np.ndarray  # bucket index within the block
    mins: np.ndarray
    maxs: np.ndarray
    sums: np.ndarray
    exact_sums: np.ndarray
    scales: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.workers)

    def take(self, index) -> "Aggregates":
        return Aggregates(*(getattr(self, name)[index] for name in _AGGREGATE_FIELDS))


_AGGREGATE_FIELDS = ("metrics", "workers", "variants", "buckets", "mins", "maxs", "sums", "exact_sums", "scales", "counts")
COMBINED = -2  # the variant code of a row over all variants


def empty() -> Aggregates:
    nothing = np.zeros(0, dtype=np.int64)
    return Aggregates(nothing, nothing, nothing, nothing, np.zeros(0), np.zeros(0), np.zeros(0), nothing, nothing, nothing)


def concatenate(parts: list[Aggregates]) -> Aggregates:
    return Aggregates(*(np.concatenate([getattr(p, name) for p in parts]) for name in _AGGREGATE_FIELDS))


@dataclass
class RollupBlock:
    """A rollup block as stored: its workers, where each one's lanes start (bytes), the data."""

    workers: np.ndarray
    offsets: np.ndarray
    data: bytes


def encode_rollup(rows: Aggregates) -> RollupBlock:
    """A rollup block of one metric from its rows (sorted by worker, variant, bucket).

    Each worker's lanes are together: its combined lane (variant codes | its variant lanes'
    sizes in bytes | buckets | min | max | sum | count), then a lane per variant (buckets |
    min | max | sum | count), so that one worker is read without the others."""
    workers = np.unique(rows.workers)
    combined = rows.variants == COMBINED
    variant_rows = rows.take(~combined)
    if len(variant_rows):
        pairs = np.unique(np.stack([variant_rows.workers, variant_rows.variants], axis=1), axis=0)
    else:
        pairs = np.zeros((0, 2), dtype=np.int64)
    variant_counts = np.bincount(np.searchsorted(workers, pairs[:, 0]), minlength=len(workers)).astype(np.int64)
    group_starts = np.arange(len(workers)) + np.cumsum(variant_counts) - variant_counts
    variant_lanes = np.repeat(group_starts, variant_counts) + 1 + ranks(variant_counts)
    writer = LanesWriter(len(workers) + len(pairs))
    if len(pairs):
        keys = variant_rows.workers * (1 << 20) + (variant_rows.variants + 2)
        pair_keys = pairs[:, 0] * (1 << 20) + (pairs[:, 1] + 2)
        _write_aggregates(writer, variant_rows, variant_lanes, _lane_counts(keys, pair_keys))
    writer.ints(pairs[:, 1], variant_counts, lanes=group_starts)
    writer.ints(writer.lane_bytes()[variant_lanes], variant_counts, lanes=group_starts)
    _write_aggregates(writer, rows.take(combined), group_starts, _lane_counts(rows.workers[combined], workers))
    data, sizes = writer.to_bytes()
    return RollupBlock(workers, (np.cumsum(sizes) - sizes)[group_starts], data)


def _lane_counts(keys: np.ndarray, lane_keys: np.ndarray) -> np.ndarray:
    """Rows per lane, for rows sorted by key and lanes with sorted keys."""
    return np.searchsorted(keys, lane_keys, side="right") - np.searchsorted(keys, lane_keys, side="left")


def _write_aggregates(writer: LanesWriter, rows: Aggregates, lanes: np.ndarray, counts: np.ndarray) -> None:
    writer.ints(rows.buckets, counts, lanes=lanes)
    # The activity has no min and max (NaN): its lanes keep none.
    kept = ~np.isnan(rows.mins)
    kept_counts = np.bincount(np.repeat(np.arange(len(lanes)), counts)[kept], minlength=len(lanes))
    writer.floats(rows.mins[kept], kept_counts, lanes=lanes)
    writer.floats(rows.maxs[kept], kept_counts, lanes=lanes)
    # Sums: exact integers at the lane's largest scale, or floats where a row has none.
    lane_of = np.repeat(np.arange(len(lanes)), counts)
    lane_scale = np.full(len(lanes), -1, dtype=np.int64)
    if len(rows):
        has = counts > 0
        starts = (np.cumsum(counts) - counts)[has]
        inexact = np.minimum.reduceat(rows.scales, starts) < 0
        lane_scale[has] = np.where(inexact, -1, np.maximum.reduceat(rows.scales, starts))
    row_scale = lane_scale[lane_of]
    exact = row_scale >= 0
    exact_lanes = lane_scale >= 0
    sums = rows.exact_sums[exact] * 10 ** (row_scale[exact] - rows.scales[exact])
    writer.decimals(sums, lane_scale[exact_lanes], counts[exact_lanes], lanes=lanes[exact_lanes])
    writer.floats(rows.sums[~exact], counts[~exact_lanes], lanes=lanes[~exact_lanes])
    writer.ints(rows.counts, counts, lanes=lanes)


def decode_rollup(
    block: RollupBlock, metric: int, variants: bool = True, workers: np.ndarray | None = None
) -> Aggregates:
    """A rollup block's rows (sorted by worker, variant, bucket); without `variants`, only
    the rows over all variants; with `workers`, only theirs."""
    if workers is not None:
        chosen = np.flatnonzero(np.isin(block.workers, workers))
        block = RollupBlock(block.workers[chosen], block.offsets[chosen], block.data)
    return decode_rollups([(block, metric, 0)], variants)


def decode_rollups(parts: list[tuple[RollupBlock, int, int]], variants: bool = True) -> Aggregates:
    """The rows of many rollup blocks, (block, metric, its first bucket) each, read in one
    pass (the lanes of every block in lockstep): buckets counted from the epoch, each
    block's rows sorted by worker, variant, bucket."""
    parts = [part for part in parts if len(part[0].workers)]
    if not parts:
        return empty()
    sizes = np.array([len(block.data) for block, _, _ in parts], dtype=np.int64)
    lanes = np.array([len(block.workers) for block, _, _ in parts], dtype=np.int64)
    block_of = np.repeat(np.arange(len(parts)), lanes)
    data = b"".join(block.data for block, _, _ in parts)
    starts = np.concatenate([block.offsets for block, _, _ in parts]) + (np.cumsum(sizes) - sizes)[block_of]
    workers = np.concatenate([block.workers for block, _, _ in parts])
    metrics = np.array([metric for _, metric, _ in parts], dtype=np.int64)[block_of]
    firsts = np.array([first for _, _, first in parts], dtype=np.int64)[block_of]
    reader = SectionReader(data, starts * 8)
    codes = reader.next()
    variant_sizes = reader.next()
    rows = _read_aggregates(reader, metrics, workers, np.full(len(workers), COMBINED), firsts)
    if not variants or not len(codes.integers):
        return rows
    # Each worker's variant lanes follow its combined lane, one after the other.
    per_lane = codes.counts
    lane_starts = np.repeat((reader.cursors + 7) // 8, per_lane) + ranks_within(variant_sizes.integers, per_lane)
    variant_rows = _read_aggregates(
        SectionReader(data, lane_starts * 8), np.repeat(metrics, per_lane), np.repeat(workers, per_lane),
        codes.integers, np.repeat(firsts, per_lane),
    )  # fmt: skip
    both = concatenate([rows, variant_rows])
    return both.take(np.lexsort((both.buckets, both.variants, both.workers, both.metrics)))


def _read_aggregates(
    reader: SectionReader, metrics: np.ndarray, workers: np.ndarray, variants: np.ndarray, firsts: np.ndarray
) -> Aggregates:
    """The next lane of aggregates of every lane (their metric, worker, variant and first
    bucket given per lane)."""
    buckets = reader.next()
    mins, maxs, sums, counts = reader.next(), reader.next(), reader.next(), reader.next()
    per_lane = buckets.counts
    scales = np.where((sums.kinds >> 4) == RAW, -1, sums.kinds & 15)
    return Aggregates(
        metrics=np.repeat(metrics, per_lane),
        workers=np.repeat(workers, per_lane),
        variants=np.repeat(variants, per_lane),
        buckets=buckets.integers + np.repeat(firsts, per_lane),
        mins=_filled(mins, per_lane),
        maxs=_filled(maxs, per_lane),
        sums=sums.floats(),
        exact_sums=sums.integers,
        scales=np.repeat(scales, per_lane),
        counts=counts.integers,
    )


def _filled(sequences: Sequences, per_lane: np.ndarray) -> np.ndarray:
    """A column's values; NaN for lanes that keep none (the activity's min and max)."""
    if np.array_equal(sequences.counts, per_lane):
        return sequences.floats()
    result = np.full(int(per_lane.sum()), np.nan)
    full = sequences.counts == per_lane
    starts = np.cumsum(per_lane) - per_lane
    result[np.repeat(starts[full], per_lane[full]) + ranks(per_lane[full])] = sequences.floats()
    return result


# --- a queue's bits ------------------------------------------------------------------------


def encode_queue_bits(rows: Aggregates, workers: np.ndarray, buckets: int) -> tuple[bytes, bytes]:
    """A queue pseudo-metric's block's rows (buckets counted from the block's start) as its
    `listening` and `busy` bits (migrations/013): per bucket a row of ceil(len(workers) / 8)
    bytes, bit i (numpy's packbits order) for workers[i], set when the worker has a row in that
    bucket (it listened) / when the row's sum is above 0 (a report of it carried a task)."""
    rows = rows.take(rows.variants == COMBINED)
    column = np.searchsorted(workers, rows.workers)
    listening = np.zeros((buckets, len(workers)), dtype=bool)
    listening[rows.buckets, column] = rows.counts > 0
    busy = np.zeros((buckets, len(workers)), dtype=bool)
    busy[rows.buckets, column] = rows.sums > 0
    return np.packbits(listening, axis=1).tobytes(), np.packbits(busy, axis=1).tobytes()


def queue_bits(bits: bytes, workers: int, buckets: int) -> np.ndarray:
    """`encode_queue_bits`' bytes as their packed rows: (buckets, ceil(workers / 8)) uint8."""
    return np.frombuffer(bits, dtype=np.uint8).reshape(buckets, -(-workers // 8))
