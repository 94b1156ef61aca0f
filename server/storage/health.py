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
    """Two reports of one worker in one batch as one: busy where either was, the later's length."""
    if earlier is None or later is None:
        return later if later is not None else earlier
    merged = []
    for index, flag in enumerate(later):
        before = earlier[index] if index < len(earlier) else None
        merged.append(flag if before is None else before if flag is None else flag or before)
    return merged
