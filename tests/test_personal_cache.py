"""The personal n-gram cache: Witten-Bell probabilities, the blend, the per-user weight choice and the
selection rule (which model is served, at which cache weight)."""
from __future__ import annotations

import numpy as np
import pytest

from models.personal_cache import (
    DEFAULT_WEIGHT, LARGE_WEIGHT_LOSS_SD, PAIRED_DISAGREEMENT, SAFE_WEIGHT, WEIGHT_GRID, BlendEvaluation, BlendedModel,
    HeldoutScorer, NgramCache, blend, cache_from_sentences, cache_from_windows, choose_weight, evaluate_blend,
    select_personal,
)

V = 12
BOS, EOS = 1, 2


def test_witten_bell_by_hand_and_normalized() -> None:
    cache = NgramCache(V, order=2)
    assert not cache.probs([BOS]).any() and len(cache) == 0
    cache.add([BOS, 5, 6, EOS])
    cache.add([BOS, 5, 7, EOS])
    # unigram over targets: 5 x2, 6, 7, eos x2 -> 6 tokens
    uni = np.zeros(V)
    uni[[5, 6, 7, EOS]] = [2, 1, 1, 2]
    uni /= 6
    # after 5: followers {6: 1, 7: 1}, total 2, types 2 -> lambda = 2 / 4 of the unigram
    want = 0.5 * uni
    want[6] += 1 / 4
    want[7] += 1 / 4
    np.testing.assert_allclose(cache.probs([BOS, 5]), want)
    np.testing.assert_allclose(cache.probs([BOS, 9]), uni)  # an unseen history backs off to the unigram
    for ctx in ([BOS], [BOS, 5], [BOS, 5, 6], [3, 3]):
        assert cache.probs(ctx).sum() == pytest.approx(1.0)
    assert len(cache) == 6


def test_blend_is_a_distribution_and_weight_zero_is_the_global_model() -> None:
    rng = np.random.default_rng(0)
    g = np.log(rng.dirichlet(np.ones(V)))
    cache = cache_from_sentences([[5, 6], [5, 6]], V)
    np.testing.assert_array_equal(blend(g, cache.probs([BOS, 5]), 0.0), g)
    mixed = blend(g, cache.probs([BOS, 5]), 0.3)
    assert np.exp(mixed).sum() == pytest.approx(1.0)
    assert mixed[6] > g[6]
    np.testing.assert_array_equal(blend(g, NgramCache(V).probs([BOS]), 0.5), g)  # empty cache: global
    model = BlendedModel(lambda ctx: g, cache, 0.3)
    np.testing.assert_allclose(model([BOS, 5]), mixed)


def _windows(sentences: list[list[int]], T: int = 6) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((len(sentences), T), np.int32)
    y = np.zeros((len(sentences), T), np.int32)
    for i, s in enumerate(sentences):
        full = [BOS, *s, EOS]
        x[i, : len(full) - 1] = full[:-1]
        y[i, : len(full) - 1] = full[1:]
    return x, y


def test_a_user_who_repeats_themselves_gets_a_cache_and_better_top1() -> None:
    # the global model prefers word 4 everywhere; the user always types 5 6 7
    g_row = np.full(V, -5.0)
    g_row[4] = -0.5
    g_row -= np.log(np.exp(g_row).sum())
    user = [[5, 6, 7]] * 6
    x, y = _windows(user)
    g = np.broadcast_to(g_row, (*x.shape, V)).copy()
    history = cache_from_windows(x[:3], y[:3], V)
    weight = choose_weight(x[3:], y[3:], g[3:], history)
    assert weight > 0
    scored = evaluate_blend(x[3:], y[3:], g[3:], history, weights=(0.0, weight))
    assert scored.metrics_of(weight)["top1_recall"] > scored.metrics_of(0.0)["top1_recall"] + 0.5
    assert scored.metrics_of(weight)["loss"] < scored.metrics_of(0.0)["loss"]


def test_unhelpful_cache_is_switched_off_and_scoring_grows_the_cache_in_order() -> None:
    rng = np.random.default_rng(1)
    sentences = [list(rng.integers(4, V, size=4)) for _ in range(8)]
    x, y = _windows(sentences)
    # a global model that knows every target exactly: no cache can beat it
    g = np.full((*x.shape, V), np.log(1e-6))
    for i in range(len(x)):
        for t in range(x.shape[1]):
            g[i, t, y[i, t]] = np.log(1 - 1e-6 * (V - 1))
    assert choose_weight(x, y, g, cache_from_windows(x, y, V)) == 0.0

    cache = NgramCache(V)
    first = evaluate_blend(x[:1], y[:1], g[:1], cache, weights=(0.0, 0.5))
    assert first.metrics_of(0.0) == first.metrics_of(0.5)  # the first sentence meets an empty cache
    assert len(cache) == 5  # ... and is then remembered (4 words + <eos>)
    before = len(cache)
    choose_weight(x, y, g, cache)
    assert len(cache) == before  # choosing a weight does not learn the held-back text


def _peaked(x: np.ndarray, y: np.ndarray, right: float) -> np.ndarray:
    """Log-probabilities [n, T, V] that put `right` on each target (a model that knows the user that well)."""
    g = np.full((*x.shape, V), np.log((1 - right) / (V - 1)))
    for i in range(len(x)):
        for t in range(x.shape[1]):
            g[i, t, y[i, t]] = np.log(right)
    return g


def test_the_selection_rule() -> None:
    rng = np.random.default_rng(2)
    x, y = _windows([list(rng.integers(4, V, size=4)) for _ in range(12)])  # 60 held-back targets
    flat = np.log(np.full((*x.shape, V), 1.0 / V))
    better = _peaked(x, y, 0.5)
    history = NgramCache(V)
    # A fine-tuned model that beats the global one on enough held-back words is served.
    sel = select_personal(x, y, flat, better, history, min_tokens=50)
    assert sel.served == "personal" and sel.enough_text and sel.heldout_tokens == 60
    assert sel.metrics["finetune"]["top1"] > sel.metrics["global"]["top1"] and "beats" in sel.reason
    # The same win on fewer words than the minimum is not evidence: the global model is served.
    sel = select_personal(x, y, flat, better, history, min_tokens=61)
    assert sel.served == "global" and not sel.enough_text and "not enough" in sel.reason
    # A fine-tuned model that does not beat the global one is not served.
    sel = select_personal(x, y, better, flat, history, min_tokens=50)
    assert sel.served == "global" and "does not beat" in sel.reason
    # An empty cache cannot help: weight 0 is chosen; below min_weight_tokens the default is used.
    assert sel.weight == 0.0 and sel.weight_global == 0.0
    sel = select_personal(x, y, flat, better, history, min_tokens=50, min_weight_tokens=61, default_weight=0.25)
    assert sel.weight == 0.25 == sel.weight_global


def test_scoring_in_batches_selects_as_scoring_at_once() -> None:
    rng = np.random.default_rng(3)
    sentences = [list(rng.integers(4, 8, size=5)) for _ in range(10)]
    x, y = _windows(sentences)
    history = cache_from_windows(*_windows(sentences[::2]), V)
    g = np.log(rng.dirichlet(np.ones(V), size=x.shape))
    t = np.log(rng.dirichlet(np.ones(V), size=x.shape))
    whole = select_personal(x, y, g, t, history, min_tokens=10)
    scorer = HeldoutScorer(history)
    for b in range(0, len(x), 3):
        scorer.add(x[b : b + 3], y[b : b + 3], g[b : b + 3], t[b : b + 3])
    batched = scorer.select(10)
    assert batched.to_dict()["served"] == whole.served and batched.weight == whole.weight
    for k in whole.metrics:
        assert batched.metrics[k] == pytest.approx(whole.metrics[k])
    assert whole.weight_global > 0  # the user's words are from a small set the history knows


def test_counts_are_the_counted_ngrams() -> None:
    cache = cache_from_sentences([[5, 6], [5, 7]], V)
    assert cache.counts(1) == {(5,): 2, (6,): 1, (7,): 1, (EOS,): 2}
    assert cache.counts(3) == {(BOS, 5, 6): 1, (5, 6, EOS): 1, (BOS, 5, 7): 1, (5, 7, EOS): 1}


def _effective_weight(g: np.ndarray, mixed: np.ndarray, q: np.ndarray, weight: float) -> float:
    """lam(h) such that exp(mixed) = (1 - lam) exp(g) + lam q / sum(q)."""
    p_cache = q / q.sum()
    j = int(np.argmax(np.abs(p_cache - np.exp(g))))
    return float((np.exp(mixed[j]) - np.exp(g[j])) / (p_cache[j] - np.exp(g[j])))


def test_context_dependent_weight_unseen_context_keeps_the_global_model() -> None:
    rng = np.random.default_rng(4)
    g = np.log(rng.dirichlet(np.ones(V)))
    cache = cache_from_sentences([[5, 6, 7]], V, kappa=2.0)
    # the history (9,) and (4, 9) were never typed: no evidence, the blend is the global model exactly
    assert cache.confidence([BOS, 4, 9]) == 0.0
    assert not cache.probs([BOS, 4, 9]).any()
    np.testing.assert_array_equal(blend(g, cache.probs([BOS, 4, 9]), 0.6), g)
    np.testing.assert_array_equal(BlendedModel(lambda ctx: g, cache, 0.6)([BOS, 4, 9]), g)
    # without kappa the same context leans towards the user's unigram (the classic cache)
    plain = cache_from_sentences([[5, 6, 7]], V)
    assert plain.probs([BOS, 4, 9]).sum() == pytest.approx(1.0) and plain.confidence([BOS, 4, 9]) == 1.0
    assert blend(g, plain.probs([BOS, 4, 9]), 0.6)[5] > g[5]


def test_context_dependent_weight_trusts_a_repeated_context() -> None:
    rng = np.random.default_rng(5)
    g = np.log(rng.dirichlet(np.ones(V)))
    kappa, lam = 2.0, 0.6
    weights = []
    for times in (1, 4, 40):
        cache = cache_from_sentences([[5, 6, 7]] * times, V, kappa=kappa)
        # the longest history seen for "<bos> 5 _" is (bos, 5), typed `times` times
        assert cache.confidence([BOS, 5]) == pytest.approx(times / (times + kappa))
        q = cache.probs([BOS, 5])
        assert q.sum() == pytest.approx(times / (times + kappa))  # the scaled (deficient) cache distribution
        mixed = blend(g, q, lam)
        assert np.exp(mixed).sum() == pytest.approx(1.0)  # ... still blends into a distribution
        w = _effective_weight(g, mixed, q, lam)
        assert w == pytest.approx(lam * times / (times + kappa))
        weights.append(w)
        assert int(np.argmax(mixed)) == 6 or times < 4  # typed often enough, the user's next word wins
    assert weights[0] < weights[1] < weights[2] and weights[2] > 0.95 * lam
    # kappa 0 (the default) is the one-weight cache: a distribution, the weight is lam everywhere
    plain = cache_from_sentences([[5, 6, 7]], V)
    assert plain.kappa == 0.0 and plain.probs([BOS, 5]).sum() == pytest.approx(1.0)
    assert _effective_weight(g, blend(g, plain.probs([BOS, 5]), lam), plain.probs([BOS, 5]), lam) == pytest.approx(lam)
    with pytest.raises(ValueError):
        NgramCache(V, kappa=-1.0)


def test_a_kappa_cache_is_chosen_and_scored_like_any_other() -> None:
    g_row = np.full(V, -5.0)
    g_row[4] = -3.0  # the global model's favourite, at p ~0.4
    g_row -= np.log(np.exp(g_row).sum())
    x, y = _windows([[5, 6, 7]] * 6)
    g = np.broadcast_to(g_row, (*x.shape, V)).copy()
    history = cache_from_windows(x[:3], y[:3], V, kappa=1.0)
    weight = choose_weight(x[3:], y[3:], g[3:], history)
    assert weight > 0
    scored = evaluate_blend(x[3:], y[3:], g[3:], history, weights=(0.0, weight))
    assert scored.metrics_of(weight)["top1_recall"] > scored.metrics_of(0.0)["top1_recall"] + 0.5


def test_a_weight_above_the_default_needs_a_clear_held_back_win() -> None:
    assert WEIGHT_GRID[0] == 0.0 and {DEFAULT_WEIGHT, SAFE_WEIGHT} <= set(WEIGHT_GRID) and list(WEIGHT_GRID) == sorted(WEIGHT_GRID)

    def ev(losses: list[float], tokens: int = 100) -> BlendEvaluation:
        return BlendEvaluation((0.0, 0.05, 0.1, 0.3), [{"loss": l, "tokens": tokens} for l in losses])

    assert SAFE_WEIGHT == 0.1
    se = LARGE_WEIGHT_LOSS_SD / np.sqrt(100)  # about one standard error of the loss difference on 100 words
    assert ev([1.0, 0.95, 0.9, 0.9 - se / 2]).best_weight() == 0.1  # a small win on little text: noise
    assert ev([1.0, 0.95, 0.9, 0.9 - se * 2]).best_weight() == 0.3  # a clear win
    assert ev([1.0, 0.95, 0.9, 0.9 - se / 2], tokens=2500).best_weight() == 0.3  # the same win on 25x the text
    assert ev([1.0, 0.95, 0.97, 0.99]).best_weight() == 0.05  # the best weight up to the safe one
    assert ev([1.0, 1.01, 1.02, 1.03]).best_weight() == 0.0  # the cache does not help: off
    assert ev([1.0, 0.95, 0.95, 0.5]).best_weight(safe_weight=0.3) == 0.3
    assert ev([1.0, 0.9, 0.9, 0.9]).best_weight() == 0.05  # ties: the lower weight


def test_a_fine_tuned_win_within_its_standard_error_is_not_served() -> None:
    rng = np.random.default_rng(7)
    x, y = _windows([list(rng.integers(4, V, size=4)) for _ in range(20)])  # 100 held-back targets
    n = int((y != 0).sum())
    flat = np.log(np.full((*x.shape, V), 1.0 / V))
    margin = np.sqrt(PAIRED_DISAGREEMENT / n)  # ~3 points at 100 words

    def knows(share: float) -> np.ndarray:
        """The flat model, but certain of the first round(share * n) targets."""
        lp = flat.copy()
        k = 0
        for i in range(len(x)):
            for t in np.flatnonzero(y[i] != 0):
                if k < round(share * n):
                    lp[i, t] = np.log(1e-6)
                    lp[i, t, y[i, t]] = np.log(1 - 1e-6 * (V - 1))
                k += 1
        return lp

    base = knows(0.2)
    history = NgramCache(V)
    small = select_personal(x, y, base, knows(0.2 + margin / 2), history, min_tokens=50)
    assert small.served == "global" and "does not beat" in small.reason
    big = select_personal(x, y, base, knows(0.2 + 2 * margin), history, min_tokens=50)
    assert big.served == "personal" and "beats" in big.reason
    # margin 0 is the old rule: any win is served
    assert select_personal(x, y, base, knows(0.2 + margin / 2), history, min_tokens=50, margin_se=0.0).served == "personal"
