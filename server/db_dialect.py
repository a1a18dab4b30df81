"""The two SQL engines behind server.db.Db: SQLite (embedded, the default) and PostgreSQL.

Every query in the server is written once, in SQLite's spelling (`?` placeholders, INSERT OR IGNORE,
json_extract, INTEGER/REAL/BLOB columns). A dialect opens connections and rewrites that text for its
engine: SQLite takes it as it is; PostgresDialect turns `?` into `%s`, INSERT OR IGNORE into
ON CONFLICT DO NOTHING, json_extract(col, '$.key') into (col::jsonb ->> 'key'), and in DDL INTEGER into
BIGINT (SQLite's integers are 64-bit), REAL into DOUBLE PRECISION, BLOB into BYTEA and AUTOINCREMENT keys
into identity columns. Generated ids come back through INSERT ... RETURNING, which both engines have.

What differs beyond the text lives here too: how a write transaction begins (SQLite: BEGIN IMMEDIATE, the
file's write lock; PostgreSQL: BEGIN and a transaction-scoped advisory lock, the same one-writer rule across
processes), and the PRAGMAs (SQLite only).
"""
from __future__ import annotations

import functools
import os
import re
import socket
import sqlite3
from pathlib import Path
from typing import Any, Protocol

from server.db_url import is_postgres_url, redact_url, scrub

# pg_advisory_xact_lock key serialising schema installs: CREATE TABLE IF NOT EXISTS is not safe against a
# concurrent identical CREATE in another session (it can fail on the catalog's unique index).
SCHEMA_LOCK_KEY = 0x666B5F736368  # "fk_sch"
WRITER_LOCK_KEY = 0x666B5F777269  # "fk_wri": held by the transaction of Db.write() (PostgresDialect.begin)


# Every session of this process says which server process it is (host and pid), so one process can tell
# whether others are connected (server/cluster.py other_server_processes).
APPLICATION_NAME = f"fk-server {socket.gethostname()[:30]} {os.getpid()}"


class StoreUnavailable(RuntimeError):
    """The database cannot be opened or reached: a start-up error to report, not a bug to trace."""


class Dialect(Protocol):
    name: str

    def describe(self) -> str: ...
    def connect(self, writer: bool = False) -> Any: ...
    def alive(self, conn: Any) -> bool: ...
    def sql(self, text: str) -> str: ...
    def params(self, args: tuple) -> tuple: ...
    def install(self, conn: Any, script: str) -> None: ...
    def begin(self, conn: Any) -> None: ...
    def commit(self, conn: Any) -> None: ...
    def rollback(self, conn: Any) -> None: ...
    def executemany(self, conn: Any, sql: str, rows: list[tuple]) -> None: ...


class SqliteDialect:
    """One SQLite file in WAL mode: readers never block the writer; a commit is fsynced (synchronous=FULL)."""

    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return str(self.path)

    def connect(self, writer: bool = False) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.row_factory = sqlite3.Row
            if writer:
                conn.execute("PRAGMA journal_mode=WAL")  # persistent in the file; readers then never block it
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the SQLite database {self.path}: {exc}") from exc
        return conn

    def alive(self, conn: sqlite3.Connection) -> bool:
        return True

    def sql(self, text: str) -> str:
        return text

    def params(self, args: tuple) -> tuple:
        return args

    def install(self, conn: sqlite3.Connection, script: str) -> None:
        conn.executescript(script)

    def begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")  # take the file's write lock now, not at the first write

    def commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")

    def executemany(self, conn: sqlite3.Connection, sql: str, rows: list[tuple]) -> None:
        conn.executemany(sql, rows)


class PostgresDialect:
    """A PostgreSQL database by URL (psycopg 3). Connections run in autocommit: a read is one statement
    on the latest commit, a write transaction is an explicit BEGIN ... COMMIT on the writer connection.
    With the server's default synchronous_commit=on a COMMIT has returned only once it is durable."""

    name = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url

    def describe(self) -> str:
        return redact_url(self.url)

    def connect(self, writer: bool = False) -> Any:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError as exc:  # pragma: no cover - requirements.txt pins it
            raise StoreUnavailable("PostgreSQL needs the psycopg package (pip install 'psycopg[binary]')") from exc
        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10,
                                   application_name=APPLICATION_NAME)
        except (psycopg.Error, ValueError) as exc:  # ValueError: a malformed URL
            detail = scrub(_one_line(exc), self.url)  # a parse error may quote the URL
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {self.describe()}: {detail}") from None

    def alive(self, conn: Any) -> bool:
        return not (conn.closed or conn.broken)

    def sql(self, text: str) -> str:
        return translate(text)

    def params(self, args: tuple) -> tuple:
        # SQLite stores a bool as 0/1; PostgreSQL will not put a boolean into the BIGINT flag columns
        return tuple(int(a) if isinstance(a, bool) else a for a in args)

    def install(self, conn: Any, script: str) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            conn.execute(translate_schema(script))  # no parameters: psycopg sends the script as it is

    def begin(self, conn: Any) -> None:
        # The transaction-scoped advisory lock is SQLite's BEGIN IMMEDIATE here: one writer at a time on the
        # database, across processes too, released by COMMIT / ROLLBACK. One round trip (no parameters).
        conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITER_LOCK_KEY})")

    def commit(self, conn: Any) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: Any) -> None:
        conn.execute("ROLLBACK")

    def executemany(self, conn: Any, sql: str, rows: list[tuple]) -> None:
        with conn.cursor() as cur:
            cur.executemany(sql, rows)


def open_dialect(target: str | Path) -> SqliteDialect | PostgresDialect:
    """A postgresql:// (or postgres://) URL selects PostgreSQL; anything else is a SQLite file path."""
    return PostgresDialect(str(target)) if is_postgres_url(target) else SqliteDialect(target)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------------- SQLite text -> PostgreSQL text
_STRING_OR_MARK = re.compile(r"'(?:[^']|'')*'|\?|%")
_JSON_EXTRACT = re.compile(r"json_extract\(\s*([\w.]+)\s*,\s*'\$\.(\w+)'\s*\)", re.IGNORECASE)
_INSERT_OR = re.compile(r"^\s*INSERT\s+OR\s+(\w+)\s+INTO\b", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def translate(text: str) -> str:
    """One query in SQLite's spelling as PostgreSQL (with psycopg's %s placeholders). Cached: the server's
    queries are a fixed set of strings (IN lists vary only in their count of marks)."""
    text = _JSON_EXTRACT.sub(lambda m: f"({m.group(1)}::jsonb ->> '{m.group(2)}')", text)
    conflict = ""
    m = _INSERT_OR.match(text)
    if m:
        if m.group(1).upper() != "IGNORE":
            # REPLACE deletes and re-inserts on any unique key: no portable ON CONFLICT without knowing which
            raise ValueError(f"INSERT OR {m.group(1)} has no PostgreSQL translation; use ON CONFLICT(...) DO UPDATE")
        text = text[:m.start()] + "INSERT INTO" + text[m.end():]
        conflict = " ON CONFLICT DO NOTHING"

    def mark(m: re.Match) -> str:
        token = m.group(0)
        if token == "?":
            return "%s"
        if token == "%":
            return "%%"
        return token.replace("%", "%%")  # psycopg reads % everywhere, string literals included

    return _STRING_OR_MARK.sub(mark, text).rstrip().rstrip(";") + conflict


_DDL = [
    (re.compile(r"\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b", re.IGNORECASE),
     "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b", re.IGNORECASE), "BIGINT"),
    (re.compile(r"\bREAL\b", re.IGNORECASE), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b", re.IGNORECASE), "BYTEA"),
]


def translate_schema(script: str) -> str:
    """CREATE TABLE / INDEX ... IF NOT EXISTS statements in SQLite's types as PostgreSQL's."""
    for pattern, replacement in _DDL:
        script = pattern.sub(replacement, script)
    return script


__all__ = ["Dialect", "PostgresDialect", "SqliteDialect", "StoreUnavailable", "open_dialect", "translate",
           "translate_schema"]
