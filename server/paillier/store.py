"""Paillier rounds' table: per round the key, the packing, the running encrypted sum's file and count."""
from __future__ import annotations

import json
from typing import Any

from models import paillier_pack as pp
from server.db import Db

SCHEMA = """
CREATE TABLE IF NOT EXISTS paillier_rounds (
    round_id   INTEGER PRIMARY KEY,
    key_id     TEXT NOT NULL,
    packing    TEXT NOT NULL,
    sum_file   TEXT,
    sum_count  INTEGER NOT NULL DEFAULT 0,
    info       TEXT NOT NULL DEFAULT '{}'
);
"""


class PaillierStore:
    def __init__(self, db: Db) -> None:
        self.db = db
        db.install_schema(SCHEMA)

    def row(self, rid: int) -> dict[str, Any] | None:
        row = self.db.one("SELECT * FROM paillier_rounds WHERE round_id = ?", (rid,))
        if row is None:
            return None
        row["packing"] = pp.Packing.from_dict(json.loads(row["packing"]))
        row["info"] = json.loads(row["info"] or "{}")
        return row

    def create(self, rid: int, key_id: str, packing: pp.Packing) -> None:
        with self.db.write():
            self.db.execute("INSERT OR IGNORE INTO paillier_rounds(round_id, key_id, packing) VALUES (?, ?, ?)",
                            (rid, key_id, json.dumps(packing.to_dict())))

    def set_sum(self, rid: int, rel: str, count: int, info: dict[str, Any]) -> None:
        """(In a transaction.)"""
        self.db.execute("UPDATE paillier_rounds SET sum_file = ?, sum_count = ?, info = ? WHERE round_id = ?",
                        (rel, count, json.dumps(info), rid))

    def set_info(self, rid: int, info: dict[str, Any]) -> None:
        with self.db.write():
            self.db.execute("UPDATE paillier_rounds SET info = ? WHERE round_id = ?", (json.dumps(info), rid))

    def clear_sum(self, rid: int) -> None:
        with self.db.write():
            self.db.execute("UPDATE paillier_rounds SET sum_file = NULL WHERE round_id = ?", (rid,))

    def finished_with_sum(self) -> list[int]:
        """Rounds that are over but still hold their encrypted sum's file."""
        return [r["round_id"] for r in self.db.all(
            "SELECT p.round_id FROM paillier_rounds p JOIN rounds r ON r.id = p.round_id"
            " WHERE p.sum_file IS NOT NULL AND r.state IN ('closed', 'abandoned')")]

    def live_files(self) -> set[str]:
        return {r["sum_file"] for r in self.db.all("SELECT sum_file FROM paillier_rounds WHERE sum_file IS NOT NULL")}


__all__ = ["PaillierStore", "SCHEMA"]
