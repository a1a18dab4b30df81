"""The personal n-gram cache of what this user typed (models.personal_cache.NgramCache), on the device.

Built from the TextStore's messages the first time suggestions need it (start-up of the keyboard;
headless fleet devices that never suggest never build it), then updated as each message is
committed. It lives in memory only: it is never written to disk (the store it is rebuilt from
already is) and never uploaded, and `clear()` drops it when the user forgets their data.
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

from models.personal_cache import DEFAULT_ORDER, NgramCache
from models.tokenizer import tokenize_sentences
from models.vocab import Vocabulary


class TypingCache:
    """Thread-safe; `version` changes whenever the counts do (so callers can drop stale results)."""

    def __init__(self, messages: Callable[[], Sequence[str]], order: int = DEFAULT_ORDER) -> None:
        self._messages = messages  # the store's messages, oldest first (read on the first build only)
        self.order = order
        self._lock = threading.Lock()
        self._vocab: Vocabulary | None = None
        self._cache: NgramCache | None = None
        self.version = 0

    def _add(self, cache: NgramCache, vocab: Vocabulary, text: str) -> None:
        # Sentence by sentence, as models.examples cuts training text: <bos> words <eos>.
        for tokens in tokenize_sentences(text):
            cache.add([Vocabulary.BOS_ID, *vocab.encode(tokens), Vocabulary.EOS_ID])

    def ensure(self, vocab: Vocabulary) -> NgramCache:
        """The cache for `vocab`, built from the stored messages on first use or after a new vocabulary."""
        with self._lock:
            if self._cache is not None and self._vocab is not vocab and self._vocab == vocab:
                self._vocab = vocab  # an equal vocabulary (a new global version): keep the counts
            if self._cache is None or self._vocab is not vocab:
                cache = NgramCache(len(vocab), self.order)
                for text in self._messages():
                    self._add(cache, vocab, text)
                self._cache, self._vocab = cache, vocab
                self.version += 1
            return self._cache

    def add_message(self, text: str) -> None:
        """A committed message (already in the store). Before the first build there is nothing to do:
        the build reads it from the store."""
        with self._lock:
            if self._cache is not None and self._vocab is not None:
                self._add(self._cache, self._vocab, text)
                self.version += 1

    def clear(self) -> None:
        """Forget the counts (the user's data was deleted); the next ensure() rebuilds from the store."""
        with self._lock:
            self._cache, self._vocab = None, None
            self.version += 1

    @property
    def built(self) -> bool:
        return self._cache is not None

    @property
    def tokens(self) -> int:
        return len(self._cache) if self._cache is not None else 0

    def counts(self, n: int) -> dict[tuple[int, ...], int]:
        """The counted n-grams of length n ({} while unbuilt): what must never leave the device."""
        with self._lock:
            return self._cache.counts(n) if self._cache is not None else {}

    def probs(self, context_ids: Sequence[int]) -> np.ndarray:
        """p_cache(. | context) (zeros while unbuilt or empty)."""
        with self._lock:
            if self._cache is None:
                raise RuntimeError("typing cache not built: call ensure(vocab) first")
            return self._cache.probs(context_ids)


__all__ = ["TypingCache"]
