"""SecAgg dropouts: devices that report leaving a round, and the stage decided before its deadline.

A device that gives up on a SecAgg round (a local error, a failed check, training stopped) says so:
POST /v1/rounds/{id}/secagg/abort {reason}. From then on its stage messages are refused (so that what
was counted stays true), and after every change that can decide the current stage early (a dropout, a
message in a round that has dropouts, the close of the previous stage) the stage is tallied
(protocol.Tally) and judged (protocol.decide_early):

    unreachable  the devices that answered plus those that still can are below the stage's threshold,
                 or too few remain for the later stages: the round is abandoned at once
                 (secagg_threshold_unreachable, with the counts) and the next round can open;
    complete     every eligible device answered or left: the stage closes now by its own rule.

A device caught cheating (advertised keys of small order or another device's, a masked input the
protocol does not allow) is excluded the same way, and named in the round's offender list.

Devices that vanish without a word are known only at the stage deadline, as before. Without any
dropout nothing can be decided early (the previous stage's close checked its threshold), so rounds
without dropouts never pay for a tally.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from models import secagg_math as sm
from server.errors import Rejection
from server.round import Round
from server.secagg import protocol as proto
from server.secagg.protocol import ACTIVE, SecAggState

if TYPE_CHECKING:
    from server.secagg.service import SecAggService


class Dropouts:
    def __init__(self, service: SecAggService) -> None:
        self.s = service
        self._lock = threading.Lock()
        self._known: dict[int, dict[str, str]] = {}  # round -> {device: stage it left in}; loaded once per round

    # ------------------------------------------------------------------ who left
    def of(self, rid: int) -> dict[str, str]:
        """The devices that left round `rid` (device -> stage); read from the database once, then kept."""
        known = self._known.get(rid)
        if known is None:
            with self._lock:
                known = self._known.get(rid)
                if known is None:
                    known = self._known[rid] = self.s.rows.dropouts(rid)
        return known

    def refuse_if_left(self, rid: int, device_id: str) -> None:
        """A device that reported leaving cannot come back: the tallies counted it as gone."""
        if device_id in self.of(rid):
            raise Rejection("round_closed", f"this device left round {rid} (it reported dropping out)")

    def forget(self, rid: int) -> None:
        with self._lock:
            self._known.pop(rid, None)

    def record(self, device_id: str, rid: int, body: dict[str, Any]) -> dict[str, Any]:
        """The abort message: the device left the round. Idempotent; may end the stage or the round."""
        s = self.s
        s.round(rid, device_id)
        reason = proto.parse_abort(body)
        with s.host.lock:
            rnd, st = s.round(rid, device_id)
            if rnd.state != "open" or st.stage not in ACTIVE:
                failure = st.info.get("failure") or (rnd.outcome or {}).get("reason")
                raise Rejection("round_closed", f"round {rid} is {rnd.state}" + (f" ({failure})" if failure else ""))
            known = self.of(rid)
            if device_id not in known:
                with s.db.write():
                    s.rows.add_dropout(rid, device_id, st.stage, reason)
                with self._lock:
                    known[device_id] = st.stage
            self.settle(rid)
        return {"status": "accepted", "round_id": rid, "stage": s.stage(rid)}

    def exclude(self, rid: int, device_id: str, entry: dict[str, Any]) -> None:
        """(Caller holds the lock; the round is open in an active stage.) A device caught cheating (its
        message refused for a protocol violation, `entry` from protocol.offender) is out of the round like a
        device that left: recorded as a dropout (so the stage need not wait for it, and its later messages
        are refused) and named in the round's offender list. May end the stage or the round."""
        s = self.s
        st = s.rows.state(rid)
        known = self.of(rid)
        with s.db.write():
            if device_id not in known:
                s.rows.add_dropout(rid, device_id, st.stage, entry["reason"][:64])
            s.rows.add_offenders(rid, [entry])
        with self._lock:
            known.setdefault(device_id, st.stage)
        self.settle(rid)

    def refuse_bad_keys(self, rid: int, device_id: str, c_pk: bytes, s_pk: bytes) -> None:
        """(Caller holds the lock; advertise stage.) A low-order or non-canonical key (any agreement with it
        is a secret everyone knows) or a key another device of the round already advertised (a copied key):
        the device is refused, out of the round (exclude) and named."""
        problem = proto.key_problem(c_pk, s_pk)
        if problem:
            self.exclude(rid, device_id, proto.offender(device_id, "advertise", "secagg_bad_key", problem))
            raise Rejection("secagg_bad_key", f"advertised keys refused: {problem}; this device is out of the round")
        owners = [d for d in self.s.rows.key_owners(rid, [sm.b64(c_pk), sm.b64(s_pk)]) if d != device_id]
        if owners:
            detail = f"a key already advertised by device {owners[0]} in this round"
            self.exclude(rid, device_id, proto.offender(device_id, "advertise", "secagg_duplicate_key", detail))
            raise Rejection("secagg_duplicate_key",
                            f"advertised keys refused: {detail}; this device is out of the round")

    # ------------------------------------------------------------------ deciding a stage early
    def tally(self, rnd: Round, st: SecAggState) -> proto.Tally | None:
        """The current stage's counts (None outside the five stages)."""
        s, rid = self.s, rnd.id
        rows, db = s.rows, s.db
        left = self.of(rid)
        open_slots = 0
        # per stage: (eligible count, answered count, is-eligible, has-answered); dropouts are few, so
        # their membership is asked one by one instead of reading the cohort's lists
        checks: dict[str, Callable[[], tuple[int, int, Callable[[str], bool], Callable[[str], bool]]]] = {
            "advertise": lambda: (db.count_admitted(rid), rows.count_keys(rid), lambda d: True,
                                  lambda d: rows.keys_of(rid, d) is not None),
            "share": lambda: (len(st.u1 or ()), rows.count_commitments(rid), set(st.u1 or ()).__contains__,
                              lambda d: rows.commitment_sha(rid, d) is not None),
            "masked": lambda: (len(st.u2 or ()), db.count_updates(rid), set(st.u2 or ()).__contains__,
                               lambda d: db.get_update(rid, d) is not None),
            "consistency": lambda: (len(st.u3 or ()), rows.count_signatures(rid), set(st.u3 or ()).__contains__,
                                    lambda d: rows.signature_of(rid, d) is not None),
            "unmask": lambda: (rows.count_signatures(rid), rows.count_unmask(rid),
                               lambda d: rows.signature_of(rid, d) is not None,
                               lambda d: rows.unmask_sha(rid, d) is not None),
        }
        if st.stage not in checks:
            return None
        eligible, submitted, is_eligible, answered = checks[st.stage]()
        if st.stage == "advertise":  # admission is still open: free slots may bring more devices
            open_slots = max(0, rnd.params.max_admitted - eligible)
        gone = [d for d in left if is_eligible(d)]
        left_after = sum(1 for d in gone if answered(d))
        needed, needed_later = proto.stage_needs(st, rnd.train)
        return proto.Tally(st.stage, eligible, submitted, len(gone) - left_after, left_after, needed, needed_later,
                           open_slots)

    def settle(self, rid: int) -> None:
        """(Caller holds the lock.) Abandon the round or close its stage now if the dropouts decide it."""
        if not self.of(rid):
            return  # nobody left: only the stage's own rules and deadline can decide it
        s = self.s
        rnd, st = s.db.get_round(rid), s.rows.state(rid)
        if rnd is None or st is None or rnd.state != "open" or st.stage not in ACTIVE:
            return
        tally = self.tally(rnd, st)
        verdict = proto.decide_early(tally) if tally is not None else None
        if isinstance(verdict, proto.Fail):
            s.fail(rnd, verdict.reason, verdict.counts)
        elif verdict == "close":
            s.close_stage(rnd, st)  # each close settles the next stage in turn


__all__ = ["Dropouts"]
