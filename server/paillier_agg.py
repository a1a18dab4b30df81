"""Paillier rounds, server side: devices upload packed Paillier ciphertexts of their quantized delta
(models/paillier_pack.py); the server multiplies them into one running encrypted sum and asks the
separate key holder (server/keyholder.py) to decrypt only that sum.

    GET  /v1/paillier/public_key           the key holder's public key as the server relays it
                                           (devices check its signature against a pinned key-holder key)
    POST /v1/rounds/{id}/paillier/input    binary frame b"FKPL": n_ct ciphertexts + metadata

Stored per round: the running encrypted sum (one file, replaced on every accepted upload: written
durably before the contributor row commits, then the 200) and the contributor list (updates rows
with no file). Never an individual ciphertext. At the goal, or at the deadline with >= min_count,
the round aggregates: the sum goes to the key holder with the contribution count; the plaintext
slots are unpacked, range-checked (a tampered ciphertext decrypts to garbage and abandons the round)
and de-quantized into the sum of the deltas.
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from typing import Any

import httpx
import numpy as np

from models import dp
from models import paillier_pack as pp
from models import privacy_wire
from models import secagg_math as sm
from server.errors import Rejection
from server.keyholder import REQUEST_MAGIC, RESPONSE_MAGIC
from server.strategy import _parse_metadata

log = logging.getLogger("server.paillier")

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


class SecureAggregationFailed(Exception):
    """Raised by a privacy protocol's finalize: the round must be abandoned, not retried."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class PaillierCoordinator:
    def __init__(self, manager) -> None:
        self.m = manager
        self.db = manager.db
        self.store = manager.store
        self.config = manager.config
        from server.secagg import install_schema

        install_schema(self.db, SCHEMA)
        self._key: dict[str, Any] | None = None
        self._sums: dict[int, list] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._key_lock = threading.Lock()

    # ------------------------------------------------------------------ key holder
    def public_key_info(self) -> dict[str, Any]:
        """The key holder's public key (fetched once; its self-signature checked)."""
        with self._key_lock:
            if self._key is None:
                url = self.config.paillier_keyholder_url
                if not url:
                    raise Rejection("not_configured", "no Paillier key holder configured (--paillier-keyholder-url)")
                try:
                    info = httpx.get(url.rstrip("/") + "/v1/public_key", timeout=30.0).json()
                except (httpx.HTTPError, ValueError) as exc:
                    raise Rejection("keyholder_unavailable", f"cannot reach the key holder: {exc}", status=503) from None
                key = pp.PublicKey.from_dict(info)
                if not sm.verify(sm.unb64(info["verify_key"], 32), sm.unb64(info["signature"], 64),
                                 key.signed_message()):
                    raise Rejection("keyholder_unavailable", "key holder's public key signature does not verify",
                                    status=503)
                self._key = info
            return self._key

    def _public_key(self) -> pp.PublicKey:
        return pp.PublicKey.from_dict(self.public_key_info())

    # ------------------------------------------------------------------ rounds
    def _row(self, rid: int) -> dict[str, Any] | None:
        row = self.db.one("SELECT * FROM paillier_rounds WHERE round_id = ?", (rid,))
        if row is None:
            return None
        row["packing"] = pp.Packing.from_dict(json.loads(row["packing"]))
        row["info"] = json.loads(row["info"] or "{}")
        return row

    def _ensure_row(self, rnd: dict[str, Any]) -> dict[str, Any]:
        row = self._row(rnd["id"])
        if row is not None:
            return row
        key = self._public_key()
        p = rnd["params"]
        stddev = dp.device_noise_stddev(p["dp_mode"], p["noise_multiplier"], p["clip_norm"], p["min_count"])
        packing = pp.choose_packing(p["clip_norm"], stddev, self.m.dim, p["max_admitted"], key.key_bits,
                                    int(p.get("paillier_value_bits", 24)), float(p.get("norm_sigmas", 6.0)))
        with self.db.write() as conn:
            conn.execute("INSERT OR IGNORE INTO paillier_rounds(round_id, key_id, packing) VALUES (?, ?, ?)",
                         (rnd["id"], key.key_id, json.dumps(packing.to_dict())))
        return self._row(rnd["id"])

    def task_params(self, rnd: dict[str, Any]) -> dict[str, Any]:
        row = self._ensure_row(rnd)
        return {"protocol": pp.PROTOCOL, "version": pp.PROTOCOL_VERSION, "round_id": rnd["id"],
                "public_key": self.public_key_info(), "keyholder_url": self.config.paillier_keyholder_url,
                "packing": row["packing"].to_dict(), "upload_url": f"/v1/rounds/{rnd['id']}/paillier/input"}

    def max_input_bytes(self, row: dict[str, Any]) -> int:
        p: pp.Packing = row["packing"]
        return p.n_ciphertexts * p.ct_bytes + (1 << 16)

    def submit(self, device_id: str, rid: int, body: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        rnd = self.db.get_round(rid)
        if rnd is None or rnd["kind"] != "train" or rnd["params"].get("secure_aggregation") != "paillier":
            raise Rejection("unknown_round", f"no Paillier round {rid}")
        if not self.db.is_admitted(rid, device_id):
            raise Rejection("not_admitted", f"device was not admitted to round {rid}")
        row = self._ensure_row(rnd)
        prev = self.db.get_update(rid, device_id)
        if prev is not None:
            if prev["payload_sha256"] != hashlib.sha256(body[:-32]).hexdigest():
                raise Rejection("duplicate_upload", f"round {rid} already holds different ciphertexts from this device")
            return self._answer(prev)
        if rnd["state"] != "open" or self.m._past_deadline(rnd, time.time()):
            raise Rejection("round_closed", f"round {rid} is {rnd['state']}")
        key = self._public_key()
        packing: pp.Packing = row["packing"]
        try:
            header, cts, sha = pp.decode_input(body, packing, key.nsquare, self.max_input_bytes(row))
        except privacy_wire.FrameError as exc:
            raise Rejection(exc.reason, exc.detail) from None
        if header.get("round_id") != rid or header.get("key_id") != row["key_id"] \
                or header.get("device_id") != device_id:
            raise Rejection("bad_metadata", "ciphertexts are for another round, key or device")
        num_examples, metrics = _parse_metadata(header.get("metadata") or {}, rnd["params"]["max_examples_per_update"])
        lock = self._locks.setdefault(rid, threading.Lock())
        with lock:
            row = self._row(rid)  # fresh: another upload may have committed while this one was decoded
            acc = self._current(rid, row, packing)
            new = pp.add_into(list(acc) if acc else [], cts, key.nsquare)
            count = row["sum_count"] + 1
            rel = f"paillier/r{rid:06d}/sum-{count:06d}-{secrets.token_hex(4)}.bin"
            blob = pp.ciphertexts_to_bytes(new, packing.ct_bytes)
            self.store.write_bytes(rel, blob)  # durable before the row that points at it commits
            committed = False
            try:
                with self.m.lock:
                    rnd = self.db.get_round(rid)
                    row = self._row(rid)
                    if self.db.get_update(rid, device_id) is not None:
                        self.store.delete(rel)
                        return self._answer(self.db.get_update(rid, device_id))
                    if rnd["state"] != "open" or self.m._past_deadline(rnd, time.time()):
                        raise Rejection("round_closed", f"round {rid} closed while the upload was processed")
                    goal = rnd["params"]["goal"]
                    if count - 1 >= goal:
                        raise Rejection("round_closed", f"round {rid} already has its {goal} updates")
                    now = time.time()
                    with self.db.write() as conn:
                        self.db.add_update(round_id=rid, device_id=device_id, payload_sha256=sha, file=None,
                                           num_examples=num_examples, weight=1.0, norm=0.0, dtype="paillier",
                                           metrics=metrics, received_at=now)
                        self.db.touch_device(device_id, now)
                        info = row["info"]
                        info["ingest_seconds"] = info.get("ingest_seconds", 0.0) + time.perf_counter() - t0
                        conn.execute("UPDATE paillier_rounds SET sum_file = ?, sum_count = ?, info = ? WHERE round_id = ?",
                                     (rel, count, json.dumps(info), rid))
                        if count >= goal:
                            self.db.update_round(rid, state="aggregating")
                    committed = True
                    old = row["sum_file"]
                    self._sums[rid] = new
                    if count >= goal:
                        self.m._wake.set()
            except BaseException:
                if not committed:
                    self.store.delete(rel)
                raise
        self.store.delete(old)
        self.m.metrics.inc("fk_uploads_total", {"result": "accepted"})
        return self._answer(self.db.get_update(rid, device_id))

    @staticmethod
    def _answer(row: dict[str, Any]) -> dict[str, Any]:
        return {"status": "accepted", "round_id": row["round_id"], "payload_sha256": row["payload_sha256"],
                "num_examples": row["num_examples"]}

    def _current(self, rid: int, row: dict[str, Any], packing: pp.Packing) -> list | None:
        cur = self._sums.get(rid)
        if cur is None and row["sum_file"]:
            import gmpy2

            key = self._public_key()
            data = self.store.read_bytes(row["sum_file"])
            cur = [gmpy2.mpz(c) for c in pp.ciphertexts_from_bytes(data, packing.ct_bytes, packing.n_ciphertexts,
                                                                    key.nsquare)]
            self._sums[rid] = cur
        return cur

    # ------------------------------------------------------------------ aggregation
    def result_sum(self, rid: int) -> np.ndarray:
        """Decrypt the round's encrypted sum at the key holder; the float64 sum of the deltas."""
        t0 = time.perf_counter()
        row = self._row(rid)
        if row is None or not row["sum_file"]:
            raise SecureAggregationFailed("paillier_no_sum", f"round {rid} has no encrypted sum")
        packing: pp.Packing = row["packing"]
        count = row["sum_count"]
        body = privacy_wire.frame(REQUEST_MAGIC, {"round_id": rid, "count": count, "key_id": row["key_id"],
                                                  "n_ct": packing.n_ciphertexts, "ct_bytes": packing.ct_bytes},
                                  self.store.read_bytes(row["sum_file"]))
        url = self.config.paillier_keyholder_url.rstrip("/") + "/v1/decrypt"
        r = httpx.post(url, content=body, timeout=httpx.Timeout(3600.0, connect=10.0),
                       headers={"Authorization": f"Bearer {self.config.paillier_keyholder_token or ''}",
                                "Content-Type": "application/octet-stream"})
        if 400 <= r.status_code < 500:  # refused (count, replay, token) or malformed: never retried
            try:
                err = r.json()
            except ValueError:
                err = {"error": f"http_{r.status_code}", "detail": r.text[:200]}
            raise SecureAggregationFailed(f"keyholder_{err.get('error')}", str(err.get("detail", "")))
        r.raise_for_status()  # anything else (5xx): retried by the round worker
        t_dec = time.perf_counter()
        header, payload, _ = privacy_wire.unframe(RESPONSE_MAGIC, r.content)
        width = header["width"]
        data = bytes(payload)
        plains = [int.from_bytes(data[i * width:(i + 1) * width], "big") for i in range(header["n"])]
        total, ok = pp.dequantize_sum(pp.unpack(plains, packing), count, packing)
        if not ok:
            raise SecureAggregationFailed("paillier_integrity",
                                          "decrypted sum out of range: a ciphertext was altered")
        with self.db.write() as conn:
            info = row["info"]
            info.update(decrypt_seconds=t_dec - t0, unpack_seconds=time.perf_counter() - t_dec, count=count)
            conn.execute("UPDATE paillier_rounds SET info = ? WHERE round_id = ?", (json.dumps(info), rid))
        log.info("round %d: key holder decrypted the sum of %d Paillier inputs (%d ciphertexts) in %.2fs", rid, count,
                 packing.n_ciphertexts, t_dec - t0)
        return total

    def cleanup(self, rid: int) -> None:
        row = self._row(rid)
        if row is None or not row["sum_file"]:
            return
        with self.db.write() as conn:
            conn.execute("UPDATE paillier_rounds SET sum_file = NULL WHERE round_id = ?", (rid,))
        self.store.delete(row["sum_file"])
        self._sums.pop(rid, None)
        self._locks.pop(rid, None)
        d = self.store.path(f"paillier/r{rid:06d}")
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()

    def tick(self, now: float) -> None:
        for r in self.db.all("SELECT p.round_id FROM paillier_rounds p JOIN rounds r ON r.id = p.round_id"
                             " WHERE p.sum_file IS NOT NULL AND r.state IN ('closed', 'abandoned')"):
            self.cleanup(r["round_id"])

    def recover(self) -> None:
        root = self.store.path("paillier")
        if not root.is_dir():
            return
        live = {r["sum_file"] for r in self.db.all("SELECT sum_file FROM paillier_rounds WHERE sum_file IS NOT NULL")}
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.relative_to(self.store.root).as_posix() not in live:
                p.unlink(missing_ok=True)

    def summary(self, rid: int) -> dict[str, Any] | None:
        row = self._row(rid)
        if row is None:
            return None
        p: pp.Packing = row["packing"]
        return {"protocol": pp.PROTOCOL, "key_id": row["key_id"], "slots_per_ciphertext": p.slots,
                "ciphertexts": p.n_ciphertexts, "value_bits": p.value_bits, "contributions": row["sum_count"],
                **row["info"]}


__all__ = ["PaillierCoordinator", "SecureAggregationFailed"]
