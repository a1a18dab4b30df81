"""Admin changes of the model line: start/stop training, push a model, discard the candidate, roll back.

Every change of the global model creates a new version (versions only grow) and abandons the open
training round, whose base is no longer the global model, and supersedes a trained version awaiting its
release evaluation (RoundManager.set_global).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from models import wire
from server.errors import Rejection
from server.reporting import round_summary

if TYPE_CHECKING:
    from server.rounds import Doomed, RoundManager

log = logging.getLogger("server.rounds")


class AdminOps:
    def __init__(self, manager: RoundManager) -> None:
        self.m = manager
        self.db = manager.db
        self.models = manager.models

    def set_training(self, enabled: bool) -> dict[str, Any]:
        m = self.m
        self.models.require_initialized()
        with m.lock:
            with self.db.write():
                self.db.set_meta("training_enabled", bool(enabled))
                # a start clears why training stopped, and the held-back streak that may have stopped it
                self.db.set_meta("training_stopped_reason", None if enabled else "stopped by an admin")
                if enabled:
                    self.db.set_meta("held_back_streak", 0)
                doomed: Doomed = []
                train = self.db.active_round("train")
                if not enabled and train is not None and train.state == "open":
                    doomed = m.abandon_rows(train, "stopped")
            m.delete_round_files(doomed)
            if enabled:
                m.ensure_rounds()
        return {"training_enabled": bool(enabled), "round": round_summary(m, self.db.active_round("train"))}

    def push_model(self, body: bytes, *, promote: bool = False, note: str | None = None) -> dict[str, Any]:
        """A model pushed by an admin (e.g. from tff_sim): staged as candidate, or made global if promote."""
        m = self.m
        self.models.require_initialized()
        try:
            payload = wire.decode(body, self.models.model_config, expected_kind="weights")
        except wire.WireError as exc:
            raise Rejection(exc.reason, str(exc)) from None
        flat = np.concatenate([t.reshape(-1) for t in payload.tensors])
        meta = {"source": "push", "pushed_model_version": payload.model_version, "pushed_metadata": payload.metadata}
        with m.lock:
            version = self.db.max_version() + 1
            rel, sha, size = self.models.write_version(version, flat, meta)
            doomed: Doomed = []
            with self.db.write():
                if promote:
                    self.db.add_model(version, source="push", file=rel, sha256=sha, size=size,
                                      parent_version=self.models.global_version(), note=note, info=meta,
                                      was_global=True)
                    doomed = m.set_global(version)
                else:
                    doomed = self._discard_candidate_rows("superseded")
                    self.db.add_model(version, source="push", file=rel, sha256=sha, size=size,
                                      parent_version=self.models.global_version(), candidate_state="pending",
                                      note=note, info=meta)
                    self.db.set_meta("candidate_version", version)
            m.delete_round_files(doomed)
            m.ensure_rounds()
            ev = self.db.active_round("eval")
        log.info("model pushed as version %d (%s)", version, "global" if promote else "candidate")
        # the open evaluation round may still be a trained version's (release gating): the candidate waits
        return {"version": version, "state": "global" if promote else "candidate",
                "eval_round_id": ev.id if (ev and not promote and ev.candidate_version == version) else None,
                "sha256": sha}

    def _discard_candidate_rows(self, reason: str) -> Doomed:
        cand = self.models.candidate_version()
        doomed: Doomed = []
        if cand is None:
            return doomed
        row = self.db.get_model(cand)
        if row is not None and row["candidate_state"] == "pending":
            why = "discarded by an admin" if reason == "discarded" else "superseded by a newer pushed candidate"
            self.db.update_model(cand, candidate_state="discarded",
                                 info=dict(row["info"], release={"state": "discarded", "reason": why}))
        ev = self.db.active_round("eval")
        if ev is not None and ev.state == "open" and ev.candidate_version == cand:  # not a trained version's
            doomed = self.m.abandon_rows(ev, reason)
        self.db.set_meta("candidate_version", None)
        return doomed

    def discard_candidate(self) -> dict[str, Any]:
        self.models.require_initialized()
        with self.m.lock:
            cand = self.models.candidate_version()
            if cand is None:
                raise Rejection("no_candidate", "there is no staged candidate")
            with self.db.write():
                doomed = self._discard_candidate_rows("discarded")
            self.m.delete_round_files(doomed)
        return {"discarded": cand}

    def rollback(self, target: int, note: str | None = None) -> dict[str, Any]:
        """Make an earlier global model global again, as a new version (versions only grow)."""
        m = self.m
        self.models.require_initialized()
        with m.lock:
            row = self.db.get_model(target)
            if row is None:
                raise Rejection("unknown_version", f"no model version {target}")
            if not row["was_global"]:
                raise Rejection("not_a_global_version", f"version {target} was never the global model")
            if target == self.models.global_version():
                raise Rejection("already_global", f"version {target} is the global model")
            flat = self.models.flat_weights(target)
            version = self.db.max_version() + 1
            rel, sha, size = self.models.write_version(version, flat, {"source": "rollback", "rollback_of": target})
            with self.db.write():
                self.db.add_model(version, source="rollback", file=rel, sha256=sha, size=size, parent_version=target,
                                  note=note or f"rollback to version {target}", info={"rollback_of": target},
                                  was_global=True)
                doomed = m.set_global(version)
            m.delete_round_files(doomed)
            m.ensure_rounds()
        log.info("rolled back to version %d as version %d", target, version)
        return {"version": version, "rollback_of": target}


__all__ = ["AdminOps"]
