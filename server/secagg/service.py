"""SecAgg rounds, the service: the protocol (server/secagg/protocol.py) applied to requests, with the
locking, durable writes and caches around it. Masked inputs are server/secagg/ingest.py, the unmasking
thread server/secagg/finish.py, devices that leave a round (and the stage decided early by them)
server/secagg/dropouts.py, the HTTP routes server/secagg/routes.py.

Locking: every state change re-reads the round and its protocol state under the round manager's lock
(`host.lock`, shared with uploads, deadlines and aggregation), then commits one transaction.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from models import secagg_math as sm
from server.config import ServerConfig
from server.db import Db
from server.errors import Rejection
from server.host import RoundHost
from server.metrics import Metrics
from server.round import Round
from server.secagg import protocol as proto
from server.secagg.dropouts import Dropouts
from server.secagg.finish import Unmasker
from server.secagg.identity import IdentityRegistry
from server.secagg.ingest import MaskedInputs
from server.secagg.protocol import ACTIVE, STAGES, Advance, Fail, SecAggState
from server.secagg.store import SecAggStore
from server.secagg.waiters import Waiters
from server.store import Store
from server.strategy import UploadBound

log = logging.getLogger("server.secagg")


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class SecAggService:
    """Server side of the SecAgg protocol for every round that asks for it (one instance per server)."""

    runs_own_deadlines = True  # stage deadlines (server/secagg/protocol.py), not the round manager's

    def __init__(self, config: ServerConfig, db: Db, store: Store, host: RoundHost, metrics: Metrics) -> None:
        self.config, self.db, self.store, self.host, self.metrics = config, db, store, host, metrics
        self.rows = SecAggStore(db)
        warning = proto.neighbourhood_warning(config)
        if warning:
            log.warning(warning)
        self.waiters = Waiters()
        self.inputs = MaskedInputs(self)
        self.unmasker = Unmasker(self)
        self.drops = Dropouts(self)
        self._timers: dict[int, dict[str, float]] = {}
        self._graphs: dict[int, tuple[Any, dict[str, list[str]]]] = {}
        # Parts of stage views that no longer change once their stage closed (the cohort's keys, the
        # consistency signatures): built once per round and handed to every device, not re-read per request.
        self._frozen: dict[tuple[str, int], Any] = {}
        self._freeze_lock = threading.Lock()
        self._admitted: set[tuple[int, str]] = set()  # (round, device) pairs seen admitted
        self.identities = IdentityRegistry(self.rows, host.lock)

    # ------------------------------------------------------------------ protocol state
    def state(self, rid: int) -> SecAggState | None:
        return self.rows.state(rid)

    def stage(self, rid: int) -> str | None:
        """The round's committed stage (what every view answers from; the row is cached)."""
        st = self.rows.state(rid)
        return st.stage if st is not None else None

    def _ensure_state(self, rnd: Round, bound: UploadBound | None = None) -> SecAggState:
        st = self.rows.state(rnd.id)
        if st is not None:
            return st
        bound = bound or self.host.upload_bound(rnd)
        q = proto.quantization_for(rnd.train, bound, self.host.dim)
        with self.db.write():
            self.rows.create(rnd.id, q, rnd.train.secagg_neighbors, time.time())
        return self.rows.state(rnd.id)

    def set_stage(self, rid: int, stage: str, deadline: float | None, info: dict[str, Any] | None = None,
                  **fields: Any) -> None:
        """Inside a write transaction: move to `stage`, recording when the previous one closed."""
        st = self.rows.state(rid)
        merged = json.loads(json.dumps(st.info))  # the cached state's info is shared
        now = time.time()
        stages = merged.setdefault("stages", {})
        stages.setdefault(st.stage, {})["closed"] = now
        if stage in STAGES:
            stages.setdefault(stage, {})["opened"] = now
        timers = self._timers.get(rid)
        if timers:
            for k, v in timers.items():
                merged[k] = merged.get(k, 0.0) + v
            timers.clear()
        merged.update(info or {})
        self.rows.update(rid, stage=stage, stage_deadline=deadline, info=merged, **fields)

    def time(self, rid: int, key: str, seconds: float) -> None:
        t = self._timers.setdefault(rid, {})
        t[key] = t.get(key, 0.0) + seconds

    def _advance(self, rnd: Round, result: Advance | Fail) -> bool:
        """(Caller holds the lock.) Apply a stage close; False if the round failed."""
        if isinstance(result, Fail):
            self.fail(rnd, result.reason, result.counts)
            return False
        with self.db.write():
            self.set_stage(rnd.id, result.stage, result.deadline, info=result.info, **result.fields)
        return True

    def graph(self, rid: int, st: SecAggState) -> dict[str, list[str]]:
        """The round's neighbour graph (computed once per round: O(n^2) for the complete graph)."""
        key = (rid, st.graph_seed)
        if self._graphs.get(rid, (None,))[0] != key:
            self._graphs[rid] = (key, sm.neighbours(st.u1, st.graph_k, st.graph_seed))
        return self._graphs[rid][1]

    # ------------------------------------------------------------------ the strategy's view (SecureProtocol)
    def task_params(self, rnd: Round, bound: UploadBound) -> dict[str, Any]:
        return proto.task_params(rnd, self._ensure_state(rnd, bound))

    def admission_open(self, rnd: Round) -> bool:
        s = self.stage(rnd.id)
        return s is None or s == "advertise"

    def may_reanswer(self, rnd: Round, device_id: str) -> bool:
        """Only before the device advertised keys (a device that lost its round keys cannot rejoin), and
        never after it reported leaving the round."""
        return (self.admission_open(rnd) and self.rows.keys_of(rnd.id, device_id) is None
                and device_id not in self.drops.of(rnd.id))

    def result_sum(self, rid: int) -> np.ndarray:
        st = self.rows.state(rid)
        if st is None or not st.result_file:
            raise RuntimeError(f"round {rid} has no unmasked sum")
        return np.load(self.store.path(st.result_file), allow_pickle=False)

    def summary(self, rid: int) -> dict[str, Any] | None:
        st = self.rows.state(rid)
        return proto.summary(st) if st is not None else None

    # ------------------------------------------------------------------ common checks
    def round(self, rid: int, device_id: str | None) -> tuple[Round, SecAggState]:
        rnd = self.db.get_round(rid)
        if rnd is None or rnd.protocol != "secagg":
            raise Rejection("unknown_round", f"no secure-aggregation round {rid}")
        if device_id is not None and (rid, device_id) not in self._admitted:
            if not self.db.is_admitted(rid, device_id):
                raise Rejection("not_admitted", f"device was not admitted to round {rid}")
            self._admitted.add((rid, device_id))  # an admission is never withdrawn
        st = self.rows.state(rid)
        if st is None:
            st = self._ensure_state(rnd)
        return rnd, st

    @staticmethod
    def require_stage(rnd: Round, st: SecAggState, stage: str) -> None:
        if rnd.state != "open" or st.stage == "failed":
            raise Rejection("round_closed", f"round {rnd.id} is {rnd.state}"
                            + (f" ({st.info.get('failure')})" if st.info.get("failure") else ""))
        if st.stage != stage:
            raise Rejection("round_closed", f"round {rnd.id} is in secure-aggregation stage {st.stage!r}, "
                                            f"not {stage!r}")

    @staticmethod
    def _raise_if_failed(rnd: Round, st: SecAggState) -> None:
        if st.stage == "failed" or rnd.state == "abandoned":
            reason = st.info.get("failure") or (rnd.outcome or {}).get("reason") or "abandoned"
            raise Rejection("round_closed", f"round {rnd.id} failed: {reason}")

    def _accepted(self, rid: int, stage: str | None = None) -> dict[str, Any]:
        return {"status": "accepted", "round_id": rid, "stage": stage if stage is not None else self.stage(rid)}

    # ------------------------------------------------------------------ stage 1: advertise keys
    def advertise(self, device_id: str, rid: int, body: dict[str, Any]) -> dict[str, Any]:
        rnd, st = self.round(rid, device_id)
        c_pk, s_pk, sig = proto.parse_advertise(body)
        message = sm.advertise_message(st.session, rid, device_id, c_pk, s_pk)
        if not sm.verify(self.identities.key(device_id), sig, message):
            raise Rejection("bad_signature", "advertised keys are not signed by this device's identity key")
        with self.host.lock:
            rnd, st = self.round(rid, device_id)
            prev = self.rows.keys_of(rid, device_id)
            if prev is not None:
                if (prev["c_pk"], prev["s_pk"]) != (sm.b64(c_pk), sm.b64(s_pk)):
                    raise Rejection("duplicate_upload", "this device already advertised other keys for this round")
                return self._accepted(rid, st.stage)
            self.require_stage(rnd, st, "advertise")
            self.drops.refuse_if_left(rid, device_id)
            self.drops.refuse_bad_keys(rid, device_id, c_pk, s_pk)
            with self.db.write():
                self.rows.add_keys(rid, device_id, sm.b64(c_pk), sm.b64(s_pk), sm.b64(sig))
            if self.rows.count_keys(rid) >= rnd.params.max_admitted:
                self.close_advertise(rnd, st)
            else:
                self.drops.settle(rid)  # with dropouts, this may have been the last device that could answer
            return self._accepted(rid)

    def close_advertise(self, rnd: Round, st: SecAggState) -> None:
        if self._advance(rnd, proto.close_advertise(st, rnd.train, self.rows.advertisers(rnd.id), time.time(),
                                                    admitted=self.db.count_admitted(rnd.id))):
            st = self.rows.state(rnd.id)
            log.info("round %d secagg: %d devices advertised keys; threshold %d of %d holders", rnd.id, len(st.u1),
                     st.threshold, st.info.get("holders_per_secret"))
            self._keys_part(rnd.id)  # built here, once, so the cohort's views only read memory
            self.waiters.notify(rnd.id)
            self.drops.settle(rnd.id)  # devices that left earlier may decide the next stage already

    def keys_view(self, device_id: str, rid: int) -> dict[str, Any]:
        rnd, st = self.round(rid, device_id)
        self._raise_if_failed(rnd, st)
        if not st.ready_after("advertise"):
            return {"ready": False, "stage": st.stage}
        return {"ready": True, "stage": st.stage, "session": st.session, "threshold": st.threshold,
                "neighbors": st.graph_k, "graph_seed": st.graph_seed, "participants": self._keys_part(rid)}

    def _keys_part(self, rid: int) -> list[dict[str, Any]]:
        """U1's advertised keys with their identity keys (fixed from the close of the advertise stage on)."""
        def build() -> list[dict[str, Any]]:
            keys, idents = self.rows.all_keys(rid), self.rows.identities_of_advertisers(rid)
            return [{"device_id": u, "index": i + 1, "c_pk": keys[u]["c_pk"], "s_pk": keys[u]["s_pk"],
                     "signature": keys[u]["signature"], "identity_key": idents.get(u)}
                    for i, u in enumerate(self.rows.state(rid).u1)]
        return self._frozen_part("keys", rid, build)

    def _frozen_part(self, kind: str, rid: int, build: Callable[[], Any]) -> Any:
        """A part of a stage view that no longer changes once its stage closed, built once per round
        (by one thread: the cohort asks for it all at once) and handed to every device."""
        value = self._frozen.get((kind, rid))
        if value is None:
            with self._freeze_lock:
                value = self._frozen.get((kind, rid))
                if value is None:
                    value = self._frozen[(kind, rid)] = build()
        return value

    # ------------------------------------------------------------------ stage 2: share keys
    def share(self, device_id: str, rid: int, body: dict[str, Any]) -> dict[str, Any]:
        rnd, st = self.round(rid, device_id)
        body_sha = _sha(json.dumps(body, sort_keys=True))
        prev = self.rows.commitment_sha(rid, device_id)
        if prev is not None:
            if prev != body_sha:
                raise Rejection("duplicate_upload", "this device already shared other keys in this round")
            return self._accepted(rid, st.stage)
        self.require_stage(rnd, st, "share")
        if device_id not in st.u1:
            raise Rejection("not_admitted", "device did not advertise keys in time for this round")
        shares, commit = proto.parse_shares(body, set(self.graph(rid, st)[device_id]))
        self._check_share_signatures(rnd, st, device_id, shares)
        with self.host.lock:
            rnd, st = self.round(rid, device_id)
            if self.rows.commitment_sha(rid, device_id) is not None:
                return self.share(device_id, rid, body)
            self.require_stage(rnd, st, "share")
            self.drops.refuse_if_left(rid, device_id)
            with self.db.write():
                self.rows.add_shares(rid, device_id, shares, commit, body_sha)
            if self.rows.count_commitments(rid) >= len(st.u1):
                self.close_share(rnd, st)
            else:
                self.drops.settle(rid)
            return self._accepted(rid)

    def _check_share_signatures(self, rnd: Round, st: SecAggState, device_id: str,
                                shares: list[tuple[str, bytes, bytes]]) -> None:
        """Each ciphertext must be signed by its sender: a holder that cannot decrypt one can then tell the
        sender's doing from the relay's (device_app.secagg unmask_body). A device that signs badly is out of
        the round and named, so the stage stops waiting for it."""
        ident, ctx = self.identities.key(device_id), sm.round_context(st.session, rnd.id)
        bad = [to for to, ct, sig in shares if not sm.verify(ident, sig, sm.share_message(ctx, device_id, to, ct))]
        if not bad:
            return
        detail = f"{len(bad)} of its {len(shares)} encrypted shares are not signed by its identity key"
        with self.host.lock:
            rnd, st = self.round(rnd.id, device_id)
            if rnd.state == "open" and st.stage == "share":
                self.drops.exclude(rnd.id, device_id, proto.offender(device_id, "share", "secagg_bad_share_signature",
                                                                     detail))
        raise Rejection("bad_signature", f"{detail}; this device is out of the round")

    def close_share(self, rnd: Round, st: SecAggState) -> None:
        if self._advance(rnd, proto.close_share(st, rnd.train, self.rows.sharers(rnd.id), time.time(), rnd.deadline)):
            log.info("round %d secagg: %d devices shared keys", rnd.id, len(self.rows.state(rnd.id).u2))
            self._inbox_part(rnd.id)
            self.waiters.notify(rnd.id)
            self.drops.settle(rnd.id)

    def _inbox_part(self, rid: int) -> dict[str, list[dict[str, str]]]:
        """U2's encrypted shares by recipient (fixed from the close of the share stage on)."""
        def build() -> dict[str, list[dict[str, str]]]:
            u2, inbox = set(self.rows.state(rid).u2), {}
            for r in self.rows.shares_by_sender(rid):
                if r["sender"] in u2:
                    sig, ct = proto.split_signed_share(bytes(r["ct"]))
                    inbox.setdefault(r["recipient"], []).append({"from": r["sender"], "ct": sm.b64(ct),
                                                                 "sig": sm.b64(sig)})
            return inbox
        return self._frozen_part("shares", rid, build)

    def shares_view(self, device_id: str, rid: int) -> dict[str, Any]:
        rnd, st = self.round(rid, device_id)
        self._raise_if_failed(rnd, st)
        if not st.ready_after("share"):
            return {"ready": False, "stage": st.stage}
        return {"ready": True, "stage": st.stage, "u2": st.u2, "shares": self._inbox_part(rid).get(device_id, [])}

    # ------------------------------------------------------------------ stage 3: masked input (ingest.py)
    def close_masked(self, rnd: Round, st: SecAggState) -> None:
        contributors = [r["device_id"] for r in self.db.list_updates(rnd.id)]
        if self._advance(rnd, proto.close_masked(st, rnd.train, contributors, time.time())):
            st = self.rows.state(rnd.id)
            log.info("round %d secagg: %d masked inputs (%d of U2 dropped)", rnd.id, len(st.u3),
                     len(st.u2) - len(st.u3))
            self.waiters.notify(rnd.id)
            self.drops.settle(rnd.id)

    def survivors_view(self, device_id: str, rid: int) -> dict[str, Any]:
        rnd, st = self.round(rid, device_id)
        self._raise_if_failed(rnd, st)
        if not st.ready_after("masked"):
            return {"ready": False, "stage": st.stage}
        return {"ready": True, "stage": st.stage, "u3": st.u3}

    # ------------------------------------------------------------------ stage 4: consistency check
    def consistency(self, device_id: str, rid: int, body: dict[str, Any]) -> dict[str, Any]:
        self.round(rid, device_id)
        sig = proto.parse_signature(body)
        with self.host.lock:
            rnd, st = self.round(rid, device_id)
            prev = self.rows.signature_of(rid, device_id)
            if prev is not None:
                if prev != sm.b64(sig):
                    raise Rejection("duplicate_upload", "this device already signed")
                return self._accepted(rid, st.stage)
            self.require_stage(rnd, st, "consistency")
            if device_id not in st.u3:
                raise Rejection("not_admitted", "device is not among this round's masked inputs")
            self.drops.refuse_if_left(rid, device_id)
            if not sm.verify(self.identities.key(device_id), sig, sm.consistency_message(st.session, rid, st.u3)):
                raise Rejection("bad_signature", "consistency signature does not verify over this round's U3")
            with self.db.write():
                self.rows.add_signature(rid, device_id, sm.b64(sig))
            if self.rows.count_signatures(rid) >= len(st.u3):
                self.close_consistency(rnd, st)
            else:
                self.drops.settle(rid)
            return self._accepted(rid)

    def close_consistency(self, rnd: Round, st: SecAggState) -> None:
        if self._advance(rnd, proto.close_consistency(st, rnd.train, self.rows.count_signatures(rnd.id), time.time())):
            self._signatures_part(rnd.id)
            self.waiters.notify(rnd.id)
            self.drops.settle(rnd.id)

    def _signatures_part(self, rid: int) -> list[dict[str, str]]:
        return self._frozen_part("signatures", rid, lambda: self.rows.signatures(rid))

    def signatures_view(self, device_id: str, rid: int) -> dict[str, Any]:
        rnd, st = self.round(rid, device_id)
        self._raise_if_failed(rnd, st)
        if not st.ready_after("consistency"):
            return {"ready": False, "stage": st.stage}
        return {"ready": True, "stage": st.stage, "u3": st.u3, "signatures": self._signatures_part(rid)}

    # ------------------------------------------------------------------ stage 5: unmasking
    def unmasking(self, device_id: str, rid: int, body: dict[str, Any]) -> dict[str, Any]:
        rnd, st = self.round(rid, device_id)
        body_sha = _sha(json.dumps(body, sort_keys=True))
        prev = self.rows.unmask_sha(rid, device_id)
        if prev is not None:
            if prev != body_sha:
                raise Rejection("duplicate_upload", "this device already sent its unmasking shares")
            return self._accepted(rid, st.stage)
        self.require_stage(rnd, st, "unmask")
        if device_id not in st.u3:
            raise Rejection("not_admitted", "device is not among this round's masked inputs")
        if self.rows.signature_of(rid, device_id) is None:  # U5 within U4 (Bonawitz et al.): who checked U3
            raise Rejection("not_admitted", "device did not sign this round's survivor set")
        want_b, want_s = proto.unmask_wants(st, self.graph(rid, st), device_id)
        b_sh, s_sh, pairs, complaints = proto.parse_unmask(body, want_b, want_s, device_id)
        with self.host.lock:
            rnd, st = self.round(rid, device_id)
            if self.rows.unmask_sha(rid, device_id) is not None:
                return self.unmasking(device_id, rid, body)
            self.require_stage(rnd, st, "unmask")
            self.drops.refuse_if_left(rid, device_id)
            with self.db.write():
                self.rows.add_unmask(rid, device_id, b_sh, s_sh, body_sha, pairs, complaints)
            if self.rows.count_unmask(rid) >= self.rows.count_signatures(rid):
                self.close_unmask(rnd, st)
            else:
                self.drops.settle(rid)
            return self._accepted(rid)

    def close_unmask(self, rnd: Round, st: SecAggState) -> None:
        if self._advance(rnd, proto.close_unmask(st, self.rows.count_unmask(rnd.id), self.rows.count_signatures(rnd.id))):
            self.waiters.notify(rnd.id)
            self.unmasker.start(rnd.id)

    def result_view(self, device_id: str, rid: int) -> dict[str, Any]:
        rnd, st = self.round(rid, device_id)
        self._raise_if_failed(rnd, st)
        return {"ready": st.stage == "done", "stage": st.stage, "round_state": rnd.state,
                "result_version": rnd.result_version}

    # ------------------------------------------------------------------ failure, deadlines, cleanup
    def fail(self, rnd: Round, reason: str, counts: dict[str, Any] | None = None) -> None:
        """Abandon the round (caller holds the manager lock). `counts` (the failing stage's tally: eligible,
        submitted, dropped, pending, needed) go into the round's outcome next to the manager's own."""
        log.warning("round %d secagg failed: %s", rnd.id, reason)

        def mark_failed() -> None:
            if self.rows.state(rnd.id) is not None:
                self.set_stage(rnd.id, "failed", None, info={"failure": reason, **({"failure_counts": counts}
                                                                                    if counts else {})})

        self.host.abandon(rnd, reason.split(":")[0], also=mark_failed)
        if counts:  # the manager wrote reason, admitted, accepted; the stage's counts say why
            after = self.db.get_round(rnd.id)
            if after is not None and after.state == "abandoned":
                with self.db.write():
                    self.db.update_round(rnd.id, outcome={**(after.outcome or {}), **counts})
        self.waiters.notify(rnd.id)  # devices waiting on a stage learn it now, not at their deadline
        self._cleanup(rnd.id)
        self.host.wake()  # the worker opens the next round now

    def tick(self, now: float) -> None:
        for r in self.rows.uncleaned():
            rid, stage = r["round_id"], r["stage"]
            rnd = self.db.get_round(rid)
            if rnd is None:
                continue
            if rnd.is_over:
                if stage in ACTIVE:
                    with self.host.lock, self.db.write():
                        self.set_stage(rid, "failed", None, info={"failure": f"round {rnd.state}"})
                    self.waiters.notify(rid)
                self._cleanup(rid)
                continue
            if stage == "finishing" and not self.unmasker.running(rid):
                self.unmasker.start(rid)  # after a restart
                continue
            deadline = r["stage_deadline"]
            if stage == "advertise" and deadline is None and rnd.deadline is not None:
                # The advertise stage runs secagg_stage_s from the round's first admission.
                first_admission = rnd.deadline - rnd.params.deadline_s
                with self.host.lock, self.db.write():
                    self.rows.update(rid, stage_deadline=first_admission + rnd.train.secagg_stage_s)
                continue
            if deadline is None or now < deadline or stage not in ACTIVE:
                continue
            with self.host.lock:
                rnd, st = self.db.get_round(rid), self.rows.state(rid)
                if rnd.state != "open" or st.stage != stage:
                    continue
                log.info("round %d secagg: stage %s reached its deadline", rid, stage)
                self.close_stage(rnd, st)

    def close_stage(self, rnd: Round, st: SecAggState) -> None:
        """(Caller holds the lock.) Close the current stage by its own rule (advance or fail)."""
        {"advertise": self.close_advertise, "share": self.close_share, "masked": self.close_masked,
         "consistency": self.close_consistency, "unmask": self.close_unmask}[st.stage](rnd, st)

    def _cleanup(self, rid: int) -> None:
        """Drop everything but the summary once a round is over (keys, shares, sums)."""
        st = self.rows.state(rid)
        if st is None or st.cleaned:
            return
        rnd = self.db.get_round(rid)
        if rnd is not None and rnd.state in ("open", "aggregating"):
            return
        with self.host.lock:
            with self.db.write():
                self.rows.delete_stage_rows(rid)
                self.rows.update(rid, cleaned=1, sum_file=None, result_file=None)
            self.inputs.forget(rid)
            self.drops.forget(rid)
            self._graphs.pop(rid, None)
            for kind in ("keys", "shares", "signatures"):
                self._frozen.pop((kind, rid), None)
            self._admitted = {pair for pair in self._admitted if pair[0] != rid}
            self._timers.pop(rid, None)
        for rel in (st.sum_file, st.result_file):
            self.store.delete(rel)
        d = self.store.path(f"secagg/r{rid:06d}")
        if d.is_dir():
            for p in d.iterdir():
                p.unlink(missing_ok=True)
            d.rmdir()

    def recover(self) -> None:
        """At start: delete sum/result files no row references (left by a crash mid-write)."""
        root = self.store.path("secagg")
        if not root.is_dir():
            return
        live = self.rows.live_files()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.store.root).as_posix()
                if rel not in live:
                    p.unlink(missing_ok=True)
        for d in sorted(root.iterdir()):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


__all__ = ["SecAggService"]
