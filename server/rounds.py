"""The round state machine: admission and pace steering, uploads, deadlines, aggregation, versions.

Rounds (a Gboard round, Bonawitz et al. 2019):

    open --(goal reached, or deadline with >= min_count)--> aggregating --> closed (new model version)
    open --(deadline with < min_count | training stopped | global model replaced)--> abandoned

* A training round opens whenever training is enabled and no training round is open or
  aggregating; its base is the global model of that moment and its parameters are frozen into it.
* Its deadline starts at the first admission (an idle server does not abandon empty rounds).
* Check-in admits eligible devices (charging, unmetered, idle) up to ceil(goal * over_admit);
  everyone else is told when to come back (pace steering).
* The mean aggregate is accumulated as updates arrive; robust aggregators read the stored updates.
* Evaluation rounds run beside training: a staged candidate is sent to a fraction of devices, which
  report recall and loss of the candidate and of the round's baseline (the global model when the
  evaluation round opened); the candidate is promoted only if it is not worse (tolerance).
* Every change of the global model (round result, promotion, rollback, admin push) creates a new
  version number; versions only grow. A change by promotion/rollback/push abandons the open
  training round (its base is no longer the global model) and resets the server optimizer.

Concurrency: heavy work (decoding, hashing, writing update files, aggregation math) runs outside
`self.lock`; every state change re-checks the round under the lock and commits one SQLite
transaction. Crash safety: files are durable before the row that references them commits; at start
`recover()` deletes unreferenced files, and rounds left "aggregating" are aggregated again
(deterministically: same updates, same order, same noise seed).
"""
from __future__ import annotations

import collections
import gc
import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
from typing import Any, Sequence

import numpy as np

from models import dp, wire
from models.config import ModelConfig
from models.vocab import Vocabulary
from server.config import ServerConfig
from server.db import Db
from server.errors import Rejection
from server.metrics import Metrics
from server.optimizers import ServerOptimizer
from server.paillier_agg import SecureAggregationFailed
from server.store import Store
from server.strategy import DecodedUpdate, RoundContext, strategy_for

log = logging.getLogger("server.rounds")

ELIGIBILITY_KEYS = ("charging", "unmetered", "idle")
MAX_EVAL_METRICS = 32


def _finite(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


class RoundManager:
    def __init__(self, config: ServerConfig, db: Db, store: Store, metrics: Metrics | None = None) -> None:
        self.config = config
        self.db = db
        self.store = store
        self.metrics = metrics or Metrics()
        self.lock = threading.RLock()
        self._states: dict[int, Any] = {}  # round id -> strategy state (e.g. the running sum)
        self._in_flight: dict[int, int] = {}  # round id -> accepted updates still being added to its state
        self.warm = threading.Event()  # set once start-up imports are done (see recover); /healthz reports it
        self._accepting = threading.Condition(threading.Lock())
        self._blobs: collections.OrderedDict[int, tuple[bytes, str]] = collections.OrderedDict()
        self._weights_cache: tuple[int, np.ndarray] | None = None
        self._ledger: dp.PrivacyLedger | None = None
        # CPU-heavy upload work (checksum, decode, norm) runs at most one per core: eight 5.7 MB payloads
        # hashed at once on two cores only thrash caches and the GIL, and finish later than in turn.
        self._cpu_slots = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.model_config: ModelConfig | None = None
        self.vocab: Vocabulary | None = None
        self.dim = 0
        self.max_upload_bytes = 0
        self._load_identity()
        from server.privacy import PrivacyServices

        self.privacy = PrivacyServices(self)  # secure aggregation, Paillier rounds, randomized response

    # ================================================================== model identity
    def _load_identity(self) -> None:
        cfg = self.db.get_meta("model_config")
        if cfg is None:
            return
        self.model_config = ModelConfig.from_dict(cfg)
        self.vocab = Vocabulary.from_dict(self.db.get_meta("vocab"))
        self.dim = self.model_config.num_parameters()
        self.max_upload_bytes = self.config.max_upload_bytes or (
            wire.payload_nbytes(self.model_config, "float32") + (1 << 20))

    @property
    def initialized(self) -> bool:
        return self.model_config is not None

    def _require_initialized(self) -> None:
        if not self.initialized:
            raise Rejection("not_initialized", "the server has no model yet (start it with --init-bundle or --init-preset)")

    def initialize(self, model_config: ModelConfig, vocab: Vocabulary, weights: Sequence[np.ndarray],
                   info: dict[str, Any] | None = None) -> int:
        """Fix the deployment's model config and vocabulary and store version 1."""
        with self.lock:
            if self.initialized:
                raise Rejection("already_initialized", f"already serving model config {self.model_config.config_hash()}")
            if len(vocab) != model_config.vocab_size:
                raise ValueError(f"vocabulary has {len(vocab)} tokens, model config expects {model_config.vocab_size}")
            blob = wire.encode(list(weights), model_config, kind="weights", model_version=1, metadata={"source": "init"})
            rel, sha, size = self.store.write_model(1, blob)
            with self.db.write():
                self.db.set_meta("model_config", model_config.to_dict())
                self.db.set_meta("vocab", vocab.to_dict())
                self.db.set_meta("global_version", 1)
                self.db.set_meta("candidate_version", None)
                self.db.set_meta("training_enabled", bool(self.config.training_on_start))
                self.db.add_model(1, source="init", file=rel, sha256=sha, size=size, info=info or {}, was_global=True)
            self._load_identity()
            log.info("initialised with model config %s (%d parameters), vocabulary %s",
                     model_config.config_hash(), self.dim, vocab.content_hash())
            return 1

    def global_version(self) -> int | None:
        return self.db.get_meta("global_version")

    def candidate_version(self) -> int | None:
        return self.db.get_meta("candidate_version")

    def training_enabled(self) -> bool:
        return bool(self.db.get_meta("training_enabled", False))

    # ================================================================== model blobs
    def model_blob(self, version: int) -> tuple[bytes, str]:
        """(wire bytes, sha256) of a stored version; small LRU so the current model is served from memory."""
        with self.lock:
            hit = self._blobs.get(version)
            if hit is not None:
                self._blobs.move_to_end(version)
                return hit
        row = self.db.get_model(version)
        if row is None:
            raise Rejection("unknown_version", f"no model version {version}")
        blob = self.store.read_bytes(row["file"])
        with self.lock:
            self._blobs[version] = (blob, row["sha256"])
            while len(self._blobs) > 4:
                self._blobs.popitem(last=False)
        return blob, row["sha256"]

    def _flat_weights(self, version: int) -> np.ndarray:
        """Flat float32 weights of a version (cached for the latest one asked)."""
        cached = self._weights_cache
        if cached is not None and cached[0] == version:
            return cached[1]
        blob, _ = self.model_blob(version)
        payload = wire.decode(blob, self.model_config, expected_kind="weights")
        flat = np.concatenate([t.reshape(-1) for t in payload.tensors])
        self._weights_cache = (version, flat)
        return flat

    def _split(self, flat: np.ndarray) -> list[np.ndarray]:
        out, offset = [], 0
        for _, shape in self.model_config.weight_specs():
            size = int(np.prod(shape))
            out.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return out

    def _write_version(self, version: int, flat32: np.ndarray, metadata: dict[str, Any]) -> tuple[str, str, int]:
        blob = wire.encode(self._split(flat32), self.model_config, kind="weights", model_version=version,
                           metadata=metadata)
        rel, sha, size = self.store.write_model(version, blob)
        with self.lock:
            self._blobs[version] = (blob, sha)
            while len(self._blobs) > 4:
                self._blobs.popitem(last=False)
        return rel, sha, size

    # ================================================================== rounds: creation and lookup
    def _ensure_rounds(self) -> None:
        """Open a training round / evaluation round where one is due (caller holds the lock)."""
        if not self.initialized:
            return
        if self.training_enabled() and self.db.active_round("train") is None:
            with self.db.write():
                rid = self.db.create_round(kind="train", base_version=self.global_version(),
                                           params=self.config.round_params(), seed=secrets.randbits(63))
            log.info("opened training round %d on version %s", rid, self.global_version())
        cand = self.candidate_version()
        if cand is not None and self.db.active_round("eval") is None:
            row = self.db.get_model(cand)
            if row is not None and row["candidate_state"] == "pending":
                with self.db.write():
                    rid = self.db.create_round(kind="eval", base_version=self.global_version(),
                                               candidate_version=cand, params=self.config.eval_params(),
                                               seed=secrets.randbits(63))
                log.info("opened evaluation round %d: candidate %d vs global %s", rid, cand, self.global_version())

    def _past_deadline(self, rnd: dict[str, Any], now: float) -> bool:
        return rnd["deadline"] is not None and now >= rnd["deadline"]

    def _retry(self, seconds: float, reason: str, device_id: str | None = None) -> dict[str, Any]:
        seconds = min(max(seconds, self.config.retry_min_s), self.config.retry_max_s)
        if device_id is not None:  # spread a crowd's next check-ins over +-20% (deterministic per device)
            u = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "big") / 2 ** 32
            seconds *= 0.8 + 0.4 * u
        seconds = int(math.ceil(min(max(seconds, self.config.retry_min_s), self.config.retry_max_s)))
        self.metrics.inc("fk_checkins_total", {"action": "retry", "reason": reason})
        return {"action": "retry", "task": None, "retry_after": seconds, "reason": reason,
                "global_version": self.global_version()}

    def _retry_for_round(self, rnd: dict[str, Any], now: float, reason: str, device_id: str) -> dict[str, Any]:
        remaining = (rnd["deadline"] - now) if rnd["deadline"] is not None else rnd["params"]["deadline_s"]
        return self._retry(max(remaining, 0.0) / 2.0, reason, device_id)

    # ================================================================== check-in
    def checkin(self, device_id: str, eligibility: dict[str, Any], device_version: int | None = None) -> dict[str, Any]:
        now = time.time()
        if not self.initialized:
            return self._retry(self.config.retry_idle_s, "not_initialized")
        if not all(eligibility.get(k) is True for k in ELIGIBILITY_KEYS):
            return self._retry(self.config.retry_ineligible_s, "ineligible", device_id)
        with self.lock:
            self._expire_due(now)
            self._ensure_rounds()
            train = self.db.active_round("train")
            ev = self.db.active_round("eval")
            # A device already admitted and not yet done gets the same task again (idempotent check-in).
            for rnd in (ev, train):
                if rnd is not None and rnd["state"] == "open" and self.db.is_admitted(rnd["id"], device_id) \
                        and not self._has_submitted(rnd, device_id) and self.privacy.may_reanswer(rnd, device_id):
                    return self._answer_task(rnd)
            if ev is not None and ev["state"] == "open" and self._in_eval_sample(device_id, ev["candidate_version"]) \
                    and not self.db.is_admitted(ev["id"], device_id) \
                    and self.db.count_admitted(ev["id"]) < ev["params"]["max_admitted"]:
                return self._answer_task(self._admit(ev, device_id, now))
            if train is None:
                reason = "training_stopped" if not self.training_enabled() else "no_round"
                return self._retry(self.config.retry_idle_s, reason, device_id)
            if train["state"] != "open":
                return self._retry(self.config.retry_min_s, "aggregating", device_id)
            if self.db.is_admitted(train["id"], device_id):
                return self._retry_for_round(train, now, "already_participated", device_id)
            if self.db.count_admitted(train["id"]) >= train["params"]["max_admitted"] \
                    or not self.privacy.admission_open(train):
                return self._retry_for_round(train, now, "round_full", device_id)
            return self._answer_task(self._admit(train, device_id, now))

    def _has_submitted(self, rnd: dict[str, Any], device_id: str) -> bool:
        if rnd["kind"] == "train":
            return self.db.get_update(rnd["id"], device_id) is not None
        return self.db.get_eval_report(rnd["id"], device_id) is not None

    def _in_eval_sample(self, device_id: str, candidate: int) -> bool:
        fraction = self.config.candidate_eval_fraction
        if fraction >= 1.0:
            return True
        h = hashlib.sha256(f"{device_id}:{candidate}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2 ** 64 < fraction

    def _admit(self, rnd: dict[str, Any], device_id: str, now: float) -> dict[str, Any]:
        with self.db.write():
            self.db.admit(rnd["id"], device_id, now)
            self.db.touch_device(device_id, now)
            if rnd["deadline"] is None:
                self.db.update_round(rnd["id"], deadline=now + rnd["params"]["deadline_s"])
        return self.db.get_round(rnd["id"])

    def _answer_task(self, rnd: dict[str, Any]) -> dict[str, Any]:
        task = self.task_for(rnd)
        self.metrics.inc("fk_checkins_total", {"action": task["type"], "reason": "admitted"})
        return {"action": task["type"], "task": task, "retry_after": None, "reason": None,
                "global_version": self.global_version()}

    def task_for(self, rnd: dict[str, Any]) -> dict[str, Any]:
        p = rnd["params"]
        common = {"round_id": rnd["id"], "deadline": rnd["deadline"], "config_hash": self.model_config.config_hash()}
        if rnd["kind"] == "eval":
            return {"type": "evaluate", **common,
                    "candidate_version": rnd["candidate_version"], "baseline_version": rnd["base_version"],
                    "model_urls": {str(rnd["candidate_version"]): f"/v1/models/{rnd['candidate_version']}",
                                   str(rnd["base_version"]): f"/v1/models/{rnd['base_version']}"},
                    "report_url": f"/v1/rounds/{rnd['id']}/eval"}
        return {"type": "train", **common,
                "base_version": rnd["base_version"], "model_url": f"/v1/models/{rnd['base_version']}",
                "epochs": p["epochs"], "batch_size": p["batch_size"], "learning_rate": p["learning_rate"],
                "dp_mode": p["dp_mode"], "clip_norm": p["clip_norm"], "noise_multiplier": p["noise_multiplier"],
                "noise_stddev": dp.device_noise_stddev(p["dp_mode"], p["noise_multiplier"], p["clip_norm"],
                                                       p["min_count"]) if p["clip_norm"] > 0 else 0.0,
                "upload_url": f"/v1/rounds/{rnd['id']}/update", "upload_dtypes": p["upload_dtypes"],
                "max_upload_bytes": self.max_upload_bytes, "max_examples": p["max_examples_per_update"],
                "secure_aggregation": self.privacy.task_params(rnd)}

    # ================================================================== uploads
    def _context(self) -> RoundContext:
        return RoundContext(self.model_config, self.dim, self.max_upload_bytes, self.store.open_update,
                            self.privacy.secure_sum)

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

    def _submit_update(self, device_id: str, round_id: int, body: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._require_initialized()
        if len(body) > self.max_upload_bytes:
            raise Rejection("too_large", f"upload is {len(body)} bytes, the limit is {self.max_upload_bytes}")
        rnd = self.db.get_round(round_id)
        if rnd is None or rnd["kind"] != "train":
            raise Rejection("unknown_round", f"no training round {round_id}")
        if not self.db.is_admitted(round_id, device_id):
            raise Rejection("not_admitted", f"device was not admitted to round {round_id}; check in first")
        prev = self.db.get_update(round_id, device_id)
        if prev is not None:
            return self._repeat_update(prev, body)
        if rnd["state"] != "open" or self._past_deadline(rnd, time.time()):
            raise Rejection("round_closed", f"round {round_id} is {rnd['state']}"
                            + (" (deadline passed)" if rnd["state"] == "open" else ""))
        strategy = strategy_for(rnd["params"])
        with self._cpu_slots:
            update = strategy.decode_upload(body, rnd, self._context())
        weight = strategy.weight(rnd, update.num_examples)
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
                       strategy, body: bytes) -> tuple[dict[str, Any], bool]:
        """(answer, whether this call accepted a new update)."""
        with self.lock:
            rnd = self.db.get_round(round_id)
            prev = self.db.get_update(round_id, device_id)
            if prev is not None:  # a concurrent retry of the same device won the race
                self.store.delete(rel)
                return self._repeat_update(prev, body), False
            now = time.time()
            if rnd["state"] != "open" or self._past_deadline(rnd, now):
                raise Rejection("round_closed", f"round {round_id} closed while the upload was processed")
            count = self.db.count_updates(round_id)
            goal = rnd["params"]["goal"]
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
        # waits for in-flight adds (_wait_for_adds) and rebuilds from disk if one failed.
        try:
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

    def _wait_for_adds(self, round_id: int, timeout: float = 60.0) -> None:
        """Block until no accepted update of the round is still being added to its running sum."""
        with self._accepting:
            self._accepting.wait_for(lambda: not self._in_flight.get(round_id), timeout=timeout)

    def _round_state(self, rnd: dict[str, Any], strategy) -> Any:
        """The strategy's in-memory state for an open round, rebuilt from disk after a restart."""
        rid = rnd["id"]
        if rid not in self._states:
            state = strategy.new_state(self.dim)
            rows = self.db.list_updates(rid)
            if state is not None and rows:
                state = strategy.rebuild(rows, self._context())
                log.info("round %d: rebuilt the running aggregate from %d stored updates", rid, len(rows))
            self._states[rid] = state
        return self._states[rid]

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
        self._require_initialized()
        rnd = self.db.get_round(round_id)
        if rnd is None or rnd["kind"] != "eval":
            raise Rejection("unknown_round", f"no evaluation round {round_id}")
        if not self.db.is_admitted(round_id, device_id):
            raise Rejection("not_admitted", f"device was not admitted to round {round_id}; check in first")
        canonical = json.dumps(sorted(results, key=lambda r: r.get("model_version", 0)), sort_keys=True)
        sha = hashlib.sha256(canonical.encode()).hexdigest()
        answer = {"status": "accepted", "round_id": round_id, "payload_sha256": sha}
        prev = self.db.get_eval_report(round_id, device_id)
        if prev is not None:
            if prev["payload_sha256"] != sha:
                raise Rejection("duplicate_upload", f"round {round_id} already holds a different report from this device")
            return answer
        if rnd["state"] != "open" or self._past_deadline(rnd, time.time()):
            raise Rejection("round_closed", f"round {round_id} is {rnd['state']}")
        want = {rnd["candidate_version"], rnd["base_version"]}
        got = [r.get("model_version") for r in results]
        if sorted(got) != sorted(want) or len(got) != len(want):
            raise Rejection("bad_report", f"report must cover exactly model versions {sorted(want)}, got {got}")
        for r in results:
            n = r.get("num_examples")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.config.max_examples_per_update:
                raise Rejection("bad_report", f"num_examples must be an int in [1, {self.config.max_examples_per_update}]")
            if not _finite(r.get("recall")) or not 0.0 <= r["recall"] <= 1.0:
                raise Rejection("bad_report", f"recall must be a number in [0, 1], got {r.get('recall')!r}")
            if not _finite(r.get("loss")) or r["loss"] < 0:
                raise Rejection("bad_report", f"loss must be a finite number >= 0, got {r.get('loss')!r}")
            metrics = r.get("metrics") or {}
            if not isinstance(metrics, dict) or len(metrics) > MAX_EVAL_METRICS \
                    or not all(isinstance(k, str) and _finite(v) for k, v in metrics.items()):
                raise Rejection("bad_report", "metrics must be an object of finite numbers")
        with self.lock:
            rnd = self.db.get_round(round_id)
            prev = self.db.get_eval_report(round_id, device_id)
            if prev is not None:
                if prev["payload_sha256"] != sha:
                    raise Rejection("duplicate_upload", f"round {round_id} already holds a different report")
                return answer
            now = time.time()
            if rnd["state"] != "open" or self._past_deadline(rnd, now):
                raise Rejection("round_closed", f"round {round_id} is {rnd['state']}")
            with self.db.write():
                self.db.add_eval_report(round_id=round_id, device_id=device_id, payload_sha256=sha,
                                        report={"results": results}, received_at=now)
                self.db.touch_device(device_id, now)
            if self.db.count_eval_reports(round_id) >= rnd["params"]["goal"]:
                self._decide_eval(self.db.get_round(round_id))
        return answer

    def _eval_summary(self, round_id: int) -> dict[int, dict[str, float]]:
        sums: dict[int, dict[str, float]] = {}
        for row in self.db.list_eval_reports(round_id):
            for r in row["report"]["results"]:
                s = sums.setdefault(int(r["model_version"]), {"examples": 0.0, "recall": 0.0, "loss": 0.0, "devices": 0})
                n = float(r["num_examples"])
                s["examples"] += n
                s["recall"] += n * float(r["recall"])
                s["loss"] += n * float(r["loss"])
                s["devices"] += 1
        return {v: {"recall": s["recall"] / s["examples"], "loss": s["loss"] / s["examples"],
                    "examples": int(s["examples"]), "devices": int(s["devices"])} for v, s in sums.items()}

    def _decide_eval(self, rnd: dict[str, Any]) -> None:
        """Promote or reject the round's candidate (caller holds the lock)."""
        summary = self._eval_summary(rnd["id"])
        cand_v, base_v = rnd["candidate_version"], rnd["base_version"]
        cand, base = summary[cand_v], summary[base_v]
        p = rnd["params"]
        promote = cand["recall"] >= base["recall"] - p["promotion_tolerance"] and (
            p["promotion_loss_tolerance"] is None or cand["loss"] <= base["loss"] + p["promotion_loss_tolerance"])
        row = self.db.get_model(cand_v)
        now = time.time()
        outcome = {"candidate": cand, "baseline": base, "reports": self.db.count_eval_reports(rnd["id"]),
                   "admitted": self.db.count_admitted(rnd["id"])}
        if row["candidate_state"] != "pending":
            outcome["decision"] = "superseded"
            with self.db.write():
                self.db.update_round(rnd["id"], state="closed", closed_at=now, outcome=outcome)
            return
        info = dict(row["info"], evaluation={"round_id": rnd["id"], **outcome})
        if not promote:
            outcome["decision"] = "rejected"
            with self.db.write():
                self.db.update_model(cand_v, candidate_state="rejected", info=info)
                self.db.set_meta("candidate_version", None)
                self.db.update_round(rnd["id"], state="closed", closed_at=now, outcome=outcome)
            log.info("candidate %d rejected: recall %.4f vs %.4f (global %d)", cand_v, cand["recall"], base["recall"], base_v)
            return
        outcome["decision"] = "promoted"
        flat = self._flat_weights(cand_v)
        version = self.db.max_version() + 1
        rel, sha, size = self._write_version(version, flat, {"source": "promotion", "candidate": cand_v})
        with self.db.write():
            self.db.add_model(version, source="promotion", file=rel, sha256=sha, size=size, parent_version=cand_v,
                              note=f"candidate {cand_v} promoted by evaluation round {rnd['id']}",
                              info={"evaluation": {"round_id": rnd["id"], **outcome}}, was_global=True)
            self.db.update_model(cand_v, candidate_state="promoted", info=info)
            self.db.set_meta("candidate_version", None)
            outcome["result_version"] = version
            self.db.update_round(rnd["id"], state="closed", closed_at=now, outcome=outcome, result_version=version)
            doomed = self._set_global(version)
        self._delete_round_files(doomed)
        log.info("candidate %d promoted as version %d: recall %.4f vs %.4f", cand_v, version, cand["recall"], base["recall"])

    # ================================================================== deadlines and abandonment
    def _expire_due(self, now: float) -> None:
        """Close open rounds whose deadline passed (caller holds the lock)."""
        for rnd in self.db.rounds_in_state("open"):
            if not self._past_deadline(rnd, now) or self.privacy.manages_deadline(rnd):
                continue  # secure-aggregation rounds run their own stage deadlines (server/secagg.py)
            if rnd["kind"] == "train":
                n = self.db.count_updates(rnd["id"])
                if n >= rnd["params"]["min_count"]:
                    with self.db.write():
                        self.db.update_round(rnd["id"], state="aggregating")
                    log.info("round %d: deadline with %d updates (min %d): aggregating", rnd["id"], n,
                             rnd["params"]["min_count"])
                    self._wake.set()
                else:
                    self._abandon(rnd, "below_min_count")
            else:
                n = self.db.count_eval_reports(rnd["id"])
                if n >= rnd["params"]["min_count"]:
                    self._decide_eval(rnd)
                else:
                    self._abandon(rnd, "below_min_count")

    def _abandon_rows(self, rnd: dict[str, Any], reason: str) -> list[tuple[int, list[str | None]]]:
        """Mark a round abandoned inside the caller's transaction; returns files to delete after commit."""
        rid = rnd["id"]
        files = [r["file"] for r in self.db.list_updates(rid)] if rnd["kind"] == "train" else []
        outcome = {"reason": reason, "admitted": self.db.count_admitted(rid),
                   "accepted": self.db.count_updates(rid) if rnd["kind"] == "train" else self.db.count_eval_reports(rid)}
        self.db.update_round(rid, state="abandoned", closed_at=time.time(), outcome=outcome)
        self.db.clear_update_files(rid)
        self._states.pop(rid, None)
        self.metrics.inc("fk_rounds_finished_total", {"kind": rnd["kind"], "state": "abandoned"})
        log.info("round %d (%s) abandoned: %s (%d admitted, %d accepted)", rid, rnd["kind"], reason,
                 outcome["admitted"], outcome["accepted"])
        return [(rid, files)]

    def _abandon(self, rnd: dict[str, Any], reason: str) -> None:
        with self.db.write():
            doomed = self._abandon_rows(rnd, reason)
        self._delete_round_files(doomed)

    def _delete_round_files(self, doomed: list[tuple[int, list[str | None]]]) -> None:
        if self.config.keep_update_blobs:
            return
        for rid, files in doomed:
            self.store.delete_round_updates(rid, files)

    def _set_global(self, version: int) -> list[tuple[int, list[str | None]]]:
        """Inside a transaction: make `version` global; the open training round no longer fits, so abandon it."""
        self.db.set_meta("global_version", version)
        self.db.update_model(version, was_global=1)
        doomed = []
        train = self.db.active_round("train")
        if train is not None and train["state"] == "open" and train["base_version"] != version:
            doomed = self._abandon_rows(train, "global_changed")
        self._weights_cache = None
        return doomed

    # ================================================================== aggregation
    def aggregate_pending(self) -> None:
        for rnd in self.db.rounds_in_state("aggregating", "train"):
            try:
                self._aggregate(rnd["id"])
            except Exception:
                log.exception("aggregation of round %d failed; it will be retried", rnd["id"])
                time.sleep(1.0)

    def _aggregate(self, round_id: int) -> None:
        t0 = time.perf_counter()
        self._wait_for_adds(round_id)
        with self.lock:
            rnd = self.db.get_round(round_id)
            if rnd is None or rnd["state"] != "aggregating":
                return
            rows = self.db.list_updates(round_id)
            strategy = strategy_for(rnd["params"])
            state = self._states.get(round_id)
            base_version = rnd["base_version"]
            if self.global_version() != base_version:
                self._abandon(rnd, "global_changed")
                return
        ctx = self._context()
        try:
            delta = strategy.finalize(state, rows, rnd, ctx)  # the heavy part, outside the lock
        except SecureAggregationFailed as exc:  # e.g. a tampered ciphertext: abandon, never retry
            log.warning("round %d: %s", round_id, exc)
            with self.lock:
                rnd = self.db.get_round(round_id)
                if rnd["state"] == "aggregating":
                    self._abandon(rnd, exc.reason)
            return
        base = self._flat_weights(base_version).astype(np.float64)
        optimizer = ServerOptimizer.from_config(self.config)
        base_row = self.db.get_model(base_version)
        if base_row.get("opt_state_file"):
            optimizer.load_state_dict(self.store.read_opt_state(base_row["opt_state_file"]), self.dim)
        new_weights = optimizer.step(base, delta)
        new32 = new_weights.astype(np.float32)
        local_metrics = self._mean_metrics(rows)
        with self.lock:
            rnd = self.db.get_round(round_id)
            if rnd["state"] != "aggregating":
                return
            if self.global_version() != base_version:
                self._abandon(rnd, "global_changed")
                return
            if not np.isfinite(new32).all():
                self._abandon(rnd, "non_finite_aggregate")
                return
            n = len(rows)
            admitted = self.db.count_admitted(round_id)
            population = self.db.count_devices()
            p = rnd["params"]
            dp_fields: dict[str, Any] = {}
            if p["dp_mode"] != "none":
                z, q = float(p["noise_multiplier"]), min(1.0, n / max(population, 1))
                delta_dp = self.config.dp_delta or dp.default_delta(population)
                ledger = self._privacy_ledger()
                ledger.add(z, q)
                dp_fields = {"noise_multiplier": z, "sampling_prob": q, "population": population,
                             "delta": delta_dp, "epsilon": ledger.epsilon(delta_dp)}
            version = self.db.max_version() + 1
            rel, sha, size = self._write_version(version, new32, {"source": "round", "round_id": round_id,
                                                                  "base_version": base_version})
            opt_rel = self.store.write_opt_state(version, optimizer.state_dict()) if optimizer.state else None
            outcome = {"aggregated": n, "admitted": admitted, "dropouts": max(0, admitted - n),
                       "aggregator": strategy.name, "examples": int(sum(r["num_examples"] for r in rows)),
                       "delta_norm": float(np.linalg.norm(delta)), "local_metrics": local_metrics,
                       "result_version": version}
            files = [r["file"] for r in rows]
            try:
                with self.db.write():
                    self.db.add_model(version, source="round", file=rel, sha256=sha, size=size,
                                      parent_version=base_version, round_id=round_id, opt_state_file=opt_rel,
                                      info={"round_id": round_id, "aggregated": n}, was_global=True)
                    if base_row.get("opt_state_file"):
                        self.db.update_model(base_version, opt_state_file=None)
                    self.db.set_meta("global_version", version)
                    self.db.update_round(round_id, state="closed", closed_at=time.time(), result_version=version,
                                         outcome=outcome, **dp_fields)
                    self.db.clear_update_files(round_id)
            except BaseException:
                self._ledger = None  # rebuilt from the database on next use
                raise
            self._weights_cache = (version, new32)
            self._states.pop(round_id, None)
            if base_row.get("opt_state_file"):
                self.store.delete(base_row["opt_state_file"])
            self._delete_round_files([(round_id, files)])
            self._ensure_rounds()
        self.metrics.inc("fk_rounds_finished_total", {"kind": "train", "state": "closed"})
        self.metrics.observe("fk_aggregation_seconds", time.perf_counter() - t0)
        log.info("round %d aggregated %d updates (%s) into version %d%s", round_id, n, strategy.name, version,
                 f", epsilon {dp_fields['epsilon']:.4g}" if dp_fields else "")

    @staticmethod
    def _mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for r in rows:
            for k, v in json.loads(r["metrics"]).items():
                sums[k] = sums.get(k, 0.0) + v * r["num_examples"]
                weights[k] = weights.get(k, 0.0) + r["num_examples"]
        return {k: sums[k] / weights[k] for k in sorted(sums)}

    # ================================================================== privacy
    def _privacy_ledger(self) -> dp.PrivacyLedger:
        if self._ledger is None:
            ledger = dp.PrivacyLedger(self.config.accountant)
            ledger.extend(self.db.dp_rounds())
            self._ledger = ledger
        return self._ledger

    def privacy_report(self, accountant: str | None = None) -> dict[str, Any]:
        rounds = self.db.dp_rounds()
        population = self.db.count_devices()
        delta = self.config.dp_delta or dp.default_delta(population)
        name = accountant or self.config.accountant
        with self.lock:
            if name == self.config.accountant:
                eps = self._privacy_ledger().epsilon(delta)
            else:
                eps = dp.epsilon_for_rounds(rounds, delta, name) if rounds else 0.0
        report = {"dp_mode": self.config.dp_mode, "accountant": name, "epsilon": eps, "delta": delta,
                  "population": population, "dp_rounds": len(rounds),
                  "noise_multiplier": self.config.noise_multiplier, "clip_norm": self.config.clip_norm,
                  "secure_aggregation": self.config.secure_aggregation}
        report.update(self._device_view_epsilon(delta))
        return report

    def _device_view_epsilon(self, delta: float) -> dict[str, Any]:
        """What one device's single upload reveals to whoever sees it alone (local DP, no sampling).

        local: each upload carries the full noise z*C; distributed: only z*C/sqrt(min_count), which is
        why it must be combined with secure aggregation (the server sees the sum, whose noise is z*C,
        and the ledger's epsilon applies). Sensitivity in the local model is 2C (replace one clipped
        update by any other), so one upload is a Gaussian mechanism with multiplier stddev / (2C)."""
        cfg = self.config
        if cfg.dp_mode not in ("local", "distributed") or cfg.clip_norm <= 0 or cfg.noise_multiplier <= 0:
            return {}
        stddev = dp.device_noise_stddev(cfg.dp_mode, cfg.noise_multiplier, cfg.clip_norm, cfg.min_count)
        z_local = stddev / (2.0 * cfg.clip_norm)
        key = (cfg.dp_mode, z_local, delta)
        if getattr(self, "_local_eps_cache", (None, None))[0] != key:
            try:
                eps1 = dp.epsilon(z_local, 1.0, 1, delta, "rdp")
                eps10 = dp.epsilon(z_local, 1.0, 10, delta, "rdp")
            except Exception:  # noqa: BLE001 - a report, never a failure
                eps1 = eps10 = math.inf
            self._local_eps_cache = (key, (eps1, eps10))
        eps1, eps10 = self._local_eps_cache[1]
        return {"device_noise_stddev": stddev, "local_noise_multiplier": z_local,
                "local_epsilon_per_upload": eps1, "local_epsilon_10_uploads": eps10,
                "local_epsilon_note": ("per device, from its own uploads alone (no sampling amplification); "
                                       + ("the guarantee of local mode" if cfg.dp_mode == "local" else
                                          "what a server that saw one unmasked upload could claim: distributed "
                                          "noise relies on secure aggregation"))}

    # ================================================================== admin operations
    def set_training(self, enabled: bool) -> dict[str, Any]:
        self._require_initialized()
        with self.lock:
            with self.db.write():
                self.db.set_meta("training_enabled", bool(enabled))
                doomed = []
                train = self.db.active_round("train")
                if not enabled and train is not None and train["state"] == "open":
                    doomed = self._abandon_rows(train, "stopped")
            self._delete_round_files(doomed)
            if enabled:
                self._ensure_rounds()
        return {"training_enabled": bool(enabled), "round": self.round_summary(self.db.active_round("train"))}

    def push_model(self, body: bytes, *, promote: bool = False, note: str | None = None) -> dict[str, Any]:
        """A model pushed by an admin (e.g. from tff_sim): staged as candidate, or made global if promote."""
        self._require_initialized()
        try:
            payload = wire.decode(body, self.model_config, expected_kind="weights")
        except wire.WireError as exc:
            raise Rejection(exc.reason, str(exc)) from None
        flat = np.concatenate([t.reshape(-1) for t in payload.tensors])
        meta = {"source": "push", "pushed_model_version": payload.model_version, "pushed_metadata": payload.metadata}
        with self.lock:
            version = self.db.max_version() + 1
            rel, sha, size = self._write_version(version, flat, meta)
            doomed = []
            with self.db.write():
                if promote:
                    self.db.add_model(version, source="push", file=rel, sha256=sha, size=size,
                                      parent_version=self.global_version(), note=note, info=meta, was_global=True)
                    doomed = self._set_global(version)
                else:
                    doomed = self._discard_candidate_rows("superseded")
                    self.db.add_model(version, source="push", file=rel, sha256=sha, size=size,
                                      parent_version=self.global_version(), candidate_state="pending", note=note,
                                      info=meta)
                    self.db.set_meta("candidate_version", version)
            self._delete_round_files(doomed)
            self._ensure_rounds()
            ev = self.db.active_round("eval")
        log.info("model pushed as version %d (%s)", version, "global" if promote else "candidate")
        return {"version": version, "state": "global" if promote else "candidate",
                "eval_round_id": ev["id"] if (ev and not promote) else None, "sha256": sha}

    def _discard_candidate_rows(self, reason: str) -> list:
        cand = self.candidate_version()
        doomed: list = []
        if cand is None:
            return doomed
        row = self.db.get_model(cand)
        if row is not None and row["candidate_state"] == "pending":
            self.db.update_model(cand, candidate_state="discarded")
        ev = self.db.active_round("eval")
        if ev is not None and ev["state"] == "open":
            doomed = self._abandon_rows(ev, reason)
        self.db.set_meta("candidate_version", None)
        return doomed

    def discard_candidate(self) -> dict[str, Any]:
        self._require_initialized()
        with self.lock:
            cand = self.candidate_version()
            if cand is None:
                raise Rejection("no_candidate", "there is no staged candidate")
            with self.db.write():
                doomed = self._discard_candidate_rows("discarded")
            self._delete_round_files(doomed)
        return {"discarded": cand}

    def rollback(self, target: int, note: str | None = None) -> dict[str, Any]:
        """Make an earlier global model global again, as a new version (versions only grow)."""
        self._require_initialized()
        with self.lock:
            row = self.db.get_model(target)
            if row is None:
                raise Rejection("unknown_version", f"no model version {target}")
            if not row["was_global"]:
                raise Rejection("not_a_global_version", f"version {target} was never the global model")
            if target == self.global_version():
                raise Rejection("already_global", f"version {target} is the global model")
            flat = self._flat_weights(target)
            version = self.db.max_version() + 1
            rel, sha, size = self._write_version(version, flat, {"source": "rollback", "rollback_of": target})
            with self.db.write():
                self.db.add_model(version, source="rollback", file=rel, sha256=sha, size=size, parent_version=target,
                                  note=note or f"rollback to version {target}", info={"rollback_of": target},
                                  was_global=True)
                doomed = self._set_global(version)
            self._delete_round_files(doomed)
            self._ensure_rounds()
        log.info("rolled back to version %d as version %d", target, version)
        return {"version": version, "rollback_of": target}

    # ================================================================== reporting
    def round_summary(self, rnd: dict[str, Any] | None) -> dict[str, Any] | None:
        if rnd is None:
            return None
        rid = rnd["id"]
        admitted = rnd.get("n_admitted", None)
        if admitted is None:
            admitted = self.db.count_admitted(rid)
        if rnd["kind"] == "train":
            accepted = rnd.get("n_updates")
            accepted = self.db.count_updates(rid) if accepted is None else accepted
        else:
            accepted = rnd.get("n_reports")
            accepted = self.db.count_eval_reports(rid) if accepted is None else accepted
        p = rnd["params"]
        out = {k: rnd[k] for k in ("id", "kind", "state", "base_version", "candidate_version", "created_at",
                                   "deadline", "closed_at", "result_version", "epsilon", "delta",
                                   "noise_multiplier", "sampling_prob", "population")}
        out.update(goal=p["goal"], min_count=p["min_count"], max_admitted=p["max_admitted"], admitted=admitted,
                   accepted=accepted, dropouts=(max(0, admitted - accepted) if rnd["state"] in ("closed", "abandoned")
                                                else None),
                   outcome=rnd["outcome"], params=p)
        if rnd["kind"] == "train" and p.get("secure_aggregation", "none") != "none":
            out["secure_aggregation"] = self.privacy.summary(rnd)
        return out

    def list_rounds(self, limit: int = 100, kind: str | None = None) -> list[dict[str, Any]]:
        return [self.round_summary(r) for r in self.db.list_rounds(limit, kind)]

    def list_versions(self) -> list[dict[str, Any]]:
        g, c = self.global_version(), self.candidate_version()
        out = []
        for m in self.db.list_models():
            out.append({k: m[k] for k in ("version", "created_at", "source", "sha256", "size", "parent_version",
                                          "round_id", "candidate_state", "was_global", "note", "info")}
                       | {"is_global": m["version"] == g, "is_candidate": m["version"] == c})
        return out

    def status(self) -> dict[str, Any]:
        counts = self.db.round_state_counts()
        rounds: dict[str, dict[str, int]] = {}
        for (kind, state), n in counts.items():
            rounds.setdefault(kind, {})[state] = n
        now = time.time()
        return {
            "initialized": self.initialized,
            "config_hash": self.model_config.config_hash() if self.initialized else None,
            "vocab_hash": self.vocab.content_hash() if self.initialized else None,
            "global_version": self.global_version(),
            "candidate_version": self.candidate_version(),
            "training_enabled": self.training_enabled(),
            "devices": {"registered": self.db.count_devices(),
                        "active_24h": self.db.count_active_devices(now - 86400),
                        "participations": self.db.count_participations()},
            "rounds": rounds,
            "current_round": self.round_summary(self.db.active_round("train")),
            "current_eval_round": self.round_summary(self.db.active_round("eval")),
            "privacy": self.privacy_report() if self.initialized else None,
            "telemetry": self.privacy.telemetry.summary(),
        }

    # ================================================================== lifecycle
    def recover(self) -> None:
        """At start: drop unreferenced files; rounds left aggregating are picked up by the worker."""
        def warm_up() -> None:
            try:
                if self.config.dp_mode != "none":
                    # dp_accounting (and scipy) take a second or two to import: now, not in the first aggregation
                    __import__("dp_accounting")
                # The hundreds of thousands of objects the imports made live as long as the server: keep
                # them out of the cyclic collector, which otherwise walks them all on every full collection
                # while requests wait.
                gc.collect()
                gc.freeze()
            finally:
                self.warm.set()

        threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
        with self.lock:
            live = self.db.live_model_files() | self.db.live_update_files()
            removed = self.store.collect_garbage(live)
            if removed:
                log.info("removed %d unreferenced files left by an interrupted run", len(removed))
            for rnd in self.db.rounds_in_state("open", "train"):
                n = self.db.count_updates(rnd["id"])
                if n:
                    log.info("round %d resumes with %d accepted updates", rnd["id"], n)
            self.privacy.recover()
            self._ensure_rounds()

    def tick(self) -> None:
        """Deadlines, new rounds, pending aggregations. Takes the lock only when something is due."""
        now = time.time()
        due = any(self._past_deadline(r, now) for r in self.db.rounds_in_state("open"))
        missing = self.initialized and (
            (self.training_enabled() and self.db.active_round("train") is None)
            or (self.candidate_version() is not None and self.db.active_round("eval") is None))
        if due or missing:
            with self.lock:
                self._expire_due(time.time())
                self._ensure_rounds()
        self.privacy.tick(time.time())
        self.aggregate_pending()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("round worker tick failed")
                self._stop.wait(1.0)
            self._wake.wait(self.config.tick_s)
            self._wake.clear()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="round-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


__all__ = ["RoundManager", "ELIGIBILITY_KEYS"]
