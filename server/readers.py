"""Heavy reads (get_stats, get_activity_report, get_all, get_queues) computed in reader processes.

A fleet chart is tens of milliseconds of decoding and aggregating, and get_all of thousands
of workers as long building its answer: done in the server process, the event loop (or a
thread holding the interpreter) is busy meanwhile and every status report waits. So each
server process hands these reads to reader processes of its own
(WORKERS_READ_PROCESSES, default 1), started at a lower CPU priority (WORKERS_READ_NICE)
as fresh interpreters (multiprocessing's spawn: nothing of the server process's event loop
or threads is copied; the first read of a process waits for its reader to start, about a
second). A reader leaves when its server process is gone, however it ended. A reader runs
one read at a time on a connection of its own and sends back the answer's `data`
serialized; the server process puts those bytes into the envelope as they are
(orjson.Fragment). Which read runs next is admission.py's
choice. With WORKERS_READ_PROCESSES=0 the reads run in the server process (admitted the
same way, one at a time).

A read is a module-level coroutine function `read(pool, settings, company, body) -> dict`
(server/endpoints/workers.py), passed to the reader by reference. One marked
`replicas.on_replica` is given a replica's pool when one can serve it (server/replicas.py);
the reader tells the server process whether the primary served it instead, and why, for the
metrics.
"""

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import asyncpg
import orjson

from . import errors, metrics as metrics_, replicas, serving
from .admission import ReadAdmission
from .config import Settings
from .errors import ApiError
from .storage import db
from .storage.db import UNAVAILABLE_ERRORS

log = logging.getLogger(__name__)

Read = Callable[[asyncpg.Pool, Settings, str, dict], Awaitable[dict]]
SERIALIZE = orjson.OPT_SERIALIZE_NUMPY

OK, FAILED, UNAVAILABLE = "ok", "failed", "unavailable"
PARENT_CHECK_SECONDS = 1.0


class Readers:
    """The reader processes of one server process, and the admission in front of them."""

    def __init__(self, settings: Settings, metrics=None, replicas_here: replicas.Replicas | None = None):
        """`replicas_here`: the server process's replicas, for reads made here (no reader processes)."""
        self._settings = settings
        self._metrics = metrics
        self._replicas = replicas_here
        self.admission = ReadAdmission(
            max(1, settings.read_processes), settings.read_queue_seconds, settings.read_queue_per_company, metrics
        )
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    async def run(self, read: Read, pool: asyncpg.Pool, company: str, body: dict):
        """The `data` of the answer: serialized by a reader (an orjson.Fragment), or made here
        when there are no reader processes."""
        async with self.admission.admitted(company):
            if self._settings.read_processes == 0:
                answer, route = await _routed(self._replicas, read, pool, self._settings, company, body)
                self._observe(route)
                return answer
            return orjson.Fragment(await self._in_reader(read, company, body))

    def _observe(self, route: tuple | None) -> None:
        if route is not None:
            metrics_.observe_replicas(self._metrics, *route)

    async def _in_reader(self, read: Read, company: str, body: dict) -> bytes:
        executor = self._executor or self._start()
        try:
            outcome, *details = await asyncio.wrap_future(executor.submit(_read_here, read, company, body))
        except concurrent.futures.process.BrokenProcessPool:
            # A reader died (killed, out of memory): the next read starts new ones.
            if self._executor is executor:
                self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)
            log.error("a reader process died during %s; starting new ones", read.__name__)
            raise ApiError(errors.READS_BUSY, "the reader process stopped during this read; retry later", retry_after=1)
        if outcome == OK:
            data, route = details
            self._observe(route)
            return data
        if outcome == UNAVAILABLE:
            raise ConnectionError(f"database unavailable to the reader: {details[0]}")
        code, message, retry_after = details
        raise ApiError(tuple(code), message, retry_after=retry_after)

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        self._executor = concurrent.futures.ProcessPoolExecutor(
            self._settings.read_processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_reader,
            initargs=(self._settings, os.getpid()),
        )
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


# ------------------------------------------------------------------------- in a reader process


@dataclass
class _Reader:
    settings: Settings
    loop: asyncio.AbstractEventLoop
    pool: asyncpg.Pool | None = None
    replicas_here: replicas.Replicas | None = None  # its own (server/replicas.py)


_reader: _Reader | None = None


def _start_reader(settings: Settings, server_pid: int) -> None:
    global _reader
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops its readers
    os.nice(settings.read_nice)
    threading.Thread(target=_leave_with, args=(server_pid,), name="leave-with-server", daemon=True).start()
    _reader = _Reader(settings, serving.new_event_loop(), replicas_here=replicas.from_settings(settings))


def _leave_with(server_pid: int) -> None:
    """Exit once the server process is gone (killed, it had no time to stop its readers)."""
    while os.getppid() == server_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


def _read_here(read: Read, company: str, body: dict) -> tuple:
    """(OK, the data serialized, route: see `_routed`), (FAILED, code, message, retry_after)
    for an error the client is told, or (UNAVAILABLE, why): plain tuples, whatever the
    exception's class."""
    reader = _reader
    try:
        return OK, *reader.loop.run_until_complete(_serialized(reader, read, company, body))
    except ApiError as error:
        return FAILED, (error.result_code, error.result_subcode), error.message, error.retry_after
    except UNAVAILABLE_ERRORS as error:
        if reader.pool is not None:
            reader.pool.terminate()
            reader.pool = None
        return UNAVAILABLE, repr(error)


async def _serialized(reader: _Reader, read: Read, company: str, body: dict) -> tuple[bytes, tuple | None]:
    settings = reader.settings
    if reader.pool is None:
        reader.pool = await db.create_pool(
            settings.db_dsn, statement_timeout=settings.read_timeout_seconds, connect_timeout=5, max_size=2
        )
    answer, route = await _routed(reader.replicas_here, read, reader.pool, settings, company, body)
    return orjson.dumps(answer, option=SERIALIZE), route


async def _routed(
    replicas_here: replicas.Replicas | None, read: Read, primary: asyncpg.Pool, settings: Settings, company: str, body: dict
) -> tuple[dict, tuple | None]:
    """`read`'s answer, from a replica when it may and one can serve it; and its route: None
    for a read of the primary's, else (the fallback cause or None, the replicas' health)."""
    if replicas_here is None or not replicas.served_by_replica(read):
        return await read(primary, settings, company, body), None
    answer, cause = await replicas_here.run(lambda pool: read(pool, settings, company, body), primary)
    return answer, (cause, replicas_here.health())
