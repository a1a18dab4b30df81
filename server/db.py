"""The server's store: schema and queries on SQLite (embedded, the default) or PostgreSQL (--database URL).

Every state change is one `with db.write():` transaction on the single writer connection, serialised by a
re-entrant lock; a commit is durable when `write()` returns (SQLite: BEGIN IMMEDIATE and synchronous=FULL;
PostgreSQL: BEGIN ... COMMIT with synchronous_commit on), which is what makes "durable before the 2xx" hold.
Reads use one connection per thread and never wait for the writer (SQLite's WAL, PostgreSQL's MVCC); a thread
inside a write transaction reads through the writer so it sees its own uncommitted rows.

Queries are written once in SQLite's spelling; server/db_dialect.py opens the engine's connections and
rewrites the text for PostgreSQL. The tables hold counts, hashes, file names and parameters: never the
content of an update (the blobs stay in the data dir).
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from server.db_cache import RowCache
from server.db_dialect import StoreUnavailable, open_dialect
from server.round import Round

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id          TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    last_seen   REAL
);
-- revoked / banned devices (server/auth.py); a device not listed here is in good standing. Its own table
-- (CREATE IF NOT EXISTS) so a data dir from before it opens unchanged.
CREATE TABLE IF NOT EXISTS device_blocks (
    device_id   TEXT PRIMARY KEY,
    state       TEXT NOT NULL,      -- revoked: token refused (401), may re-register | banned: token refused (403)
    reason      TEXT,
    at          REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    version         INTEGER PRIMARY KEY,
    created_at      REAL NOT NULL,
    source          TEXT NOT NULL,      -- init | round | push | promotion | rollback
    file            TEXT NOT NULL,      -- relative to the data dir
    sha256          TEXT NOT NULL,      -- of the wire blob (the ETag)
    size            INTEGER NOT NULL,
    parent_version  INTEGER,            -- base of a round, candidate promoted, version rolled back to
    round_id        INTEGER,
    candidate_state TEXT,               -- pushed models: pending | promoted | rejected | discarded; trained
                                        -- versions under release gating: pending | released | held_back | superseded
    was_global      INTEGER NOT NULL DEFAULT 0,  -- 1 once it has served as the global model
    opt_state_file  TEXT,               -- server optimizer state after producing this version
    note            TEXT,
    info            TEXT                -- JSON: evaluation results, push metadata
);
CREATE TABLE IF NOT EXISTS rounds (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    kind              TEXT NOT NULL,    -- train | eval
    state             TEXT NOT NULL,    -- open | aggregating | closed | abandoned
    base_version      INTEGER NOT NULL,
    candidate_version INTEGER,
    created_at        REAL NOT NULL,
    deadline          REAL,             -- set by the first admission
    closed_at         REAL,
    params            TEXT NOT NULL,    -- JSON, frozen at creation
    seed              INTEGER NOT NULL,
    result_version    INTEGER,
    noise_multiplier  REAL,
    sampling_prob     REAL,
    population        INTEGER,
    epsilon           REAL,
    delta             REAL,
    outcome           TEXT              -- JSON: reason, counts, metrics
);
CREATE INDEX IF NOT EXISTS rounds_state ON rounds(state, kind);
CREATE TABLE IF NOT EXISTS admissions (
    round_id    INTEGER NOT NULL,
    device_id   TEXT NOT NULL,
    admitted_at REAL NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS updates (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    round_id       INTEGER NOT NULL,
    device_id      TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    file           TEXT,               -- relative to the data dir; NULL once deleted
    num_examples   INTEGER NOT NULL,
    weight         REAL NOT NULL,
    norm           REAL NOT NULL,
    dtype          TEXT NOT NULL,
    metrics        TEXT NOT NULL,
    received_at    REAL NOT NULL,
    UNIQUE (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS eval_reports (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    round_id       INTEGER NOT NULL,
    device_id      TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    report         TEXT NOT NULL,
    received_at    REAL NOT NULL,
    UNIQUE (round_id, device_id)
);
"""


def _dict(row: Any) -> dict[str, Any] | None:
    return dict(row) if row is not None else None


class Db:
    """The store. `target`: a SQLite file path, or a postgresql:// URL (server/db_dialect.py). `shared`: other
    server processes write to the same database (--cluster, server/cluster.py): no row is cached."""

    def __init__(self, target: str | Path, shared: bool = False) -> None:
        self.dialect = open_dialect(target)
        self.shared = shared
        self.path: Path | None = getattr(self.dialect, "path", None)  # the SQLite file; None on PostgreSQL
        self._lock = threading.RLock()
        self._depth = 0
        self._owner: int | None = None
        self._local = threading.local()
        self._readers: list[tuple[threading.Thread, Any]] = []  # (thread, its connection): closed with the db
        self._readers_lock = threading.Lock()
        self._caches: list[RowCache] = []
        self._rounds = self.cache()
        self._writer = self.dialect.connect(writer=True)
        try:
            self.dialect.install(self._writer, SCHEMA)
            with self.write():
                if self.get_meta("schema_version") is None:
                    self.set_meta("schema_version", SCHEMA_VERSION)
            found = self.get_meta("schema_version")
        except Exception:
            self.close()
            raise
        if found != SCHEMA_VERSION:
            self.close()
            raise StoreUnavailable(f"{self.dialect.describe()}: schema version {found}, this server knows {SCHEMA_VERSION}")

    @property
    def engine(self) -> str:
        """"sqlite" or "postgresql"."""
        return self.dialect.name

    def close(self) -> None:
        with self._lock:
            self._writer.close()
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for _, conn in readers:
            conn.close()

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
        """One transaction; nested calls join the outer one. Committed (and durable) on exit."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                if not self.dialect.alive(self._writer):  # e.g. PostgreSQL restarted: a fresh session
                    self._writer = self.dialect.connect(writer=True)
                self.dialect.begin(self._writer)
                self._owner = threading.get_ident()
            self._depth += 1
            try:
                yield self._writer
            except BaseException:
                self._depth -= 1
                if outer:
                    self._owner = None
                    try:
                        if self.dialect.alive(self._writer):
                            self.dialect.rollback(self._writer)
                    finally:
                        self._settle()
                raise
            self._depth -= 1
            if outer:
                self._owner = None
                try:
                    self.dialect.commit(self._writer)
                finally:
                    self._settle()

    def cache(self) -> RowCache:
        """A RowCache settled at the end of every write transaction of this database."""
        c = RowCache(enabled=not self.shared)
        self._caches.append(c)
        return c

    def _settle(self) -> None:
        for c in self._caches:
            c.settle()

    def _reader(self) -> Any:
        if self._owner == threading.get_ident():
            return self._writer
        conn = getattr(self._local, "conn", None)
        if conn is None or not self.dialect.alive(conn):
            conn = self._local.conn = self.dialect.connect()
            self._track_reader(conn)
        return conn

    def _track_reader(self, conn: Any) -> None:
        """Remember the connection so close() closes it; close those of threads that have ended (a
        PostgreSQL connection is a server process: a pool's short-lived threads must not pile them up)."""
        with self._readers_lock:
            ended = [c for t, c in self._readers if not t.is_alive()]
            self._readers = [(t, c) for t, c in self._readers if t.is_alive()]
            self._readers.append((threading.current_thread(), conn))
        for c in ended:
            c.close()

    def _run(self, conn: Any, sql: str, args: tuple) -> Any:
        return conn.execute(self.dialect.sql(sql), self.dialect.params(tuple(args)))

    def _exec(self, sql: str, args: tuple = ()) -> Any:
        if self._owner != threading.get_ident():
            raise RuntimeError("writes must run inside db.write()")
        return self._run(self._writer, sql, args)

    def _insert(self, sql: str, args: tuple, key: str) -> int:
        """INSERT one row and return its generated `key` (RETURNING: SQLite >= 3.35 and PostgreSQL)."""
        rows = self._exec(f"{sql} RETURNING {key}", args).fetchall()  # fetch all: the statement is then done
        return int(rows[0][key])

    def execute(self, sql: str, args: tuple = ()) -> Any:
        """One statement of a service's own tables, inside the caller's `write()` transaction."""
        return self._exec(sql, args)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        """One statement for many rows, inside the caller's `write()` transaction."""
        if self._owner != threading.get_ident():
            raise RuntimeError("writes must run inside db.write()")
        if rows:
            self.dialect.executemany(self._writer, self.dialect.sql(sql), [self.dialect.params(tuple(r)) for r in rows])

    def install_schema(self, schema: str) -> None:
        """CREATE ... IF NOT EXISTS of a service's own tables (idempotent; outside any transaction)."""
        with self._lock:
            self.dialect.install(self._writer, schema)

    def one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        return _dict(self._run(self._reader(), sql, args).fetchone())

    def all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._run(self._reader(), sql, args).fetchall()]

    def scalar(self, sql: str, args: tuple = ()) -> Any:
        row = self.one(sql, args)
        return next(iter(row.values())) if row else None

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str, default: Any = None) -> Any:
        value = self.scalar("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(value) if value is not None else default

    def set_meta(self, key: str, value: Any) -> None:
        self._exec("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   (key, json.dumps(value)))

    # ------------------------------------------------------------------ devices
    def add_device(self, device_id: str, token_hash: str) -> None:
        self._exec("INSERT INTO devices(id, token_hash, created_at) VALUES (?, ?, ?)", (device_id, token_hash, time.time()))

    def device_by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        return self.one("SELECT id, created_at FROM devices WHERE token_hash = ?", (token_hash,))

    def count_devices(self) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM devices"))

    def touch_device(self, device_id: str, now: float) -> None:
        self._exec("UPDATE devices SET last_seen = ? WHERE id = ?", (now, device_id))

    def get_device(self, device_id: str) -> dict[str, Any] | None:
        """The device's row with its block state (None: in good standing), reason and when."""
        return self.one("SELECT d.id, d.created_at, d.last_seen, b.state, b.reason, b.at AS blocked_at FROM devices d"
                        " LEFT JOIN device_blocks b ON b.device_id = d.id WHERE d.id = ?", (device_id,))

    def set_device_block(self, device_id: str, state: str | None, reason: str | None = None) -> None:
        """Revoke or ban a device (state "revoked" / "banned"), or lift its block (None)."""
        if state is None:
            self._exec("DELETE FROM device_blocks WHERE device_id = ?", (device_id,))
        else:
            self._exec("INSERT INTO device_blocks(device_id, state, reason, at) VALUES (?, ?, ?, ?) ON CONFLICT(device_id)"
                       " DO UPDATE SET state = excluded.state, reason = excluded.reason, at = excluded.at",
                       (device_id, state, reason, time.time()))

    def device_block_state(self, device_id: str) -> str | None:
        """"revoked" | "banned" | None (in good standing)."""
        return self.scalar("SELECT state FROM device_blocks WHERE device_id = ?", (device_id,))

    def device_blocks(self) -> dict[str, str]:
        """device id -> "revoked" | "banned", for every blocked device."""
        return {r["device_id"]: r["state"] for r in self.all("SELECT device_id, state FROM device_blocks")}

    def count_devices_in_good_standing(self) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM devices d WHERE NOT EXISTS"
                               " (SELECT 1 FROM device_blocks b WHERE b.device_id = d.id)"))

    def count_active_devices(self, since: float) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM devices WHERE last_seen >= ?", (since,)))

    # ------------------------------------------------------------------ models
    def add_model(self, version: int, *, source: str, file: str, sha256: str, size: int,
                  parent_version: int | None = None, round_id: int | None = None,
                  candidate_state: str | None = None, opt_state_file: str | None = None,
                  note: str | None = None, info: dict | None = None, was_global: bool = False) -> None:
        self._exec(
            "INSERT INTO models(version, created_at, source, file, sha256, size, parent_version, round_id,"
            " candidate_state, opt_state_file, note, info, was_global) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (version, time.time(), source, file, sha256, size, parent_version, round_id, candidate_state,
             opt_state_file, note, json.dumps(info or {}), int(was_global)),
        )

    def get_model(self, version: int) -> dict[str, Any] | None:
        return _model(self.one("SELECT * FROM models WHERE version = ?", (version,)))

    def list_models(self) -> list[dict[str, Any]]:
        return [_model(r) for r in self.all("SELECT * FROM models ORDER BY version")]

    def live_model_files(self) -> set[str]:
        out = set()
        for r in self.all("SELECT file, opt_state_file FROM models"):
            out.add(r["file"])
            if r["opt_state_file"]:
                out.add(r["opt_state_file"])
        return out

    def max_version(self) -> int:
        return int(self.scalar("SELECT COALESCE(MAX(version), 0) FROM models"))

    def update_model(self, version: int, **fields: Any) -> None:
        self._update("models", "version", version, fields)

    def _update(self, table: str, key: str, key_value: Any, fields: dict[str, Any]) -> None:
        if not fields:
            return
        cols = ", ".join(f"{name} = ?" for name in fields)
        values = tuple(json.dumps(v) if isinstance(v, (dict, list)) else v for v in fields.values())
        self._exec(f"UPDATE {table} SET {cols} WHERE {key} = ?", values + (key_value,))

    # ------------------------------------------------------------------ rounds
    def create_round(self, *, kind: str, base_version: int, params: dict, seed: int,
                     candidate_version: int | None = None) -> int:
        return self._insert(
            "INSERT INTO rounds(kind, state, base_version, candidate_version, created_at, params, seed)"
            " VALUES (?, 'open', ?, ?, ?, ?, ?)",
            (kind, base_version, candidate_version, time.time(), json.dumps(params), seed), "id")

    def get_round(self, round_id: int) -> Round | None:
        """The round (cached; immutable, so it is shared)."""
        return self._rounds.get(round_id, lambda: _round(self.one("SELECT * FROM rounds WHERE id = ?", (round_id,))))

    def rounds_in_state(self, state: str, kind: str | None = None) -> list[Round]:
        if kind is None:
            rows = self.all("SELECT * FROM rounds WHERE state = ? ORDER BY id", (state,))
        else:
            rows = self.all("SELECT * FROM rounds WHERE state = ? AND kind = ? ORDER BY id", (state, kind))
        return [_round(r) for r in rows]

    def active_round(self, kind: str) -> Round | None:
        """The open or aggregating round of this kind (at most one exists)."""
        return _round(self.one(
            "SELECT * FROM rounds WHERE kind = ? AND state IN ('open', 'aggregating') ORDER BY id DESC LIMIT 1", (kind,)))

    def update_round(self, round_id: int, **fields: Any) -> None:
        self._rounds.invalidate(round_id)
        self._update("rounds", "id", round_id, fields)

    def list_rounds(self, limit: int = 100, kind: str | None = None, before: int | None = None) -> list[Round]:
        where, args = [], []
        if kind:
            where.append("r.kind = ?")
            args.append(kind)
        if before:
            where.append("r.id < ?")
            args.append(before)
        sql = (
            "SELECT r.*, (SELECT COUNT(*) FROM admissions a WHERE a.round_id = r.id) AS n_admitted,"
            " (SELECT COUNT(*) FROM updates u WHERE u.round_id = r.id) AS n_updates,"
            " (SELECT COUNT(*) FROM eval_reports e WHERE e.round_id = r.id) AS n_reports FROM rounds r"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY r.id DESC LIMIT ?"
        )
        return [_round(r) for r in self.all(sql, tuple(args) + (limit,))]

    def round_state_counts(self) -> dict[tuple[str, str], int]:
        return {(r["kind"], r["state"]): r["n"] for r in
                self.all("SELECT kind, state, COUNT(*) AS n FROM rounds GROUP BY kind, state")}

    def dp_rounds(self, ftrl: bool = False) -> list[tuple[float, float]]:
        """(noise_multiplier, sampling_prob) of every closed round that released a noisy aggregate: the
        Gaussian-mechanism rounds, or (ftrl=True) the DP-FTRL rounds, the leaves of its noise tree."""
        # the comparison is chosen here, not bound: PostgreSQL will not compare a boolean with a 0/1 parameter
        rows = self.all("SELECT noise_multiplier, sampling_prob FROM rounds WHERE state = 'closed' AND kind = 'train'"
                        " AND noise_multiplier IS NOT NULL AND COALESCE(json_extract(params, '$.dp_mode'), '')"
                        f" {'=' if ftrl else '!='} 'ftrl' ORDER BY id")
        return [(float(r["noise_multiplier"]), float(r["sampling_prob"])) for r in rows]

    # ------------------------------------------------------------------ admissions
    def admit(self, round_id: int, device_id: str, now: float) -> None:
        self._exec("INSERT INTO admissions(round_id, device_id, admitted_at) VALUES (?, ?, ?)", (round_id, device_id, now))

    def is_admitted(self, round_id: int, device_id: str) -> bool:
        return self.one("SELECT 1 AS x FROM admissions WHERE round_id = ? AND device_id = ?", (round_id, device_id)) is not None

    def count_admitted(self, round_id: int) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM admissions WHERE round_id = ?", (round_id,)))

    # ------------------------------------------------------------------ updates
    def add_update(self, *, round_id: int, device_id: str, payload_sha256: str, file: str, num_examples: int,
                   weight: float, norm: float, dtype: str, metrics: dict, received_at: float) -> int:
        return self._insert(
            "INSERT INTO updates(round_id, device_id, payload_sha256, file, num_examples, weight, norm, dtype,"
            " metrics, received_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (round_id, device_id, payload_sha256, file, num_examples, weight, norm, dtype, json.dumps(metrics), received_at),
            "seq")

    def get_update(self, round_id: int, device_id: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM updates WHERE round_id = ? AND device_id = ?", (round_id, device_id))

    def list_updates(self, round_id: int) -> list[dict[str, Any]]:
        return self.all("SELECT * FROM updates WHERE round_id = ? ORDER BY seq", (round_id,))

    def delete_update(self, round_id: int, device_id: str) -> None:
        self._exec("DELETE FROM updates WHERE round_id = ? AND device_id = ?", (round_id, device_id))

    def count_updates(self, round_id: int) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM updates WHERE round_id = ?", (round_id,)))

    def live_update_files(self) -> set[str]:
        return {r["file"] for r in self.all("SELECT file FROM updates WHERE file IS NOT NULL")}

    def clear_update_files(self, round_id: int) -> None:
        self._exec("UPDATE updates SET file = NULL WHERE round_id = ?", (round_id,))

    def count_participations(self) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM updates"))

    # ------------------------------------------------------------------ evaluation reports
    def add_eval_report(self, *, round_id: int, device_id: str, payload_sha256: str, report: dict,
                        received_at: float) -> int:
        return self._insert(
            "INSERT INTO eval_reports(round_id, device_id, payload_sha256, report, received_at) VALUES (?,?,?,?,?)",
            (round_id, device_id, payload_sha256, json.dumps(report), received_at), "seq")

    def get_eval_report(self, round_id: int, device_id: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM eval_reports WHERE round_id = ? AND device_id = ?", (round_id, device_id))

    def list_eval_reports(self, round_id: int) -> list[dict[str, Any]]:
        rows = self.all("SELECT * FROM eval_reports WHERE round_id = ? ORDER BY seq", (round_id,))
        for r in rows:
            r["report"] = json.loads(r["report"])
        return rows

    def count_eval_reports(self, round_id: int) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM eval_reports WHERE round_id = ?", (round_id,)))


def _model(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    row["info"] = json.loads(row["info"]) if row.get("info") else {}
    row["was_global"] = bool(row["was_global"])
    return row


def _round(row: dict[str, Any] | None) -> Round | None:
    return Round.from_row(row) if row is not None else None
