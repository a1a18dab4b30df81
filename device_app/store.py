"""The device's local text store: what the user typed, kept only on the device (SQLite).

One row per committed message (what the user sent or finished typing), oldest first.
The store has a size cap (total characters; the oldest messages are evicted first) and a
"forget my data" action that deletes the database files themselves, not just the rows.
SQLite's secure_delete is on, so evicted rows are overwritten with zeros in the file too.

The most recent messages are "held back": never trained on (neither by personalization
nor by federated rounds), so the personal-vs-global gain is measured on text neither
model has seen.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from device_app.private_files import create_private_file, tighten

DEFAULT_MAX_CHARS = 500_000  # ~100k words: months of typing, a few hundred KB on disk
DEFAULT_HOLDOUT_FRACTION = 0.2
DEFAULT_MAX_HOLDOUT = 200
DEFAULT_MIN_HOLDOUT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    text TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Split:
    """Messages to train on (older) and held-back messages (the most recent), oldest first."""

    train: list[str]
    heldout: list[str]


class TextStore:
    """SQLite-backed, capped, thread-safe store of the user's messages."""

    def __init__(
        self,
        path: str | os.PathLike,
        max_chars: int = DEFAULT_MAX_CHARS,
        holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
        max_holdout: int = DEFAULT_MAX_HOLDOUT,
    ) -> None:
        if max_chars <= 0:
            raise ValueError("max_chars must be positive")
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError("holdout_fraction must be in [0, 1)")
        self.path = Path(path)
        self.max_chars = int(max_chars)
        self.holdout_fraction = float(holdout_fraction)
        self.max_holdout = int(max_holdout)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._open()

    # ------------------------------------------------------------------ connection

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 before SQLite opens it: SQLite gives its journal the database file's mode (issue #18)
        create_private_file(self.path)
        tighten(f"{self.path}-journal")  # one left over by a crash, from before files were private
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # secure_delete: deleted content is overwritten, not left in free pages.
        # journal_mode DELETE (not WAL): no long-lived side file holding old pages.
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.executescript(_SCHEMA)
        self._conn = conn

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("text store is closed")
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "TextStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def add(self, text: str, ts: float | None = None) -> bool:
        """Store one message; returns False for blank text. Enforces the size cap."""
        text = text.strip()
        if not text:
            return False
        if len(text) > self.max_chars:
            text = text[-self.max_chars :]
        with self._lock:
            self.conn.execute("INSERT INTO messages (ts, text) VALUES (?, ?)", (time.time() if ts is None else ts, text))
            self._enforce_cap()
        return True

    def _enforce_cap(self) -> None:
        total = self.total_chars()
        if total <= self.max_chars:
            return
        rows = self.conn.execute("SELECT id, length(text) FROM messages ORDER BY id").fetchall()
        cut_id = None
        for row_id, length in rows:
            if total <= self.max_chars:
                break
            total -= length
            cut_id = row_id
        if cut_id is not None:
            self.conn.execute("DELETE FROM messages WHERE id <= ?", (cut_id,))

    def forget(self) -> None:
        """Delete everything: close the database and remove its files, then start empty."""
        with self._lock:
            if self._conn is not None:
                self._conn.execute("DELETE FROM messages")
                self._conn.execute("VACUUM")
                self._conn.close()
                self._conn = None
            for suffix in ("", "-journal", "-wal", "-shm"):
                try:
                    os.remove(f"{self.path}{suffix}")
                except FileNotFoundError:
                    pass
            self._open()

    # ------------------------------------------------------------------ reading

    def count(self) -> int:
        with self._lock:
            return int(self.conn.execute("SELECT count(*) FROM messages").fetchone()[0])

    def total_chars(self) -> int:
        with self._lock:
            return int(self.conn.execute("SELECT coalesce(sum(length(text)), 0) FROM messages").fetchone()[0])

    def last_id(self) -> int:
        """Id of the newest message (0 when empty); ids only grow, even across evictions."""
        with self._lock:
            row = self.conn.execute("SELECT max(id) FROM messages").fetchone()
            return int(row[0] or 0)

    def count_since(self, message_id: int) -> int:
        with self._lock:
            return int(self.conn.execute("SELECT count(*) FROM messages WHERE id > ?", (message_id,)).fetchone()[0])

    def messages(self, limit: int | None = None) -> list[str]:
        """All messages oldest first, or the most recent `limit` of them."""
        with self._lock:
            if limit is None:
                rows = self.conn.execute("SELECT text FROM messages ORDER BY id").fetchall()
            else:
                rows = self.conn.execute(
                    "SELECT text FROM (SELECT id, text FROM messages ORDER BY id DESC LIMIT ?) ORDER BY id", (int(limit),)
                ).fetchall()
        return [r[0] for r in rows]

    def holdout_size(self, n: int) -> int:
        if n < 2:
            return 0  # one message: train on it, nothing to measure yet
        return max(DEFAULT_MIN_HOLDOUT, min(self.max_holdout, int(round(n * self.holdout_fraction))))

    def split(self) -> Split:
        """(train, held back): the most recent holdout_fraction of messages are held back."""
        msgs = self.messages()
        k = self.holdout_size(len(msgs))
        return Split(train=msgs[: len(msgs) - k], heldout=msgs[len(msgs) - k :])

    def training_messages(self) -> list[str]:
        return self.split().train


__all__ = ["TextStore", "Split", "DEFAULT_MAX_CHARS"]
