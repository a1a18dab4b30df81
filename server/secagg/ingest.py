"""SecAgg stage 3: masked inputs into the round's durable running modular sum (running_sum.py).

A masked input is validated and added to a staging sum (the request body can go), then committed with
whatever else was staged meanwhile (group commit): the new sum file is written durably (temp, fsync,
rename), then one transaction adds every contributor row and points the round's row at the file,
then the answers go out.

Each masked input is also kept as uploaded (in_rel) until the round closes: a device that gave its
holders bad shares cannot be unmasked, and its input is then taken out of the sum instead
(protocol.recover_sum). A masked vector is uniform in the ring: it shows nothing without the seeds the
protocol never reveals for an honest survivor. These files are written without fsync (a crash loses at
most the ability to take a cheater out: that round then fails safely, as before).
"""
from __future__ import annotations

import hashlib
import secrets
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from models import secagg_math as sm
from models.privacy_wire import FrameError
from server.errors import Rejection
from server.secagg import protocol as proto
from server.secagg.running_sum import Claim, RunningSum
from server.secagg.store import in_rel
from server.strategy import parse_metadata

if TYPE_CHECKING:
    from server.secagg.service import SecAggService


# frame refusals that are the sender's doing, not damage in transit (those fail the checksum or the
# framing first): a ring or length other than the round's, a frame of another kind
VIOLATIONS = frozenset({"shape_mismatch", "wrong_kind"})


def _answer(row: dict[str, Any]) -> dict[str, Any]:
    return {"status": "accepted", "round_id": row["round_id"], "payload_sha256": row["payload_sha256"],
            "num_examples": row["num_examples"]}


class MaskedInputs:
    def __init__(self, service: SecAggService) -> None:
        self.s = service
        self._sums: dict[int, RunningSum] = {}

    def max_input_bytes(self) -> int:
        return self.s.host.dim * 8 + (1 << 16)

    def submit(self, device_id: str, rid: int, body: bytes) -> dict[str, Any]:
        """Stage and commit one masked input (the HTTP route runs the two halves separately so that the
        request body is freed as soon as it has been added to the staging sum)."""
        return self.commit(self.stage(device_id, rid, body))

    def stage(self, device_id: str, rid: int, body: bytes) -> tuple[RunningSum, Claim] | dict[str, Any]:
        """Validate a masked input and add it to the round's staging sum. Returns (the round's running
        sum, the input's claim), or the stored answer when the input was already committed (a retry).

        What is checked here is the frame (ring, length, round, device, metadata): one outside them is
        refused and its device excluded (_exclude). The words themselves are uniform in the ring whatever
        the input, so its per-device bound cannot be checked here; only the unmasked sum is bounded
        (protocol.recover_sum says what that leaves a device free to send)."""
        s = self.s
        rnd, st = s.round(rid, device_id)
        prev = s.db.get_update(rid, device_id)
        if prev is not None:
            if prev["payload_sha256"] != hashlib.sha256(memoryview(body)[:-32]).hexdigest():
                raise Rejection("duplicate_upload", f"round {rid} already holds a different masked input from this device")
            return _answer(prev)
        s.require_stage(rnd, st, "masked")
        if device_id not in st.u2:
            raise Rejection("not_admitted", "device did not share keys in this round")
        s.drops.refuse_if_left(rid, device_id)
        q = st.quantization
        try:
            header, y, sha = sm.decode_masked(body, bits=q.bits, dim=s.host.dim, max_bytes=self.max_input_bytes())
        except FrameError as exc:
            if exc.reason in VIOLATIONS:
                self._exclude(rid, device_id, exc.reason, exc.detail)
            raise Rejection(exc.reason, exc.detail) from None
        try:
            if header.get("round_id") != rid or header.get("session") != st.session \
                    or header.get("device_id") != device_id:
                raise Rejection("bad_metadata", "masked input is for another round, session or device")
            num_examples, metrics = parse_metadata(header.get("metadata") or {}, rnd.train.max_examples_per_update)
        except Rejection as exc:
            self._exclude(rid, device_id, exc.reason, exc.detail)
            raise
        running = self.running(rid)
        s.store.write_unsynced(in_rel(rid, device_id, sha), lambda f: np.save(f, y, allow_pickle=False))
        return running, running.stage(Claim(device_id, sha, num_examples, metrics), y)

    def kept_input(self, rid: int, device_id: str) -> np.ndarray | None:
        """The masked input of a contributor as it was added to the sum, or None if it is not at hand."""
        row = self.s.db.get_update(rid, device_id)
        path = self.s.store.path(in_rel(rid, device_id, row["payload_sha256"])) if row else None
        try:
            return np.load(path, allow_pickle=False) if path is not None else None
        except (OSError, ValueError):
            return None

    def _exclude(self, rid: int, device_id: str, reason: str, detail: str) -> None:
        """A masked input outside what the protocol allows (another ring or length, another round or device,
        metadata out of range): not transport damage (the frame's checksum verified), so the device is out
        of the round and named, and the stage stops waiting for it (dropouts.Dropouts.exclude)."""
        s = self.s
        with s.host.lock:
            rnd, st = s.round(rid, None)
            if rnd.state == "open" and st.stage == "masked":
                s.drops.exclude(rid, device_id, proto.offender(device_id, "masked", "secagg_bad_masked_input",
                                                               f"{reason}: {detail}"))

    def commit(self, staged: tuple[RunningSum, Claim] | dict[str, Any]) -> dict[str, Any]:
        """The staged input's answer once it is in the durable running sum (group commit: inputs
        staged while a sum is being written go together in the next write)."""
        if isinstance(staged, dict):
            return staged
        running, claim = staged
        rid = running.round_id
        answer = running.wait(claim, lambda claims, new, count: self._commit_sum(rid, claims, new, count))
        self.s.metrics.inc("fk_uploads_total", {"result": "accepted"})
        return answer

    def running(self, rid: int) -> RunningSum:
        """The round's running sum (loaded from its file after a restart)."""
        running = self._sums.get(rid)
        if running is None:
            with self.s.host.lock:
                running = self._sums.get(rid)
                if running is None:
                    st = self.s.state(rid)
                    dtype, dim = sm.ring_dtype(st.quantization.bits), self.s.host.dim
                    current = None
                    if st.sum_file:
                        current = np.load(self.s.store.path(st.sum_file), allow_pickle=False)
                        if current.dtype != dtype or current.size != dim:
                            raise RuntimeError(f"round {rid}: stored running sum has the wrong layout")
                    running = self._sums[rid] = RunningSum(rid, dim, dtype, current, st.sum_count)
        return running

    def forget(self, rid: int) -> None:
        self._sums.pop(rid, None)

    def _commit_sum(self, rid: int, claims: list[Claim], new: np.ndarray, count: int) -> Callable[[], None]:
        """Make `new` (the running sum with `claims` added) durable: sum file first, then one transaction
        with every contributor row and the row's pointer to the file. Returns what follows once it is
        the current sum: the old file goes, the claims get their answers, the stage may close."""
        s, db = self.s, self.s.db
        tb = time.perf_counter()
        rnd, st = s.round(rid, None)
        s.require_stage(rnd, st, "masked")
        rel = f"secagg/r{rid:06d}/sum-{count:06d}-{secrets.token_hex(4)}.npy"
        s.store.write_atomic(rel, lambda f: np.save(f, new, allow_pickle=False),
                             size=new.nbytes + 128)  # durable first
        try:
            with s.host.lock:
                rnd, st = s.round(rid, None)
                s.require_stage(rnd, st, "masked")
                if st.sum_count != count - len(claims):
                    raise RuntimeError("running sum out of step with the database")
                now = time.time()
                with db.write():
                    for c in claims:
                        db.add_update(round_id=rid, device_id=c.device_id, payload_sha256=c.sha, file=None,
                                      num_examples=c.num_examples, weight=1.0, norm=0.0,
                                      dtype=f"secagg{st.quantization.bits}", metrics=c.metrics, received_at=now)
                        db.touch_device(c.device_id, now)
                    s.rows.update(rid, sum_file=rel, sum_count=count)
        except BaseException:
            s.store.delete(rel)
            raise
        s.time(rid, "ingest_seconds", time.perf_counter() - tb)  # write + commit
        s.time(rid, "ingest_batches", 1.0)

        def after() -> None:  # the row points at the new sum: from here on it stays
            for c in claims:
                c.finish(answer=_answer({"round_id": rid, "payload_sha256": c.sha, "num_examples": c.num_examples}))
            s.store.delete(st.sum_file)
            if count >= len(st.u2) or count >= rnd.params.goal:
                with s.host.lock:
                    now_rnd, now_st = s.round(rid, None)
                    if now_st.stage == "masked" and now_rnd.state == "open":
                        s.close_masked(now_rnd, now_st)
            elif s.drops.of(rid):  # with dropouts, these may have been the last inputs that could come
                with s.host.lock:
                    s.drops.settle(rid)
        return after


__all__ = ["MaskedInputs"]
