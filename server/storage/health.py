"""What one status report tells of its worker's health (docs/health.md), for the registration's
upsert (registrations.REPORTS_UPSERT): which GPUs are busy, and the mean CPU and GPU usage.
This runs for every report on the writer's path: a few dictionary reads, and a loop over the
report's GPUs."""

# GPU indices from this one on are not tracked: no machine has that many, and the
# registration's arrays stay small whatever a report sends.
MAX_GPUS = 256


def gpu_busy(usage: dict | None, busy_percent: float) -> list[bool | None] | None:
    """Per GPU index, whether `gpu_usage` (`{variant: percent}`) is at or above `busy_percent`;
    None at an index the report has no value for, and None for a report without GPUs."""
    if not usage:
        return None
    # The usual list of numbers: variants "0" to "n-1", in order (schemas.MachineStats).
    if len(usage) <= MAX_GPUS and next(reversed(usage)) == str(len(usage) - 1):
        return [value >= busy_percent for value in usage.values()]
    flags: dict[int, bool] = {}
    for variant, value in usage.items():
        if variant.isdigit() and int(variant) < MAX_GPUS:  # a scalar (variant "total") names no GPU
            flags[int(variant)] = value >= busy_percent
    if not flags:
        return None
    return [flags.get(index) for index in range(max(flags) + 1)]


def mean(values: dict | None) -> float | None:
    """The mean of a metric's values (over cores, over GPUs); None without any."""
    if not values:
        return None
    return sum(values.values()) / len(values)


def merge_gpu_busy(earlier: list | None, later: list | None) -> list | None:
    """Two reports of one worker in one batch as one, with the later's GPUs: busy where either
    was, below the threshold where both were, else no value (which restarts that GPU's idle
    window, as it would have in two statements)."""
    if earlier is None or later is None:
        return later if later is not None else earlier
    merged = []
    for index, flag in enumerate(later):
        before = earlier[index] if index < len(earlier) else flag
        merged.append(True if True in (before, flag) else None if None in (before, flag) else False)
    return merged
