"""Recall of global model versions on held-out chitchat users (never trained on), measured in a
background thread so the demo's terminal keeps moving while TensorFlow evaluates."""
from __future__ import annotations

import queue
import threading
import time
from typing import Any

from scripts.admin_client import Admin


class RecallMeter:
    """Recall of model versions on held-out chitchat users, in a background thread (TensorFlow here)."""

    def __init__(self, admin: Admin, n_sentences: int, seed: int) -> None:
        self.admin = admin
        self.n_sentences = n_sentences
        self.seed = seed
        self.results: dict[int, dict[str, float]] = {}
        self.errors: list[str] = []
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._done = threading.Condition()
        self._identity: tuple[Any, Any] | None = None
        self._sentences: list | None = None
        self._same_as: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name="recall", daemon=True)
        self._thread.start()

    def request(self, version: int, same_as: int | None = None) -> None:
        if same_as is not None:
            self._same_as[version] = same_as
        self._queue.put(version)

    def get(self, version: int) -> dict[str, float] | None:
        return self.results.get(version)

    def wait(self, version: int, timeout: float) -> dict[str, float] | None:
        deadline = time.monotonic() + timeout
        with self._done:
            while version not in self.results and time.monotonic() < deadline:
                self._done.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        return self.results.get(version)

    def _prepare(self) -> None:
        from models.central import sample_sentences
        from models.config import ModelConfig
        from models.data import load_dataset
        from models.tokenizer import tokenize_sentences
        from models.vocab import Vocabulary

        import logging

        logging.getLogger("tensorflow").setLevel(logging.ERROR)  # evaluate_keras retraces per call: harmless
        info = self.admin.get("/v1/model/info")
        vocab = Vocabulary.from_dict(self.admin.get("/v1/model/vocab"))
        self._identity = (ModelConfig.from_dict(info["config"]), vocab)
        ds = load_dataset("chitchat", seed=self.seed)
        tokens = [t for text in ds.heldout_sentences() for t in tokenize_sentences(text)]
        self._sentences = sample_sentences(tokens, self.n_sentences, ds.seed + 1)

    def _run(self) -> None:
        from models import wire

        while True:
            version = self._queue.get()
            if version is None:
                return
            if version in self.results:
                continue
            try:
                if version in self._same_as and self._same_as[version] in self.results:
                    res = dict(self.results[self._same_as[version]])
                else:
                    if self._identity is None:
                        self._prepare()
                    from models.central import evaluate_keras

                    config, vocab = self._identity
                    weights = wire.decode(self.admin.model_bytes(version), config, expected_kind="weights").tensors
                    res = evaluate_keras(config, weights, self._sentences, vocab, batch_size=128)
                with self._done:
                    self.results[version] = {k: float(v) for k, v in res.items()}
                    self._done.notify_all()
            except Exception as exc:  # noqa: BLE001 - a failed measurement must not stop the demo
                self.errors.append(f"version {version}: {exc.__class__.__name__}: {exc}")
                with self._done:
                    self.results[version] = {"error": 1.0}
                    self._done.notify_all()

    def close(self) -> None:
        self._queue.put(None)
