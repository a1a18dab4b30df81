"""SecAgg's tables and queries: the identity registry, the round's protocol row and what each stage
collected (keys, encrypted shares, commitments, consistency signatures, unmasking shares).

Writes run inside the caller's `db.write()` transaction (the service decides what commits together).
The round row is cached (RowCache, coherent with commits): every request of a cohort reads it.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import Any

from models import secagg_math as sm
from server.db import Db
from server.secagg.protocol import SecAggState

SCHEMA = """
CREATE TABLE IF NOT EXISTS device_identity (
    device_id     TEXT PRIMARY KEY,
    public_key    TEXT NOT NULL,      -- Ed25519, base64 raw 32 bytes; never replaced
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS secagg_rounds (
    round_id       INTEGER PRIMARY KEY,
    session        TEXT NOT NULL,      -- random, binds every key, signature and ciphertext to this round
    stage          TEXT NOT NULL,      -- advertise | share | masked | consistency | unmask | finishing | done | failed
    stage_deadline REAL,
    quantization   TEXT NOT NULL,      -- JSON models.secagg_math.Quantization
    graph_k        INTEGER NOT NULL,
    graph_seed     TEXT,
    threshold      INTEGER,
    u1             TEXT,               -- JSON sorted device ids
    u2             TEXT,
    u3             TEXT,
    sum_file       TEXT,               -- running modular sum of the masked inputs
    sum_count      INTEGER NOT NULL DEFAULT 0,
    result_file    TEXT,               -- the unmasked, de-quantized sum (float64)
    info           TEXT NOT NULL DEFAULT '{}',
    cleaned        INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS secagg_keys (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, c_pk TEXT NOT NULL, s_pk TEXT NOT NULL,
    signature TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS secagg_shares (
    round_id INTEGER NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    ct BLOB NOT NULL,                  -- the sender's Ed25519 signature (64 bytes), then the ciphertext
    PRIMARY KEY (round_id, sender, recipient)
);
CREATE INDEX IF NOT EXISTS secagg_shares_to ON secagg_shares(round_id, recipient);
CREATE TABLE IF NOT EXISTS secagg_commitments (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, b_commit TEXT NOT NULL, body_sha TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS secagg_consistency (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, signature TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS secagg_dropouts (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, stage TEXT NOT NULL, reason TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS secagg_unmask (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, body TEXT NOT NULL, body_sha TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (round_id, device_id)
);
"""
STAGE_TABLES = ("secagg_shares", "secagg_unmask", "secagg_consistency", "secagg_commitments", "secagg_keys",
                "secagg_dropouts")


def in_rel(rid: int, device_id: str, sha: str) -> str:
    """Where a masked input is kept until its round closes (named by its hash: a refused second input
    never replaces the one in the sum)."""
    return f"secagg/r{rid:06d}/in-{device_id}-{sha[:16]}.npy"


def install_schema(db: Db) -> None:
    db.install_schema(SCHEMA)


def _state(row: dict[str, Any]) -> SecAggState:
    def ids(key: str) -> list[str] | None:
        return json.loads(row[key]) if row[key] else None

    return SecAggState(
        round_id=int(row["round_id"]), session=row["session"], stage=row["stage"], stage_deadline=row["stage_deadline"],
        quantization=sm.Quantization.from_dict(json.loads(row["quantization"])), graph_k=int(row["graph_k"]),
        graph_seed=row["graph_seed"], threshold=row["threshold"], u1=ids("u1"), u2=ids("u2"), u3=ids("u3"),
        sum_file=row["sum_file"], sum_count=int(row["sum_count"]), result_file=row["result_file"],
        info=json.loads(row["info"] or "{}"), cleaned=bool(row["cleaned"]))


class SecAggStore:
    def __init__(self, db: Db) -> None:
        self.db = db
        install_schema(db)
        self._rows = db.cache()  # SecAggState by round id

    # ------------------------------------------------------------------ the round's protocol row
    def state(self, rid: int) -> SecAggState | None:
        return self._rows.get(rid, lambda: self._load(rid))

    def _load(self, rid: int) -> SecAggState | None:
        row = self.db.one("SELECT * FROM secagg_rounds WHERE round_id = ?", (rid,))
        return _state(row) if row is not None else None

    def create(self, rid: int, quantization: sm.Quantization, graph_k: int, now: float) -> None:
        """(In a transaction.) The round's row at stage advertise, unless it exists."""
        self._rows.invalidate(rid)
        self.db.execute("INSERT OR IGNORE INTO secagg_rounds(round_id, session, stage, quantization, graph_k, info)"
                        " VALUES (?, ?, 'advertise', ?, ?, ?)",
                        (rid, secrets.token_hex(16), json.dumps(quantization.to_dict()), int(graph_k),
                         json.dumps({"stages": {"advertise": {"opened": now}}})))

    def update(self, rid: int, **fields: Any) -> None:
        """(In a transaction.) Set columns of the round's row; lists and dicts are stored as JSON."""
        cols = ", ".join(f"{k} = ?" for k in fields)
        vals = tuple(json.dumps(v) if isinstance(v, (dict, list)) else v for v in fields.values())
        self._rows.invalidate(rid)
        self.db.execute(f"UPDATE secagg_rounds SET {cols} WHERE round_id = ?", vals + (rid,))

    def add_offenders(self, rid: int, entries: list[dict[str, Any]]) -> None:
        """(In a transaction.) Name devices caught cheating in the round's info ("offenders": kept with the
        round's summary after cleanup, so the admin's round view shows them). Idempotent."""
        if not entries:
            return
        info = json.loads(json.dumps(self.state(rid).info))  # the cached state's info is shared
        known = info.setdefault("offenders", [])
        seen = {(o["device_id"], o["stage"], o["reason"]) for o in known}
        for e in entries:
            if (e["device_id"], e["stage"], e["reason"]) not in seen:
                known.append({**e, "at": time.time()})
                seen.add((e["device_id"], e["stage"], e["reason"]))
        self.update(rid, info=info)

    def uncleaned(self) -> list[dict[str, Any]]:
        return self.db.all("SELECT round_id, stage, stage_deadline FROM secagg_rounds WHERE cleaned = 0")

    def live_files(self) -> set[str]:
        live: set[str] = set()
        for r in self.db.all("SELECT sum_file, result_file FROM secagg_rounds WHERE cleaned = 0"):
            live.update(x for x in (r["sum_file"], r["result_file"]) if x)
        for r in self.db.all("SELECT u.round_id, u.device_id, u.payload_sha256 FROM updates u JOIN secagg_rounds s"
                             " ON s.round_id = u.round_id WHERE s.cleaned = 0"):
            live.add(in_rel(r["round_id"], r["device_id"], r["payload_sha256"]))
        return live

    def delete_stage_rows(self, rid: int) -> None:
        """(In a transaction.) Everything the stages collected: keys, shares, commitments, signatures, dropouts."""
        for table in STAGE_TABLES:
            self.db.execute(f"DELETE FROM {table} WHERE round_id = ?", (rid,))

    # ------------------------------------------------------------------ identity registry
    def identity(self, device_id: str) -> dict[str, Any] | None:
        return self.db.one("SELECT device_id, public_key, registered_at FROM device_identity WHERE device_id = ?",
                           (device_id,))

    def add_identity(self, device_id: str, public_key: str, now: float) -> None:
        self.db.execute("INSERT INTO device_identity(device_id, public_key, registered_at) VALUES (?, ?, ?)",
                        (device_id, public_key, now))

    def identities_of_advertisers(self, rid: int) -> dict[str, str]:
        return {r["device_id"]: r["public_key"] for r in self.db.all(
            "SELECT device_id, public_key FROM device_identity WHERE device_id IN (SELECT device_id FROM"
            " secagg_keys WHERE round_id = ?)", (rid,))}

    # ------------------------------------------------------------------ stage 1: keys
    def keys_of(self, rid: int, device_id: str) -> dict[str, Any] | None:
        return self.db.one("SELECT c_pk, s_pk FROM secagg_keys WHERE round_id = ? AND device_id = ?", (rid, device_id))

    def add_keys(self, rid: int, device_id: str, c_pk: str, s_pk: str, signature: str) -> None:
        self.db.execute("INSERT INTO secagg_keys(round_id, device_id, c_pk, s_pk, signature, at)"
                        " VALUES (?, ?, ?, ?, ?, ?)", (rid, device_id, c_pk, s_pk, signature, time.time()))

    def all_keys(self, rid: int) -> dict[str, dict[str, Any]]:
        return {r["device_id"]: r for r in self.db.all("SELECT * FROM secagg_keys WHERE round_id = ?", (rid,))}

    def key_owners(self, rid: int, keys: list[str]) -> list[str]:
        """Devices of round `rid` that advertised any of `keys` (base64), as either of their two keys."""
        marks = ", ".join("?" * len(keys))
        return [r["device_id"] for r in self.db.all(
            f"SELECT device_id FROM secagg_keys WHERE round_id = ? AND (c_pk IN ({marks}) OR s_pk IN ({marks}))",
            (rid, *keys, *keys))]

    def advertisers(self, rid: int) -> list[str]:
        return [r["device_id"] for r in self.db.all("SELECT device_id FROM secagg_keys WHERE round_id = ?", (rid,))]

    def count_keys(self, rid: int) -> int:
        return int(self.db.scalar("SELECT COUNT(*) FROM secagg_keys WHERE round_id = ?", (rid,)))

    # ------------------------------------------------------------------ stage 2: shares and commitments
    def commitment_sha(self, rid: int, device_id: str) -> str | None:
        row = self.db.one("SELECT body_sha FROM secagg_commitments WHERE round_id = ? AND device_id = ?",
                          (rid, device_id))
        return row["body_sha"] if row is not None else None

    def add_shares(self, rid: int, sender: str, shares: list[tuple[str, bytes, bytes]], commitment: str,
                   body_sha: str) -> None:
        """shares: (recipient, ciphertext, sender's signature); stored as signature || ciphertext."""
        self.db.executemany("INSERT INTO secagg_shares(round_id, sender, recipient, ct) VALUES (?, ?, ?, ?)",
                            [(rid, sender, to, sig + ct) for to, ct, sig in shares])
        self.db.execute("INSERT INTO secagg_commitments(round_id, device_id, b_commit, body_sha, at)"
                        " VALUES (?, ?, ?, ?, ?)", (rid, sender, commitment, body_sha, time.time()))

    def sharers(self, rid: int) -> list[str]:
        return [r["device_id"] for r in self.db.all("SELECT device_id FROM secagg_commitments WHERE round_id = ?",
                                                    (rid,))]

    def count_commitments(self, rid: int) -> int:
        return int(self.db.scalar("SELECT COUNT(*) FROM secagg_commitments WHERE round_id = ?", (rid,)))

    def commitments(self, rid: int) -> dict[str, str]:
        return {r["device_id"]: r["b_commit"] for r in self.db.all(
            "SELECT device_id, b_commit FROM secagg_commitments WHERE round_id = ?", (rid,))}

    def shares_by_sender(self, rid: int) -> list[dict[str, Any]]:
        return self.db.all("SELECT sender, recipient, ct FROM secagg_shares WHERE round_id = ? ORDER BY sender", (rid,))

    # ------------------------------------------------------------------ stage 4: consistency
    def signature_of(self, rid: int, device_id: str) -> str | None:
        row = self.db.one("SELECT signature FROM secagg_consistency WHERE round_id = ? AND device_id = ?",
                          (rid, device_id))
        return row["signature"] if row is not None else None

    def add_signature(self, rid: int, device_id: str, signature: str) -> None:
        self.db.execute("INSERT INTO secagg_consistency(round_id, device_id, signature, at) VALUES (?, ?, ?, ?)",
                        (rid, device_id, signature, time.time()))

    def count_signatures(self, rid: int) -> int:
        return int(self.db.scalar("SELECT COUNT(*) FROM secagg_consistency WHERE round_id = ?", (rid,)))

    def signatures(self, rid: int) -> list[dict[str, Any]]:
        return [{"device_id": r["device_id"], "signature": r["signature"]} for r in self.db.all(
            "SELECT device_id, signature FROM secagg_consistency WHERE round_id = ? ORDER BY device_id", (rid,))]

    # ------------------------------------------------------------------ stage 5: unmasking
    def unmask_sha(self, rid: int, device_id: str) -> str | None:
        row = self.db.one("SELECT body_sha FROM secagg_unmask WHERE round_id = ? AND device_id = ?", (rid, device_id))
        return row["body_sha"] if row is not None else None

    def add_unmask(self, rid: int, device_id: str, b_shares: dict, s_shares: dict, body_sha: str,
                   pair_seeds: dict | None = None, complaints: dict | None = None) -> None:
        body = {"b": b_shares, "s": s_shares, **({"p": pair_seeds} if pair_seeds else {}),
                **({"c": complaints} if complaints else {})}
        self.db.execute("INSERT INTO secagg_unmask(round_id, device_id, body, body_sha, at) VALUES (?, ?, ?, ?, ?)",
                        (rid, device_id, json.dumps(body), body_sha, time.time()))

    def count_unmask(self, rid: int) -> int:
        return int(self.db.scalar("SELECT COUNT(*) FROM secagg_unmask WHERE round_id = ?", (rid,)))

    def unmask_bodies(self, rid: int) -> dict[str, dict[str, dict[str, str]]]:
        return {r["device_id"]: json.loads(r["body"])
                for r in self.db.all("SELECT device_id, body FROM secagg_unmask WHERE round_id = ?", (rid,))}

    # ------------------------------------------------------------------ devices that left the round
    def add_dropout(self, rid: int, device_id: str, stage: str, reason: str) -> None:
        """(In a transaction.) The first report counts; a repeat is ignored."""
        self.db.execute("INSERT OR IGNORE INTO secagg_dropouts(round_id, device_id, stage, reason, at)"
                        " VALUES (?, ?, ?, ?, ?)", (rid, device_id, stage, reason, time.time()))

    def dropouts(self, rid: int) -> dict[str, str]:
        """device -> the stage it left in."""
        return {r["device_id"]: r["stage"] for r in self.db.all(
            "SELECT device_id, stage FROM secagg_dropouts WHERE round_id = ?", (rid,))}


__all__ = ["SCHEMA", "SecAggStore", "in_rel", "install_schema"]
