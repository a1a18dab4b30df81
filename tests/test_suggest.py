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
