"""The deployment's model identity (config + vocabulary, fixed by the first model) and its stored versions.

Versions are wire blobs (kind weights) in the store, one row each in `models`; a small LRU keeps the
latest few in memory so the current model is served without a disk read. With release gating a version a
training round produced is stored unpublished (candidate_state pending, meta release_pending) until its
evaluation round releases it (global) or holds it back (server/round_close.py).
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Sequence

import numpy as np

from models import wire
from models.config import ModelConfig
from models.vocab import Vocabulary
from server.config import ServerConfig
from server.db import Db
from server.errors import Rejection
from server.store import Store

log = logging.getLogger("server.versions")

BLOB_CACHE = 4  # versions kept in memory


class ModelVersions:
    def __init__(self, config: ServerConfig, db: Db, store: Store, lock: threading.RLock) -> None:
        self.config, self.db, self.store, self.lock = config, db, store, lock
        self._blobs: collections.OrderedDict[int, tuple[bytes, str]] = collections.OrderedDict()
        self._blobs_lock = threading.Lock()  # the LRU only: a download must not wait for the round lock
        self._weights_cache: tuple[int, np.ndarray] | None = None
        self.model_config: ModelConfig | None = None
        self.vocab: Vocabulary | None = None
        self.dim = 0
        self.max_upload_bytes = 0
        self._load_identity()

    # ------------------------------------------------------------------ identity
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
        if self.model_config is None and self.db.shared:  # another server process may have initialised it
            self._load_identity()
        return self.model_config is not None

    def require_initialized(self) -> None:
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

    def next_server_step(self) -> int:
        """The server step a training round opened now aggregates into: 1 + the steps behind the global
        version's optimizer state (server/optimizers.py counts them under a schedule; none saved: step 1)."""
        version = self.global_version()
        row = self.db.get_model(version) if version is not None else None
        if not row or not row.get("opt_state_file"):
            return 1
        return self.store.read_opt_steps(row["opt_state_file"]) + 1

    def training_enabled(self) -> bool:
        return bool(self.db.get_meta("training_enabled", False))

    # ------------------------------------------------------------------ release gating
    def release_pending(self) -> int | None:
        """The version a training round produced that awaits its evaluation round (release gating)."""
        return self.db.get_meta("release_pending")

    def release_status(self) -> dict[str, Any]:
        """Release gating for the status views: the gate, the version awaiting evaluation, the held-back
        streak, and why training stopped (if it did)."""
        return {"gate": self.config.release_gate, "awaiting_evaluation": self.release_pending(),
                "consecutive_held_back": int(self.db.get_meta("held_back_streak", 0) or 0),
                "max_rejected_versions": self.config.max_rejected_versions,
                "training_stopped_reason": self.db.get_meta("training_stopped_reason")}

    # ------------------------------------------------------------------ blobs and weights
    def model_blob(self, version: int) -> tuple[bytes, str]:
        """(wire bytes, sha256) of a stored version; small LRU so the current model is served from memory."""
        with self._blobs_lock:
            hit = self._blobs.get(version)
            if hit is not None:
                self._blobs.move_to_end(version)
                return hit
        row = self.db.get_model(version)
        if row is None:
            raise Rejection("unknown_version", f"no model version {version}")
        blob = self.store.read_bytes(row["file"])
        self._remember(version, blob, row["sha256"])
        return blob, row["sha256"]

    def _remember(self, version: int, blob: bytes, sha: str) -> None:
        with self._blobs_lock:
            self._blobs[version] = (blob, sha)
            while len(self._blobs) > BLOB_CACHE:
                self._blobs.popitem(last=False)

    def flat_weights(self, version: int) -> np.ndarray:
        """Flat float32 weights of a version (cached for the latest one asked)."""
        cached = self._weights_cache
        if cached is not None and cached[0] == version:
            return cached[1]
        blob, _ = self.model_blob(version)
        payload = wire.decode(blob, self.model_config, expected_kind="weights")
        flat = np.concatenate([t.reshape(-1) for t in payload.tensors])
        self._weights_cache = (version, flat)
        return flat

    def cache_weights(self, version: int | None, flat: np.ndarray | None = None) -> None:
        """Remember `flat` as version's weights (None: forget the cached weights)."""
        self._weights_cache = (version, flat) if version is not None and flat is not None else None

    def _split(self, flat: np.ndarray) -> list[np.ndarray]:
        out, offset = [], 0
        for _, shape in self.model_config.weight_specs():
            size = int(np.prod(shape))
            out.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return out

    def write_version(self, version: int, flat32: np.ndarray, metadata: dict[str, Any]) -> tuple[str, str, int]:
        """Write a version's blob durably (the caller commits its row): (file, sha256, size)."""
        blob = wire.encode(self._split(flat32), self.model_config, kind="weights", model_version=version,
                           metadata=metadata)
        rel, sha, size = self.store.write_model(version, blob)
        self._remember(version, blob, sha)
        return rel, sha, size


RELEASE_STATES = ("served", "awaiting_evaluation", "held_back", "superseded", "promoted", "discarded")


def release_view(row: dict[str, Any], global_version: int | None) -> tuple[str, str | None]:
    """(release state, reason) of a version row: served (the global model), awaiting_evaluation (a trained
    version or pushed candidate in its evaluation round), held_back (it regressed; the reason says how),
    superseded (served earlier, or replaced before its evaluation), promoted / discarded (pushed candidates)."""
    reason = (row.get("info") or {}).get("release", {}).get("reason")
    if row["version"] == global_version:
        return "served", None
    state = row.get("candidate_state")
    if state == "pending":
        return "awaiting_evaluation", None
    if state in ("held_back", "rejected"):
        return "held_back", reason
    if state in ("promoted", "discarded"):
        return state, reason
    return "superseded", reason


__all__ = ["ModelVersions", "RELEASE_STATES", "release_view"]
