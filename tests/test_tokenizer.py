from models.tokenizer import split_partial, split_sentences, tokenize, tokenize_sentences


def test_empty_and_whitespace():
    assert tokenize("") == []
    assert tokenize("   \n\t ") == []
    assert split_sentences("") == []
    assert tokenize_sentences("  ") == []


def test_only_punctuation_is_one_token_per_mark():
    assert tokenize("?!...") == ["?", "!", ".", ".", "."]


def test_apostrophes_numbers_and_case():
    assert tokenize("I don't know, I'm 25.5 y/o") == ["i", "don't", "know", ",", "i'm", "25.5", "y", "/", "o"]
    assert tokenize("I Don't", lowercase=False) == ["I", "Don't"]
    # phone keyboards type curly apostrophes; they must map to the same token
    assert tokenize("don\u2019t") == ["don't"]
    assert tokenize("1,000 people at 10:30") == ["1,000", "people", "at", "10:30"]


def test_unicode_emoji_and_accents():
    assert tokenize("Café 😂👍 naïve") == ["café", "😂", "👍", "naïve"]
    # NFC: a decomposed é is the same token as the composed one
    assert tokenize("cafe\u0301") == ["café"]
    assert tokenize("日本語 ok") == ["日本語", "ok"]
    # control characters vanish instead of becoming tokens
    assert tokenize("a\x00b\x07") == ["ab"]


def test_very_long_input_is_linear_and_bounded():
    text = "word " * 50_000 + "x" * 10_000
    tokens = tokenize(text)
    assert len(tokens) == 50_001
    assert len(tokens[-1]) == 64  # over-long "words" are cut, not kept whole


def test_sentence_boundaries():
    assert split_sentences("Hi there! How are you?? fine... ok\nnew line") == [
        "Hi there!", "How are you??", "fine...", "ok", "new line"]
    assert tokenize_sentences("Yes. No!") == [["yes", "."], ["no", "!"]]
    # a decimal point is not a boundary
    assert split_sentences("it costs 3.50 today") == ["it costs 3.50 today"]


def test_split_partial():
    assert split_partial("how are yo") == ("how are ", "yo")
    assert split_partial("how are ") == ("how are ", "")
    assert split_partial("") == ("", "")
    assert split_partial("hello,") == ("hello,", "")
    assert split_partial("i don'") == ("i ", "don'")
