import json

import numpy as np
import pytest

from models.examples import make_examples, sentence_windows
from models.tokenizer import SPECIAL_TOKENS
from models.vocab import Vocabulary, VocabularyError


def test_build_orders_by_count_then_alphabet_and_caps_size():
    vocab = Vocabulary.build([["b", "a", "c", "b"], ["a", "d", "b"]], size=3)
    assert vocab.tokens == (*SPECIAL_TOKENS, "b", "a", "c")
    assert len(vocab) == 7
    assert vocab.encode(["b", "zzz"]) == [4, Vocabulary.OOV_ID]
    assert vocab.decode([0, 1, 2, 3, 5]) == ["<pad>", "<bos>", "<eos>", "<oov>", "a"]


def test_special_tokens_in_text_are_not_words():
    vocab = Vocabulary.build([["<pad>", "<eos>", "hi"]], size=10)
    assert vocab.words == ("hi",)


def test_round_trip_and_hash(tmp_path):
    vocab = Vocabulary.build([["héllo", "😂", "don't"]], size=10)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert loaded.content_hash() == vocab.content_hash()
    assert Vocabulary(["a", "b"]).content_hash() != Vocabulary(["b", "a"]).content_hash()


def test_load_rejects_tampering_and_bad_versions(tmp_path):
    vocab = Vocabulary(["a", "b"])
    data = vocab.to_dict()
    path = tmp_path / "v.json"
    path.write_text(json.dumps({**data, "tokens": data["tokens"] + ["c"]}))
    with pytest.raises(VocabularyError, match="hash mismatch"):
        Vocabulary.load(path)
    path.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(VocabularyError, match="version"):
        Vocabulary.load(path)
    path.write_text("{not json")
    with pytest.raises(VocabularyError, match="not valid JSON"):
        Vocabulary.load(path)
    with pytest.raises(VocabularyError, match="unique"):
        Vocabulary(["a", "a"])


def test_examples_windows_cover_every_target_once():
    vocab = Vocabulary(["a", "b", "c"])
    x, y = make_examples([["a", "b", "c", "a", "b"], [], ["zz"]], vocab, seq_len=3)
    assert x.dtype == np.int32 and x.shape == y.shape == (3, 3)
    # <bos> a b c a b <eos> -> [bos a b c] [c a b eos]; then <bos> <oov> <eos>
    assert x.tolist() == [[1, 4, 5], [6, 4, 5], [1, 3, 2]]  # eos as input only feeds a pad target
    assert y.tolist() == [[4, 5, 6], [4, 5, 2], [3, 2, 0]]
    targets = y[y != 0]
    assert len(targets) == 6 + 2  # 5 words + eos, then oov + eos
    assert sentence_windows([], 4) == [[1, 2]]
