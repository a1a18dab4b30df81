"""Paillier rounds, server side: devices upload packed Paillier ciphertexts of their quantized delta
(models/paillier_pack.py); the server multiplies them into one running encrypted sum and asks the
separate key holder (server/keyholder.py) to decrypt only that sum.

Stored per round: the running encrypted sum (one file, replaced on every accepted upload: written
durably before the contributor row commits, then the 200) and the contributor list (updates rows
with no file). Never an individual ciphertext. At the goal, or at the deadline with >= min_count,
the round aggregates: the sum goes to the key holder with the contribution count; the plaintext
slots are unpacked, range-checked (a tampered ciphertext decrypts to garbage and abandons the round)
and de-quantized into the sum of the deltas.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from typing import Any

import numpy as np

from models import paillier_pack as pp
from models import privacy_wire
from server.config import ServerConfig
from server.db import Db
from server.errors import Rejection, SecureAggregationFailed
from server.host import RoundHost
from server.metrics import Metrics
from server.paillier import protocol as proto
from server.paillier.keyholder_client import KeyHolderClient
from server.paillier.store import PaillierStore
from server.round import Round
from server.store import Store
from server.strategy import UploadBound, parse_metadata

log = logging.getLogger("server.paillier")


def _answer(row: dict[str, Any]) -> dict[str, Any]:
    return {"status": "accepted", "round_id": row["round_id"], "payload_sha256": row["payload_sha256"],
            "num_examples": row["num_examples"]}


class PaillierService:
    runs_own_deadlines = False  # the round's deadline (RoundManager) closes the inputs

    def __init__(self, config: ServerConfig, db: Db, store: Store, host: RoundHost, metrics: Metrics) -> None:
        self.config, self.db, self.store, self.host, self.metrics = config, db, store, host, metrics
        self.rows = PaillierStore(db)
        self.keyholder = KeyHolderClient(config.paillier_keyholder_url, config.paillier_keyholder_token)
        self._sums: dict[int, list] = {}
        self._locks: dict[int, threading.Lock] = {}

    def public_key_info(self) -> dict[str, Any]:
        return self.keyholder.public_key_info()

    # ------------------------------------------------------------------ the strategy's view (SecureProtocol)
    def _ensure_row(self, rnd: Round, bound: UploadBound | None = None) -> dict[str, Any]:
        row = self.rows.row(rnd.id)
        if row is not None:
            return row
        key = self.keyholder.public_key()
        packing = proto.packing_for(rnd, bound or self.host.upload_bound(rnd), self.host.dim, key.key_bits)
        self.rows.create(rnd.id, key.key_id, packing)
        return self.rows.row(rnd.id)

    def task_params(self, rnd: Round, bound: UploadBound) -> dict[str, Any]:
        row = self._ensure_row(rnd, bound)
        return proto.task_params(rnd, self.public_key_info(), self.config.paillier_keyholder_url, row["packing"])

    def admission_open(self, rnd: Round) -> bool:
        return True

    def may_reanswer(self, rnd: Round, device_id: str) -> bool:
        return True

    def summary(self, rid: int) -> dict[str, Any] | None:
        row = self.rows.row(rid)
        return proto.summary(row) if row is not None else None

    # ------------------------------------------------------------------ inputs
    def submit(self, device_id: str, rid: int, body: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        rnd = self.db.get_round(rid)
        if rnd is None or rnd.protocol != "paillier":
            raise Rejection("unknown_round", f"no Paillier round {rid}")
        if not self.db.is_admitted(rid, device_id):
            raise Rejection("not_admitted", f"device was not admitted to round {rid}")
        row = self._ensure_row(rnd)
        prev = self.db.get_update(rid, device_id)
        if prev is not None:
            if prev["payload_sha256"] != hashlib.sha256(body[:-32]).hexdigest():
                raise Rejection("duplicate_upload", f"round {rid} already holds different ciphertexts from this device")
            return _answer(prev)
        if rnd.state != "open" or rnd.past_deadline(time.time()):
            raise Rejection("round_closed", f"round {rid} is {rnd.state}")
        key = self.keyholder.public_key()
        packing: pp.Packing = row["packing"]
        try:
            header, cts, sha = pp.decode_input(body, packing, key.nsquare, proto.max_input_bytes(packing))
        except privacy_wire.FrameError as exc:
            raise Rejection(exc.reason, exc.detail) from None
        proto.check_header(header, rid, row["key_id"], device_id)
        num_examples, metrics = parse_metadata(header.get("metadata") or {}, rnd.train.max_examples_per_update)
        lock = self._locks.setdefault(rid, threading.Lock())
        with lock:
            row = self.rows.row(rid)  # fresh: another upload may have committed while this one was decoded
            acc = self._current(rid, row, packing)
            new = pp.add_into(list(acc) if acc else [], cts, key.nsquare)
            count = row["sum_count"] + 1
            rel = f"paillier/r{rid:06d}/sum-{count:06d}-{secrets.token_hex(4)}.bin"
            self.store.write_bytes(rel, pp.ciphertexts_to_bytes(new, packing.ct_bytes))  # durable before its row
            committed = False
            try:
                with self.host.lock:
                    rnd = self.db.get_round(rid)
                    row = self.rows.row(rid)
                    if self.db.get_update(rid, device_id) is not None:
                        self.store.delete(rel)
                        return _answer(self.db.get_update(rid, device_id))
                    if rnd.state != "open" or rnd.past_deadline(time.time()):
                        raise Rejection("round_closed", f"round {rid} closed while the upload was processed")
                    goal = rnd.params.goal
                    if count - 1 >= goal:
                        raise Rejection("round_closed", f"round {rid} already has its {goal} updates")
                    now = time.time()
                    with self.db.write():
                        self.db.add_update(round_id=rid, device_id=device_id, payload_sha256=sha, file=None,
                                           num_examples=num_examples, weight=1.0, norm=0.0, dtype="paillier",
                                           metrics=metrics, received_at=now)
                        self.db.touch_device(device_id, now)
                        info = row["info"]
                        info["ingest_seconds"] = info.get("ingest_seconds", 0.0) + time.perf_counter() - t0
                        self.rows.set_sum(rid, rel, count, info)
                        if count >= goal:
                            self.db.update_round(rid, state="aggregating")
                    committed = True
                    old = row["sum_file"]
                    self._sums[rid] = new
                    if count >= goal:
                        self.host.wake()
            except BaseException:
                if not committed:
                    self.store.delete(rel)
                raise
        self.store.delete(old)
        self.metrics.inc("fk_uploads_total", {"result": "accepted"})
        return _answer(self.db.get_update(rid, device_id))

    def _current(self, rid: int, row: dict[str, Any], packing: pp.Packing) -> list | None:
        cur = self._sums.get(rid)
        if cur is None and row["sum_file"]:
            import gmpy2  # only a restarted round needs big integers before its first add

            key = self.keyholder.public_key()
            data = self.store.read_bytes(row["sum_file"])
            cur = [gmpy2.mpz(c) for c in pp.ciphertexts_from_bytes(data, packing.ct_bytes, packing.n_ciphertexts,
                                                                    key.nsquare)]
            self._sums[rid] = cur
        return cur

    # ------------------------------------------------------------------ aggregation
    def result_sum(self, rid: int) -> np.ndarray:
        """Decrypt the round's encrypted sum at the key holder; the float64 sum of the deltas."""
        t0 = time.perf_counter()
        row = self.rows.row(rid)
        if row is None or not row["sum_file"]:
            raise SecureAggregationFailed("paillier_no_sum", f"round {rid} has no encrypted sum")
        packing: pp.Packing = row["packing"]
        count = row["sum_count"]
        response = self.keyholder.decrypt(proto.decrypt_request(rid, count, row["key_id"], packing,
                                                                self.store.read_bytes(row["sum_file"])))
        t_dec = time.perf_counter()
        total = proto.sum_from_response(response, count, packing)
        info = row["info"]
        info.update(decrypt_seconds=t_dec - t0, unpack_seconds=time.perf_counter() - t_dec, count=count)
        self.rows.set_info(rid, info)
        log.info("round %d: key holder decrypted the sum of %d Paillier inputs (%d ciphertexts) in %.2fs", rid, count,
                 packing.n_ciphertexts, t_dec - t0)
        return total

    # ------------------------------------------------------------------ cleanup
    def cleanup(self, rid: int) -> None:
        row = self.rows.row(rid)
        if row is None or not row["sum_file"]:
            return
        self.rows.clear_sum(rid)
        self.store.delete(row["sum_file"])
        self._sums.pop(rid, None)
        self._locks.pop(rid, None)
        d = self.store.path(f"paillier/r{rid:06d}")
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()

    def tick(self, now: float) -> None:
        for rid in self.rows.finished_with_sum():
            self.cleanup(rid)

    def recover(self) -> None:
        root = self.store.path("paillier")
        if not root.is_dir():
            return
        live = self.rows.live_files()
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.relative_to(self.store.root).as_posix() not in live:
                p.unlink(missing_ok=True)


__all__ = ["PaillierService"]
