"""SQL of a streaming replica's state: how far behind the primary its reads are."""

# Seconds the replica's data is behind its primary (0: it has replayed everything the primary
# sent it; NULL: unknown, it never replayed a transaction). Not the age of the last replayed
# transaction alone: on an idle primary that grows while nothing is pending. So: a server
# that is not in recovery is current (a promoted replica, or the primary itself); a replica
# with a WAL receiver that has replayed all it received is current; otherwise (replay behind
# or paused with WAL waiting, or no receiver: cut off from the primary) its data is as old as
# the last transaction it replayed.
_LAG = """
SELECT CASE
    WHEN NOT pg_is_in_recovery() THEN 0
    WHEN EXISTS (SELECT FROM pg_stat_wal_receiver) AND pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn() THEN 0
    ELSE greatest(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()), 0)
END::float8
"""


async def lag(conn, timeout: float) -> float | None:
    """Seconds the replica's data is behind, or None when it cannot tell."""
    return await conn.fetchval(_LAG, timeout=timeout)
