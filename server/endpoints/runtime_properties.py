"""`workers.set_runtime_properties` and `workers.get_runtime_properties` (API 2.10 on), as
ClearML's server answers them: string properties of a worker, kept per company, calling user
and worker id, each until changed, removed (expiry 0) or expired.

A call's entries are taken in order, as the reference takes them one by one: the last entry
of a key decides what is stored, an entry that cannot be stored (no value, a negative expiry)
is an entry of `errors` and the others are stored. Everything the call stores is stored in
one transaction.
"""

from dataclasses import dataclass, field

from .. import errors, limits, schemas
from ..errors import ApiError
from ..keys import POOL
from ..protocol import Call, since
from ..storage import runtime_properties

MIN_VERSION = "2.10"


@dataclass
class Changes:
    """What one set_runtime_properties call stores, removes, and answers."""

    stored: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # key -> (value, expiry)
    removed_keys: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def stored_key(company: str, user: str, worker: str, key: str) -> str:
    """The key the reference server stores a property under, which its answer lists."""
    return f"worker_{company}_{user}_{worker}_prop_{key}"


def changes(company: str, user: str, worker: str, entries: list[dict]) -> Changes:
    final: dict[str, tuple[str, int | None] | None] = {}  # key -> what is stored, None: removed
    result = Changes()
    for index, entry in enumerate(entries):
        key, expiry = entry["key"], entry.get("expiry")
        where = f"runtime_properties.{index} ({key!r})"
        if expiry == 0:
            final[key] = None
            result.removed.append(stored_key(company, user, worker, key))
        elif expiry is not None and expiry < 0:
            result.errors.append(f"{where}: expiry must not be negative (0 removes the property); not stored")
        elif "value" not in entry:
            result.errors.append(f"{where}: value is missing (needed unless expiry is 0); not stored")
        else:
            final[key] = (entry["value"], expiry)
            result.added.append(stored_key(company, user, worker, key))
    result.stored = {key: change for key, change in final.items() if change is not None}
    result.removed_keys = [key for key, change in final.items() if change is None]
    return result


@since(MIN_VERSION)
async def set_properties(call: Call) -> dict:
    body = schemas.load(schemas.set_runtime_properties_request, call.body)
    settings = call.settings
    entries = body["runtime_properties"]
    limits.check_count(
        len(entries), settings.max_runtime_properties_per_call, "runtime_properties",
        "WORKERS_MAX_RUNTIME_PROPERTIES_PER_CALL",
    )
    company, user, worker = call.identity.company, call.identity.user, body["worker"]
    result = changes(company, user, worker, entries)
    async with call.request.app[POOL].acquire() as conn, conn.transaction():
        if result.removed_keys:
            await runtime_properties.remove(conn, company, user, worker, result.removed_keys)
        if result.stored:
            await runtime_properties.set_many(conn, company, user, worker, result.stored)
            kept = await runtime_properties.count(conn, company, user, worker)
            limit = settings.max_runtime_properties_per_worker
            if limit and kept > limit:  # raised inside the transaction: nothing is stored
                raise ApiError(
                    errors.INVALID_FIELD_VALUES,
                    f"Invalid field values: runtime_properties would give worker {worker!r} {kept} properties, "
                    f"more than the limit of {limit} (WORKERS_MAX_RUNTIME_PROPERTIES_PER_WORKER)",
                )
    return {"added": result.added, "removed": result.removed, "errors": result.errors}


@since(MIN_VERSION)
async def get_properties(call: Call) -> dict:
    body = schemas.load(schemas.get_runtime_properties_request, call.body)
    rows = await runtime_properties.get(call.request.app[POOL], call.identity.company, call.identity.user, body["worker"])
    return {"runtime_properties": [{"key": row["key"], "value": row["value"], "expiry": row["expiry"]} for row in rows]}


ENDPOINTS = {
    "workers.set_runtime_properties": set_properties,
    "workers.get_runtime_properties": get_properties,
}
