"""Vocabulary: the top-N words of the training clients plus four special tokens.

Saved as versioned JSON with a content hash so server, device and simulation can
check they agree on token ids before exchanging weights.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from models.tokenizer import BOS, EOS, OOV, PAD, SPECIAL_TOKENS

VOCAB_FORMAT_VERSION = 1


class VocabularyError(ValueError):
    """A vocabulary file is malformed, of an unknown version, or fails its hash."""


class Vocabulary:
    """Bijection between tokens and ids; ids 0..3 are <pad>, <bos>, <eos>, <oov>."""

    PAD_ID, BOS_ID, EOS_ID, OOV_ID = 0, 1, 2, 3

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        specials = set(SPECIAL_TOKENS)
        clash = [w for w in words if w in specials]
        if clash:
            raise VocabularyError(f"special tokens may not appear among the words: {clash}")
        if len(set(words)) != len(words):
            raise VocabularyError("vocabulary words must be unique")
        self.tokens: tuple[str, ...] = (PAD, BOS, EOS, OOV, *words)
        self._ids = {tok: i for i, tok in enumerate(self.tokens)}

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], size: int = 10_000, min_count: int = 1) -> "Vocabulary":
        """Top `size` words by count (ties broken alphabetically, so builds are deterministic)."""
        counts: Counter[str] = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        ranked = sorted((item for item in counts.items() if item[1] >= min_count), key=lambda kv: (-kv[1], kv[0]))
        return cls([word for word, _ in ranked[:size]])

    @classmethod
    def from_wordfreq(cls, size: int = 10_000, lang: str = "en", punctuation: bool = True,
                      wordlist: str = "best") -> "Vocabulary":
        """`size` words from public word frequencies (the `wordfreq` package, offline): no user's text.

        wordfreq's top list, most frequent first, mapped through this project's tokenizer
        (models.tokenizer.tokenize: NFC, folded apostrophes, lowercase); an entry the tokenizer
        splits ("u.s", "1st") gives its tokens in order, each once. wordfreq writes multi-digit
        numbers as zeros ("00", "000"): those placeholders are skipped. wordfreq has no
        punctuation, which a keyboard types in every message, so with `punctuation` the 32
        ASCII marks (string.punctuation, as the tokenizer sees them: 31, "`" folds to "'") take the
        last places of the `size`.
        """
        import string

        from wordfreq import top_n_list

        from models.tokenizer import tokenize

        marks = list(dict.fromkeys(t for m in string.punctuation for t in tokenize(m))) if punctuation else []
        room = size - len(marks)
        if room < 0:
            raise VocabularyError(f"a wordfreq vocabulary with punctuation needs size >= {len(marks)}")
        words: list[str] = []
        seen = set(marks) | set(SPECIAL_TOKENS)
        n = max(2 * size, 1000)
        while True:
            ranked = top_n_list(lang, n, wordlist=wordlist)
            for entry in ranked:
                for tok in tokenize(entry):
                    if tok in seen or (len(tok) > 1 and set(tok) == {"0"}):
                        continue
                    seen.add(tok)
                    words.append(tok)
                if len(words) >= room:
                    break
            if len(words) >= room or len(ranked) < n:
                break
            words, seen, n = [], set(marks) | set(SPECIAL_TOKENS), 2 * n  # the list ran short: ask for more
        return cls([*words[:room], *marks])

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def id_of(self, token: str) -> int:
        return self._ids.get(token, self.OOV_ID)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        ids = self._ids
        oov = self.OOV_ID
        return [ids.get(tok, oov) for tok in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    @property
    def words(self) -> tuple[str, ...]:
        """The non-special tokens, most frequent first."""
        return self.tokens[len(SPECIAL_TOKENS):]

    def content_hash(self) -> str:
        return hashlib.sha256("\n".join(self.tokens).encode("utf-8")).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"format_version": VOCAB_FORMAT_VERSION, "hash": self.content_hash(), "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        if data.get("format_version") != VOCAB_FORMAT_VERSION:
            raise VocabularyError(f"unsupported vocabulary format version {data.get('format_version')!r}")
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise VocabularyError("vocabulary tokens must be a list starting with the special tokens")
        vocab = cls(tokens[len(SPECIAL_TOKENS):])
        if data.get("hash") != vocab.content_hash():
            raise VocabularyError(f"vocabulary hash mismatch: file says {data.get('hash')!r}, content is {vocab.content_hash()!r}")
        return vocab

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise VocabularyError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, hash={self.content_hash()})"


__all__ = ["Vocabulary", "VocabularyError", "PAD", "BOS", "EOS", "OOV"]
