"""The Kneser-Ney n-gram and unigram baselines (numpy only, fast)."""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import numpy as np
import pytest

from models.metrics import evaluate_logits
from models.ngram import NgramModel, UnigramModel, _modified_discounts, load_model
from models.suggest import Suggester
from models.vocab import Vocabulary

BOS, EOS, OOV = Vocabulary.BOS_ID, Vocabulary.EOS_ID, Vocabulary.OOV_ID

TOY = [s.split() for s in (
    "the cat sat on the mat", "the cat sat on the mat", "the cat sat on the mat",
    "the dog sat on the log",
    "a cat ate the fish", "a dog ate the fish",
    "the cat sat down",
    "my dog ate my homework", "my cat ate my homework",
    "hello there", "hello there my friend",
)]


def _random_corpus(seed: int, n: int = 60, words: int = 12) -> list[list[str]]:
    rng = random.Random(seed)
    lexicon = [f"w{i}" for i in range(words)]
    # A skewed distribution with some structure so higher orders matter.
    return [[rng.choice(lexicon[: rng.randint(2, words)]) for _ in range(rng.randint(1, 7))] for _ in range(n)]


def _reference_probs(sentences: list[list[int]], V: int, order: int, discounts: np.ndarray, context: list[int]) -> np.ndarray:
    """Straightforward dict-based interpolated KN, to check the vectorised model against."""
    raw: list[Counter] = [Counter() for _ in range(order + 1)]
    for s in sentences:
        full = [BOS, *s, EOS]
        for n in range(1, order + 1):
            for end in range(max(n - 1, 1), len(full)):
                raw[n][tuple(full[end - n + 1 : end + 1])] += 1
    adjusted: list[Counter] = [Counter() for _ in range(order + 1)]
    adjusted[order] = raw[order]
    for n in range(order - 1, 0, -1):
        left = defaultdict(set)
        for gram in raw[n + 1]:
            left[gram[1:]].add(gram[0])
        for gram, c in raw[n].items():
            adjusted[n][gram] = c if gram[0] == BOS else len(left[gram])
    support = [w for w in range(V) if w not in (0, BOS)]

    def disc(n: int, c: int) -> float:
        return float(discounts[n - 1][min(c, 3) - 1])

    def p(w: int, hist: tuple[int, ...]) -> float:
        n = len(hist) + 1
        rows = {g[-1]: c for g, c in adjusted[n].items() if g[:-1] == hist}
        if not rows:
            return p(w, hist[1:])
        total = sum(rows.values())
        gamma = sum(disc(n, c) for c in rows.values()) / total
        lower = (1.0 / len(support)) * (w in support) if n == 1 else p(w, hist[1:])
        c = rows.get(w, 0)
        return (c - disc(n, c)) / total * (c > 0) + gamma * lower

    hist = tuple(context[-(order - 1):]) if order > 1 else ()
    return np.array([p(w, hist) for w in range(V)])


@pytest.mark.parametrize("discount", [None, 0.6])
def test_distribution_sums_to_one(discount: float | None) -> None:
    vocab = Vocabulary.build(TOY)
    model = NgramModel.train(TOY, vocab, order=4, discount=discount)
    for ctx in ([BOS], [BOS, vocab.id_of("the")], [BOS, vocab.id_of("the"), vocab.id_of("cat")],
                [BOS, OOV, OOV], [vocab.id_of("sat")], [], [BOS, *vocab.encode("the cat sat on the".split())]):
        logp = model.next_word_logprobs(ctx)
        assert logp.shape == (len(vocab),)
        assert math.isclose(np.exp(logp).sum(), 1.0, rel_tol=1e-9)
        assert np.isneginf(logp[0]) and np.isneginf(logp[BOS])  # never a target
        assert np.all(np.isfinite(logp[2:]))


def test_toy_corpus_predicts_the_right_word() -> None:
    vocab = Vocabulary.build(TOY)
    model = NgramModel.train(TOY, vocab, order=3)

    def best(words: str) -> str:
        logp = model.next_word_logprobs([BOS, *vocab.encode(words.split())])
        return vocab.tokens[int(np.argmax(logp))]

    assert best("the cat") == "sat"
    assert best("the cat sat on the") == "mat"
    assert best("") == "the"
    assert best("my dog ate my") == "homework"


@pytest.mark.parametrize("order,discount,seed", [(2, 0.5, 0), (3, None, 1), (4, None, 2), (4, 0.8, 3)])
def test_matches_reference_kneser_ney(order: int, discount: float | None, seed: int) -> None:
    corpus = _random_corpus(seed)
    vocab = Vocabulary.build(corpus, size=9)  # a few words become <oov>
    model = NgramModel.train(corpus, vocab, order=order, discount=discount)
    sentences = [vocab.encode(s) for s in corpus]
    rng = random.Random(seed)
    contexts = [[BOS], [BOS, *sentences[0][:3]], [BOS, *sentences[5]], [BOS, OOV, OOV, OOV]]
    contexts += [[BOS, *[rng.randrange(2, len(vocab)) for _ in range(rng.randint(1, 5))]] for _ in range(10)]
    for ctx in contexts:
        want = _reference_probs(sentences, len(vocab), order, model.discounts, ctx)
        np.testing.assert_allclose(np.exp(model.next_word_logprobs(ctx)), want, rtol=1e-9, atol=1e-12)


def test_modified_discounts_formula() -> None:
    counts = np.array([1] * 10 + [2] * 4 + [3] * 3 + [4] * 2 + [9])
    y = 10 / (10 + 2 * 4)
    np.testing.assert_allclose(_modified_discounts(counts), [1 - 2 * y * 4 / 10, 2 - 3 * y * 3 / 4, 3 - 4 * y * 2 / 3])
    assert np.all(_modified_discounts(np.array([1, 1, 1])) == 0.9)  # degenerate: one clipped discount


def test_backs_off_to_lower_orders() -> None:
    vocab = Vocabulary.build(TOY)
    model = NgramModel.train(TOY, vocab, order=5)
    cat, fish, homework = vocab.id_of("cat"), vocab.id_of("fish"), vocab.id_of("homework")
    # "fish cat" never occurred: the trigram history is unseen, so only "cat" (order 2) counts.
    np.testing.assert_allclose(model.next_word_logprobs([BOS, fish, cat]), model.next_word_logprobs([cat]))
    # "homework" never precedes anything but <eos>; an <oov> history is unseen: the unigram distribution.
    np.testing.assert_allclose(np.exp(model.next_word_logprobs([BOS, homework, OOV])), model.unigram)
    # Seen "the cat" -> "sat"; after unseen "fish cat" only "cat" counts, and "cat ate" follows
    # more distinct words ("a", "my") than "cat sat" ("the"): Kneser-Ney's continuation counts.
    def best(ctx: list[int]) -> str:
        return vocab.tokens[int(np.argmax(model.next_word_logprobs(ctx)))]

    assert best([BOS, vocab.id_of("the"), cat]) == "sat"
    assert best([BOS, fish, cat]) == "ate"


def test_evaluate_hand_checked_values() -> None:
    corpus = [["a", "b"], ["a", "b"]]
    vocab = Vocabulary.build(corpus)  # a=4, b=5
    model = NgramModel.train(corpus, vocab, order=2, discount=0.5)
    # Unigram continuation counts a=b=<eos>=1 (total 3), gamma=0.5, uniform over 4 targets:
    # p1(word) = 0.5/3 + 0.5/4 = 7/24, p1(<oov>) = 1/8. Each bigram seen twice: p = 1.5/2 + 0.25 * 7/24.
    p_seen = 0.75 + 0.25 * 7 / 24
    assert math.isclose(np.exp(model.next_word_logprobs([BOS]))[4], p_seen)
    got = model.evaluate(corpus)
    assert got["tokens"] == 6 and got["oov_rate"] == 0.0
    assert got["top1_recall"] == 1.0 and got["top3_recall"] == 1.0
    assert math.isclose(got["loss"], -math.log(p_seen)) and math.isclose(got["perplexity"], 1 / p_seen)
    # "a c": c is <oov> (always a miss); after <oov> the unigram ranks the tied <eos>, a, b by lower id: <eos> first.
    got = model.evaluate([["a", "c"]])
    assert got["tokens"] == 3 and math.isclose(got["oov_rate"], 1 / 3)
    assert math.isclose(got["top1_recall"], 2 / 3) and math.isclose(got["top3_recall"], 2 / 3)
    assert got["top1_recall_in_vocab"] == 1.0
    assert math.isclose(got["loss"], -(math.log(p_seen) + math.log(0.25 / 8) + math.log(7 / 24)) / 3)

    unigram = UnigramModel.train(corpus, vocab)  # add-one: <eos> 3, <oov> 1, a 3, b 3 of 10
    np.testing.assert_allclose(np.exp(unigram.next_word_logprobs([BOS])), [0, 0, 0.3, 0.1, 0.3, 0.3])
    got = unigram.evaluate(corpus)
    assert got["tokens"] == 6 and math.isclose(got["top1_recall"], 1 / 3) and got["top3_recall"] == 1.0
    assert math.isclose(got["loss"], -math.log(0.3))


@pytest.mark.parametrize("make", ["ngram", "unigram"])
def test_evaluate_agrees_with_metrics_module(make: str) -> None:
    corpus = _random_corpus(7, n=80, words=15)
    train, test = corpus[:60], corpus[60:]
    vocab = Vocabulary.build(train, size=10)
    model = NgramModel.train(train, vocab, order=3) if make == "ngram" else UnigramModel.train(train, vocab)
    logits, targets = [], []
    for tokens in test:
        full = [BOS, *vocab.encode(tokens), EOS]
        for i in range(1, len(full)):
            logits.append(model.next_word_logprobs(full[:i]))
            targets.append(full[i])
    want = evaluate_logits(np.array(logits), np.array(targets))
    got = model.evaluate(test)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


def test_save_load_round_trip(tmp_path) -> None:
    corpus = _random_corpus(3)
    vocab = Vocabulary.build(corpus, size=9)
    model = NgramModel.train(corpus, vocab, order=4)
    path = model.save(tmp_path / "ngram.npz")
    loaded = NgramModel.load(path)
    assert loaded.vocab == vocab and loaded.order == 4
    np.testing.assert_array_equal(loaded.discounts, model.discounts)
    for ctx in ([BOS], [BOS, *vocab.encode(corpus[0])], [BOS, OOV]):
        np.testing.assert_array_equal(loaded.next_word_logprobs(ctx), model.next_word_logprobs(ctx))
    assert loaded.evaluate(corpus) == model.evaluate(corpus)
    assert isinstance(load_model(path), NgramModel)

    unigram = UnigramModel.train(corpus, vocab)
    upath = unigram.save(tmp_path / "unigram.npz")
    assert isinstance(load_model(upath), UnigramModel)
    np.testing.assert_array_equal(UnigramModel.load(upath).next_word_logprobs([BOS]), unigram.next_word_logprobs([BOS]))
    with pytest.raises(ValueError):
        NgramModel.load(upath)


def test_plugs_into_suggester() -> None:
    vocab = Vocabulary.build(TOY)
    model = NgramModel.train(TOY, vocab, order=5)
    suggester = Suggester(vocab, model.next_word_logprobs)
    assert suggester.suggest("The cat ", k=3)[0] == "sat"
    assert suggester.suggest("the dog sat on the l") == ["log"]
    assert suggester.suggest("My dog ate my ", k=1) == ["homework"]
    assert all(s not in ("<pad>", "<bos>", "<eos>", "<oov>") for s in suggester.suggest("zebra ", k=5))
    assert Suggester(vocab, UnigramModel.train(TOY, vocab).next_word_logprobs).suggest("", k=1) == ["the"]


def test_accepts_ids_and_handles_empty_input() -> None:
    vocab = Vocabulary.build(TOY)
    model = NgramModel.train(TOY, vocab, order=3)
    ids = [vocab.encode(s) for s in TOY]
    assert NgramModel.train(ids, vocab, order=3).evaluate(ids) == model.evaluate(TOY)
    empty = model.evaluate([])
    assert empty["tokens"] == 0 and math.isnan(empty["loss"])
    untrained = NgramModel.train([], vocab, order=3)
    assert math.isclose(np.exp(untrained.next_word_logprobs([BOS])).sum(), 1.0)
    with pytest.raises(ValueError):
        model.next_word_logprobs([len(vocab)])


def test_dense_cache_paths_agree(monkeypatch) -> None:
    """The evaluation fast path (cached order-2 rows, sorted blocks) gives the plain model's numbers."""
    import models.ngram as ngram_module

    corpus = _random_corpus(11, n=120, words=20)
    vocab = Vocabulary.build(corpus[:90], size=16)
    model = NgramModel.train(corpus[:90], vocab, order=4)
    # Cache a few histories only (so blocks mix cached and uncached rows), in tiny blocks.
    monkeypatch.setattr(ngram_module, "_CACHE_MIN_FOLLOWERS", 1)
    monkeypatch.setattr(ngram_module, "_CACHED_HISTORIES", 4)
    monkeypatch.setattr(ngram_module, "_EVAL_ROWS", 7)
    slot, dense = model._bigram_cache()
    assert len(dense) == 4 and (slot >= 0).sum() == 4
    rng = np.random.default_rng(0)
    keys = np.stack([rng.integers(0, len(vocab) ** m, 50) for m in range(1, 4)])
    keys[0] = rng.integers(2, len(vocab), 50)  # order-2 histories that exist, in an unsorted mix
    have = np.ones_like(keys, dtype=bool)
    np.testing.assert_allclose(model._probs(keys, have, use_cache=True), model._probs(keys, have), rtol=1e-12)
    logits, targets = [], []
    for tokens in corpus[90:]:
        full = [BOS, *vocab.encode(tokens), EOS]
        for i in range(1, len(full)):
            logits.append(model.next_word_logprobs(full[:i]))
            targets.append(full[i])
    want = evaluate_logits(np.array(logits), np.array(targets))
    got = model.evaluate(corpus[90:])
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


def test_order_one_is_a_unigram_kneser_ney() -> None:
    vocab = Vocabulary.build(TOY)
    model = NgramModel.train(TOY, vocab, order=1)
    np.testing.assert_allclose(np.exp(model.next_word_logprobs([BOS, vocab.id_of("the")])), model.unigram)
    assert math.isclose(model.unigram.sum(), 1.0)
    assert model.evaluate(TOY)["tokens"] == sum(len(s) + 1 for s in TOY)
