"""Request bodies: marshmallow schemas, and `load`, which turns their errors into API errors.

Rules shared by every schema (SPEC §1): unknown fields are ignored, `null` for a field
means the field is absent (unless the field gives `null` a meaning of its own), and types
are strict: no string is taken for a number, no number for a boolean.
"""

import math
import time
from dataclasses import dataclass

from marshmallow import EXCLUDE, Schema, ValidationError, fields, pre_load, validate

from . import errors
from .errors import ApiError

MAX_ID_LENGTH = 512
MAX_PROPERTY_VALUE_LENGTH = 4096  # a runtime property's value
MILLISECONDS_THRESHOLD = 10**11  # a timestamp above this is in milliseconds
MAX_CLOCK_AHEAD_SECONDS = 24 * 3600
MAX_INT32 = 2**31 - 1  # integers are stored as PostgreSQL integer
MAX_DATE_SECONDS = 253402300799  # 9999-12-31T23:59:59Z, the end of PostgreSQL's timestamp range
REQUIRED_MESSAGE = "Missing data for required field."


class Text(fields.String):
    """A string of at most 512 (or `max_length`) characters without NUL (which PostgreSQL cannot store)."""

    default_error_messages = {"nul": "Must not contain a NUL character."}

    def __init__(self, *, min_length: int = 0, max_length: int = MAX_ID_LENGTH, **kwargs):
        super().__init__(validate=validate.Length(min=min_length, max=max_length), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise self.make_error("nul")
        return text


def TextList(**kwargs) -> fields.List:
    return fields.List(Text(), **kwargs)


class Number(fields.Field):
    """A JSON number (int or float), never a string or a boolean."""

    default_error_messages = {"invalid": "Not a valid number.", "negative": "Must be greater than or equal to 0."}

    def __init__(self, *, non_negative: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.non_negative = non_negative

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        if self.non_negative and value < 0:
            raise self.make_error("negative")
        return value


class Boolean(fields.Field):
    """A JSON true or false, nothing else (not 1, not "yes")."""

    default_error_messages = {"invalid": "Not a valid boolean."}

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


def Integer(*, minimum: int | None = None, **kwargs) -> fields.Integer:
    """A JSON integer that fits PostgreSQL's integer."""
    return fields.Integer(strict=True, validate=validate.Range(min=minimum, max=MAX_INT32), **kwargs)


class Timestamp(Number):
    """UNIX time in seconds or, above 10^11, milliseconds; loaded as float seconds."""

    default_error_messages = {"future": "Must not be more than 24 hours ahead of the server's clock."}

    def __init__(self, **kwargs):
        super().__init__(non_negative=True, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        seconds = super()._deserialize(value, attr, data, **kwargs)
        if seconds > MILLISECONDS_THRESHOLD:
            seconds = seconds / 1000
        if seconds > time.time() + MAX_CLOCK_AHEAD_SECONDS:
            raise self.make_error("future")
        return float(seconds)


class LastSeen(fields.Field):
    """Seconds; 0, null or "none" disable the filter (loaded as 0)."""

    default_error_messages = {"invalid": "Must be a non-negative integer, 0, null or 'none'."}

    def __init__(self, **kwargs):
        super().__init__(allow_none=True, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) and value.lower() == "none":
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT32:
            raise self.make_error("invalid")
        return value

    def deserialize(self, value, attr=None, data=None, **kwargs):
        if value is None:
            return 0
        return super().deserialize(value, attr, data, **kwargs)


# Exact types: bool (a subclass of int) is not a number here. orjson makes no subclasses.
_NUMBER_TYPES = frozenset((int, float))
# Larger magnitudes would overflow PostgreSQL's avg() (it sums squares) in get_stats.
MAX_METRIC_MAGNITUDE = 1e100
_VARIANT_NAMES = tuple(str(index) for index in range(1024))


@dataclass(frozen=True)
class ReportLimits:
    """Bounds of one status report's machine_stats (docs/limits.md); 0 is no limit."""

    metric_keys: int = 0
    values_per_metric: int = 0
    values_per_report: int = 0


class MachineStats(fields.Field):
    """`{key: number | [number, ...]}` loaded as `{metric: {variant: value}}` (SPEC §4).

    A scalar is variant "total"; list item i is variant "i". Nulls are skipped. One loop
    over the keys instead of nested schemas: this runs on every status report.
    """

    default_error_messages = {
        "type": "Must be an object of metric keys to numbers or lists of numbers.",
        "key": "Metric keys must be non-empty strings of at most 512 characters without NUL.",
        "value": "Value of '{metric}' must be a number or a list of numbers.",
        "range": "Values of '{metric}' must be between -1e100 and 1e100.",
        "keys": "{count} metric keys, more than the limit of {limit} (WORKERS_MAX_METRIC_KEYS_PER_REPORT).",
        "values": "'{metric}' has {count} values, more than the limit of {limit} (WORKERS_MAX_VALUES_PER_METRIC).",
        "total": "{count} values, more than the limit of {limit} (WORKERS_MAX_VALUES_PER_REPORT).",
    }

    def __init__(self, limits: ReportLimits = ReportLimits(), **kwargs):
        super().__init__(**kwargs)
        self.max_keys = limits.metric_keys or math.inf
        self.max_values = limits.values_per_metric or math.inf
        self.max_total = limits.values_per_report or math.inf

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, dict):
            raise self.make_error("type")
        if len(value) > self.max_keys:
            raise self.make_error("keys", count=len(value), limit=self.max_keys)
        metrics = {}
        total = 0
        for key, sample in value.items():
            if not key or len(key) > MAX_ID_LENGTH or "\x00" in key:
                raise self.make_error("key")
            kind = type(sample)
            if kind in _NUMBER_TYPES:
                if abs(sample) > MAX_METRIC_MAGNITUDE:
                    raise self.make_error("range", metric=key)
                metrics[key] = {"total": sample}
                total += 1
            elif kind is list:
                if len(sample) > self.max_values:
                    raise self.make_error("values", metric=key, count=len(sample), limit=self.max_values)
                total += len(sample)
                # The usual list (numbers only) is checked and mapped to variants in C.
                if set(map(type, sample)) <= _NUMBER_TYPES and len(sample) <= len(_VARIANT_NAMES):
                    if sample and max(map(abs, sample)) > MAX_METRIC_MAGNITUDE:
                        raise self.make_error("range", metric=key)
                    variants = dict(zip(_VARIANT_NAMES, sample))
                else:
                    variants = self._variants(key, sample)
                if variants:
                    metrics[key] = variants
            elif sample is not None:
                raise self.make_error("value", metric=key)
        if total > self.max_total:
            raise self.make_error("total", count=total, limit=self.max_total)
        return metrics

    def _variants(self, key: str, sample: list) -> dict:
        variants = {}
        for index, item in enumerate(sample):
            if item is None:
                continue
            if type(item) not in _NUMBER_TYPES:
                raise self.make_error("value", metric=key)
            if abs(item) > MAX_METRIC_MAGNITUDE:
                raise self.make_error("range", metric=key)
            variants[str(index)] = item
        return variants


class RequestSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    @pre_load
    def null_means_absent(self, data, **kwargs):
        if isinstance(data, dict) and any(value is None for value in data.values()):
            data = {
                name: value
                for name, value in data.items()
                if value is not None or (name in self.load_fields and self.load_fields[name].allow_none)
            }
        return data


class LoginRequest(RequestSchema):
    expiration_sec = Integer(minimum=1)


class RegisterRequest(RequestSchema):
    worker = Text(required=True, min_length=1)
    timeout = Integer()
    queues = TextList()
    tags = TextList()
    system_tags = TextList()


class UnregisterRequest(RequestSchema):
    worker = Text(required=True, min_length=1)


class StatusReportRequest(RequestSchema):
    worker = Text(required=True, min_length=1)
    timestamp = Timestamp(required=True)
    task = Text()
    queue = Text()
    queues = TextList()
    tags = TextList()
    system_tags = TextList()
    machine_stats = MachineStats()


def bounded_status_report_request(limits: ReportLimits) -> StatusReportRequest:
    """The status report schema whose machine_stats keeps within `limits` (what the server loads with)."""

    class BoundedStatusReportRequest(StatusReportRequest):
        machine_stats = MachineStats(limits)

    return BoundedStatusReportRequest()


class WorkerFilterRequest(RequestSchema):
    last_seen = LastSeen()
    tags = TextList()
    system_tags = TextList()
    worker_pattern = Text()


class AllWorkersRequest(WorkerFilterRequest):
    health = Boolean(
        load_default=False,
        metadata={
            "description": "extension: each worker's `health` too (its report period, whether it is silent, its "
            "recent CPU and GPU usage, which of its GPUs are idle), and the rules that decide it"
        },
    )


class MetricKeysRequest(RequestSchema):
    worker_ids = TextList()


def partial_bucket() -> Boolean:
    return Boolean(
        load_default=False,
        metadata={
            "description": "extension: also answer the last bucket when the range ends before it does (it is "
            "left out by default); the answer's `partial_since` then gives that bucket's start"
        },
    )


class TimeRangeRequest(RequestSchema):
    from_date = Number(required=True, non_negative=True, validate=validate.Range(max=MAX_DATE_SECONDS))
    to_date = Number(required=True, non_negative=True, validate=validate.Range(max=MAX_DATE_SECONDS))
    interval = Integer(required=True, minimum=1)
    include_partial_bucket = partial_bucket()


class StatItem(RequestSchema):
    key = Text(required=True, min_length=1)
    aggregation = fields.String(load_default="avg", validate=validate.OneOf(["avg", "min", "max"]))


class StatsRequest(TimeRangeRequest):
    items = fields.List(fields.Nested(StatItem), required=True, validate=validate.Length(min=1))
    worker_ids = TextList()
    split_by_variant = Boolean(load_default=False)
    empty_buckets = fields.String(
        load_default="zero",
        validate=validate.OneOf(["zero", "null"]),
        metadata={
            "description": "extension: the value of a bucket in which the worker sent no value of the metric: "
            "`zero` (0, as ClearML answers) or `null`"
        },
    )


class ActivityRequest(TimeRangeRequest):
    worker_ids = TextList(metadata={"description": "extension: count only these workers (default: every worker)"})


class QueuesRequest(RequestSchema):
    """workers.get_queues (an extension): the range is optional, but whole when given."""

    from_date = Number(
        non_negative=True, validate=validate.Range(max=MAX_DATE_SECONDS),
        metadata={"description": "with to_date and interval: chart the queues over this range (seconds)"},
    )  # fmt: skip
    to_date = Number(non_negative=True, validate=validate.Range(max=MAX_DATE_SECONDS))
    interval = Integer(minimum=1, metadata={"description": "seconds, as get_activity_report's"})
    include_partial_bucket = partial_bucket()


RANGE_FIELDS = ("from_date", "to_date", "interval")


class RuntimeProperty(RequestSchema):
    key = Text(required=True, min_length=1)
    value = Text(
        max_length=MAX_PROPERTY_VALUE_LENGTH,
        metadata={"description": "the property's value; needed unless `expiry` is 0 (else an entry of `errors`)"},
    )
    expiry = Integer(
        metadata={
            "description": "seconds until the property expires; absent or null: kept until changed; 0: the "
            "property is removed; negative: not stored (an entry of `errors`)"
        }
    )


class SetRuntimePropertiesRequest(RequestSchema):
    worker = Text(required=True, min_length=1)
    runtime_properties = fields.List(fields.Nested(RuntimeProperty), required=True)


class GetRuntimePropertiesRequest(RequestSchema):
    worker = Text(required=True, min_length=1)


def _flatten(messages, prefix: str = ""):
    """Yield (field path, message) from marshmallow's nested error dict (an error of a whole
    nested object, marshmallow's `_schema`, is named by the object's path)."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            path = prefix if key == "_schema" and prefix else f"{prefix}.{key}" if prefix else str(key)
            yield from _flatten(value, path)
    elif isinstance(messages, list):
        for message in messages:
            yield from _flatten(message, prefix)
    else:
        yield prefix, str(messages)


def load(schema: Schema, body: dict) -> dict:
    """Validate a request body; raise 400/11 naming missing fields or 400/12 naming bad ones."""
    try:
        return schema.load(body)
    except ValidationError as error:
        problems = list(_flatten(error.messages))
    missing = [path for path, message in problems if message == REQUIRED_MESSAGE]
    if missing:
        raise ApiError(errors.MISSING_FIELDS, f"Missing required fields: {', '.join(missing)}") from None
    details = "; ".join(f"{path}: {message}" for path, message in problems)
    raise ApiError(errors.VALIDATION_ERROR, f"Validation error: {details}") from None


login_request = LoginRequest()
register_request = RegisterRequest()
unregister_request = UnregisterRequest()
worker_filter_request = WorkerFilterRequest()
all_workers_request = AllWorkersRequest()
metric_keys_request = MetricKeysRequest()
activity_request = ActivityRequest()
stats_request = StatsRequest()
set_runtime_properties_request = SetRuntimePropertiesRequest()
get_runtime_properties_request = GetRuntimePropertiesRequest()
queues_request = QueuesRequest()
