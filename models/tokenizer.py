"""How the keyboard sees text: one tokenizer for device, server tools and simulations.

Tokens are words (with inner apostrophes kept: "don't", "i'm"), numbers ("3.14",
"1,000"), single punctuation marks, and emoji or other symbols one code point each.
"""
from __future__ import annotations

import re
import unicodedata

PAD, BOS, EOS, OOV = "<pad>", "<bos>", "<eos>", "<oov>"
SPECIAL_TOKENS = (PAD, BOS, EOS, OOV)

# Curly apostrophes are what phone keyboards type; fold them so "don’t" == "don't".
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_TOKEN_RE = re.compile(
    r"""
    \d+(?:[.,:]\d+)*            # numbers: 42, 3.14, 1,000, 10:30
    | [^\W\d_]+(?:'[^\W\d_]+)*  # words of letters with inner apostrophes: don't, o'clock
    | \S                        # anything else: one punctuation mark or symbol
    """,
    re.VERBOSE,
)
# A sentence ends at . ! ? (or runs of them, or an ellipsis) followed by space, or at a newline.
_SENTENCE_END_RE = re.compile(r"(?<=[.!?\u2026])\s+|\n+")
_MAX_TOKEN_CHARS = 64  # a "word" longer than this is noise (URLs, key mashing); cut it to keep vocab sane


def normalize(text: str, lowercase: bool = True) -> str:
    """NFC-normalize, fold apostrophes, drop control characters, optionally lowercase."""
    text = unicodedata.normalize("NFC", text).translate(_APOSTROPHES)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    return text.lower() if lowercase else text


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Split one piece of text into keyboard tokens."""
    if not text:
        return []
    tokens = _TOKEN_RE.findall(normalize(text, lowercase))
    return [tok[:_MAX_TOKEN_CHARS] for tok in tokens]


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at terminal punctuation and newlines; empties dropped."""
    if not text:
        return []
    return [part.strip() for part in _SENTENCE_END_RE.split(text) if part and part.strip()]


def tokenize_sentences(text: str, lowercase: bool = True) -> list[list[str]]:
    """Sentences of tokens; sentences with no tokens are dropped."""
    sentences = (tokenize(s, lowercase) for s in split_sentences(text))
    return [tokens for tokens in sentences if tokens]


def split_partial(text: str) -> tuple[str, str]:
    """Split typed text into (context, partial word being typed).

    The partial word is the trailing run of word characters when the text does not
    end in whitespace or punctuation; "" means the user is about to start a new word.
    """
    match = re.search(r"[^\W_]+(?:'[^\W_]*)*$", text)
    if not match:
        return text, ""
    return text[: match.start()], match.group(0)
