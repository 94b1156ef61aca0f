"""Chart reads served by streaming replicas (WORKERS_READ_DSN), the primary when none can.

A read marked `on_replica` (the charts, the metric keys) goes to a replica whose data is at
most WORKERS_READ_MAX_LAG_SECONDS behind the primary, the replicas taken in turn; everything
else stays on the primary: registrations, and whatever a caller must see right after its own
write. When no replica can serve a read (down, too far behind, or the read cancelled by a
recovery conflict), the primary serves it and the cause is returned, for
`workers_replica_fallbacks_total`. A replica's lag is asked at most every CHECK_SECONDS per
process, so a read seldom pays for the check.

Each process that reads holds its own `Replicas`: every reader process, and the server
process (its light reads, and heavy reads when WORKERS_READ_PROCESSES=0).
"""

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import asyncpg

from .storage import db, standby
from .storage.db import UNAVAILABLE_ERRORS

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0  # a replica's lag is asked again after this long
DOWN_RETRY_SECONDS = 5.0  # a replica found down is tried again after this long
CONNECT_SECONDS = 2.0  # connecting to a replica, or asking its lag, gives up after this

# Why the primary served a read meant for a replica.
DOWN, LAG, CONFLICT = "down", "lag", "conflict"
FALLBACK_CAUSES = (DOWN, LAG, CONFLICT)

# A hot standby cancels a read whose rows replay must remove or lock (SQLSTATE 40001, or
# 40P01 for a buffer-pin deadlock): the primary answers it instead.
RECOVERY_CONFLICTS = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)

T = TypeVar("T")


def on_replica(read):
    """Mark a read as one a replica may serve: a chart of what was reported, which nothing
    the caller just wrote must show in at once."""
    read.on_replica = True
    return read


def served_by_replica(read) -> bool:
    return getattr(read, "on_replica", False)


def dsns(setting: str) -> list[str]:
    """WORKERS_READ_DSN's comma-separated DSNs."""
    return [dsn.strip() for dsn in setting.split(",") if dsn.strip()]


def label(dsn: str) -> str:
    """A replica's name in logs and metrics: host:port/database, without credentials."""
    parts = urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


@dataclass
class Replica:
    dsn: str
    name: str
    pool: asyncpg.Pool | None = None
    up: bool = False
    lag: float | None = None  # seconds behind the primary, as last asked; None: unknown
    checked: float = -math.inf  # time.monotonic() of the last check
    checking: asyncio.Lock = field(default_factory=asyncio.Lock)


class Replicas:
    def __init__(self, replica_dsns: list[str], *, max_lag: float, statement_timeout: float, pool_size: int = 2):
        self._replicas = [Replica(dsn, label(dsn)) for dsn in replica_dsns]
        self._max_lag = max_lag
        self._statement_timeout = statement_timeout
        self._pool_size = pool_size
        self._next = 0

    def __bool__(self) -> bool:
        return bool(self._replicas)

    async def run(self, read_on: Callable[[asyncpg.Pool], Awaitable[T]], primary: asyncpg.Pool) -> tuple[T, str | None]:
        """`read_on(pool)`'s answer, from a replica when one can serve it, and None; else from
        the primary, and the cause (FALLBACK_CAUSES)."""
        replica, cause = await self._choose()
        if replica is None:
            return await read_on(primary), cause
        try:
            return await read_on(replica.pool), None
        except RECOVERY_CONFLICTS as error:
            log.info("replica %s cancelled a read (%s): read from the primary", replica.name, error)
            return await read_on(primary), CONFLICT
        except UNAVAILABLE_ERRORS as error:
            self._down(replica, error)
            return await read_on(primary), DOWN

    def health(self) -> dict[str, tuple[bool, float | None]]:
        """Each replica's state as last checked: up, and its lag in seconds (None: not known)."""
        return {replica.name: (replica.up, replica.lag) for replica in self._replicas}

    async def close(self) -> None:
        for replica in self._replicas:
            if replica.pool is not None:
                replica.pool.terminate()
                replica.pool = None

    async def _choose(self) -> tuple[Replica | None, str | None]:
        """The next replica (in turn) that is up and close enough behind, or None and why."""
        causes = set()
        for offset in range(len(self._replicas)):
            index = (self._next + offset) % len(self._replicas)
            replica = self._replicas[index]
            await self._check(replica)
            if replica.up and replica.lag is not None and replica.lag <= self._max_lag:
                self._next = (index + 1) % len(self._replicas)
                return replica, None
            causes.add(LAG if replica.up else DOWN)
        return None, LAG if LAG in causes else DOWN

    async def _check(self, replica: Replica) -> None:
        """Ask the replica its lag, unless asked lately (or found down lately)."""
        if time.monotonic() - replica.checked < (CHECK_SECONDS if replica.up else DOWN_RETRY_SECONDS):
            return
        async with replica.checking:  # a concurrent read waits for this check rather than making its own
            if time.monotonic() - replica.checked < (CHECK_SECONDS if replica.up else DOWN_RETRY_SECONDS):
                return
            try:
                if replica.pool is None:
                    replica.pool = await db.create_pool(
                        replica.dsn, statement_timeout=self._statement_timeout, connect_timeout=0,
                        attempt_timeout=CONNECT_SECONDS, max_size=self._pool_size,
                    )  # fmt: skip
                async with replica.pool.acquire(timeout=CONNECT_SECONDS) as conn:
                    lag = await standby.lag(conn, CONNECT_SECONDS)
            except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as error:
                self._down(replica, error)
            else:
                if not replica.up:
                    log.info("replica %s is up, %s s behind the primary", replica.name, lag)
                replica.up, replica.lag = True, lag
            replica.checked = time.monotonic()

    def _down(self, replica: Replica, error: BaseException) -> None:
        if replica.up or replica.checked == -math.inf:
            log.warning("replica %s is down (%r): reads go to the primary", replica.name, error)
        replica.up, replica.lag = False, None
        replica.checked = time.monotonic()
        if replica.pool is not None:
            replica.pool.terminate()
            replica.pool = None


def from_settings(settings, pool_size: int = 2) -> Replicas | None:
    """The replicas of WORKERS_READ_DSN, or None when it names none."""
    replica_dsns = dsns(settings.read_dsn)
    if not replica_dsns:
        return None
    return Replicas(
        replica_dsns, max_lag=settings.read_max_lag_seconds, statement_timeout=settings.read_timeout_seconds,
        pool_size=pool_size,
    )  # fmt: skip
