"""Closing rounds into model versions: a training round's aggregate through the server optimizer, an
evaluation round's decision (promote or reject the candidate). Every close is one transaction.

Aggregation runs in the round worker (RoundManager.tick): the strategy's finalize (the heavy math)
runs outside the lock; the new version's file is durable before the transaction that makes it global,
records the DP ledger event and closes the round. A crash before that commit leaves the round
"aggregating": the next start aggregates it again, with the same updates, order and noise seed.
"""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from server import evaluation
from server.errors import SecureAggregationFailed
from server.optimizers import ServerOptimizer
from server.round import EvalParams, Round

if TYPE_CHECKING:
    from server.rounds import RoundManager

log = logging.getLogger("server.rounds")


def mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Example-weighted mean of the training metrics devices reported with their updates."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for r in rows:
        for k, v in json.loads(r["metrics"]).items():
            sums[k] = sums.get(k, 0.0) + v * r["num_examples"]
            weights[k] = weights.get(k, 0.0) + r["num_examples"]
    return {k: sums[k] / weights[k] for k in sorted(sums)}


class RoundCloser:
    def __init__(self, manager: RoundManager) -> None:
        self.m = manager

    # ------------------------------------------------------------------ training rounds
    def aggregate_pending(self) -> None:
        for rnd in self.m.db.rounds_in_state("aggregating", "train"):
            try:
                self.aggregate(rnd.id)
            except Exception:
                log.exception("aggregation of round %d failed; it will be retried", rnd.id)
                time.sleep(1.0)

    def aggregate(self, round_id: int) -> None:
        m, db = self.m, self.m.db
        t0 = time.perf_counter()
        m.wait_for_adds(round_id)
        with m.lock:
            rnd = db.get_round(round_id)
            if rnd is None or rnd.state != "aggregating":
                return
            rows = db.list_updates(round_id)
            strategy = m.strategy(rnd)
            state = m.peek_state(round_id)
            base_version = rnd.base_version
            if m.models.global_version() != base_version:
                m.abandon(rnd, "global_changed")
                return
        try:
            delta = strategy.finalize(state, rows, rnd, m.context())  # the heavy part, outside the lock
        except SecureAggregationFailed as exc:  # e.g. a tampered ciphertext: abandon, never retry
            log.warning("round %d: %s", round_id, exc)
            with m.lock:
                rnd = db.get_round(round_id)
                if rnd.state == "aggregating":
                    m.abandon(rnd, exc.reason)
            return
        base = m.models.flat_weights(base_version).astype(np.float64)
        optimizer = ServerOptimizer.from_config(m.config)
        base_row = db.get_model(base_version)
        if base_row.get("opt_state_file"):
            optimizer.load_state_dict(m.store.read_opt_state(base_row["opt_state_file"]), m.dim)
        new32 = optimizer.step(base, delta).astype(np.float32)
        local_metrics = mean_metrics(rows)
        with m.lock:
            rnd = db.get_round(round_id)
            if rnd.state != "aggregating":
                return
            if m.models.global_version() != base_version:
                m.abandon(rnd, "global_changed")
                return
            if not np.isfinite(new32).all():
                m.abandon(rnd, "non_finite_aggregate")
                return
            n = len(rows)
            admitted = db.count_admitted(round_id)
            population = db.count_devices()
            version = db.max_version() + 1
            rel, sha, size = m.models.write_version(version, new32, {"source": "round", "round_id": round_id,
                                                                     "base_version": base_version})
            opt_rel = m.store.write_opt_state(version, optimizer.state_dict()) if optimizer.state else None
            outcome = {"aggregated": n, "admitted": admitted, "dropouts": max(0, admitted - n),
                       "aggregator": strategy.name, "examples": int(sum(r["num_examples"] for r in rows)),
                       "delta_norm": float(np.linalg.norm(delta)), "local_metrics": local_metrics,
                       "result_version": version}
            files = [r["file"] for r in rows]
            try:
                dp_fields = m.account.record(strategy.ledger_event(rnd.train, n, population), population)
                with db.write():
                    released = strategy.commit_release(round_id, [r["device_id"] for r in rows])  # DP-FTRL's tree
                    db.add_model(version, source="round", file=rel, sha256=sha, size=size,
                                 parent_version=base_version, round_id=round_id, opt_state_file=opt_rel,
                                 info={"round_id": round_id, "aggregated": n}, was_global=True)
                    if base_row.get("opt_state_file"):
                        db.update_model(base_version, opt_state_file=None)
                    db.set_meta("global_version", version)
                    db.update_round(round_id, state="closed", closed_at=time.time(), result_version=version,
                                    outcome=outcome, **dp_fields)
                    db.clear_update_files(round_id)
            except BaseException:
                m.account.forget()  # its in-memory ledger may hold this round's event
                raise
            m.models.cache_weights(version, new32)
            m.drop_state(round_id)
            if released is not None:
                released()
            if base_row.get("opt_state_file"):
                m.store.delete(base_row["opt_state_file"])
            m.delete_round_files([(round_id, files)])
            m.ensure_rounds()
        m.metrics.inc("fk_rounds_finished_total", {"kind": "train", "state": "closed"})
        m.metrics.observe("fk_aggregation_seconds", time.perf_counter() - t0)
        log.info("round %d aggregated %d updates (%s) into version %d%s", round_id, n, strategy.name, version,
                 f", epsilon {dp_fields['epsilon']:.4g}" if dp_fields else "")

    # ------------------------------------------------------------------ evaluation rounds
    def decide_eval(self, rnd: Round) -> None:
        """Promote or reject the round's candidate (caller holds the lock)."""
        m, db = self.m, self.m.db
        summary = evaluation.summarize(db.list_eval_reports(rnd.id))
        cand_v, base_v = rnd.candidate_version, rnd.base_version
        cand, base = summary[cand_v], summary[base_v]
        assert isinstance(rnd.params, EvalParams)
        promote = evaluation.promote(cand, base, rnd.params)
        row = db.get_model(cand_v)
        now = time.time()
        outcome = {"candidate": cand, "baseline": base, "reports": db.count_eval_reports(rnd.id),
                   "admitted": db.count_admitted(rnd.id)}
        if row["candidate_state"] != "pending":
            outcome["decision"] = "superseded"
            with db.write():
                db.update_round(rnd.id, state="closed", closed_at=now, outcome=outcome)
            return
        info = dict(row["info"], evaluation={"round_id": rnd.id, **outcome})
        if not promote:
            outcome["decision"] = "rejected"
            with db.write():
                db.update_model(cand_v, candidate_state="rejected", info=info)
                db.set_meta("candidate_version", None)
                db.update_round(rnd.id, state="closed", closed_at=now, outcome=outcome)
            log.info("candidate %d rejected: recall %.4f vs %.4f (global %d)", cand_v, cand["recall"], base["recall"],
                     base_v)
            return
        outcome["decision"] = "promoted"
        flat = m.models.flat_weights(cand_v)
        version = db.max_version() + 1
        rel, sha, size = m.models.write_version(version, flat, {"source": "promotion", "candidate": cand_v})
        with db.write():
            db.add_model(version, source="promotion", file=rel, sha256=sha, size=size, parent_version=cand_v,
                         note=f"candidate {cand_v} promoted by evaluation round {rnd.id}",
                         info={"evaluation": {"round_id": rnd.id, **outcome}}, was_global=True)
            db.update_model(cand_v, candidate_state="promoted", info=info)
            db.set_meta("candidate_version", None)
            outcome["result_version"] = version
            db.update_round(rnd.id, state="closed", closed_at=now, outcome=outcome, result_version=version)
            doomed = m.set_global(version)
        m.delete_round_files(doomed)
        log.info("candidate %d promoted as version %d: recall %.4f vs %.4f", cand_v, version, cand["recall"],
                 base["recall"])


__all__ = ["RoundCloser", "mean_metrics"]
