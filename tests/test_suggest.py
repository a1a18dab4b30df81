import numpy as np

from models.suggest import Suggester, apply_suggestion
from models.vocab import Vocabulary

WORDS = ["hello", "help", "the", ".", "you", "😂", "helium"]


def fixed_model(probs: dict[str, float], vocab: Vocabulary):
    seen = []

    def next_word_logprobs(ids):
        seen.append(list(ids))
        p = np.full(len(vocab), 1e-6)
        for word, value in probs.items():
            p[vocab.id_of(word) if word not in ("<eos>", "<oov>") else vocab.tokens.index(word)] = value
        return np.log(p / p.sum())

    return next_word_logprobs, seen


def test_next_words_never_special_or_punctuation():
    vocab = Vocabulary(WORDS)
    fn, _ = fixed_model({"<eos>": 0.5, "<oov>": 0.3, ".": 0.1, "you": 0.05, "the": 0.04, "😂": 0.01}, vocab)
    assert Suggester(vocab, fn).suggest("i love ", k=3) == ["you", "the", "😂"]


def test_completions_of_partial_word_ranked_by_model_and_case_kept():
    vocab = Vocabulary(WORDS)
    fn, seen = fixed_model({"help": 0.2, "hello": 0.1, "helium": 0.3}, vocab)
    s = Suggester(vocab, fn)
    assert s.suggest("say hel") == ["helium", "help", "hello"]
    assert s.suggest("Hel", k=2) == ["Helium", "Help"]
    assert s.suggest("HEL", k=1) == ["HELIUM"]
    assert s.suggest("say xq") == []
    # the context passed to the model is the current sentence only, without the partial word
    s.suggest("Bye. you hel")
    assert seen[-1] == [Vocabulary.BOS_ID, vocab.id_of("you")]
    s.suggest("Bye. ")
    assert seen[-1] == [Vocabulary.BOS_ID]


def test_apply_suggestion_replaces_partial_word():
    assert apply_suggestion("how are yo", "you") == "how are you "
    assert apply_suggestion("how are ", "you") == "how are you "
    assert apply_suggestion("", "Hi") == "Hi "
    assert apply_suggestion("ok,", "then") == "ok, then "


def test_next_word_ranking_is_a_stable_sort_of_the_suggestible_words():
    """The k-argmax ranking (k <= 16) and the sort (k > 16) agree with a stable descending sort of the
    suggestible ids, NaN as -inf, ties in id order, blocked ids never, on random scores with ties."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)] + [".", ",", "!"]
    vocab = Vocabulary(words)
    scores_box: list[np.ndarray] = []
    s = Suggester(vocab, lambda ids: scores_box[0])
    suggestible = np.array([vocab.tokens[i] not in (".", ",", "!") and not vocab.tokens[i].startswith("<")
                            for i in range(len(vocab))])
    for trial in range(300):
        scores = rng.integers(-4, 3, len(vocab)).astype(np.float32)  # many ties
        scores[rng.random(len(vocab)) < 0.1] = -np.inf
        scores[rng.random(len(vocab)) < 0.05] = np.nan
        if trial % 50 == 0:
            scores[:] = -np.inf  # nothing scores: the lowest suggestible ids, never a blocked one
        scores_box[:] = [scores]
        k = [1, 3, 5, 16, 17, 40][trial % 6]
        ids = np.flatnonzero(suggestible)
        ref = ids[np.argsort(-np.nan_to_num(scores[ids], nan=-np.inf), kind="stable")[:k]]
        assert s.suggest("x ", k=k) == [vocab.tokens[i] for i in ref], (trial, k)
