"""Turn tokenized sentences into fixed-length next-word training examples."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from models.vocab import Vocabulary


def sentence_windows(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """<bos> ids <eos>, cut into overlapping-by-one windows of seq_len + 1 ids."""
    full = [Vocabulary.BOS_ID, *ids, Vocabulary.EOS_ID]
    # Consecutive windows share one id so every next-word target is predicted exactly once.
    return [full[start : start + seq_len + 1] for start in range(0, max(len(full) - 1, 1), seq_len)]


def make_examples(
    token_lists: Iterable[Sequence[str]], vocab: Vocabulary, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) int32 arrays [n, seq_len]; y is x shifted by one; padding is id 0."""
    rows: list[list[int]] = []
    for tokens in token_lists:
        if tokens:
            rows.extend(sentence_windows(vocab.encode(tokens), seq_len))
    windows = np.zeros((len(rows), seq_len + 1), dtype=np.int32)
    for i, row in enumerate(rows):
        windows[i, : len(row)] = row
    return windows[:, :-1].copy(), windows[:, 1:].copy()
