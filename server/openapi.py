"""The API description (OpenAPI 3.1), generated from the marshmallow schemas the server uses.

Request bodies come from server/schemas.py (what the server validates with), answers from
server/responses.py, error codes from server/errors.py: nothing here restates a field, so the
document cannot drift from what the server accepts and answers.
"""

import math

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields

from . import __version__, errors, limits, responses, schemas
from .config import Settings
from .endpoints import ENDPOINTS
from .protocol import API_VERSION

OPENAPI_VERSION = "3.1.0"
METHODS = ("get", "post", "put")

# Each endpoint's request body, as its handler loads it (None: the status report's, which
# depends on the settings' limits), and a line about it.
OPERATIONS = {
    "auth.login": (schemas.login_request, "A token for the caller's credentials"),
    "workers.register": (schemas.register_request, "Register a worker (again: refresh its registration)"),
    "workers.unregister": (schemas.unregister_request, "Unregister a worker"),
    "workers.status_report": (None, "Report a worker's status and machine statistics"),
    "workers.get_all": (schemas.all_workers_request, "The registered workers, filtered"),
    "workers.get_count": (schemas.worker_filter_request, "How many registered workers match the filter"),
    "workers.get_metric_keys": (schemas.metric_keys_request, "The metric keys the workers reported"),
    "workers.get_stats": (schemas.stats_request, "Statistics of workers' metrics over time, in buckets"),
    "workers.get_activity_report": (schemas.activity_request, "Reporting and busy workers over time, in buckets"),
    "workers.set_runtime_properties": (
        schemas.set_runtime_properties_request,
        "Set or remove a worker's runtime properties (API version 2.10 and later)",
    ),
    "workers.get_runtime_properties": (
        schemas.get_runtime_properties_request,
        "A worker's runtime properties (API version 2.10 and later)",
    ),
    "workers.get_queues": (
        schemas.queues_request,
        "Extension: per queue, its live, busy and idle workers now, and over a range the workers listening and busy",
    ),
}

SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "a token from auth.login"},
    "basic": {"type": "http", "scheme": "basic", "description": "access key and secret key"},
}

_NO_NUL = "^[^\\x00]*$"
_METRIC_VALUE = {
    "type": "number",
    "minimum": -schemas.MAX_METRIC_MAGNITUDE,
    "maximum": schemas.MAX_METRIC_MAGNITUDE,
}
_DESCRIPTION = f"""The workers service of a ClearML-compatible server: worker daemons register and report
machine statistics; dashboards and clients read them back.

Every endpoint takes GET, POST or PUT with an optional JSON object as its body (empty means
`{{}}`), under `/SERVICE.ACTION` or `/vMAJOR.MINOR/SERVICE.ACTION` (any version; the answer
reports it). Unknown fields are ignored and `null` means absent. Every answer, success or
error, is an envelope `{{meta, data}}` whose `meta.result_code` equals the HTTP status, and
whose `meta.result_subcode` tells the error apart (below). A 503 or 429 carries
`Retry-After`: retry then; nothing was stored.

Server version {__version__}, API version {API_VERSION}."""


def _optional_takes_null(converter, field: fields.Field, ret: dict, **kwargs) -> dict:
    """SPEC §1: `null` for an optional request field means absent."""
    if not isinstance(field.parent, schemas.RequestSchema) or field.required or not isinstance(ret.get("type"), str):
        return {}
    nullable = {"type": [ret["type"], "null"]}
    if "enum" in ret:
        nullable["enum"] = [*ret["enum"], None]
    return nullable


def _custom_field_properties(converter, field: fields.Field, **kwargs) -> dict:
    """What the OpenAPI types of server/schemas.py's own fields cannot say by themselves."""
    if isinstance(field, schemas.Text):
        return {"pattern": _NO_NUL}
    if isinstance(field, schemas.Timestamp):
        return {
            "minimum": 0,
            "description": "UNIX time in seconds, or in milliseconds above 10^11; "
            "at most 24 hours ahead of the server's clock",
        }
    if isinstance(field, schemas.Number) and field.non_negative:
        return {"minimum": 0}
    if isinstance(field, schemas.LastSeen):
        return {
            "type": ["integer", "string", "null"],
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": schemas.MAX_INT32},
                {"type": "string", "pattern": "^[Nn][Oo][Nn][Ee]$"},
                {"type": "null"},
            ],
            "description": "seconds since the last report; 0, null or 'none' disable the filter",
        }
    if isinstance(field, schemas.MachineStats):
        values = {"type": "array", "items": {"anyOf": [_METRIC_VALUE, {"type": "null"}]}}
        if field.max_values != math.inf:
            values["maxItems"] = field.max_values
        stats = {
            "propertyNames": {"minLength": 1, "maxLength": schemas.MAX_ID_LENGTH, "pattern": _NO_NUL},
            "additionalProperties": {"anyOf": [_METRIC_VALUE, values, {"type": "null"}]},
            "description": "metric key to a number, or to a list of numbers (one per core, GPU, ...); "
            "nulls are skipped"
            + (f"; at most {field.max_total} values in all" if field.max_total != math.inf else ""),
        }
        if field.max_keys != math.inf:
            stats["maxProperties"] = field.max_keys
        return stats
    return {}


def _schema_name(schema) -> str:
    return (schema if isinstance(schema, type) else type(schema)).__name__


def _read_limits(spec: APISpec, settings: Settings) -> None:
    """The request limits of these settings (checked by the endpoints, 400/16) as list bounds."""
    components = spec.components.schemas
    for schema, field, limit in (
        ("StatsRequest", "worker_ids", settings.max_stats_worker_ids),
        ("MetricKeysRequest", "worker_ids", settings.max_stats_worker_ids),
        ("ActivityRequest", "worker_ids", settings.max_stats_worker_ids),
        ("StatsRequest", "items", settings.max_stats_items),
        ("SetRuntimePropertiesRequest", "runtime_properties", settings.max_runtime_properties_per_call),
    ):
        if limit:
            components[schema]["properties"][field]["maxItems"] = limit


def _at_least(number: int) -> str:
    """A regular expression of the decimal integers >= `number` (leading zeros allowed)."""
    digits = str(number)
    longer = f"[1-9][0-9]{{{len(digits)},}}"
    same_length = [digits]
    for index, digit in enumerate(digits):
        rest = len(digits) - index - 1
        if digit != "9":
            same_length.append(f"{digits[:index]}[{int(digit) + 1}-9]" + (f"[0-9]{{{rest}}}" if rest else ""))
    return f"0*(?:{'|'.join([longer, *same_length])})"


def _version_parameter(least: str | None) -> dict:
    """The `{version}` path parameter: any MAJOR.MINOR, or from the endpoint's least version on."""
    if least is None:
        pattern, description = "^[0-9]+\\.[0-9]+$", "any API version MAJOR.MINOR; the answer reports the one served"
    else:
        major, minor = (int(part) for part in least.split("."))
        pattern = f"^(?:{_at_least(major + 1)}\\.[0-9]+|0*{major}\\.{_at_least(minor)})$"
        description = (
            f"an API version MAJOR.MINOR, {least} or later (a lower one is answered 400/1, as an unknown "
            "endpoint); the answer reports the one served"
        )
    return {
        "name": "version",
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": pattern, "examples": [API_VERSION]},
    }


def _error_answers() -> dict[int, str]:
    """Each error status, with its subcodes as errors.py names them."""
    by_status: dict[int, list[str]] = {}
    for name, value in vars(errors).items():
        if name.isupper() and isinstance(value, tuple):
            code, subcode = value
            by_status.setdefault(code, []).append(f"{code}/{subcode}: {name.lower().replace('_', ' ')}")
    by_status.pop(errors.METHOD_NOT_ALLOWED[0])  # only for methods other than GET, POST, PUT
    return {code: "; ".join(lines) for code, lines in sorted(by_status.items())}


def _envelope(data_schema: str, status: int) -> dict:
    return {
        "type": "object",
        "required": ["meta", "data"],
        "additionalProperties": False,
        "properties": {
            "meta": {
                "allOf": [
                    {"$ref": "#/components/schemas/Meta"},
                    {"properties": {"result_code": {"const": status}}},
                ]
            },
            "data": {"$ref": f"#/components/schemas/{data_schema}"},
        },
    }


def _request_name(request: Schema) -> str:
    """A request schema's component name: its class's, the status report's without "Bounded"."""
    return type(request).__name__.removeprefix("Bounded")


def _operation(endpoint: str, request: str, summary: str, method: str, versioned: bool) -> dict:
    service, action = endpoint.split(".")
    answers = {
        "200": {
            "description": "OK",
            "content": {"application/json": {"schema": _envelope(responses.DATA[endpoint].__name__, 200)}},
        }
    }
    for status in _error_answers():
        answers[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    operation = {
        "operationId": f"{service}_{action}_{method}{'_versioned' if versioned else ''}",
        "summary": summary,
        "tags": [service],
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}},
        },
        "responses": answers,
        "security": [{"bearer": []}, {"basic": []}, {"cookie": []}],
    }
    if endpoint == "auth.login":
        operation["parameters"] = [
            {
                "name": "expiration_sec",
                "in": "query",
                "required": False,
                "description": "the token's lifetime in seconds (as the body's field)",
                "schema": {"type": "integer", "minimum": 1, "maximum": schemas.MAX_INT32},
            }
        ]
    return operation


def document(settings: Settings) -> dict:
    """The OpenAPI document of a server with these settings."""
    plugin = MarshmallowPlugin(schema_name_resolver=_schema_name)
    spec = APISpec(
        title="Workers telemetry service",
        version=__version__,
        openapi_version=OPENAPI_VERSION,
        plugins=[plugin],
        info={"description": _DESCRIPTION},
    )
    plugin.converter.add_attribute_function(_custom_field_properties)
    plugin.converter.add_attribute_function(_optional_takes_null)
    for custom, kind in (
        (schemas.Number, "number"),
        (schemas.Boolean, "boolean"),
        (schemas.MachineStats, "object"),
    ):
        plugin.map_to_openapi_type(custom, kind, None)

    cookie = {"type": "apiKey", "in": "cookie", "name": settings.token_cookie, "description": "the web UI's token"}
    for name, scheme in {**SECURITY_SCHEMES, "cookie": cookie}.items():
        spec.components.security_scheme(name, scheme)
    spec.components.schema("Meta", schema=responses.Meta)
    for data in {*responses.DATA.values()}:
        spec.components.schema(data.__name__, schema=data)
    requests = {name: request for name, (request, _) in OPERATIONS.items()}
    requests["workers.status_report"] = limits.report_schema(settings)
    for request in requests.values():
        if _request_name(request) not in spec.components.schemas:
            spec.components.schema(_request_name(request), schema=request)
    _read_limits(spec, settings)
    retry_after = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}}
    for status, description in _error_answers().items():
        spec.components.response(
            f"Error{status}",
            {
                "description": description,
                "content": {"application/json": {"schema": _envelope("Empty", status)}},
                **({"headers": {"Retry-After": retry_after}} if status in (429, 503) else {}),
            },
        )
    for endpoint, (_, summary) in OPERATIONS.items():
        request = _request_name(requests[endpoint])
        for versioned in (False, True):
            spec.path(
                path=f"/v{{version}}/{endpoint}" if versioned else f"/{endpoint}",
                operations={method: _operation(endpoint, request, summary, method, versioned) for method in METHODS},
                parameters=[_version_parameter(getattr(ENDPOINTS[endpoint], "min_version", None))] if versioned else None,
            )
    return spec.to_dict()
