"""`python -m server import FILE`: a history of status reports stored as the API stores them.

FILE (or `-`, standard input) is NDJSON: one `workers.status_report` body per line, with
the "company" (id or name) it belongs to. Every line is validated first, by the schema the
endpoint loads reports with (the settings' per-report limits included): with one invalid
line nothing is stored. Then each report becomes a `Report` as in the endpoint, but one
that leaves its worker's registration alone (history is not liveness), and goes through
the batching writer, thousands in flight so that it stores them in large batches.
"""

import asyncio
import contextlib
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import asyncpg
import orjson

from . import errors, limits, schemas
from .config import Settings
from .errors import ApiError
from .storage import db, tenants
from .storage.writer import Report, ReportWriter

BATCH_SIZE = 2_000  # reports per statement: the writer's batches
IN_FLIGHT = 3 * BATCH_SIZE  # handed to the writer and not yet stored: a batch queued while two are stored
ANSWER_TIMEOUT = 600.0  # seconds a report may wait in the writer's queue
RETRY_SECONDS = 1.0  # while the database is unavailable (the writer answers 503), each report is tried again ...
RETRIES = 120  # ... this many times
PROGRESS_SECONDS = 5.0
PROBLEMS_SHOWN = 10
IMPORT_USER = "import"  # a report's user_id when its company has no user (it only ever names a registration's user)

_FIRST_USER = "SELECT id FROM users WHERE company = $1 ORDER BY name, id LIMIT 1"


def line_schema(settings: Settings) -> schemas.StatusReportRequest:
    """The endpoint's status report schema (with the settings' limits), plus the line's company."""

    class ImportedReport(type(limits.report_schema(settings))):
        company = schemas.Text(required=True, min_length=1)

    return ImportedReport()


def parse(line: bytes, schema: schemas.StatusReportRequest) -> dict:
    """A line loaded by `schema`; ValueError naming the field and what is wrong with it."""
    try:
        body = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error}") from None
    if type(body) is not dict:
        raise ValueError("not a JSON object")
    try:
        return schemas.load(schema, body)
    except ApiError as error:
        raise ValueError(error.message) from None


@dataclass
class Survey:
    """What the validation pass found."""

    reports: int = 0
    first: float = math.inf  # the earliest report's time (epoch seconds)
    last: float = -math.inf
    companies: set[str] = field(default_factory=set)
    invalid: int = 0
    problems: list[str] = field(default_factory=list)  # "LINE N: ...", the first PROBLEMS_SHOWN


def _report_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its end) of every line that is not blank."""
    with open(path, "rb", buffering=1 << 20) as lines:
        for number, line in enumerate(lines, 1):
            line = line.rstrip(b"\r\n")
            if line and not line.isspace():
                yield number, line


def survey(path: str, schema: schemas.StatusReportRequest) -> Survey:
    found = Survey()
    for number, line in _report_lines(path):
        try:
            body = parse(line, schema)
        except ValueError as problem:
            found.invalid += 1
            if len(found.problems) < PROBLEMS_SHOWN:
                found.problems.append(f"LINE {number}: {problem}")
            continue
        found.reports += 1
        found.companies.add(body["company"])
        found.first = min(found.first, body["timestamp"])
        found.last = max(found.last, body["timestamp"])
    return found


async def resolve_companies(conn: asyncpg.Connection, companies: set[str]) -> dict[str, tuple[str, str]]:
    """Each company (id or name) -> (its id, the user its reports name). A company not found
    is created with the value as its id and name, as a company of an apiserver token is."""
    resolved = {}
    for value in sorted(companies):
        company = await tenants.find_company(conn, value)
        if company is None:
            await tenants.ensure_company(conn, value, value)
            company = await tenants.find_company(conn, value)
            print(f"company {value} created", file=sys.stderr)
        user = await conn.fetchval(_FIRST_USER, company["id"])
        resolved[value] = (company["id"], user or IMPORT_USER)
    return resolved


def to_report(body: dict, company: str, user: str, settings: Settings) -> Report:
    """As workers.status_report makes it, but without touching the worker's registration."""
    return Report(
        company=company,
        worker=body["worker"],
        user_id=user,
        ip=None,
        timeout=settings.default_timeout,
        time=body["timestamp"],
        task=body.get("task"),
        queue=body.get("queue"),
        queues=body.get("queues"),
        tags=body.get("tags"),
        system_tags=body.get("system_tags"),
        metrics=body.get("machine_stats", {}),
        register=False,
    )


async def _write(writer: ReportWriter, report: Report) -> None:
    for _ in range(RETRIES):
        try:
            return await writer.write(report)
        except ApiError as error:
            if (error.result_code, error.result_subcode) != errors.DATABASE_UNAVAILABLE:
                raise
            await asyncio.sleep(RETRY_SECONDS)
    raise RuntimeError(f"the database stayed unavailable for {RETRIES * RETRY_SECONDS:g} s")


async def store(
    path: str, schema: schemas.StatusReportRequest, companies: dict[str, tuple[str, str]], settings: Settings, total: int
) -> int:
    """Store every report of the file (validated already); how many were stored."""
    writer = ReportWriter(
        settings.db_dsn, connections=settings.writer_connections, batch_size=BATCH_SIZE,
        queue_limit=IN_FLIGHT, answer_timeout=ANSWER_TIMEOUT,
    )  # fmt: skip
    await writer.start()
    slots = asyncio.Semaphore(IN_FLIGHT)
    writes: set[asyncio.Task] = set()
    failures: list[BaseException] = []
    stored = 0

    def written(write: asyncio.Task) -> None:
        nonlocal stored
        writes.discard(write)
        slots.release()
        if write.cancelled():
            failures.append(asyncio.CancelledError())
        elif write.exception() is not None:
            failures.append(write.exception())
        else:
            stored += 1

    began = last_progress = time.monotonic()
    try:
        for handed, (number, line) in enumerate(_report_lines(path), 1):
            try:
                body = parse(line, schema)
            except ValueError as problem:
                raise RuntimeError(f"LINE {number} changed since it was validated: {problem}") from None
            company, user = companies[body["company"]]
            await slots.acquire()
            if failures:
                break
            write = asyncio.create_task(_write(writer, to_report(body, company, user, settings)))
            writes.add(write)
            write.add_done_callback(written)
            if handed % BATCH_SIZE == 0:
                await asyncio.sleep(0)  # let the writer take a batch while the next one is read
                if time.monotonic() - last_progress >= PROGRESS_SECONDS:
                    last_progress = time.monotonic()
                    rate = stored / (last_progress - began)
                    print(f"{stored:,} of {total:,} reports stored ({rate:,.0f} reports/s)", file=sys.stderr,
                          flush=True)
    finally:
        await asyncio.gather(*writes, return_exceptions=True)
        await writer.close()
    if failures:
        raise RuntimeError(f"{failures[0]!r}; {stored:,} reports were stored before it")
    return stored


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def _readable(source: str) -> Iterator[str]:
    """The path of `source`, or of standard input (`-`) spooled to a temporary file: it is read twice."""
    if source != "-":
        yield source
        return
    with tempfile.NamedTemporaryFile(prefix="workers-import-", suffix=".ndjson") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
        spool.flush()
        yield spool.name


async def import_reports(settings: Settings, args) -> int:
    """The `import` command."""
    schema = line_schema(settings)
    began = time.monotonic()
    try:
        with _readable(args.file) as path:
            found = survey(path, schema)
            validated = time.monotonic()
            if found.invalid:
                print("\n".join(found.problems), file=sys.stderr)
                more = f" (the first {len(found.problems)} shown)" if found.invalid > len(found.problems) else ""
                print(f"{found.invalid:,} invalid line(s){more}; nothing stored", file=sys.stderr)
                return 1
            if not found.reports:
                print(f"no status reports in {args.file}", file=sys.stderr)
                return 0
            print(f"{found.reports:,} reports validated in {validated - began:,.1f} s", file=sys.stderr, flush=True)
            conn = await asyncpg.connect(settings.db_dsn)
            try:
                await db.migrate(conn)
                companies = await resolve_companies(conn, found.companies)
            finally:
                await conn.close()
            stored = await store(path, schema, companies, settings, found.reports)
    except (OSError, RuntimeError) as error:
        print(f"import: {error}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - began
    print(f"{stored:,} reports stored, {_utc(found.first)} to {_utc(found.last)} UTC, in {elapsed:,.1f} s: "
          f"{stored / elapsed:,.0f} reports/s (validating {validated - began:,.1f} s, "
          f"storing {elapsed - (validated - began):,.1f} s)")  # fmt: skip
    return 0


def add_command(commands) -> None:
    command = commands.add_parser(
        "import", help="store a history of status reports (NDJSON) as the API does, without registering workers"
    )
    command.add_argument(
        "file", metavar="FILE", help="NDJSON, one status report with its company per line; - for standard input"
    )
    command.set_defaults(action=import_reports)
