"""Randomized-response tables: counts per (question, coins) and which (device, question, period)
already reported. Never an individual answer."""
from __future__ import annotations

from typing import Any

from server.db import Db

SCHEMA = """
CREATE TABLE IF NOT EXISTS rr_counts (
    question TEXT NOT NULL, p_first REAL NOT NULL, p_second REAL NOT NULL,
    yes INTEGER NOT NULL DEFAULT 0, n INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (question, p_first, p_second)
);
CREATE TABLE IF NOT EXISTS rr_reported (
    device_id TEXT NOT NULL, question TEXT NOT NULL, period INTEGER NOT NULL,
    PRIMARY KEY (device_id, question, period)
);
"""


class TelemetryStore:
    def __init__(self, db: Db) -> None:
        self.db = db
        db.install_schema(SCHEMA)

    def reported(self, device_id: str, question: str, period: int) -> bool:
        return self.db.one("SELECT 1 AS x FROM rr_reported WHERE device_id = ? AND question = ? AND period = ?",
                           (device_id, question, period)) is not None

    def add(self, device_id: str, question: str, period: int, p_first: float, p_second: float, yes: bool) -> None:
        """(In a transaction.) Count one answer and remember that the device answered in this period."""
        self.db.execute("INSERT INTO rr_reported(device_id, question, period) VALUES (?, ?, ?)",
                        (device_id, question, period))
        # rr_counts.yes, not a bare yes: PostgreSQL finds that ambiguous between the row and `excluded`
        self.db.execute("INSERT INTO rr_counts(question, p_first, p_second, yes, n) VALUES (?, ?, ?, ?, 1)"
                        " ON CONFLICT(question, p_first, p_second) DO UPDATE SET yes = rr_counts.yes + excluded.yes,"
                        " n = rr_counts.n + 1", (question, p_first, p_second, int(yes)))

    def forget_before(self, period: int) -> None:
        """(In a transaction.)"""
        self.db.execute("DELETE FROM rr_reported WHERE period < ?", (period,))

    def counts(self) -> list[dict[str, Any]]:
        """Per (question, coins), most answers first within a question."""
        return self.db.all("SELECT * FROM rr_counts ORDER BY question, n DESC")


__all__ = ["SCHEMA", "TelemetryStore"]
