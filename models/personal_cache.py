"""A personal n-gram cache blended with the global model: the keyboard remembers what *you* type.

Cache language models (Kuhn & De Mori 1990) add to a general model a small model of the
user's own recent text: p(w | h) = (1 - lam) p_global(w | h) + lam p_cache(w | h). The cache
here is an interpolated Witten-Bell n-gram (order 3 by default) over the user's sentences,
counted on the device from the text the user typed; it is never uploaded. Witten-Bell needs no
tuned discounts, which matters for a model of a few hundred sentences, and backs off to the
user's own unigram, so even a context the user never typed leans towards the user's words.

lam is chosen per user on their held-back text (`choose_weight`), from a small grid, by the
mean log-likelihood (smoother than top-1 on a few dozen sentences); 0 is always in the grid,
so a cache that does not help is switched off.

Pure numpy; `evaluate_blend` scores a user's text position by position as the keyboard would:
each sentence is predicted from the cache of the sentences before it, then added to it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from models.metrics import PAD_ID, empty_metric_sums, finalize_metric_sums, merge_metric_sums, metric_sums

DEFAULT_ORDER = 3
WEIGHT_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
_FLOOR = 1e-12  # keeps log() finite where both models give a word ~0


class NgramCache:
    """Counts of the user's n-grams (ids) up to `order`, with Witten-Bell interpolated probabilities."""

    def __init__(self, vocab_size: int, order: int = DEFAULT_ORDER) -> None:
        if order < 1:
            raise ValueError("order must be >= 1")
        self.vocab_size, self.order = int(vocab_size), int(order)
        # history tuple -> {next id: count}; () is the unigram history.
        self._followers: dict[tuple[int, ...], dict[int, int]] = defaultdict(dict)
        self.tokens = 0

    def add(self, ids: Sequence[int]) -> None:
        """Count one sentence given as ids starting with <bos> (targets are ids[1:])."""
        ids = [int(i) for i in ids if int(i) != PAD_ID]
        for t in range(1, len(ids)):
            word = ids[t]
            for n in range(self.order):
                if t - n < 0:
                    break
                hist = tuple(ids[t - n : t])
                table = self._followers[hist]
                table[word] = table.get(word, 0) + 1
            self.tokens += 1

    def probs(self, context_ids: Sequence[int]) -> np.ndarray:
        """p_cache(. | context) over the vocabulary (all zeros while the cache is empty)."""
        out = np.zeros(self.vocab_size, dtype=np.float64)
        unigram = self._followers.get(())
        if not unigram:
            return out
        _add_counts(out, unigram, 1.0)
        out /= sum(unigram.values())
        context = [int(i) for i in context_ids if int(i) != PAD_ID]
        for n in range(1, self.order):
            if len(context) < n:
                break
            table = self._followers.get(tuple(context[-n:]))
            if not table:
                break  # a longer history cannot have been seen either
            total, types = sum(table.values()), len(table)
            out *= types / (total + types)
            _add_counts(out, table, 1.0 / (total + types))
        return out

    def __len__(self) -> int:
        return self.tokens


def _add_counts(out: np.ndarray, table: dict[int, int], scale: float) -> None:
    ids = np.fromiter(table.keys(), dtype=np.int64, count=len(table))
    counts = np.fromiter(table.values(), dtype=np.float64, count=len(table))
    out[ids] += scale * counts


def blend(global_logprobs: np.ndarray, cache_probs: np.ndarray, weight: float) -> np.ndarray:
    """log((1 - weight) p_global + weight p_cache); the global model alone when the cache is empty."""
    g = np.asarray(global_logprobs, dtype=np.float64)
    if weight <= 0 or not cache_probs.any():
        return g
    mixed = (1.0 - weight) * np.exp(g) + weight * cache_probs
    return np.log(np.maximum(mixed, _FLOOR))


class BlendedModel:
    """A next_word_logprobs function: the global model blended with a personal cache."""

    def __init__(self, global_logprobs: Callable[[Sequence[int]], np.ndarray], cache: NgramCache, weight: float) -> None:
        self.global_logprobs, self.cache, self.weight = global_logprobs, cache, float(weight)

    def __call__(self, context_ids: Sequence[int]) -> np.ndarray:
        g = self.global_logprobs(context_ids)
        if self.weight <= 0:
            return g
        return blend(g, self.cache.probs(context_ids), self.weight)


@dataclass
class BlendEvaluation:
    """Metrics of each grid weight on the same positions (finalized models.metrics dicts)."""

    weights: tuple[float, ...]
    metrics: list[dict[str, float]]

    def best_weight(self) -> float:
        """The weight with the highest mean log-likelihood (lowest loss); the lower weight on a tie."""
        losses = [m["loss"] if math.isfinite(m["loss"]) else math.inf for m in self.metrics]
        return self.weights[int(np.argmin(losses))]

    def metrics_of(self, weight: float) -> dict[str, float]:
        return self.metrics[self.weights.index(weight)]


def evaluate_blend(
    x: np.ndarray,
    y: np.ndarray,
    global_logprobs: np.ndarray,
    cache: NgramCache,
    weights: Sequence[float] = WEIGHT_GRID,
    update: bool = True,
) -> BlendEvaluation:
    """Score windows (x, y) [n, T] whose global log-probabilities are `global_logprobs` [n, T, V].

    Windows are taken in order, as the user typed them; with `update` each window's words are
    added to `cache` after it is scored (the keyboard's cache grows as the user types).
    """
    if global_logprobs.shape[:2] != x.shape or x.shape != y.shape:
        raise ValueError("x, y and global_logprobs must agree in [windows, positions]")
    weights = tuple(float(w) for w in weights)
    sums = [empty_metric_sums() for _ in weights]
    for i in range(len(x)):
        real = np.flatnonzero(y[i] != PAD_ID)
        if real.size == 0:
            continue
        rows = global_logprobs[i, real].astype(np.float64)
        cache_rows = np.stack([cache.probs(x[i, : t + 1]) for t in real])
        for j, w in enumerate(weights):
            sums[j] = merge_metric_sums(sums[j], metric_sums(np.stack([blend(r, c, w) for r, c in zip(rows, cache_rows)]),
                                                               y[i, real]))
        if update:
            cache.add([int(x[i, 0]), *y[i, real].tolist()])
    return BlendEvaluation(weights, [finalize_metric_sums(s) for s in sums])


def choose_weight(
    x: np.ndarray, y: np.ndarray, global_logprobs: np.ndarray, cache: NgramCache, weights: Sequence[float] = WEIGHT_GRID
) -> float:
    """The blend weight for this user: best on their held-back windows, scored against `cache`
    as it stands (not updated: the choice must not depend on the order of held-back text)."""
    return evaluate_blend(x, y, global_logprobs, cache, weights, update=False).best_weight()


def cache_from_windows(x: np.ndarray, y: np.ndarray, vocab_size: int, order: int = DEFAULT_ORDER) -> NgramCache:
    """A cache of every window's words (the user's training text as models.examples windows)."""
    cache = NgramCache(vocab_size, order)
    for row_x, row_y in zip(x, y):
        real = row_y != PAD_ID
        if real.any():
            cache.add([int(row_x[0]), *row_y[real].tolist()])
    return cache


def cache_from_sentences(id_lists: Iterable[Sequence[int]], vocab_size: int, order: int = DEFAULT_ORDER) -> NgramCache:
    """A cache of sentences given as ids without <bos>/<eos> (the device's stored messages, encoded)."""
    from models.vocab import Vocabulary

    cache = NgramCache(vocab_size, order)
    for ids in id_lists:
        if ids:
            cache.add([Vocabulary.BOS_ID, *ids, Vocabulary.EOS_ID])
    return cache


__all__ = ["NgramCache", "BlendedModel", "BlendEvaluation", "blend", "evaluate_blend", "choose_weight",
           "cache_from_windows", "cache_from_sentences", "WEIGHT_GRID"]
