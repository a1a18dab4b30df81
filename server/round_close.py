"""Closing rounds into model versions: a training round's aggregate through the server optimizer, an
evaluation round's decision (promote or reject a pushed candidate, release or hold back a trained
version). Every close is one transaction.

Aggregation runs in the round worker (RoundManager.tick): the strategy's finalize (the heavy math)
runs outside the lock; the new version's file is durable before the transaction that makes it global
(or, with release gating, stores it awaiting its evaluation), records the DP ledger event and closes the
round. A crash before that commit leaves the round "aggregating": the next start aggregates it again,
with the same updates, order and noise seed.

Release gating (release_gate eval) and what belongs to a version:
* the DP ledger event and DP-FTRL's tree are committed at aggregation whatever the evaluation decides:
  the aggregate was released to the evaluating devices, and holding a version back is post-processing;
* the server optimizer state after the step is the new version's (opt_state_file); the base's state stays
  until the decision: released, the base's is deleted (as without gating); held back, the new version's
  is deleted and the next round trains the served version from the served version's state.
"""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from server import dp_sanity, evaluation
from server.errors import SecureAggregationFailed
from server.optimizers import ServerOptimizer
from server.round import EvalParams, Round

if TYPE_CHECKING:
    from server.rounds import Doomed, RoundManager

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
        gated = m.config.release_gate == "eval"
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
                       "result_version": version, "server_lr": optimizer.last_lr}
            noise = dp_sanity.round_noise_summary(rnd.train, n, m.dim, max_noise_to_clip=m.config.max_noise_to_clip,
                                                  server_optimizer=m.config.server_optimizer,
                                                  server_lr=m.config.server_lr)
            if noise:
                outcome["dp_noise"] = noise
                if noise.get("too_noisy"):
                    log.warning("round %d: %s", round_id, noise["message"])
            files = [r["file"] for r in rows]
            try:
                dp_fields = m.account.record(strategy.ledger_event(rnd.train, n, population), population)
                with db.write():
                    released = strategy.commit_release(round_id, [r["device_id"] for r in rows])  # DP-FTRL's tree
                    db.add_model(version, source="round", file=rel, sha256=sha, size=size,
                                 parent_version=base_version, round_id=round_id, opt_state_file=opt_rel,
                                 info={"round_id": round_id, "aggregated": n}, was_global=not gated,
                                 candidate_state="pending" if gated else None)
                    if gated:  # served only once its evaluation round passes it (decide_eval)
                        db.set_meta("release_pending", version)
                    else:
                        self._drop_opt_state(base_row)
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
            m.delete_round_files([(round_id, files)])
            m.ensure_rounds()
        m.metrics.inc("fk_rounds_finished_total", {"kind": "train", "state": "closed"})
        m.metrics.observe("fk_aggregation_seconds", time.perf_counter() - t0)
        log.info("round %d aggregated %d updates (%s) into version %d%s%s", round_id, n, strategy.name, version,
                 f", epsilon {dp_fields['epsilon']:.4g}" if dp_fields else "",
                 ", awaiting its evaluation" if gated else "")

    def _drop_opt_state(self, row: dict[str, Any]) -> None:
        """Inside a transaction: the version's optimizer state is no longer needed (deleted after commit)."""
        if row.get("opt_state_file"):
            self.m.db.update_model(row["version"], opt_state_file=None)
            self.m.retire_file(row["opt_state_file"])

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
        if row["source"] == "round":  # release gating: a trained version, not a pushed candidate
            self._decide_release(rnd, row, cand, base, outcome)
            return
        info = dict(row["info"], evaluation={"round_id": rnd.id, **outcome})
        if not promote:
            outcome["decision"] = "rejected"
            info["release"] = {"state": "held_back",
                               "reason": f"held back: {evaluation.shortfall(cand, base, rnd.params)}"}
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

    def _decide_release(self, rnd: Round, row: dict[str, Any], cand: dict[str, Any], base: dict[str, Any],
                        outcome: dict[str, Any]) -> None:
        """Release a trained version (it becomes global) or hold it back; then the next training round opens."""
        m, db = self.m, self.m.db
        assert isinstance(rnd.params, EvalParams)
        version, base_v = rnd.candidate_version, rnd.base_version
        why = evaluation.shortfall(cand, base, rnd.params)
        if why is None and m.models.global_version() != base_v:  # set_global supersedes first; belt and braces
            why = f"the served version changed to {m.models.global_version()} during the evaluation"
        evaluated = {"round_id": rnd.id, **outcome}
        doomed: Doomed = []
        with db.write():
            db.set_meta("release_pending", None)
            if why is None:
                outcome.update(decision="released", result_version=version)
                db.update_model(version, candidate_state="released",
                                info=dict(row["info"], evaluation=evaluated, release={"state": "released"}))
                db.set_meta("held_back_streak", 0)
                self._drop_opt_state(db.get_model(base_v))  # training continues from the released version's
                doomed = m.set_global(version)
            else:
                outcome.update(decision="held_back", reason=f"held back: {why}")
                db.update_model(version, candidate_state="held_back", opt_state_file=None,
                                info=dict(row["info"], evaluation=evaluated,
                                          release={"state": "held_back", "reason": outcome["reason"]}))
                m.retire_file(row["opt_state_file"])  # never a base: training continues from the served version
                self._count_held_back(version, why)
            db.update_round(rnd.id, state="closed", closed_at=time.time(), outcome=outcome,
                            result_version=outcome.get("result_version"))
        m.delete_round_files(doomed)
        log.info("version %d %s: recall %.4f vs served %.4f (version %d)", version,
                 "released" if why is None else f"held back ({why})", cand["recall"], base["recall"], base_v)
        m.ensure_rounds()

    def _count_held_back(self, version: int, why: str) -> None:
        """Inside the decision's transaction: one more held-back version in a row; stop training at the limit."""
        db, limit = self.m.db, self.m.config.max_rejected_versions
        streak = int(db.get_meta("held_back_streak", 0) or 0) + 1
        db.set_meta("held_back_streak", streak)
        if limit and streak >= limit and db.get_meta("training_enabled", False):
            reason = (f"stopped after {streak} consecutive held-back versions (max_rejected_versions {limit}); "
                      f"the last, version {version}: {why}")
            db.set_meta("training_enabled", False)
            db.set_meta("training_stopped_reason", reason)
            log.warning("training %s", reason)


__all__ = ["RoundCloser", "mean_metrics"]
