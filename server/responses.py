"""Answer bodies: marshmallow schemas of the envelope and of each endpoint's `data` (SPEC §1, §2).

The server builds its answers as plain dicts (orjson serialises them on the hot path); these
schemas describe them for the API description (server/openapi.py), and the tests check every
answer against that description.
"""

from marshmallow import Schema, fields, validate


class Strict(Schema):
    """An answer object: exactly these fields, each of them always present unless marked."""

    class Meta:
        ordered = True


class EndpointVersion(Strict):
    name = fields.String(required=True)
    requested_version = fields.String(metadata={"example": "2.30"}, required=True)
    actual_version = fields.String(metadata={"example": "2.30"}, required=True)


class Meta(Strict):
    id = fields.String(validate=validate.Regexp(r"^[0-9a-f]{32}$"), required=True)
    trx = fields.String(validate=validate.Regexp(r"^[0-9a-f]{32}$"), required=True)
    endpoint = fields.Nested(EndpointVersion, required=True)
    result_code = fields.Integer(metadata={"description": "equals the HTTP status"}, required=True)
    result_subcode = fields.Integer(required=True)
    result_msg = fields.String(required=True)
    error_stack = fields.String(allow_none=True, required=True)
    error_data = fields.Dict(required=True)


class Empty(Strict):
    """`data: {}`: the answer of register, unregister, status_report, and of every error."""


class Token(Strict):
    token = fields.String(metadata={"description": "a JWT (HS256): send it as `Authorization: Bearer`"}, required=True)


class Named(Strict):
    id = fields.String(required=True)
    name = fields.String(required=True)


# Beside a ClearML server (WORKERS_APISERVER_URL), for a caller with the apiserver's token:
# what the apiserver gives of a worker's task, project and queues; ids alone otherwise.
APISERVER_ONLY = "from the apiserver (beside a ClearML server), when it has it"


class IdOptionalName(Strict):
    id = fields.String(required=True)
    name = fields.String(metadata={"description": APISERVER_ONLY})


class CurrentTask(Strict):
    id = fields.String(required=True)
    name = fields.String(metadata={"description": APISERVER_ONLY})
    running_time = fields.Integer(
        metadata={"description": "milliseconds the task has run (its active duration); " + APISERVER_ONLY}
    )
    last_iteration = fields.Integer(metadata={"description": APISERVER_ONLY})


class QueueInfo(Strict):
    id = fields.String(required=True)
    name = fields.String(metadata={"description": APISERVER_ONLY})
    display_name = fields.String(metadata={"description": APISERVER_ONLY})
    num_tasks = fields.Integer(metadata={"description": "tasks waiting in the queue; " + APISERVER_ONLY})
    next_task = fields.Nested(
        IdOptionalName, metadata={"description": "the first task waiting; " + APISERVER_ONLY}
    )


class GpuHealth(Strict):
    index = fields.Integer(metadata={"description": "the GPU's index in the reports' lists"}, required=True)
    idle = fields.Boolean(required=True)
    below_threshold_since = fields.DateTime(
        allow_none=True,
        metadata={"description": "every report since had it below the idle threshold; null: not the last one"},
        required=True,
    )


class WorkerHealth(Strict):
    report_period = fields.Float(
        allow_none=True, metadata={"description": "seconds between its reports, estimated"}, required=True
    )
    silent = fields.Boolean(required=True)
    silent_since = fields.DateTime(allow_none=True, required=True)
    cpu_usage = fields.Float(allow_none=True, metadata={"description": "percent, recent mean"}, required=True)
    gpu_usage = fields.Float(allow_none=True, metadata={"description": "percent, recent mean"}, required=True)
    gpus = fields.List(fields.Nested(GpuHealth), required=True)


class HealthRules(Strict):
    silent_periods = fields.Float(required=True)
    idle_gpu_percent = fields.Float(required=True)
    idle_gpu_minutes = fields.Float(required=True)
    utilisation_minutes = fields.Float(required=True)


class Worker(Strict):
    id = fields.String(required=True)
    key = fields.String(required=True)
    user = fields.Nested(Named, required=True)
    company = fields.Nested(Named, required=True)
    ip = fields.String(allow_none=True, required=True)
    register_time = fields.DateTime(allow_none=True, required=True)
    register_timeout = fields.Integer(required=True)
    last_activity_time = fields.DateTime(allow_none=True, required=True)
    last_report_time = fields.DateTime(allow_none=True, required=True)
    task = fields.Nested(CurrentTask, allow_none=True, required=True)
    project = fields.Nested(IdOptionalName, metadata={"description": "the task's project; " + APISERVER_ONLY})
    queue = fields.Nested(QueueInfo, allow_none=True, required=True)
    queues = fields.List(fields.Nested(QueueInfo), required=True)
    tags = fields.List(fields.String(), required=True)
    system_tags = fields.List(fields.String(), required=True)
    health = fields.Nested(WorkerHealth, metadata={"description": "extension: only with `health: true`"})


class Workers(Strict):
    workers = fields.List(fields.Nested(Worker), required=True)
    health = fields.Nested(HealthRules, metadata={"description": "extension: only with `health: true`"})


class Count(Strict):
    count = fields.Integer(required=True)


class MetricCategory(Strict):
    name = fields.String(metadata={"description": "the metric key's prefix before its first '_'"}, required=True)
    metric_keys = fields.List(fields.String(), required=True)


class MetricKeys(Strict):
    categories = fields.List(fields.Nested(MetricCategory), required=True)


Dates = fields.List(
    fields.Integer(), required=True, metadata={"description": "each bucket's start, in milliseconds since the epoch"}
)


class AggregatedValues(Strict):
    aggregation = fields.String(validate=validate.OneOf(["avg", "min", "max"]), required=True)
    values = fields.List(
        fields.Float(allow_none=True),
        metadata={"description": "one per date; 0 where nothing was reported (null with `empty_buckets: null`)"},
        required=True,
    )


class MetricSeries(Strict):
    metric = fields.String(required=True)
    variant = fields.String(metadata={"description": "present with split_by_variant: 'total', or a list index"})
    dates = Dates
    stats = fields.List(fields.Nested(AggregatedValues), required=True)


class WorkerSeries(Strict):
    worker = fields.String(required=True)
    metrics = fields.List(fields.Nested(MetricSeries), required=True)


PartialSince = fields.Integer(
    metadata={
        "description": "with `include_partial_bucket`, when the last bucket ends after to_date: its start, in "
        "milliseconds since the epoch (it holds the reports up to to_date only)"
    }
)


class Stats(Strict):
    workers = fields.List(fields.Nested(WorkerSeries), required=True)
    partial_since = PartialSince


class Counts(Strict):
    dates = Dates
    counts = fields.List(fields.Integer(), required=True)


class ActivityReport(Strict):
    total = fields.Nested(Counts, metadata={"description": "workers that reported in each bucket"}, required=True)
    active = fields.Nested(
        Counts, metadata={"description": "of those, workers that sent a task in some report of the bucket"}, required=True
    )
    partial_since = PartialSince


class QueueWorkers(Strict):
    workers = fields.Integer(required=True)
    cores = fields.Integer(required=True, metadata={"description": "the values of their last cpu_usage list"})
    gpus = fields.Integer(required=True, metadata={"description": "the values of their last gpu_usage list"})
    memory = fields.Float(
        required=True, metadata={"description": "their last memory_used + memory_free, as sent (MB from clearml-agent)"}
    )


class QueueChart(Strict):
    listening = fields.List(
        fields.Integer(), required=True, metadata={"description": "one per date: the workers that listened to the queue"}
    )
    busy = fields.List(
        fields.Integer(), required=True, metadata={"description": "one per date: of those, the workers that ran a task"}
    )


class Queue(Strict):
    queue = fields.String(required=True, metadata={"description": "the queue's id, as the workers report it"})
    live = fields.Nested(QueueWorkers, required=True, metadata={"description": "now: the live workers listening to it"})
    busy = fields.Nested(QueueWorkers, required=True, metadata={"description": "now: of those, the ones running a task"})
    idle = fields.Nested(QueueWorkers, required=True, metadata={"description": "now: of those, the others"})
    chart = fields.Nested(QueueChart, metadata={"description": "with a range: per bucket of `dates`"})


class Queues(Strict):
    queues = fields.List(
        fields.Nested(Queue),
        required=True,
        metadata={"description": "every queue a live worker listens to, and with a range every queue listened to in it; "
                  "by id"},
    )  # fmt: skip
    dates = fields.List(
        fields.Integer(), metadata={"description": "with a range: each bucket's start, in milliseconds since the epoch"}
    )
    partial_since = PartialSince


class RuntimePropertyValue(Strict):
    key = fields.String(required=True)
    value = fields.String(required=True)
    expiry = fields.Integer(
        allow_none=True,
        required=True,
        metadata={"description": "seconds left before it expires (rounded up), or null: kept until changed"},
    )


class RuntimeProperties(Strict):
    runtime_properties = fields.List(fields.Nested(RuntimePropertyValue), required=True)


_STORED_KEYS = "`worker_<company id>_<user id>_<worker id>_prop_<key>`, in the order sent"


class RuntimePropertiesChanged(Strict):
    added = fields.List(
        fields.String(), required=True, metadata={"description": f"the properties stored: {_STORED_KEYS}"}
    )
    removed = fields.List(
        fields.String(), required=True, metadata={"description": f"the properties removed (expiry 0): {_STORED_KEYS}"}
    )
    errors = fields.List(
        fields.String(),
        required=True,
        metadata={"description": "one per entry not stored (value missing, negative expiry), naming it and why"},
    )


# Each endpoint's `data` on success.
DATA = {
    "auth.login": Token,
    "workers.register": Empty,
    "workers.unregister": Empty,
    "workers.status_report": Empty,
    "workers.get_all": Workers,
    "workers.get_count": Count,
    "workers.get_metric_keys": MetricKeys,
    "workers.get_stats": Stats,
    "workers.get_activity_report": ActivityReport,
    "workers.set_runtime_properties": RuntimePropertiesChanged,
    "workers.get_runtime_properties": RuntimeProperties,
    "workers.get_queues": Queues,
}
