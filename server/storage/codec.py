"""The compact encoding of stored statistics: sequences of numbers packed into bits.

A *section* is a list of sequences written one after the other into a bit string (most
significant bit first). Each sequence is self-describing, so a section is read from its
first bit to its last; blocks (storage/blocks.py) are sections, or byte-aligned sections
one after the other with their offsets beside them. PostgreSQL reads the same bits with the
PL/pgSQL functions of migrations/006_compact_storage.sql, so SQL stays the interface.

A sequence of n numbers, as the best time-series stores do it (Gorilla's and Prometheus'
deltas, VictoriaMetrics' decimal scaling, Parquet's bit-packed miniblocks):
- values are decimal numbers scaled to integers: the smallest k (0 to 15) for which every
  value equals round(value * 10^k) / 10^k exactly (float64 equality, sign of zero
  included); values with no such k are kept as their 64 IEEE bits ("raw"), so every value
  read back is the one stored. clearml-agent sends 3 decimals, GPU counters integers;
- the integers become residuals in one of three modes, whichever packs smallest:
  FOR (value - min), delta (zigzag of the difference to the previous value: series that
  move), or delta-FOR (difference minus the smallest difference: timestamps, counters);
  all of them divided by the greatest common divisor of the differences;
- residuals are bit-packed in miniblocks of 32, each with its own width, so a jump costs
  one miniblock, not the whole sequence.

Layout of a sequence (widths in bits; `var` is a 7-bit length L then L bits):
    n: var | kind: 6 (mode << 4 | k)
    mode FOR, DELTA, DELTA_FOR, when n > 0: gcd: var | ref: var (zigzag) |
        [DELTA_FOR: base: var (zigzag)] | widths: 7 per miniblock | residuals
    mode RAW: padding to a byte boundary | n x 64 bits (IEEE 754, big-endian)
FOR has n residuals (ref is the minimum); DELTA and DELTA_FOR have n - 1 (ref is the
first value).

Reading is vectorised across *lanes*: many sections (a fleet block's workers, or several
blocks) are read in lockstep, one sequence of every lane per step.
"""

from dataclasses import dataclass

import numpy as np

FOR, DELTA, DELTA_FOR, RAW = 0, 1, 2, 3
MINIBLOCK = 32
LENGTH_BITS = 7  # the length prefix of a `var` field, and a miniblock's width
KIND_BITS = 6
MAX_SCALE = 15
MAX_EXACT = 2**53  # scaled integers and their differences stay exact in float64 and int64

_POWERS = 10.0 ** np.arange(MAX_SCALE + 1)
_PADDING = 8 + (MINIBLOCK * 57) // 8 + 8


# --- writing ---------------------------------------------------------------------------


def _zigzag(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.int64)
    return ((values << 1) ^ (values >> 63)).astype(np.uint64)


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Bits needed by each non-negative integer (0 for 0)."""
    high = np.array(values, dtype=np.uint64)
    result = np.zeros(high.shape, dtype=np.int64)
    for shift in (32, 16, 8, 4, 2, 1):
        big = high >= (np.uint64(1) << np.uint64(shift))
        result[big] += shift
        high[big] >>= np.uint64(shift)
    return result + (high > 0)


def _segment_reduce(ufunc, values: np.ndarray, counts: np.ndarray, empty) -> np.ndarray:
    """ufunc reduced over consecutive segments of `counts` items; `empty` for empty ones."""
    result = np.full(len(counts), empty, dtype=values.dtype)
    has = counts > 0
    if has.any():
        starts = (np.cumsum(counts) - counts)[has]
        result[has] = ufunc.reduceat(values, starts)
    return result


class LanesWriter:
    """Writes `lanes` sections side by side: each call appends one sequence to every lane
    (`counts[i]` values of the flat `values` to lane i), all lanes at once."""

    def __init__(self, lanes: int = 1):
        self.lanes = lanes
        self._lane_bits = np.zeros(lanes, dtype=np.int64)
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def _append(self, lane: np.ndarray, offset: np.ndarray, values: np.ndarray, widths: np.ndarray) -> None:
        """Fields at `offset` bits after each lane's current end; the lanes then end after
        the last of their fields."""
        position = self._lane_bits[lane] + offset
        self._parts.append((lane, position, np.asarray(values, dtype=np.uint64), widths))

    def lane_bytes(self) -> np.ndarray:
        """Each lane's size so far, in whole bytes."""
        return -(-self._lane_bits // 8)

    def ints(self, values, counts=None, lanes=None) -> None:
        """Integers (|value| <= 2^53). `counts[i]` of the flat `values` go to the i-th lane
        of `lanes` (default: every lane; one lane needs no counts)."""
        values = np.asarray(values, dtype=np.int64)
        lanes, counts = self._lanes(values, counts, lanes)
        self._integers(values, counts, np.zeros(len(lanes), dtype=np.int64), lanes)

    def decimals(self, values, scales, counts=None, lanes=None) -> None:
        """Decimal numbers given as integers times 10^scale (a scale per lane)."""
        values = np.asarray(values, dtype=np.int64)
        lanes, counts = self._lanes(values, counts, lanes)
        self._integers(values, counts, np.broadcast_to(np.asarray(scales, dtype=np.int64), (len(lanes),)), lanes)

    def floats(self, values, counts=None, lanes=None) -> None:
        """float64 values: each lane's scaled to integers by its smallest exact scale, or
        raw when there is none."""
        values = np.asarray(values, dtype=np.float64)
        lanes, counts = self._lanes(values, counts, lanes)
        scales = lane_scales(values, counts)
        raw_lanes = scales < 0
        raw = np.repeat(raw_lanes, counts)
        decimal = ~raw
        integers = np.round(values[decimal] * _POWERS[np.repeat(scales, counts)[decimal]]).astype(np.int64)
        self._integers(integers, counts[~raw_lanes], scales[~raw_lanes], lanes[~raw_lanes])
        if not raw_lanes.any():
            return
        # Raw lanes: n, the kind, padding to a byte, 64 bits a value.
        lanes, n = lanes[raw_lanes], counts[raw_lanes]
        header = self._var_fields(n) + [(np.full(len(lanes), RAW << 4), np.full(len(lanes), KIND_BITS))]
        bits = self._emit_rows(lanes, header)
        bits = bits + np.where(n > 0, (-(self._lane_bits[lanes] + bits)) % 8, 0)
        rank = ranks(n)
        self._append(np.repeat(lanes, n), np.repeat(bits, n) + 64 * rank, values[raw].view(np.uint64), np.full(len(rank), 64))
        self._lane_bits[lanes] += bits + 64 * n

    def _lanes(self, values: np.ndarray, counts, lanes) -> tuple[np.ndarray, np.ndarray]:
        lanes = np.arange(self.lanes) if lanes is None else np.asarray(lanes, dtype=np.int64)
        if counts is None:
            if len(lanes) != 1:
                raise ValueError("counts are needed with several lanes")
            counts = [len(values)]
        counts = np.asarray(counts, dtype=np.int64)
        if len(counts) != len(lanes) or int(counts.sum()) != len(values):
            raise ValueError("one count per lane, adding up to the values")
        return lanes, counts

    @staticmethod
    def _var_fields(values: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        values = np.asarray(values, dtype=np.uint64)
        lengths = _bit_length(values)
        return [(lengths, np.full(len(values), LENGTH_BITS)), (values, lengths)]

    def _emit_rows(self, lanes: np.ndarray, columns: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Fields given as columns (one row per lane of `lanes`), written row by row at the
        lanes' ends; returns each lane's bits written (the lanes' ends are not moved)."""
        widths = np.stack([np.broadcast_to(w, (len(lanes),)) for _, w in columns], axis=1).astype(np.int64)
        values = np.stack([np.broadcast_to(np.asarray(v, dtype=np.uint64), (len(lanes),)) for v, _ in columns], axis=1)
        offsets = np.cumsum(widths, axis=1) - widths
        self._append(np.repeat(lanes, widths.shape[1]), offsets.ravel(), values.ravel(), widths.ravel())
        return widths.sum(axis=1)

    def _integers(self, integers: np.ndarray, counts: np.ndarray, scales: np.ndarray, lanes: np.ndarray) -> None:
        """`integers`: the values of `lanes`, lane after lane (`counts` each)."""
        if not len(lanes):
            return
        if len(integers) and int(np.abs(integers).max()) > MAX_EXACT:
            raise ValueError("integers beyond 2^53 cannot be packed exactly")
        starts = np.cumsum(counts) - counts
        plan = _plan(integers, counts, starts)
        nonempty = counts > 0
        columns = self._var_fields(counts) + [(plan.modes << 4 | scales, np.full(len(lanes), KIND_BITS))]
        header_bits = self._emit_rows(lanes, columns)
        if nonempty.any():
            rows = lanes[nonempty]
            extra = [*self._var_fields(plan.gcds[nonempty]), *self._var_fields(_zigzag(plan.refs[nonempty]))]
            # The base of DELTA_FOR; an empty field elsewhere.
            base_lengths = np.where(plan.modes == DELTA_FOR, _bit_length(_zigzag(plan.bases)), 0)[nonempty]
            extra += [
                (base_lengths, np.where(plan.modes[nonempty] == DELTA_FOR, LENGTH_BITS, 0)),
                (_zigzag(plan.bases[nonempty]), base_lengths),
            ]
            self._lane_bits[rows] += header_bits[nonempty]
            extra_bits = self._emit_rows(rows, extra)
            self._lane_bits[rows] -= header_bits[nonempty]
            header_bits[nonempty] += extra_bits
        # Miniblock widths, then the residuals.
        miniblocks = plan.miniblocks
        self._append(
            np.repeat(lanes, miniblocks),
            np.repeat(header_bits, miniblocks) + LENGTH_BITS * ranks(miniblocks),
            plan.widths,
            np.full(len(plan.widths), LENGTH_BITS),
        )
        residual_widths = np.repeat(plan.widths, plan.sizes)
        residual_lanes = np.repeat(np.arange(len(lanes)), plan.residual_counts)
        within = ranks_within(residual_widths, plan.residual_counts)
        data_start = header_bits + LENGTH_BITS * miniblocks
        self._append(lanes[residual_lanes], data_start[residual_lanes] + within, plan.residuals, residual_widths)
        self._lane_bits[lanes] += data_start + plan.data_bits

    def to_bytes(self) -> tuple[bytes, np.ndarray]:
        """The lanes, each padded to whole bytes, one after the other; and their sizes in bytes."""
        sizes = -(-self._lane_bits // 8)
        if not self._parts:
            return bytes(int(sizes.sum())), sizes
        starts = (np.cumsum(sizes) - sizes) * 8
        lane = np.concatenate([part[0] for part in self._parts])
        positions = np.concatenate([part[1] for part in self._parts]) + starts[lane]
        values = np.concatenate([part[2] for part in self._parts])
        widths = np.concatenate([part[3] for part in self._parts]).astype(np.int64)
        return _pack(positions, values, widths, int(sizes.sum())), sizes


def _pack(positions: np.ndarray, values: np.ndarray, widths: np.ndarray, size: int) -> bytes:
    """Fields (each at most 64 bits) at bit positions, into `size` bytes, MSB first.

    Built as 32-bit words: fields never overlap, so adding a word's parts (exact in float64,
    with bincount) sets their bits."""
    count = -(-size // 4) + 3
    words = np.zeros(count, dtype=np.float64)
    index = positions >> 5
    ends = (positions & 31) + widths  # bit after the field, counted from its first word
    # The first word of every field: the bits that fall in it.
    below = ends - 32  # bits of the field after its first word (negative: room left in it)
    part = np.where(
        below >= 0,
        values >> np.clip(below, 0, 63).astype(np.uint64),
        values << np.clip(-below, 0, 63).astype(np.uint64),
    ) & np.uint64(0xFFFFFFFF)
    words += np.bincount(index, weights=part.astype(np.float64), minlength=count)
    # The second and third words of the fields that reach them (at most three: fields have
    # at most 64 bits).
    for j in (1, 2):
        touches = np.flatnonzero(ends > 32 * j)
        if not len(touches):
            break
        below = ends[touches] - 32 * (j + 1)
        part = np.where(
            below >= 0,
            values[touches] >> np.clip(below, 0, 63).astype(np.uint64),
            values[touches] << np.clip(-below, 0, 63).astype(np.uint64),
        ) & np.uint64(0xFFFFFFFF)
        words += np.bincount(index[touches] + j, weights=part.astype(np.float64), minlength=count)
    return words.astype(np.uint64).astype(">u4").tobytes()[:size]


def value_scales(values: np.ndarray) -> np.ndarray:
    """For each value a k with round(value * 10^k) / 10^k == value (float64 equality, the
    sign of zero included), -1 where none up to MAX_SCALE fits. Not always the smallest:
    a decimal exact at k is exact at any larger k, and integers and 3 decimals (what the
    agent sends) are tried first."""
    result = np.full(len(values), -1, dtype=np.int64)
    pending = np.ones(len(values), dtype=bool)
    for k in (0, 3, *range(1, MAX_SCALE + 1)):
        if not pending.any():
            break
        exact, too_big = _exact_at(values, k, pending)
        result[exact] = k
        pending &= ~exact & ~too_big
    return result


def lane_scales(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each lane's smallest k with round(value * 10^k) / 10^k == value for all its values
    (float64 equality, the sign of zero included): 0 for an empty lane, -1 where none fits.

    Integers and 3 decimals (what the agent sends) settle whole lanes first; then each
    remaining value's smallest scale is found, and a lane takes the largest of its values'
    (a decimal exact at k is exact at any larger k), checked whole at it."""
    result = np.zeros(len(counts), dtype=np.int64)
    has = counts > 0
    if not has.any():
        return result
    starts = (np.cumsum(counts) - counts)[has]
    undecided = np.ones(len(values), dtype=bool)
    for k in (0, 3):
        exact, _ = _exact_at(values, k, undecided)
        lane_exact = np.minimum.reduceat(exact, starts)
        settled = np.flatnonzero(has)[lane_exact & np.minimum.reduceat(undecided, starts)]
        result[settled] = k
        undecided &= ~np.repeat(lane_exact, counts[has])
    if not undecided.any():
        return result
    per_value = np.full(len(values), -1, dtype=np.int64)
    pending = undecided.copy()
    for k in range(MAX_SCALE + 1):
        if not pending.any():
            break
        exact, too_big = _exact_at(values, k, pending)
        per_value[exact] = k
        pending &= ~exact & ~too_big
    lanes = np.minimum.reduceat(undecided, starts)  # a lane is decided whole or not at all
    hopeless = np.minimum.reduceat(per_value, starts) < 0
    chosen = np.where(hopeless, -1, np.maximum.reduceat(per_value, starts))
    result[np.flatnonzero(has)[lanes]] = chosen[lanes]
    # The check at the lane's scale.
    lane_scale = np.repeat(result, counts)
    check = (lane_scale >= 0) & undecided
    if check.any():
        ok = np.ones(len(values), dtype=bool)
        for k in np.unique(lane_scale[check]):
            exact, _ = _exact_at(values, int(k), check & (lane_scale == k))
            ok[check & (lane_scale == k)] = exact[check & (lane_scale == k)]
        result[has] = np.where(np.minimum.reduceat(ok, starts), result[has], -1)
    return result


def _exact_at(values: np.ndarray, k: int, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Of the values `where` is true for: whether each equals round(value * 10^k) / 10^k,
    and whether it is too large for k (then for any larger k too)."""
    exact = np.zeros(len(values), dtype=bool)
    too_big = np.zeros(len(values), dtype=bool)
    part = values[where]
    with np.errstate(over="ignore", invalid="ignore"):  # 1e100 * 10^k overflows: it does not fit anyway
        scaled_values = np.round(part * _POWERS[k])
    fits = np.abs(scaled_values) <= MAX_EXACT
    integers = np.where(fits, scaled_values, 0).astype(np.int64)
    exact[where] = fits & ((integers / _POWERS[k]).view(np.int64) == part.view(np.int64))
    too_big[where] = ~fits
    return exact, too_big


@dataclass
class _Plan:
    modes: np.ndarray
    gcds: np.ndarray
    refs: np.ndarray
    bases: np.ndarray
    residual_counts: np.ndarray
    miniblocks: np.ndarray
    widths: np.ndarray  # per miniblock
    sizes: np.ndarray  # per miniblock
    residuals: np.ndarray  # uint64
    data_bits: np.ndarray  # per lane


def _candidate(residuals: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Miniblocks of residuals grouped by lane: (miniblocks per lane, widths, sizes, data
    bits per lane)."""
    miniblocks = -(-counts // MINIBLOCK)
    sizes = np.full(int(miniblocks.sum()), MINIBLOCK, dtype=np.int64)
    last = np.cumsum(miniblocks) - 1
    has = miniblocks > 0
    sizes[last[has]] = counts[has] - MINIBLOCK * (miniblocks[has] - 1)
    widths = _bit_length(_segment_reduce(np.maximum, residuals, sizes, 0)) if len(sizes) else np.zeros(0, np.int64)
    bits = _segment_reduce(np.add, widths * sizes, miniblocks, 0) if len(sizes) else np.zeros(len(counts), np.int64)
    return miniblocks, widths, sizes, bits


def _plan(integers: np.ndarray, counts: np.ndarray, starts: np.ndarray) -> _Plan:
    """Each lane's mode (the smallest packing of FOR, DELTA, DELTA_FOR), and its residuals."""
    lanes = len(counts)
    lane_of = np.repeat(np.arange(lanes), counts)
    differences = np.diff(integers, prepend=0)
    first = np.zeros(len(integers), dtype=bool)
    first[starts[counts > 0]] = True
    differences[first] = 0
    gcds = np.abs(_segment_reduce(np.gcd, differences, counts, 0))
    gcds[gcds == 0] = 1
    lows = _segment_reduce(np.minimum, integers, counts, 0)
    firsts = np.zeros(lanes, dtype=np.int64)
    firsts[counts > 0] = integers[starts[counts > 0]]
    steps = (differences // gcds[lane_of])[~first]
    step_counts = np.maximum(counts - 1, 0)
    smallest = _segment_reduce(np.minimum, steps, step_counts, 0)
    step_lane = np.repeat(np.arange(lanes), step_counts)
    options = [
        (FOR, lows, np.zeros(lanes, np.int64), ((integers - lows[lane_of]) // gcds[lane_of]).astype(np.uint64), counts),
        (DELTA, firsts, np.zeros(lanes, np.int64), _zigzag(steps), step_counts),
        (DELTA_FOR, firsts, smallest, (steps - smallest[step_lane]).astype(np.uint64), step_counts),
    ]
    evaluated = []
    for mode, refs, bases, residuals, residual_counts in options:
        miniblocks, widths, sizes, bits = _candidate(residuals, residual_counts)
        cost = bits + LENGTH_BITS * miniblocks
        if mode == DELTA_FOR:
            cost = cost + LENGTH_BITS + _bit_length(_zigzag(bases))
        evaluated.append((cost, mode, refs, bases, residuals, residual_counts, miniblocks, widths, sizes, bits))
    costs = np.stack([option[0] for option in evaluated])
    choice = np.argmin(costs, axis=0)
    choice[counts <= 1] = 0  # one value (or none): FOR, its value is the reference
    modes = np.array([option[1] for option in evaluated])[choice]
    pick = lambda index: np.choose(choice, [option[index] for option in evaluated])  # noqa: E731
    refs, bases = pick(2), pick(3)
    bases = np.where(modes == DELTA_FOR, bases, 0)
    residual_counts, miniblocks, data_bits = pick(5), pick(6), pick(9)
    # The chosen residuals and miniblocks, lane by lane.
    residuals = _chosen([(option[4], option[5]) for option in evaluated], choice)
    widths = _chosen([(option[7], option[6]) for option in evaluated], choice)
    sizes = _chosen([(option[8], option[6]) for option in evaluated], choice)
    return _Plan(
        modes=modes,
        gcds=gcds,
        refs=refs,
        bases=bases,
        residual_counts=residual_counts,
        miniblocks=miniblocks,
        widths=widths,
        sizes=sizes,
        residuals=residuals,
        data_bits=data_bits,
    )


def _chosen(options: list[tuple[np.ndarray, np.ndarray]], choice: np.ndarray) -> np.ndarray:
    """Lane by lane, the items of the option chosen for the lane: each option is (items,
    items per lane)."""
    used = np.unique(choice)
    if len(used) == 1:
        return options[int(used[0])][0]
    counts = np.choose(choice, [lane_counts for _, lane_counts in options])
    result = np.zeros(int(counts.sum()), dtype=options[0][0].dtype)
    shift = np.cumsum(counts) - counts
    for index in used:
        items, lane_counts = options[int(index)]
        mine = choice == index
        lane_of = np.repeat(np.arange(len(choice)), lane_counts)
        moved = shift - (np.cumsum(lane_counts) - lane_counts)
        keep = mine[lane_of]
        result[(np.arange(len(items)) + moved[lane_of])[keep]] = items[keep]
    return result


# --- reading ---------------------------------------------------------------------------


@dataclass
class Sequences:
    """One sequence of every lane that has one: `values` holds them one after the other,
    lane `lanes[i]`'s in values[offsets[i]:offsets[i + 1]]."""

    lanes: np.ndarray  # indices of the lanes read
    kinds: np.ndarray  # per lane: mode << 4 | k
    offsets: np.ndarray  # len(lanes) + 1
    integers: np.ndarray  # int64: the scaled integers (raw floats: their bits)
    firsts: np.ndarray  # per lane: the index of its first value read

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def floats(self) -> np.ndarray:
        """The values as float64: integers / 10^k, raw bits as they are."""
        per_value = np.repeat(self.kinds, self.counts)
        result = self.integers / _POWERS[per_value & 15]
        raw = (per_value >> 4) == RAW
        if raw.any():
            result[raw] = self.integers[raw].view(np.float64)
        return result

    def lane_values(self, lane_index: int, as_float: bool = True) -> np.ndarray:
        values = self.floats() if as_float else self.integers
        return values[self.offsets[lane_index] : self.offsets[lane_index + 1]]


class SectionReader:
    """Reads sections in lockstep: lane i starts at bit `starts[i]` of `data`."""

    def __init__(self, data: bytes, starts=(0,)):
        # The 64 bits from every byte on (a view, not a copy), with zero padding so that
        # every read stays within the buffer.
        padded = bytes(data) + bytes(_PADDING)
        self._windows = np.ndarray(shape=(len(padded) - 7,), dtype=">u8", buffer=padded, strides=(1,))
        self.cursors = np.array(starts, dtype=np.int64)

    def _read(self, positions: np.ndarray, widths) -> np.ndarray:
        """The unsigned integer of `widths` bits (<= 57) at each bit position: within the
        64 bits from its byte on (a position's offset in its byte is at most 7). Shifts by
        64 are undefined, hence the two-step shift (a width of 0 reads 0)."""
        positions = np.asarray(positions, dtype=np.int64)
        window = self._windows[positions >> 3].astype(np.uint64)
        np.left_shift(window, (positions & 7).view(np.uint64), out=window)
        np.right_shift(window, np.uint64(1), out=window)
        np.right_shift(window, (63 - np.asarray(widths, dtype=np.int64)).astype(np.uint64), out=window)
        return window

    def _var(self, lanes: np.ndarray) -> np.ndarray:
        cursors = self.cursors[lanes]
        lengths = self._read(cursors, LENGTH_BITS).astype(np.int64)
        values = self._read(cursors + LENGTH_BITS, lengths)
        self.cursors[lanes] = cursors + LENGTH_BITS + lengths
        return values

    def _fixed(self, lanes: np.ndarray, width: int) -> np.ndarray:
        cursors = self.cursors[lanes]
        self.cursors[lanes] = cursors + width
        return self._read(cursors, width).astype(np.int64)

    def next(self, lanes=None, skip: bool = False, limits=None, firsts=None) -> "Sequences | None":
        """The next sequence of each lane in `lanes` (default: every lane); with `skip`,
        only moves past it. With `limits` (per lane), only its first `limits[i]` values are
        read: a delta sequence's later values cost nothing then, earlier ones must be read.
        With `firsts` (per lane), a FOR or raw sequence's values before `firsts[i]` are not
        read either (theirs are at known places); `Sequences.firsts` says where each starts."""
        if lanes is None:
            lanes = np.arange(len(self.cursors))
        lanes = np.asarray(lanes, dtype=np.int64)
        counts = self._var(lanes).astype(np.int64)
        kinds = self._fixed(lanes, KIND_BITS)
        modes = kinds >> 4
        taken = counts if limits is None else np.minimum(counts, np.asarray(limits, dtype=np.int64))
        starts = np.zeros(len(lanes), dtype=np.int64)
        if firsts is not None:
            random_access = (modes == FOR) | (modes == RAW)
            starts[random_access] = np.minimum(np.asarray(firsts, dtype=np.int64)[random_access], taken[random_access])
        offsets = np.zeros(len(lanes) + 1, dtype=np.int64)
        np.cumsum(taken - starts, out=offsets[1:])
        integers = None if skip else np.zeros(int(offsets[-1]), dtype=np.int64)
        raw = (modes == RAW) & (counts > 0)
        if raw.any():
            self._read_raw(lanes[raw], counts[raw], starts[raw], taken[raw], offsets[:-1][raw], integers)
        packed = (modes != RAW) & (counts > 0)
        if packed.any():
            self._read_packed(lanes[packed], counts[packed], starts[packed], taken[packed], modes[packed],
                              offsets[:-1][packed], integers)  # fmt: skip
        return None if skip else Sequences(lanes, kinds, offsets, integers, starts)

    def _read_raw(self, lanes, counts, starts, taken, outputs, integers) -> None:
        cursors = (self.cursors[lanes] + 7) // 8 * 8
        self.cursors[lanes] = cursors + 64 * counts
        if integers is None:
            return
        read = taken - starts
        rank = ranks(read)
        at = np.repeat(cursors + 64 * starts, read) + 64 * rank
        words = self._read(at, 32) << np.uint64(32)
        words |= self._read(at + 32, 32)
        integers[np.repeat(outputs, read) + rank] = words.view(np.int64)

    def _read_packed(self, lanes, counts, starts, taken, modes, outputs, integers) -> None:
        gcds = self._var(lanes).astype(np.int64)
        refs = _unzigzag(self._var(lanes))
        bases = np.zeros(len(lanes), dtype=np.int64)
        delta_for = modes == DELTA_FOR
        if delta_for.any():
            bases[delta_for] = _unzigzag(self._var(lanes[delta_for]))
        is_for = modes == FOR
        residual_counts = counts - ~is_for
        miniblocks = -(-residual_counts // MINIBLOCK)
        # Each miniblock: its width, its number of residuals, and where its residuals start.
        cursors = self.cursors[lanes]
        widths = self._read(np.repeat(cursors, miniblocks) + LENGTH_BITS * ranks(miniblocks), LENGTH_BITS)
        widths = widths.astype(np.int64)
        sizes = np.full(len(widths), MINIBLOCK, dtype=np.int64)
        last = np.cumsum(miniblocks) - 1
        has = miniblocks > 0
        sizes[last[has]] = residual_counts[has] - MINIBLOCK * (miniblocks[has] - 1)
        block_bits = widths * sizes
        data_start = cursors + LENGTH_BITS * miniblocks
        block_start = np.repeat(data_start, miniblocks) + ranks_within(block_bits, miniblocks)
        lane_bits = np.zeros(len(lanes), dtype=np.int64)
        np.add.at(lane_bits, np.repeat(np.arange(len(lanes)), miniblocks), block_bits)
        self.cursors[lanes] = data_start + lane_bits
        if integers is None:
            return
        # The residuals read: those of the values taken (a delta sequence's first value is
        # its ref), from the first value read on (a FOR sequence's start).
        skipped = np.where(is_for, starts, 0)
        residual_counts = np.maximum(taken - ~is_for, 0) - skipped
        miniblock_start = MINIBLOCK * ranks(miniblocks)
        low = np.clip(np.repeat(skipped, miniblocks) - miniblock_start, 0, sizes)
        sizes = np.clip(np.repeat(skipped + residual_counts, miniblocks) - miniblock_start, 0, sizes) - low
        # Each residual at its place in its miniblock (np.repeat rather than gathers: one
        # sequential pass each; this is most of a chart's raw read).
        residual_widths = np.repeat(widths, sizes)
        positions = np.repeat(block_start + widths * low, sizes) + residual_widths * ranks(sizes)
        residuals = self._read(positions, residual_widths).view(np.int64)  # < 2^57
        # Residuals to values: FOR: ref + gcd * residual; DELTA / DELTA_FOR: ref, then ref
        # plus the running sum of gcd * step.
        per_residual = lambda column: np.repeat(column, residual_counts)  # noqa: E731
        steps = np.where(per_residual(modes == DELTA), (residuals >> 1) ^ -(residuals & 1), residuals + per_residual(bases))
        steps *= per_residual(gcds)
        running = np.cumsum(steps)
        residual_starts = np.cumsum(residual_counts) - residual_counts
        before = np.zeros(len(lanes), dtype=np.int64)
        nonempty = residual_counts > 0
        before[nonempty] = running[residual_starts[nonempty]] - steps[residual_starts[nonempty]]
        values = np.where(per_residual(is_for), steps, running - per_residual(before))
        values += per_residual(refs)
        shift = outputs - residual_starts + ~is_for
        integers[np.arange(len(values)) + per_residual(shift)] = values
        first = ~is_for & (taken > 0)
        integers[outputs[first]] = refs[first]


def ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., counts[0] - 1, 0, 1, ..., counts[1] - 1, ..."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


def ranks_within(sizes: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """For items grouped consecutively (`groups[i]` items in group i), each item's sum of
    the sizes of the items before it in its group."""
    running = np.cumsum(sizes) - sizes
    group_starts = np.cumsum(groups) - groups
    has = groups > 0
    first_running = np.zeros(len(groups), dtype=np.int64)
    first_running[has] = running[group_starts[has]]
    return running - np.repeat(first_running, groups)


def _unzigzag(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.uint64)
    return ((values >> np.uint64(1)).astype(np.int64)) ^ -((values & np.uint64(1)).astype(np.int64))
