"""Several server processes on one PostgreSQL database (--cluster): the round lock across processes and the
aggregator's lease.

* ClusterLock is RoundManager.lock when the server runs with --cluster: a re-entrant thread lock whose
  outermost holder also holds a PostgreSQL session advisory lock, on a connection of its own. Every
  check-then-write of the round state machine (admission against the round's cap, an upload against its
  goal, a deadline, a close) is then serialised across all processes exactly as it is across the threads of
  one; reads inside it run on autocommit connections and see every commit the previous holder made.
* Leadership is the aggregator's lease: the process holding another session advisory lock runs the round
  worker's duties (deadlines, opening rounds, aggregation, start-up recovery). PostgreSQL releases a session
  lock when its connection ends, so a SIGKILLed aggregator's lease passes to the next process that asks (its
  round worker asks every tick), which then aggregates whatever round was left "aggregating", as a restarted
  single server does.

Both locks live on dedicated connections, never on the reader or writer connections of server.db.Db, so a
statement there can never release or hold one by accident.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from server.db import Db
from server.db_dialect import APPLICATION_NAME

log = logging.getLogger("server.cluster")

ROUND_LOCK_KEY = 0x666B5F726E64  # "fk_rnd": RoundManager.lock across processes
LEADER_LOCK_KEY = 0x666B5F6C6472  # "fk_ldr": the aggregator's lease
LEASE_CHECK_S = 1.0  # how often a leader checks that its lease's connection is still alive


def other_server_processes(db: Db) -> int:
    """Server processes other than this one with a session on the database (db_dialect.APPLICATION_NAME)."""
    return int(db.scalar("SELECT COUNT(DISTINCT application_name) FROM pg_stat_activity WHERE datname = current_database()"
                         " AND application_name LIKE 'fk-server %' AND application_name <> ?", (APPLICATION_NAME,)))


class ClusterLock:
    """A re-entrant lock held across server processes (see the module doc). Same use as threading.RLock."""

    def __init__(self, db: Db) -> None:
        self._db = db
        self._local = threading.RLock()
        self._depth = 0
        self._conn: Any = None

    def _connection(self) -> Any:
        if self._conn is None or not self._db.dialect.alive(self._conn):
            self._conn = self._db.dialect.connect()
        return self._conn

    def acquire(self) -> bool:
        self._local.acquire()
        if self._depth == 0:
            try:
                self._connection().execute(f"SELECT pg_advisory_lock({ROUND_LOCK_KEY})")
            except BaseException:
                self._local.release()
                raise
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._db.dialect.alive(self._conn):
                self._conn.execute(f"SELECT pg_advisory_unlock({ROUND_LOCK_KEY})")
            # (a broken connection has already released it: PostgreSQL ends the session's locks with it)
        finally:
            self._local.release()

    def __enter__(self) -> "ClusterLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def close(self) -> None:
        with self._local:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class Leadership:
    """The aggregator's lease: `held()` is True while this process holds it, and takes it when it is free."""

    def __init__(self, db: Db) -> None:
        self._db = db
        self._conn: Any = None
        self._held = False
        self._checked = 0.0

    def held(self) -> bool:
        """Keep or try to take the lease (a query at most every LEASE_CHECK_S while held, each call while not)."""
        now = time.monotonic()
        if self._held:
            if now - self._checked < LEASE_CHECK_S:
                return True
            self._checked = now
            try:
                self._conn.execute("SELECT 1")
                return True
            except Exception as exc:  # the session ended, and with it the lease
                log.warning("lost the aggregator lease: %s", " ".join(str(exc).split()))
                self._held = False
                self._close()
        try:
            if self._conn is None or not self._db.dialect.alive(self._conn):
                self._conn = self._db.dialect.connect()
            row = self._conn.execute(f"SELECT pg_try_advisory_lock({LEADER_LOCK_KEY}) AS got").fetchone()
        except Exception as exc:
            log.warning("cannot ask for the aggregator lease: %s", " ".join(str(exc).split()))
            self._close()
            return False
        self._held, self._checked = bool(row["got"]), now
        if self._held:
            log.info("this process is the aggregator now")
        return self._held

    @property
    def holds(self) -> bool:
        """Whether this process held the lease at its last check (no query)."""
        return self._held

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def release(self) -> None:
        """Give the lease up (at shutdown): closing the session ends it."""
        self._held = False
        self._close()


__all__ = ["ClusterLock", "Leadership", "ROUND_LOCK_KEY", "LEADER_LOCK_KEY", "other_server_processes"]
