"""The round state machine: admission and pace steering, uploads, deadlines, scheduling, locking.

Rounds (a Gboard round, Bonawitz et al. 2019):

    open --(goal reached, or deadline with >= min_count)--> aggregating --> closed (new model version)
    open --(deadline with < min_count | training stopped | global model replaced)--> abandoned

* A training round opens whenever training is enabled, no training round is open or aggregating
  and no trained version awaits its evaluation; its base is the global model of that moment and its
  parameters are frozen into it.
* Release gating (release_gate eval): the version a training round produces is not served at once;
  an evaluation round compares it with the served version (server/round_close.py releases it or holds
  it back), and only then does the next training round open: train -> evaluate -> train.
* Its deadline starts at the first admission (an idle server does not abandon empty rounds).
* Check-in admits eligible devices (charging, unmetered, idle) up to ceil(goal * over_admit);
  everyone else is told when to come back (pace steering).
* What a training round asks of devices and how it aggregates is its strategy's (server/strategy/):
  the task, the upload's validation and bound, the running state, the aggregate, the DP ledger event.
  Closing rounds into versions is server/round_close.py; admin version changes server/admin_ops.py;
  evaluation rounds' pure rules server/evaluation.py.

Concurrency: heavy work (decoding, hashing, writing update files, aggregation math) runs outside
`self.lock`; every state change re-checks the round under the lock and commits one SQLite
transaction. Crash safety: files are durable before the row that references them commits; at start
`recover()` deletes unreferenced files, and rounds left "aggregating" are aggregated again
(deterministically: same updates, same order, same noise seed).

Several processes (--cluster, server/cluster.py): `self.lock` is a ClusterLock (the same serialisation
across processes), and only the process holding the aggregator's lease runs the round worker's duties;
the others serve the API. The lease's new holder does what a start does (`take_over`), except that, while
other server processes are connected, files younger than ORPHAN_MIN_AGE_S stay: one may be another
process's upload about to commit its row.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import threading
import time
from typing import Any, Callable, Protocol

from models import wire
from server import evaluation
from server.cluster import ClusterLock, Leadership, other_server_processes
from server.config import ServerConfig
from server.db import Db
from server.errors import Rejection
from server.ftrl import FtrlTreeStore
from server.metrics import Metrics
from server.privacy_account import PrivacyAccount
from server.round import Round, TrainParams, parse_params
from server.round_close import RoundCloser
from server.store import Store
from server.strategy import DecodedUpdate, RoundContext, SecureProtocol, Strategy, UploadBound, strategy_for
from server.versions import ModelVersions
from server.worker import RoundWorker, start_warm_up

log = logging.getLogger("server.rounds")

ELIGIBILITY_KEYS = ("charging", "unmetered", "idle")
Doomed = list[tuple[int, list[str | None]]]  # (round id, update files) to delete once a transaction committed
ORPHAN_MIN_AGE_S = 600.0  # --cluster: an unreferenced file this young may still be another process's upload


class Background(Protocol):
    """A service the round worker drives: deadlines each tick, stray files at start."""

    def tick(self, now: float) -> None: ...
    def recover(self) -> None: ...


class RoundManager:
    """Rounds' locking, persistence and scheduling; what a round computes is its strategy's."""

    def __init__(self, config: ServerConfig, db: Db, store: Store, metrics: Metrics | None = None) -> None:
        self.config = config
        self.db = db
        self.store = store
        self.metrics = metrics or Metrics()
        self.lock: threading.RLock | ClusterLock = ClusterLock(db) if config.cluster else threading.RLock()
        self.leadership = Leadership(db) if config.cluster else None
        self.models = ModelVersions(config, db, store, self.lock)
        self._states: dict[int, Any] = {}  # round id -> strategy state (e.g. the running sum)
        self._in_flight: dict[int, int] = {}  # round id -> accepted updates still being added to its state
        self.warm = threading.Event()  # set once start-up imports are done (see recover); /healthz reports it
        self._accepting = threading.Condition(threading.Lock())
        # CPU-heavy upload work (checksum, decode, norm) runs at most one per core: eight 5.7 MB payloads
        # hashed at once on two cores only thrash caches and the GIL, and finish later than in turn.
        self._cpu_slots = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
        self._wake = threading.Event()
        self._worker = RoundWorker(self.tick, config.tick_s, self._wake)
        self._protocols: dict[str, SecureProtocol] = {}
        self.ftrl = FtrlTreeStore(config, db, store)  # DP-FTRL's noise tree and participations (dp_mode ftrl)
        self._background: list[Background] = [self.ftrl]
        self._retired: list[str] = []  # model-side files (optimizer states) to delete once their rows let go
        self.account = PrivacyAccount(config, db, self.lock, self._strategy_for_params)
        self.closer = RoundCloser(self)
        self._orphans_collected = 0.0  # time.monotonic() of the last collect_orphans

    # ================================================================== wiring (server/services.py)
    def attach_protocol(self, name: str, protocol: SecureProtocol) -> None:
        self._protocols[name] = protocol

    def attach_background(self, service: Background) -> None:
        self._background.append(service)

    # ================================================================== what services ask of the manager
    @property
    def dim(self) -> int:
        return self.models.dim

    def strategy(self, rnd: Round) -> Strategy:
        """The training round's wrapped strategy (server/strategy/factory.py)."""
        return strategy_for(rnd.train, self._protocols, self.ftrl)

    def _strategy_for_params(self, params: TrainParams) -> Strategy:
        return strategy_for(params, self._protocols, self.ftrl)

    def upload_bound(self, rnd: Round) -> UploadBound | None:
        return self.strategy(rnd).upload_bound(rnd.train)

    def context(self) -> RoundContext:
        m = self.models
        return RoundContext(m.model_config, m.dim, m.max_upload_bytes, self.store.open_update)

    def wake(self) -> None:
        """Have the round worker run now (e.g. a round became ready to aggregate)."""
        self._wake.set()

    def abandon(self, rnd: Round, reason: str, also: Callable[[], None] | None = None) -> None:
        """Abandon a round in one transaction (with `also`'s writes), then delete its update files."""
        with self.lock:
            with self.db.write():
                if also is not None:
                    also()
                doomed = self.abandon_rows(rnd, reason)
            self.delete_round_files(doomed)

    # ================================================================== rounds: creation
    def _training_due(self) -> bool:
        """Training is on, no training round is active and no trained version awaits its evaluation."""
        m = self.models
        return m.training_enabled() and m.release_pending() is None and self.db.active_round("train") is None

    def _due_candidate(self) -> int | None:
        """The version an evaluation round should open for now: a trained version awaiting release first
        (training waits for it), else an admin's pending candidate; None when one is active or none waits."""
        if self.db.active_round("eval") is not None:
            return None
        for cand in (self.models.release_pending(), self.models.candidate_version()):
            row = self.db.get_model(cand) if cand is not None else None
            if row is not None and row["candidate_state"] == "pending":
                return cand
        return None

    def ensure_rounds(self) -> None:
        """Open a training round / evaluation round where one is due (caller holds the lock)."""
        m = self.models
        if not m.initialized:
            return
        if self._training_due():
            base = self.config.round_params(m.next_server_step() if self.config.client_lr_decay else 1)
            params = self._strategy_for_params(parse_params("train", base)).open_params(base)  # type: ignore[arg-type]
            with self.db.write():
                rid = self.db.create_round(kind="train", base_version=m.global_version(),
                                           params=params, seed=secrets.randbits(63))
            log.info("opened training round %d on version %s", rid, m.global_version())
        cand = self._due_candidate()
        if cand is not None:
            with self.db.write():
                rid = self.db.create_round(kind="eval", base_version=m.global_version(),
                                           candidate_version=cand, params=self.config.eval_params(),
                                           seed=secrets.randbits(63))
            log.info("opened evaluation round %d: candidate %d vs global %s", rid, cand, m.global_version())

    def _retry(self, seconds: float, reason: str, device_id: str | None = None) -> dict[str, Any]:
        seconds = min(max(seconds, self.config.retry_min_s), self.config.retry_max_s)
        if device_id is not None:  # spread a crowd's next check-ins over +-20% (deterministic per device)
            u = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "big") / 2 ** 32
            seconds *= 0.8 + 0.4 * u
        seconds = int(math.ceil(min(max(seconds, self.config.retry_min_s), self.config.retry_max_s)))
        self.metrics.inc("fk_checkins_total", {"action": "retry", "reason": reason})
        return {"action": "retry", "task": None, "retry_after": seconds, "reason": reason,
                "global_version": self.models.global_version()}

    def _retry_for_round(self, rnd: Round, now: float, reason: str, device_id: str) -> dict[str, Any]:
        remaining = (rnd.deadline - now) if rnd.deadline is not None else rnd.params.deadline_s
        return self._retry(max(remaining, 0.0) / 2.0, reason, device_id)

    # ================================================================== check-in
    def checkin(self, device_id: str, eligibility: dict[str, Any], device_version: int | None = None) -> dict[str, Any]:
        now = time.time()
        if not self.models.initialized:
            return self._retry(self.config.retry_idle_s, "not_initialized")
        if not all(eligibility.get(k) is True for k in ELIGIBILITY_KEYS):
            return self._retry(self.config.retry_ineligible_s, "ineligible", device_id)
        with self.lock:
            self._expire_due(now)
            self.ensure_rounds()
            train = self.db.active_round("train")
            ev = self.db.active_round("eval")
            # A device already admitted and not yet done gets the same task again (idempotent check-in).
            for rnd in (ev, train):
                if rnd is not None and rnd.state == "open" and self.db.is_admitted(rnd.id, device_id) \
                        and not self._has_submitted(rnd, device_id) and self._may_reanswer(rnd, device_id):
                    return self._answer_task(rnd)
            if ev is not None and ev.state == "open" \
                    and evaluation.in_sample(device_id, ev.candidate_version, self.config.candidate_eval_fraction) \
                    and not self.db.is_admitted(ev.id, device_id) \
                    and self.db.count_admitted(ev.id) < ev.params.max_admitted:
                return self._answer_task(self._admit(ev, device_id, now))
            if train is None:
                if self.models.training_enabled() and self.models.release_pending() is not None:
                    # the next training round opens as soon as the evaluation round decides the last version
                    # (it closes at its goal): come back soon, as while a round aggregates
                    return self._retry(self.config.retry_min_s, "awaiting_release", device_id)
                reason = "training_stopped" if not self.models.training_enabled() else "no_round"
                return self._retry(self.config.retry_idle_s, reason, device_id)
            if train.state != "open":
                return self._retry(self.config.retry_min_s, "aggregating", device_id)
            if self.db.is_admitted(train.id, device_id):
                return self._retry_for_round(train, now, "already_participated", device_id)
            refusal = self.strategy(train).admission_refusal(train, device_id)  # e.g. DP-FTRL's participation rule
            if refusal is not None:
                return self._retry(refusal[1], refusal[0], device_id)
            if self.db.count_admitted(train.id) >= train.params.max_admitted \
                    or not self.strategy(train).admission_open(train):
                return self._retry_for_round(train, now, "round_full", device_id)
            return self._answer_task(self._admit(train, device_id, now))

    def _may_reanswer(self, rnd: Round, device_id: str) -> bool:
        return rnd.kind != "train" or self.strategy(rnd).may_reanswer(rnd, device_id)

    def _has_submitted(self, rnd: Round, device_id: str) -> bool:
        if rnd.kind == "train":
            return self.db.get_update(rnd.id, device_id) is not None
        return self.db.get_eval_report(rnd.id, device_id) is not None

    def _admit(self, rnd: Round, device_id: str, now: float) -> Round:
        with self.db.write():
            self.db.admit(rnd.id, device_id, now)
            self.db.touch_device(device_id, now)
            if rnd.deadline is None:
                self.db.update_round(rnd.id, deadline=now + rnd.params.deadline_s)
        return self.db.get_round(rnd.id)

    def _answer_task(self, rnd: Round) -> dict[str, Any]:
        task = self.task_for(rnd)
        self.metrics.inc("fk_checkins_total", {"action": task["type"], "reason": "admitted"})
        return {"action": task["type"], "task": task, "retry_after": None, "reason": None,
                "global_version": self.models.global_version()}

    def task_for(self, rnd: Round) -> dict[str, Any]:
        if rnd.kind == "eval":
            return evaluation.evaluate_task(rnd, self.models.model_config.config_hash())
        return self.strategy(rnd).configure_train(rnd, self.context())

    # ================================================================== uploads
    @staticmethod
    def _update_answer(row: dict[str, Any]) -> dict[str, Any]:
        return {"status": "accepted", "round_id": row["round_id"], "payload_sha256": row["payload_sha256"],
                "num_examples": row["num_examples"], "norm": row["norm"]}

    def _repeat_update(self, prev: dict[str, Any], body: bytes) -> dict[str, Any]:
        """Idempotent retry: the same bytes get the same answer, anything else is a duplicate."""
        n = wire.CHECKSUM_BYTES
        same = len(body) > n and bytes(body[-n:]).hex() == prev["payload_sha256"] \
            and hashlib.sha256(memoryview(body)[:-n]).hexdigest() == prev["payload_sha256"]
        if not same:
            raise Rejection("duplicate_upload",
                            f"round {prev['round_id']} already holds a different update from this device")
        self.metrics.inc("fk_uploads_total", {"result": "repeat"})
        return self._update_answer(prev)

    def submit_update(self, device_id: str, round_id: int, body: bytes) -> dict[str, Any]:
        try:
            return self._submit_update(device_id, round_id, body)
        except Rejection as exc:
            self.metrics.inc("fk_uploads_total", {"result": exc.reason})
            raise

    def upload_round(self, device_id: str, round_id: int) -> tuple[Round, dict[str, Any] | None]:
        """The checks of an upload that need no body, in the order every refusal is documented: (the training
        round, the device's accepted update if it already sent one). The HTTP layer calls it before reading the
        body (server/http/device_routes.py), so a device that may not upload is refused without sending it."""
        self.models.require_initialized()
        rnd = self.db.get_round(round_id)
        if rnd is None or rnd.kind != "train":
            raise Rejection("unknown_round", f"no training round {round_id}")
        if not self.db.is_admitted(round_id, device_id):
            raise Rejection("not_admitted", f"device was not admitted to round {round_id}; check in first")
        prev = self.db.get_update(round_id, device_id)
        if prev is None and (rnd.state != "open" or rnd.past_deadline(time.time())):
            # (a device that already uploaded goes on: its retry gets the original answer)
            raise Rejection("round_closed", f"round {round_id} is {rnd.state}"
                            + (" (deadline passed)" if rnd.state == "open" else ""))
        return rnd, prev

    def _submit_update(self, device_id: str, round_id: int, body: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.models.require_initialized()
        limit = self.models.max_upload_bytes
        if len(body) > limit:
            raise Rejection("too_large", f"upload is {len(body)} bytes, the limit is {limit}")
        rnd, prev = self.upload_round(device_id, round_id)
        if prev is not None:
            return self._repeat_update(prev, body)
        strategy = self.strategy(rnd)
        with self._cpu_slots:
            update = strategy.decode_upload(body, rnd, self.context())
        weight = strategy.weight(rnd.train, update.num_examples)
        rel = self.store.write_update(round_id, device_id, update.tensors)  # durable before the row commits
        try:
            answer, new = self._commit_update(device_id, round_id, update, weight, rel, strategy, body)
        except BaseException:
            self.store.delete(rel)
            raise
        if new:
            self.metrics.inc("fk_uploads_total", {"result": "accepted"})
            self.metrics.observe("fk_upload_seconds", time.perf_counter() - t0)
        return answer

    def _commit_update(self, device_id: str, round_id: int, update: DecodedUpdate, weight: float, rel: str,
                       strategy: Strategy, body: bytes) -> tuple[dict[str, Any], bool]:
        """(answer, whether this call accepted a new update)."""
        with self.lock:
            rnd = self.db.get_round(round_id)
            prev = self.db.get_update(round_id, device_id)
            if prev is not None:  # a concurrent retry of the same device won the race
                self.store.delete(rel)
                return self._repeat_update(prev, body), False
            now = time.time()
            if rnd.state != "open" or rnd.past_deadline(now):
                raise Rejection("round_closed", f"round {round_id} closed while the upload was processed")
            count = self.db.count_updates(round_id)
            goal = rnd.params.goal
            if count >= goal:
                raise Rejection("round_closed", f"round {round_id} already has its {goal} updates")
            state = self._round_state(rnd, strategy)
            with self.db.write():
                self.db.add_update(round_id=round_id, device_id=device_id, payload_sha256=update.payload_sha256,
                                   file=rel, num_examples=update.num_examples, weight=weight, norm=update.norm,
                                   dtype=update.dtype, metrics=update.metrics, received_at=now)
                self.db.touch_device(device_id, now)
                if count + 1 >= goal:
                    self.db.update_round(round_id, state="aggregating")
            answer = self._update_answer(self.db.get_update(round_id, device_id))
            with self._accepting:
                self._in_flight[round_id] = self._in_flight.get(round_id, 0) + 1
        # The row is durable; the running sum is added to outside the manager lock (the state
        # serialises its own adds), so other uploads validate and commit meanwhile. Aggregation
        # waits for in-flight adds (wait_for_adds) and rebuilds from disk if one failed.
        try:
            if state is not None:  # (None: a stateless strategy, or --cluster)
                strategy.accept(state, update, weight)
        except BaseException:
            with self.lock:
                if self._states.get(round_id) is state:
                    self._states.pop(round_id, None)  # rebuilt from the stored updates when needed
            raise
        finally:
            with self._accepting:
                self._in_flight[round_id] -= 1
                if not self._in_flight[round_id]:
                    del self._in_flight[round_id]
                self._accepting.notify_all()
        if count + 1 >= goal:
            log.info("round %d reached its goal of %d updates", round_id, goal)
            self._wake.set()
        return answer, True

    def wait_for_adds(self, round_id: int, timeout: float = 60.0) -> None:
        """Block until no accepted update of the round is still being added to its running sum."""
        with self._accepting:
            self._accepting.wait_for(lambda: not self._in_flight.get(round_id), timeout=timeout)

    def _round_state(self, rnd: Round, strategy: Strategy) -> Any:
        """The strategy's in-memory state for an open round, rebuilt from disk after a restart. None under
        --cluster: each process would hold only its own uploads, so the aggregator reads them all from disk."""
        if self.leadership is not None:
            return None
        if rnd.id not in self._states:
            state = strategy.new_state(self.dim)
            rows = self.db.list_updates(rnd.id)
            if state is not None and rows:
                state = strategy.rebuild(rows, self.context())
                log.info("round %d: rebuilt the running aggregate from %d stored updates", rnd.id, len(rows))
            self._states[rnd.id] = state
        return self._states[rnd.id]

    def peek_state(self, round_id: int) -> Any:
        """The round's in-memory state, if any (aggregation rebuilds it from disk when it is missing)."""
        return self._states.get(round_id)

    def drop_state(self, round_id: int) -> None:
        self._states.pop(round_id, None)

    # ================================================================== evaluation reports
    def submit_eval(self, device_id: str, round_id: int, results: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            answer = self._submit_eval(device_id, round_id, results)
        except Rejection as exc:
            self.metrics.inc("fk_eval_reports_total", {"result": exc.reason})
            raise
        self.metrics.inc("fk_eval_reports_total", {"result": "accepted"})
        return answer

    def _submit_eval(self, device_id: str, round_id: int, results: list[dict[str, Any]]) -> dict[str, Any]:
        self.models.require_initialized()
        rnd = self.db.get_round(round_id)
        if rnd is None or rnd.kind != "eval":
            raise Rejection("unknown_round", f"no evaluation round {round_id}")
        if not self.db.is_admitted(round_id, device_id):
            raise Rejection("not_admitted", f"device was not admitted to round {round_id}; check in first")
        sha = evaluation.report_sha(results)
        answer = {"status": "accepted", "round_id": round_id, "payload_sha256": sha}
        prev = self.db.get_eval_report(round_id, device_id)
        if prev is not None:
            if prev["payload_sha256"] != sha:
                raise Rejection("duplicate_upload", f"round {round_id} already holds a different report from this device")
            return answer
        if rnd.state != "open" or rnd.past_deadline(time.time()):
            raise Rejection("round_closed", f"round {round_id} is {rnd.state}")
        evaluation.validate_results(rnd, results, self.config.max_examples_per_update)
        with self.lock:
            rnd = self.db.get_round(round_id)
            prev = self.db.get_eval_report(round_id, device_id)
            if prev is not None:
                if prev["payload_sha256"] != sha:
                    raise Rejection("duplicate_upload", f"round {round_id} already holds a different report")
                return answer
            now = time.time()
            if rnd.state != "open" or rnd.past_deadline(now):
                raise Rejection("round_closed", f"round {round_id} is {rnd.state}")
            with self.db.write():
                self.db.add_eval_report(round_id=round_id, device_id=device_id, payload_sha256=sha,
                                        report={"results": results}, received_at=now)
                self.db.touch_device(device_id, now)
            if self.db.count_eval_reports(round_id) >= rnd.params.goal:
                self.closer.decide_eval(self.db.get_round(round_id))
        return answer

    # ================================================================== deadlines and abandonment
    def _expire_due(self, now: float) -> None:
        """Close open rounds whose deadline passed (caller holds the lock)."""
        for rnd in self.db.rounds_in_state("open"):
            if not rnd.past_deadline(now) or (rnd.kind == "train" and self.strategy(rnd).runs_own_deadlines(rnd)):
                continue  # secure-aggregation rounds run their own stage deadlines (server/secagg/)
            if rnd.kind == "train":
                n = self.db.count_updates(rnd.id)
                if n >= rnd.params.min_count:
                    with self.db.write():
                        self.db.update_round(rnd.id, state="aggregating")
                    log.info("round %d: deadline with %d updates (min %d): aggregating", rnd.id, n,
                             rnd.params.min_count)
                    self._wake.set()
                else:
                    self.abandon(rnd, "below_min_count")
            else:
                n = self.db.count_eval_reports(rnd.id)
                if n >= rnd.params.min_count:
                    self.closer.decide_eval(rnd)
                else:
                    self.abandon(rnd, "below_min_count")

    def abandon_rows(self, rnd: Round, reason: str) -> Doomed:
        """Mark a round abandoned inside the caller's transaction; returns files to delete after commit."""
        rid = rnd.id
        files = [r["file"] for r in self.db.list_updates(rid)] if rnd.kind == "train" else []
        outcome = {"reason": reason, "admitted": self.db.count_admitted(rid),
                   "accepted": self.db.count_updates(rid) if rnd.kind == "train" else self.db.count_eval_reports(rid)}
        self.db.update_round(rid, state="abandoned", closed_at=time.time(), outcome=outcome)
        self.db.clear_update_files(rid)
        self._states.pop(rid, None)
        self.metrics.inc("fk_rounds_finished_total", {"kind": rnd.kind, "state": "abandoned"})
        log.info("round %d (%s) abandoned: %s (%d admitted, %d accepted)", rid, rnd.kind, reason,
                 outcome["admitted"], outcome["accepted"])
        return [(rid, files)]

    def delete_round_files(self, doomed: Doomed) -> None:
        """After a commit: delete the update files of `doomed` rounds and the model-side files retired."""
        self.delete_retired_files()
        if self.config.keep_update_blobs:
            return
        for rid, files in doomed:
            self.store.delete_round_updates(rid, files)

    def retire_file(self, rel: str | None) -> None:
        """Inside a transaction that stops referencing `rel` (an optimizer state): delete it after the commit."""
        if rel:
            self._retired.append(rel)

    def delete_retired_files(self) -> None:
        """Delete retired files no row references (a rolled-back transaction still does: those stay)."""
        if not self._retired:
            return
        live = self.db.live_model_files()
        for rel in self._retired:
            if rel not in live:
                self.store.delete(rel)
        self._retired.clear()

    def set_global(self, version: int) -> Doomed:
        """Inside a transaction: make `version` global; the open training round no longer fits, so abandon it,
        and a trained version awaiting release (trained on the old global model) is superseded."""
        self.db.set_meta("global_version", version)
        self.db.update_model(version, was_global=1)
        doomed = self._supersede_release(version)
        train = self.db.active_round("train")
        if train is not None and train.state == "open" and train.base_version != version:
            doomed += self.abandon_rows(train, "global_changed")
        self.models.cache_weights(None)
        return doomed

    def _supersede_release(self, version: int) -> Doomed:
        """Inside a transaction: drop the trained version awaiting release (another one became global)."""
        pending = self.models.release_pending()
        if pending is None or pending == version:
            return []
        row = self.db.get_model(pending)
        reason = f"superseded: version {version} became global before the evaluation decided"
        self.db.update_model(pending, candidate_state="superseded", opt_state_file=None,
                             info=dict(row["info"], release={"state": "superseded", "reason": reason}))
        self.retire_file(row["opt_state_file"])  # its optimizer state must never be a base's
        self.db.set_meta("release_pending", None)
        ev = self.db.active_round("eval")
        log.info("version %d: %s", pending, reason)
        if ev is not None and ev.candidate_version == pending and ev.state == "open":
            return self.abandon_rows(ev, "global_changed")
        return []

    # ================================================================== lifecycle
    @property
    def role(self) -> str:
        """"single" (one server process), else under --cluster "aggregator" (holds the lease) or "api"."""
        if self.leadership is None:
            return "single"
        return "aggregator" if self.leadership.holds else "api"

    def recover(self) -> None:
        """At start: drop unreferenced files; rounds left aggregating are picked up by the worker. Under
        --cluster the aggregator's lease decides who does it (tick -> take_over)."""
        params = parse_params("train", self.config.round_params())
        start_warm_up(self._strategy_for_params(params).ledger_event(params, 1, 1) is not None, self.warm)
        if self.leadership is None or self.leadership.held():
            self.take_over()

    def take_over(self) -> None:
        """What the one process running rounds does first: drop unreferenced files, resume rounds."""
        with self.lock:
            self.collect_orphans()
            for rnd in self.db.rounds_in_state("open", "train"):
                n = self.db.count_updates(rnd.id)
                if n:
                    log.info("round %d resumes with %d accepted updates", rnd.id, n)
            for service in self._background:
                service.recover()
            self.ensure_rounds()

    def collect_orphans(self) -> None:
        """Delete files no row references (an interrupted upload's, a crashed aggregation's). Under --cluster,
        while other server processes are connected, only those older than ORPHAN_MIN_AGE_S: a younger one
        may be an upload whose row another process is about to commit."""
        self._orphans_collected = time.monotonic()
        shared = self.leadership is not None and other_server_processes(self.db) > 0
        with self.lock:
            live = self.db.live_model_files() | self.db.live_update_files()
            removed = self.store.collect_garbage(live, min_age_s=ORPHAN_MIN_AGE_S if shared else 0.0)
        if removed:
            log.info("removed %d unreferenced files left by an interrupted upload or run", len(removed))

    def tick(self) -> None:
        """Deadlines, new rounds, pending aggregations. Takes the lock only when something is due. Under
        --cluster only the lease's holder does this."""
        if self.leadership is not None:
            was = self.leadership.holds
            if not self.leadership.held():
                return
            if not was:
                self.take_over()
            elif time.monotonic() - self._orphans_collected > ORPHAN_MIN_AGE_S:  # e.g. a killed peer's uploads
                self.collect_orphans()
        now = time.time()
        due = any(r.past_deadline(now) for r in self.db.rounds_in_state("open"))
        missing = self.models.initialized and (self._training_due() or self._due_candidate() is not None)
        if due or missing:
            with self.lock:
                self._expire_due(time.time())
                self.ensure_rounds()
        for service in self._background:
            service.tick(time.time())
        self.closer.aggregate_pending()

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()
        if self.leadership is not None:
            self.leadership.release()
        if isinstance(self.lock, ClusterLock):
            self.lock.close()


__all__ = ["RoundManager", "ELIGIBILITY_KEYS", "Background", "Doomed"]
