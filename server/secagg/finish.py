"""SecAgg's last step, in its own thread: reconstruct, unmask and check the sum (protocol.recover_sum),
store it durably, and hand the round to aggregation. Any failure abandons the round: nothing released.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from models import secagg_math as sm
from server.secagg.protocol import SecAggFailure, recover_sum

if TYPE_CHECKING:
    from server.secagg.service import SecAggService

log = logging.getLogger("server.secagg")


class Unmasker:
    def __init__(self, service: SecAggService) -> None:
        self.s = service
        self._finishing: set[int] = set()

    def running(self, rid: int) -> bool:
        return rid in self._finishing

    def start(self, rid: int) -> None:
        if rid in self._finishing:
            return
        self._finishing.add(rid)
        threading.Thread(target=self._finish, args=(rid,), name=f"secagg-finish-{rid}", daemon=True).start()

    def _finish(self, rid: int) -> None:
        s = self.s
        try:
            self._finish_inner(rid)
        except Exception as exc:  # noqa: BLE001 - any failure abandons the round safely
            if not isinstance(exc, SecAggFailure):
                log.exception("round %d secagg: unmasking failed", rid)
            reason = str(exc) if isinstance(exc, SecAggFailure) else f"secagg_unmask_failed: {exc}"
            with s.host.lock:
                rnd = s.db.get_round(rid)
                if rnd is not None and rnd.state == "open":
                    if isinstance(exc, SecAggFailure) and exc.offenders:
                        with s.db.write():  # named even though the round fails
                            s.rows.add_offenders(rid, exc.offenders)
                    s.fail(rnd, reason)
        finally:
            self._finishing.discard(rid)

    def _finish_inner(self, rid: int) -> None:
        s, rows = self.s, self.s.rows
        t0 = time.perf_counter()
        rnd = s.db.get_round(rid)
        st = rows.state(rid)
        if rnd is None or st is None or st.stage != "finishing" or rnd.state != "open":
            return
        keys = rows.all_keys(rid)
        s_pks = {u: sm.unb64(keys[u]["s_pk"], 32) for u in st.u1}
        current = s.inputs.running(rid).current
        if current is None:
            raise ValueError("no running sum")
        bound = s.host.upload_bound(rnd)
        if bound is None:
            raise ValueError("a SecAgg round needs clipped updates")
        rec = recover_sum(st, s_pks, rows.commitments(rid), rows.unmask_bodies(rid), current, s.graph(rid, st),
                          s.host.dim, bound, lambda v: s.inputs.kept_input(rid, v))
        rel = f"secagg/r{rid:06d}/result-{secrets.token_hex(4)}.npy"
        s.store.write_atomic(rel, lambda f: np.save(f, rec.total, allow_pickle=False))
        with s.host.lock:
            rnd = s.db.get_round(rid)
            if rnd.state != "open" or s.stage(rid) != "finishing":
                s.store.delete(rel)
                return
            with s.db.write():
                s.rows.add_offenders(rid, rec.offenders)
                for v in rec.removed:  # not in the sum: neither counted nor reported as a contributor
                    s.db.delete_update(rid, v)
                s.set_stage(rid, "done", None, result_file=rel, info={
                    "sum_sha256": rec.sum_sha256, "sum_norm": rec.norm, "max_abs_int": rec.max_abs_int,
                    "reconstruct_seconds": rec.reconstruct_seconds, "unmask_seconds": rec.unmask_seconds,
                    "finish_seconds": time.perf_counter() - t0, "dropped_recovered": rec.dropped_recovered,
                    "removed": rec.removed})
                s.db.update_round(rid, state="aggregating")
        log.info("round %d secagg: unmasked the sum of %d inputs (%d dropped devices' masks removed, %d cheaters' "
                 "inputs taken out) in %.2fs", rid, len(st.u3) - len(rec.removed), len(rec.dropped_recovered),
                 len(rec.removed), time.perf_counter() - t0)
        s.waiters.notify(rid)
        s.host.wake()


__all__ = ["Unmasker"]
