"""Getting the server's global models onto the device: conditional download (ETag), the server's
config and vocabulary checked against ours, installation, and the weights of a given version (a
round's base). Offline errors propagate (device_app.http_client.Offline): the caller decides."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from device_app.connection import ServerConnection
from device_app.device_state import DeviceState
from device_app.http_client import ServerAPI, ServerError
from device_app.model_state import ModelState
from device_app.progress import ProgressReporter
from models import wire
from models.config import ModelConfig
from models.vocab import Vocabulary

log = logging.getLogger("device_app.client")

Decoded = tuple[ModelConfig, Vocabulary, list[np.ndarray], int]  # config, vocab, tensors, version


class ModelCache:
    """Decoded global models shared by devices of one process (fleet mode), keyed by ETag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Decoded] = {}
        self._vocab: dict[str, Vocabulary] = {}

    def get(self, etag: str | None) -> Decoded | None:
        if not etag:
            return None
        with self._lock:
            return self._items.get(etag)

    def put(self, etag: str | None, value: Decoded) -> None:
        if etag:
            with self._lock:
                self._items[etag] = value
                while len(self._items) > 4:
                    self._items.pop(next(iter(self._items)))

    def vocab(self, vocab_hash: str, fetch: Callable[[], Vocabulary]) -> Vocabulary:
        with self._lock:
            hit = self._vocab.get(vocab_hash)
        if hit is None:
            hit = fetch()
            with self._lock:
                self._vocab[vocab_hash] = hit
        return hit


class ModelSync:
    def __init__(self, link: ServerConnection, models: ModelState, state: DeviceState, progress: ProgressReporter,
                 cache: ModelCache | None = None, persist: bool = True) -> None:
        self.link = link
        self.models = models
        self.state = state
        self.progress = progress
        self.cache = cache
        self.persist = persist

    def sync(self) -> bool:
        """Download the current global model if it changed (conditional GET). True if installed."""
        etag = self.state.data.get("model_etag") if self.server_version() is not None else None
        self.progress.report(0.05, "checking for a new model")
        download = self.link.call(lambda api: api.download_model(etag=etag))
        self.state.data["last_sync"] = time.time()
        if download.status == 304 or download.data is None:
            self.state.save()
            return False
        installed = self._install_blob(download.data, download.etag)
        self.state.save()
        return installed

    def server_version(self) -> int | None:
        """The version of our global model if it came from this server (not the bundled initial one)."""
        bundle = self.models.bundle
        if bundle is None or bundle.meta.get("source") != "server" or not self.state.data.get("vocab_checked"):
            return None
        return bundle.model_version

    def sync_identity_for(self, task: Any) -> None:
        """A task for another model config than ours: get the server's current model first."""
        if task.config_hash and self.models.config is not None and task.config_hash != self.models.config.config_hash():
            self.sync()

    def weights_for(self, version: int, url: str | None) -> list[np.ndarray]:
        """Weights of global model `version`: ours if current, else downloaded (and installed if newer)."""
        if self.server_version() == version:
            return self.models.global_weights
        download = self.link.call(lambda api: api.download_model(version=version, url=url))
        assert download.data is not None
        current = self.server_version()
        if current is None or version > current:
            self._install_blob(download.data, download.etag if download.version == version else None)
            self.state.save()
            return self.models.global_weights
        payload = wire.decode(download.data, self.models.config, expected_kind="weights")
        return [np.array(t, dtype=np.float32) for t in payload.tensors]

    def _server_identity(self, api: ServerAPI) -> tuple[ModelConfig, Vocabulary]:
        """The server's model config and vocabulary (fetched only if they differ from ours)."""
        info = api.model_info()
        config = api.model_config(info)
        vocab_hash = info.get("vocab_hash")
        local = self.models.vocab
        if local is not None and vocab_hash == local.content_hash() and len(local) == config.vocab_size:
            return config, local
        if self.cache is not None and vocab_hash:
            vocab = self.cache.vocab(vocab_hash, api.vocab)
        else:
            vocab = api.vocab()
        if vocab_hash and vocab.content_hash() != vocab_hash:
            raise ServerError(200, "vocab_hash_mismatch", "the vocabulary does not match the model info")
        return config, vocab

    def _install_blob(self, data: bytes, etag: str | None) -> bool:
        cached = self.cache.get(etag) if self.cache is not None else None
        if cached is not None:
            config, vocab, tensors, version = cached
        else:
            self.progress.report(0.5, "installing the new model")
            header = wire.decode(data, expected_kind="weights")
            config_local, vocab_local = self.models.config, self.models.vocab
            if (
                config_local is not None
                and header.config_hash == config_local.config_hash()
                and self.state.data.get("vocab_checked")
            ):
                config, vocab = config_local, vocab_local
            else:
                config, vocab = self.link.call(self._server_identity)
            payload = wire.decode(data, config, expected_kind="weights")
            tensors, version = list(payload.tensors), payload.model_version
            if self.cache is not None:
                self.cache.put(etag, (config, vocab, tensors, version))
        assert vocab is not None
        if self.server_version() == version and self.models.config == config and self.models.vocab == vocab:
            self.state.data["model_etag"] = etag
            self.state.data["vocab_checked"] = True
            return False
        self.models.install_global(config, vocab, tensors, version, {"source": "server", "etag": etag},
                                   persist=self.persist)
        self.state.data.update(model_etag=etag, vocab_checked=True, global_version=version,
                               model_installed_at=time.time())
        log.info("installed global model version %s", version)
        return True
