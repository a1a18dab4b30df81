"""A personal n-gram cache blended with the global model: the keyboard remembers what *you* type.

Cache language models (Kuhn & De Mori 1990) add to a general model a small model of the
user's own recent text: p(w | h) = (1 - lam) p_global(w | h) + lam p_cache(w | h). The cache
here is an interpolated Witten-Bell n-gram (order 3 by default) over the user's sentences,
counted on the device from the text the user typed; it is never uploaded. Witten-Bell needs no
tuned discounts, which matters for a model of a few hundred sentences, and backs off to the
user's own unigram, so even a context the user never typed leans towards the user's words.

lam is chosen per user on their held-back text (`choose_weight`), from a small grid, by the
mean log-likelihood (smoother than top-1 on a few dozen sentences); 0 is always in the grid,
so a cache that does not help is switched off, and a weight above SAFE_WEIGHT needs a win of about
one standard error (LARGE_WEIGHT_LOSS_SD).

A context-dependent weight is available and off by default: NgramCache(kappa=k) scales its
distribution by c(h) / (c(h) + k), c(h) the count of the longest history of this context the cache
has seen (0 for a context it never saw), and `blend` mixes a scaled ("deficient") cache
distribution of mass m as (1 - lam m) p_global + lam p_cache, i.e. at the effective weight
lam(h) = lam c(h) / (c(h) + k): an unseen context keeps the global model, a context the user typed
many times trusts the cache up to lam. Measured (benchmarks/bench_personal.py's users replayed with
the weight grid up to 0.6, 58 held-out chitchat users, models/pretrained/small) it does not beat
the fixed weight: k = 2 / 5 gave median top-1 gains of +0.36 / +0.30 points at the per-user weight
vs +0.47 for k = 0, with as many or more users worse by > 0.5 points (6 / 4 vs 4). Backing off to nothing
instead of the user's unigram (+0.40, 7 users worse) and choosing the weight by held-back top-1
instead of log-likelihood (+0.18, 7 users worse, one by 3.5 points: top-1 on ~100 held-back words
is noise) did not either. Even the weight that is best on each user's own future text gives a
median of at most about +1.1 points with any of these caches: see benchmarks/bench_personal.py.

The selection rule (`HeldoutScorer.select`, used by the device's personalization and by
benchmarks/bench_personal.py): serve the fine-tuned personal model only when it beats the global
model's top-1 on at least MIN_GAIN_TOKENS held-back tokens, by at least GAIN_MARGIN_SE standard errors (alone
and with the cache), and blend the served model with the
cache at the weight chosen on the held-back text (DEFAULT_WEIGHT until MIN_WEIGHT_TOKENS exist).

Pure numpy; `evaluate_blend` scores a user's text position by position as the keyboard would:
each sentence is predicted from the cache of the sentences before it, then added to it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from models.metrics import PAD_ID, empty_metric_sums, finalize_metric_sums, merge_metric_sums, metric_sums

DEFAULT_ORDER = 3
WEIGHT_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
# A weight above SAFE_WEIGHT is chosen only when it beats the best weight up to SAFE_WEIGHT by about
# one standard error of the held-back log-likelihood difference: LARGE_WEIGHT_LOSS_SD / sqrt(n) nats
# per word on n held-back words (0.03 at 100 words, 0.008 at 1,500). Small wins of large weights on
# little text were noise that cost top-1 on the future text. bench_personal.py's 58 users, pretrained
# small model, replayed offline (median top-1 gain, users worse by > 0.5 points, pooled top-1):
# any win +0.47p / 4 / 24.72%; this rule +0.51p / 1 / 24.69%; a fixed 0.05 nats +0.51p / 1 / 24.43%;
# never above 0.1 +0.51p / 1 / 24.43% (global 23.77%). A user who repeats themselves, or a weak global
# model (the tiny model's best median weight was 0.4), still gets the larger weight.
SAFE_WEIGHT = 0.1
LARGE_WEIGHT_LOSS_SD = 0.3
_FLOOR = 1e-12  # keeps log() finite where both models give a word ~0


class NgramCache:
    """Counts of the user's n-grams (ids) up to `order`, with Witten-Bell interpolated probabilities.

    kappa > 0 makes the weight context-dependent (see the module docstring): probs() is then scaled
    by c(h) / (c(h) + kappa), c(h) the count of the longest history seen (0: an unseen context).
    """

    def __init__(self, vocab_size: int, order: int = DEFAULT_ORDER, kappa: float = 0.0) -> None:
        if order < 1:
            raise ValueError("order must be >= 1")
        if kappa < 0:
            raise ValueError("kappa must be >= 0")
        self.vocab_size, self.order, self.kappa = int(vocab_size), int(order), float(kappa)
        # history tuple -> {next id: count}; () is the unigram history.
        self._followers: dict[tuple[int, ...], dict[int, int]] = defaultdict(dict)
        self._totals: dict[tuple[int, ...], int] = defaultdict(int)  # history -> sum of its counts
        # The unigram counts also as a dense vector: every probs() call starts from it, and turning a
        # dict of thousands of words into an array per keystroke would cost more than the model call.
        self._unigram = np.zeros(self.vocab_size, dtype=np.float64)
        # history -> its followers as (ids, counts) arrays, built on first use and dropped when the
        # history is counted again (most keystrokes look up histories that have not changed)
        self._arrays: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
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
                self._totals[hist] += 1
                self._arrays.pop(hist, None)
            self._unigram[word] += 1
            self.tokens += 1

    def probs(self, context_ids: Sequence[int]) -> np.ndarray:
        """p_cache(. | context) over the vocabulary (all zeros while the cache is empty); with kappa,
        scaled by the confidence in this context (mass < 1; all zeros for an unseen context)."""
        if self.tokens == 0:
            return np.zeros(self.vocab_size, dtype=np.float64)
        out = self._unigram / self.tokens
        context = [int(i) for i in context_ids if int(i) != PAD_ID]
        seen = 0  # count of the longest history seen (the unigram's is not evidence about this context)
        for n in range(1, self.order):
            if len(context) < n:
                break
            hist = tuple(context[-n:])
            table = self._followers.get(hist)
            if not table:
                break  # a longer history cannot have been seen either
            total, types = self._totals[hist], len(table)
            seen = total
            out *= types / (total + types)
            arrays = self._arrays.get(hist)
            if arrays is None:
                arrays = self._arrays[hist] = _arrays_of(table)
            out[arrays[0]] += arrays[1] * (1.0 / (total + types))
        if self.kappa > 0:
            out *= seen / (seen + self.kappa)
        return out

    def confidence(self, context_ids: Sequence[int]) -> float:
        """The share of the blend weight this context gets: c(h) / (c(h) + kappa), 1 without kappa."""
        if self.kappa <= 0:
            return 1.0 if self.tokens else 0.0
        context = [int(i) for i in context_ids if int(i) != PAD_ID]
        seen = 0
        for n in range(1, min(self.order, len(context) + 1)):
            total = self._totals.get(tuple(context[-n:]), 0)
            if not total:
                break
            seen = total
        return seen / (seen + self.kappa)

    def counts(self, n: int) -> dict[tuple[int, ...], int]:
        """The counted n-grams of length n (history + next id) and their counts."""
        return {(*hist, word): c for hist, table in self._followers.items() if len(hist) == n - 1
                for word, c in table.items()}

    def __len__(self) -> int:
        return self.tokens


def _arrays_of(table: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter(table.keys(), dtype=np.int64, count=len(table))
    return ids, np.fromiter(table.values(), dtype=np.float64, count=len(table))


def blend(global_logprobs: np.ndarray, cache_probs: np.ndarray, weight: float) -> np.ndarray:
    """log((1 - weight m) p_global + weight p_cache), m the mass of cache_probs (1 for a plain
    cache; less for a kappa cache's scaled one): a distribution either way. The global model alone
    when the cache gives this context nothing."""
    g = np.asarray(global_logprobs, dtype=np.float64)
    if weight <= 0:
        return g
    mass = float(cache_probs.sum())
    if mass <= 0:
        return g
    # In place on one buffer: this runs on every keystroke (see benchmarks/bench_device_suggest.py).
    mixed = np.exp(g)
    mixed *= 1.0 - weight * min(mass, 1.0)
    mixed += weight * cache_probs
    np.maximum(mixed, _FLOOR, out=mixed)
    return np.log(mixed, out=mixed)


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

    def best_weight(self, safe_weight: float = SAFE_WEIGHT, loss_sd: float = LARGE_WEIGHT_LOSS_SD) -> float:
        """The weight with the highest mean log-likelihood (lowest loss); the lower weight on a tie.
        A weight above `safe_weight` must beat the best one up to it by loss_sd / sqrt(tokens) nats per word."""
        safe = float(safe_weight)
        losses = [m["loss"] if math.isfinite(m["loss"]) else math.inf for m in self.metrics]
        best = int(np.argmin(losses))
        low = [j for j, w in enumerate(self.weights) if w <= safe]
        if not low or self.weights[best] <= safe:
            return self.weights[best]
        best_low = min(low, key=lambda j: (losses[j], self.weights[j]))
        min_gain = loss_sd / math.sqrt(max(int(self.metrics[best].get("tokens", 1)), 1))
        return self.weights[best] if losses[best_low] - losses[best] > min_gain else self.weights[best_low]

    def metrics_of(self, weight: float) -> dict[str, float]:
        return self.metrics[self.weights.index(weight)]


def blend_metric_sums(
    x: np.ndarray,
    y: np.ndarray,
    global_logprobs: np.ndarray,
    cache: NgramCache,
    weights: Sequence[float] = WEIGHT_GRID,
    update: bool = True,
) -> list[dict[str, float]]:
    """Additive metric sums (models.metrics) of each weight on windows (x, y) [n, T] whose model
    log-probabilities are `global_logprobs` [n, T, V]: merge across batches, then finalize.

    Windows are taken in order, as the user typed them; with `update` each window's words are
    added to `cache` after it is scored (the keyboard's cache grows as the user types).
    """
    if global_logprobs.shape[:2] != x.shape or x.shape != y.shape:
        raise ValueError("x, y and global_logprobs must agree in [windows, positions]")
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
    return sums


def evaluate_blend(
    x: np.ndarray,
    y: np.ndarray,
    global_logprobs: np.ndarray,
    cache: NgramCache,
    weights: Sequence[float] = WEIGHT_GRID,
    update: bool = True,
) -> BlendEvaluation:
    """Metrics of each weight on windows (x, y) [n, T] (see blend_metric_sums), finalized."""
    weights = tuple(float(w) for w in weights)
    sums = blend_metric_sums(x, y, global_logprobs, cache, weights, update)
    return BlendEvaluation(weights, [finalize_metric_sums(s) for s in sums])


def choose_weight(
    x: np.ndarray, y: np.ndarray, global_logprobs: np.ndarray, cache: NgramCache, weights: Sequence[float] = WEIGHT_GRID
) -> float:
    """The blend weight for this user: best on their held-back windows, scored against `cache`
    as it stands (not updated: the choice must not depend on the order of held-back text)."""
    return evaluate_blend(x, y, global_logprobs, cache, weights, update=False).best_weight()


def cache_from_windows(x: np.ndarray, y: np.ndarray, vocab_size: int, order: int = DEFAULT_ORDER,
                       kappa: float = 0.0) -> NgramCache:
    """A cache of every window's words (the user's training text as models.examples windows)."""
    cache = NgramCache(vocab_size, order, kappa)
    for row_x, row_y in zip(x, y):
        real = row_y != PAD_ID
        if real.any():
            cache.add([int(row_x[0]), *row_y[real].tolist()])
    return cache


def cache_from_sentences(id_lists: Iterable[Sequence[int]], vocab_size: int, order: int = DEFAULT_ORDER,
                         kappa: float = 0.0) -> NgramCache:
    """A cache of sentences given as ids without <bos>/<eos> (the device's stored messages, encoded)."""
    from models.vocab import Vocabulary

    cache = NgramCache(vocab_size, order, kappa)
    for ids in id_lists:
        if ids:
            cache.add([Vocabulary.BOS_ID, *ids, Vocabulary.EOS_ID])
    return cache


# ---------------------------------------------------------------------- the selection rule

# Held-back target tokens before a personal gain means something. Top-1 of two models on the same
# n tokens differs by a paired difference whose standard error is about sqrt(d / n), d the share of
# tokens exactly one model gets right (~0.1 for a fine-tuned vs global model): at 300 tokens that is
# +-1.8 points (a 95% interval of +-3.6), about the size of the gains at stake. Below it the status
# says "not enough text yet" and the fine-tuned model is not served (its win would be noise).
MIN_GAIN_TOKENS = 300
# ... and above it, the fine-tuned model's top-1 win must be at least this many of those standard
# errors (sqrt(PAIRED_DISAGREEMENT / n)), alone and with the cache: a win of a few words is noise too.
# bench_personal.py (58 users, pretrained small model, cache weights up to 0.1): 7 users' fine-tuned
# models won on held-back text; the 4 that won by under one standard error gained -3.5 / -0.6 / -0.2 /
# +1.4 points on their future text (alone), the 3 that won by more +1.9 / -0.05 / +3.5. Without the
# margin `both` had 2 users worse by > 0.5 points (worst -3.2), with it 1 (-0.9: one word of 109).
GAIN_MARGIN_SE = 1.0
PAIRED_DISAGREEMENT = 0.1
# Held-back target tokens before the cache weight is chosen on them (a log-likelihood over a few
# dozen tokens already separates "the cache helps" from "it does not"); below it, DEFAULT_WEIGHT.
MIN_WEIGHT_TOKENS = 30
# The weight before one was chosen for this user (no personalization yet, or under MIN_WEIGHT_TOKENS
# held-back words). benchmarks/bench_personal.py --fixed-weights on 58 held-out chitchat users:
# * tiny global model: median top-1 gain +2.0 / +4.0 / +5.4 / +5.7 points at 0.05 / 0.1 / 0.2 / 0.3,
#   users worse by > 0.5 points 2 / 0 / 0 / 2;
# * models/pretrained/small (stronger; the one served now): +0.31 / +0.57 / +0.65 / +0.50 points,
#   users worse by > 0.5 points 1 / 3 / 8 / 13.
# On the stronger model 0.1 keeps nearly all of 0.2's gain and hurts under half as many users: the
# better default now (tests/test_device_personal.py's "gym" user still expects 0.2's boost before
# personalization; changing it is the lead's call).
DEFAULT_WEIGHT = 0.2


@dataclass
class Selection:
    """What a device serves: the fine-tuned or the global model, blended with the cache at `weight`.

    metrics: top-1/top-3 recall and loss on the held-back text of "global" (alone), "cache" (global
    + cache at weight_global), "finetune" (the fine-tuned model alone) and "served" (what is served).
    """

    served: str  # "personal" | "global"
    weight: float  # cache weight for the served model
    weight_global: float  # cache weight for the global model (served when the personal one is stale or off)
    heldout_tokens: int
    min_tokens: int
    reason: str
    metrics: dict[str, dict[str, float]]

    @property
    def enough_text(self) -> bool:
        return self.heldout_tokens >= self.min_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"served": self.served, "weight": self.weight, "weight_global": self.weight_global,
                "heldout_tokens": self.heldout_tokens, "min_tokens": self.min_tokens,
                "enough_text": self.enough_text, "reason": self.reason, "metrics": self.metrics}


def _summary(m: dict[str, float]) -> dict[str, float]:
    return {"top1": float(m["top1_recall"]), "top3": float(m["top3_recall"]), "loss": float(m["loss"])}


class HeldoutScorer:
    """Scores the global and the fine-tuned model, alone and with the cache at every grid weight,
    on held-back windows given batch by batch (so a device never holds [n, T, V] for all of them).
    `cache` is the training text's cache; it is not updated (the choice must not depend on the
    order of the held-back text)."""

    def __init__(self, cache: NgramCache, weights: Sequence[float] = WEIGHT_GRID,
                 default_weight: float = DEFAULT_WEIGHT) -> None:
        self.cache, self.default_weight = cache, float(default_weight)
        # 0 (no cache) and the default are always scored, so every reported row is measured
        self.weights = tuple(sorted({0.0, self.default_weight, *(float(w) for w in weights)}))
        self._global = [empty_metric_sums() for _ in self.weights]
        self._tuned: list[dict[str, float]] | None = None

    def add(self, x: np.ndarray, y: np.ndarray, global_logprobs: np.ndarray,
            tuned_logprobs: np.ndarray | None = None) -> None:
        """One batch of held-back windows with both models' log-probabilities [n, T, V]."""
        for j, s in enumerate(blend_metric_sums(x, y, global_logprobs, self.cache, self.weights, update=False)):
            self._global[j] = merge_metric_sums(self._global[j], s)
        if tuned_logprobs is not None:
            tuned = blend_metric_sums(x, y, tuned_logprobs, self.cache, self.weights, update=False)
            self._tuned = tuned if self._tuned is None else [merge_metric_sums(a, b) for a, b in zip(self._tuned, tuned)]

    def select(self, min_tokens: int = MIN_GAIN_TOKENS, min_weight_tokens: int = MIN_WEIGHT_TOKENS,
               margin_se: float = GAIN_MARGIN_SE) -> Selection:
        """The selection rule, the only one (the device and benchmarks/bench_personal.py use it):

        * the fine-tuned model is served only if there are >= min_tokens held-back tokens and its
          top-1 beats the global model's on them by at least margin_se standard errors of the paired
          difference, alone and blended with the cache (each model at its own weight); otherwise the
          global model is served;
        * each model's cache weight is the grid weight with the best held-back log-likelihood
          (0 is in the grid: a cache that does not help is off; one above the default only when it
          wins by about a standard error, LARGE_WEIGHT_LOSS_SD / sqrt(n)), or the default weight below min_weight_tokens held-back tokens.
        """
        g = BlendEvaluation(self.weights, [finalize_metric_sums(s) for s in self._global])
        t = None if self._tuned is None else BlendEvaluation(self.weights, [finalize_metric_sums(s) for s in self._tuned])
        tokens = int(self._global[0]["tokens"])

        def weight_of(ev: BlendEvaluation) -> float:
            return ev.best_weight() if tokens >= min_weight_tokens else self.default_weight

        def top1(ev: BlendEvaluation, w: float) -> float:
            return ev.metrics_of(w)["top1_recall"]

        w_global = weight_of(g)
        if t is None:
            serve_tuned, reason = False, "no fine-tuned model"
        elif tokens < min_tokens:
            serve_tuned, reason = False, f"not enough held-back text yet ({tokens} of {min_tokens} words)"
        else:
            # Better alone and with the cache (each at its own weight): serving it never lowers what the user gets.
            margin = margin_se * math.sqrt(PAIRED_DISAGREEMENT / tokens)
            alone = top1(t, 0.0) - top1(g, 0.0) > margin
            blended = top1(t, weight_of(t)) - top1(g, w_global) > margin
            serve_tuned = alone and blended
            reason = (f"the fine-tuned model {'beats' if serve_tuned else 'does not beat'} the global model on "
                      f"held-back text by more than {margin:.1%} (top-1 {top1(t, 0.0):.1%} vs {top1(g, 0.0):.1%}; "
                      f"with the cache {top1(t, weight_of(t)):.1%} vs {top1(g, w_global):.1%})")
        served_ev = t if serve_tuned and t is not None else g
        w_served = weight_of(served_ev)

        metrics = {"global": _summary(g.metrics_of(0.0)), "cache": _summary(g.metrics_of(w_global)),
                   "served": _summary(served_ev.metrics_of(w_served))}
        if t is not None:
            metrics["finetune"] = _summary(t.metrics_of(0.0))
        return Selection("personal" if serve_tuned else "global", w_served, w_global, tokens, int(min_tokens),
                         reason, metrics)


def select_personal(x: np.ndarray, y: np.ndarray, global_logprobs: np.ndarray, tuned_logprobs: np.ndarray | None,
                    cache: NgramCache, *, min_tokens: int = MIN_GAIN_TOKENS, min_weight_tokens: int = MIN_WEIGHT_TOKENS,
                    default_weight: float = DEFAULT_WEIGHT, margin_se: float = GAIN_MARGIN_SE) -> Selection:
    """HeldoutScorer in one call, for held-back windows that fit in memory (the benchmark)."""
    scorer = HeldoutScorer(cache, default_weight=default_weight)
    scorer.add(x, y, global_logprobs, tuned_logprobs)
    return scorer.select(min_tokens, min_weight_tokens, margin_se)


__all__ = ["NgramCache", "BlendedModel", "BlendEvaluation", "HeldoutScorer", "Selection", "blend", "blend_metric_sums",
           "evaluate_blend", "choose_weight", "select_personal", "cache_from_windows", "cache_from_sentences",
           "WEIGHT_GRID", "DEFAULT_WEIGHT", "MIN_GAIN_TOKENS", "MIN_WEIGHT_TOKENS", "GAIN_MARGIN_SE", "LARGE_WEIGHT_LOSS_SD", "SAFE_WEIGHT",
           "PAIRED_DISAGREEMENT"]
