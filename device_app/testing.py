"""Helpers for the device tests, benchmarks and demos: a small corpus, bundles built from it,
and HTTP transports that record every request (one can be switched offline). Not used by the app itself."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import httpx

from models.config import preset
from models.tokenizer import tokenize_sentences
from models.vocab import Vocabulary

# A user's messages with distinctive words, so a test can search request bodies for them.
SAMPLE_MESSAGES: tuple[str, ...] = (
    "see you tomorrow at the marmalade station",
    "i will bring the pineapple cake tomorrow",
    "are you coming to the zeppelin party tonight?",
    "the weather is nice today",
    "let's meet at the cafe near the lighthouse",
    "thanks for the pineapple cake!",
    "my grandmother knits purple scarves",
    "see you tonight at the zeppelin party",
    "did you feed the tortoise this morning?",
    "the tortoise ate all the strawberries",
)


def vocab_for(messages: Iterable[str], size: int = 500) -> Vocabulary:
    return Vocabulary.build((t for m in messages for t in tokenize_sentences(m)), size=size)


def make_bundle(
    path: str | os.PathLike,
    messages: Sequence[str] = SAMPLE_MESSAGES,
    preset_name: str = "tiny",
    seed: int = 0,
    vocab: Vocabulary | None = None,
    model_version: int = 0,
) -> Path:
    """An untrained model bundle whose vocabulary covers `messages` (TensorFlow)."""
    from models.bundle import save_bundle
    from models.keras_model import build_model, get_weights

    vocab = vocab or vocab_for(messages, size=(preset(preset_name).vocab_size - 4))
    config = preset(preset_name, vocab_size=len(vocab))
    weights = get_weights(build_model(config, seed=seed))
    return save_bundle(path, config, vocab, weights, model_version, {"source": "device_app.testing"})


class RecordingTransport(httpx.BaseTransport):
    """Wraps a transport and keeps (method, url, headers, body) of every request it sends."""

    def __init__(self, inner: httpx.BaseTransport | None = None) -> None:
        self.inner = inner or httpx.HTTPTransport()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.requests.append((request.method, str(request.url), dict(request.headers), bytes(body)))
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class SwitchableTransport(httpx.BaseTransport):
    """Passes requests through, or fails them like a dead network while `.offline` is set
    (optionally only for URL paths containing one of `.fail_paths`). Records every request."""

    def __init__(self, inner: httpx.BaseTransport | None = None) -> None:
        self.inner = inner or httpx.HTTPTransport()
        self.offline = False
        self.fail_paths: tuple[str, ...] = ()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.requests.append((request.method, str(request.url), dict(request.headers), bytes(body)))
        if self.offline and (not self.fail_paths or any(p in request.url.path for p in self.fail_paths)):
            raise httpx.ConnectError("network is down (SwitchableTransport)", request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


__all__ = ["SAMPLE_MESSAGES", "RecordingTransport", "SwitchableTransport", "make_bundle", "vocab_for"]
