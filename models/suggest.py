"""Keyboard suggestions: the top-k next words, or completions of the word being typed.

Works with any next-word model exposed as `next_word_logprobs(context_ids) -> [vocab]`
(the Keras predictor, the n-gram baseline, a personal model), so ranking logic lives once.
"""
from __future__ import annotations

import bisect
import re
import unicodedata
from typing import Callable, Sequence

import numpy as np

from models.tokenizer import SPECIAL_TOKENS, split_partial, split_sentences, tokenize
from models.vocab import Vocabulary

NextWordLogprobs = Callable[[Sequence[int]], np.ndarray]
_ENDS_SENTENCE_RE = re.compile(r"([.!?\u2026]\s+|\n)\s*$")


def _is_suggestible(token: str) -> bool:
    """Words, numbers and emoji are offered; special tokens and bare punctuation are not."""
    if token in SPECIAL_TOKENS:
        return False
    return not all(unicodedata.category(ch).startswith("P") for ch in token)


class Suggester:
    """Ranks vocabulary words for the text typed so far."""

    def __init__(self, vocab: Vocabulary, next_word_logprobs: NextWordLogprobs, lowercase: bool = True) -> None:
        self.vocab = vocab
        self.next_word_logprobs = next_word_logprobs
        self.lowercase = lowercase
        suggestible = np.array([_is_suggestible(tok) for tok in vocab.tokens], dtype=bool)
        self._blocked = ~suggestible
        self._blocked_ids = np.flatnonzero(self._blocked)
        self._suggestible_ids = np.flatnonzero(suggestible)
        # Sorted words + ids make prefix lookup a bisect instead of a scan per keystroke.
        pairs = sorted((tok, i) for i, tok in enumerate(vocab.tokens) if suggestible[i])
        self._sorted_words = [tok for tok, _ in pairs]
        self._sorted_ids = np.array([i for _, i in pairs], dtype=np.int64)

    def context_ids(self, context: str) -> list[int]:
        """<bos> plus the ids of the current sentence (the model is trained per sentence)."""
        if not context.strip() or _ENDS_SENTENCE_RE.search(context):
            return [Vocabulary.BOS_ID]
        sentences = split_sentences(context)
        current = sentences[-1] if sentences else ""
        return [Vocabulary.BOS_ID, *self.vocab.encode(tokenize(current, self.lowercase))]

    def _prefix_ids(self, prefix: str) -> np.ndarray:
        lo = bisect.bisect_left(self._sorted_words, prefix)
        hi = bisect.bisect_left(self._sorted_words, prefix + "\U0010ffff")
        return self._sorted_ids[lo:hi]

    def suggest(self, text: str, k: int = 3) -> list[str]:
        """Top-k suggestions for `text`: completions if it ends inside a word, else next words."""
        context, partial = split_partial(text)
        # No float64 copy: ranking float32 log-probabilities gives the same order.
        logprobs = np.asarray(self.next_word_logprobs(self.context_ids(context)))
        if partial:
            key = partial.lower() if self.lowercase else partial
            candidates = self._prefix_ids(key)
            if candidates.size == 0:
                return []
            order = candidates[np.argsort(-logprobs[candidates], kind="stable")[:k]]
        else:
            order = self._top_next_words(logprobs, k)
        words = self.vocab.decode(int(i) for i in order)
        return [_match_case(word, partial) for word in words]

    def _top_next_words(self, logprobs: np.ndarray, k: int) -> list[int]:
        """The k best suggestible ids, best first, ties in id order (as a stable sort of the suggestible
        ids would give; NaN counts as -inf). For a keyboard's few suggestions, k argmax
        passes over a copy (~5 us for 10k words) instead of np.argpartition (~100 us)."""
        k_eff = min(k, self._suggestible_ids.size)
        if k_eff <= 0:
            return []
        if k_eff > 16:
            scores = logprobs[self._suggestible_ids]
            scores = np.where(np.isnan(scores), -np.inf, scores)
            return [int(i) for i in self._suggestible_ids[np.argsort(-scores, kind="stable")[:k_eff]]]
        scores = np.array(logprobs, dtype=np.result_type(logprobs.dtype, np.float32))  # a copy to mark picks in
        scores[self._blocked_ids] = -np.inf
        order: list[int] = []
        while len(order) < k_eff:
            i = int(scores.argmax())
            best = scores[i]
            if best != best:  # NaN: argmax stops at the first one
                scores[np.isnan(scores)] = -np.inf
                continue
            if best == -np.inf:  # only -inf left (blocked ids among them): the lowest suggestible ids
                picked = set(order)
                order += [int(j) for j in self._suggestible_ids[scores[self._suggestible_ids] == -np.inf]
                          if int(j) not in picked][: k_eff - len(order)]
                break
            order.append(i)
            scores[i] = -np.inf
        return order


def _match_case(word: str, typed: str) -> str:
    """Keep the user's capitalisation: 'Hel' -> 'Hello', 'HEL' -> 'HELLO'."""
    if len(typed) > 1 and typed.isupper():
        return word.upper()
    if typed[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def apply_suggestion(text: str, suggestion: str) -> str:
    """Insert a tapped suggestion, replacing the partial word being typed, then a space."""
    context, _ = split_partial(text)
    if context and not context[-1].isspace():
        context += " "
    return f"{context}{suggestion} "
