"""Count-based baselines over vocabulary ids (numpy only): interpolated Kneser-Ney n-gram and unigram.

The n-gram is modified Kneser-Ney (Chen & Goodman 1998, three discounts per order estimated
from counts of counts) with interpolation down to a uniform distribution, the usual strong
count-based baseline (Gboard's server baseline was a Katz-smoothed 5-gram). Lower orders use
continuation counts (how many distinct words precede an n-gram) except for n-grams that start
with <bos>, which have no left context and keep raw counts (as KenLM does).

Sentences are <bos> w1 .. wn <eos>; words outside the vocabulary are <oov> and are ordinary
tokens for counting. Both models expose `next_word_logprobs(context_ids) -> [vocab]`, a proper
log-distribution (<pad> and <bos> have probability 0, log -inf), so they plug into
models.suggest.Suggester, and `evaluate(token_lists)` with the keys and masking rules of
models.metrics.evaluate_logits (<pad>, <bos>, <oov> never predicted; ties to the lower id).

Storage: per order, sorted int64 history keys (base-V digits, most recent word least
significant) with CSR rows of (follower id, discounted probability) and one backoff weight
per history. A lookup is a binary search, and evaluation is vectorised over blocks of
positions: a block's probabilities are (product of backoff weights) * p_unigram plus a scatter
of the follower rows of each order; the order-2 rows of the most frequent histories (thousands
of followers each) are kept dense, so ~100k tokens at a 10k vocabulary take a few seconds.

One module past 500 lines on purpose: the storage layout, the Kneser-Ney estimates and the vectorised
lookup share private arrays and invariants; split, each part would reach into the others.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from models.metrics import EXCLUDED_PREDICTION_IDS, SUM_KEYS, empty_metric_sums, finalize_metric_sums, merge_metric_sums
from models.vocab import Vocabulary

NGRAM_FORMAT_VERSION = 1
PAD_ID, BOS_ID, EOS_ID, OOV_ID = Vocabulary.PAD_ID, Vocabulary.BOS_ID, Vocabulary.EOS_ID, Vocabulary.OOV_ID
# Ids that are never a target, so they get no probability mass (they are never counted either).
_NEVER_TARGET = (PAD_ID, BOS_ID)
_EVAL_ROWS = 512  # positions per dense [rows, vocab] block in evaluation: ~40 MB of float64 at 10k words
_CACHED_HISTORIES = 512  # dense order-2 rows kept for evaluation: ~40 MB of float64 at 10k words
_CACHE_MIN_FOLLOWERS = 32  # below this a scatter is cheaper than reading a dense row


# --------------------------------------------------------------------------- shared helpers


def _encode_sentences(token_lists: Iterable[Sequence[str] | Sequence[int]], vocab: Vocabulary) -> list[list[int]]:
    """Each sentence as [<bos>, ids..., <eos>]; accepts token strings or already-encoded ids."""
    out = []
    for tokens in token_lists:
        if not tokens:
            continue
        if isinstance(tokens[0], (int, np.integer)):
            ids = [int(i) for i in tokens]
        else:
            ids = vocab.encode(tokens)
        out.append([BOS_ID, *ids, EOS_ID])
    return out


def _flatten(sentences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(seq, pos): all sentences concatenated, and each token's position within its sentence."""
    if not sentences:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
    seq = np.fromiter((i for s in sentences for i in s), dtype=np.int64, count=int(lengths.sum()))
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.arange(len(seq), dtype=np.int64) - starts
    return seq, pos


def _history_keys(seq: np.ndarray, pos: np.ndarray, max_len: int, base: int) -> np.ndarray:
    """keys[m-1, i] = key of the m ids before position i (valid where pos[i] >= m), m = 1..max_len."""
    keys = np.zeros((max_len, len(seq)), dtype=np.int64)
    acc = np.zeros(len(seq), dtype=np.int64)
    scale = 1
    for m in range(1, max_len + 1):
        prev = np.zeros(len(seq), dtype=np.int64)
        if m < len(seq):
            prev[m:] = seq[:-m]
        # Where pos < m the id before lies in another sentence: the key is never used there.
        acc = acc + prev * scale
        keys[m - 1] = acc
        scale *= base
    return keys


def _check_key_range(vocab_size: int, order: int) -> None:
    if vocab_size ** max(order - 1, 1) >= 2**63:
        raise ValueError(f"order {order} with {vocab_size} ids overflows int64 history keys")


def _rank_sums(probs: np.ndarray, targets: np.ndarray) -> tuple[int, int]:
    """Top-1 / top-3 hits with metrics' rules: excluded ids never predicted, ties to the lower id.

    Overwrites the excluded columns of `probs` (the caller reads target probabilities first).
    """
    probs[:, list(EXCLUDED_PREDICTION_IDS)] = -1.0  # below every probability
    rows = np.arange(len(targets))
    target_p = probs[rows, targets][:, None]
    above = np.count_nonzero(probs > target_p, axis=1)
    # Ties can only matter where fewer than 3 ids are strictly above: count them on those rows only.
    near = np.flatnonzero(above < 3)
    ids = np.arange(probs.shape[1])
    ties = np.count_nonzero((probs[near] == target_p[near]) & (ids[None, :] < targets[near, None]), axis=1)
    ranks = above[near] + ties
    valid = ~np.isin(targets[near], EXCLUDED_PREDICTION_IDS)
    return int(np.count_nonzero((ranks < 1) & valid)), int(np.count_nonzero((ranks < 3) & valid))


# --------------------------------------------------------------------------- Kneser-Ney


class _OrderTable:
    """Histories of one length (order n >= 2) with CSR rows of followers."""

    __slots__ = ("keys", "offsets", "words", "probs", "gammas")

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, words: np.ndarray, probs: np.ndarray, gammas: np.ndarray):
        self.keys, self.offsets, self.words, self.probs, self.gammas = keys, offsets, words, probs, gammas

    @classmethod
    def empty(cls) -> "_OrderTable":
        return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0), np.zeros(0))

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Row index of each key, -1 where the history was never seen."""
        if len(self.keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        idx = np.searchsorted(self.keys, keys)
        idx = np.minimum(idx, len(self.keys) - 1)
        return np.where(self.keys[idx] == keys, idx, -1)


def _modified_discounts(counts: np.ndarray) -> np.ndarray:
    """(D1, D2, D3+) from counts of counts (Chen & Goodman); degenerate tiny corpora get one clipped D."""
    n = [int(np.count_nonzero(counts == k)) for k in (1, 2, 3, 4)]
    y = n[0] / (n[0] + 2 * n[1]) if n[0] + 2 * n[1] > 0 else 0.75
    if min(n) == 0:
        return np.full(3, min(max(y, 0.1), 0.9))
    d = np.array([1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2]])
    if not np.all(np.isfinite(d)) or np.any(d <= 0):
        return np.full(3, min(max(y, 0.1), 0.9))
    return np.minimum(d, [1.0, 2.0, 3.0])


def _discount_of(counts: np.ndarray, d: np.ndarray) -> np.ndarray:
    return d[np.minimum(counts, 3) - 1]


class NgramModel:
    """Interpolated (modified) Kneser-Ney n-gram model over a fixed vocabulary."""

    def __init__(
        self,
        vocab: Vocabulary,
        order: int,
        unigram: np.ndarray,
        tables: list[_OrderTable],
        discounts: np.ndarray,
        info: dict | None = None,
    ) -> None:
        self.vocab = vocab
        self.order = int(order)
        self.unigram = unigram  # p_1 over the vocab, float64, the cached base of every distribution
        self.tables = tables  # tables[m - 1] is order m + 1 (history length m)
        self.discounts = discounts  # [order, 3]: row n-1 = (D1, D2, D3+) of order n
        self.info = dict(info or {})
        self._cache: tuple[np.ndarray, np.ndarray] | None = None
        _check_key_range(len(vocab), self.order)

    @property
    def name(self) -> str:
        return f"ngram-{self.order}"

    # ----------------------------------------------------------------- training

    @classmethod
    def train(
        cls,
        token_lists: Iterable[Sequence[str] | Sequence[int]],
        vocab: Vocabulary,
        order: int = 5,
        discount: float | None = None,
    ) -> "NgramModel":
        """Count and smooth. discount=None: modified KN (3 estimated discounts per order);
        a float in (0, 1]: plain interpolated KN with that one absolute discount everywhere."""
        if order < 1:
            raise ValueError("order must be >= 1")
        if discount is not None and not 0.0 < discount <= 1.0:
            raise ValueError("discount must be in (0, 1]")
        V = len(vocab)
        _check_key_range(V, order)
        sentences = _encode_sentences(token_lists, vocab)
        seq, pos = _flatten(sentences)
        if len(seq) and (seq.min() < 0 or seq.max() >= V):
            raise ValueError(f"token ids must be in [0, {V})")
        hist = _history_keys(seq, pos, order - 1, V)

        tables: list[_OrderTable] = []
        discounts = np.zeros((order, 3))
        unigram = np.zeros(V)
        reps_above: np.ndarray | None = None  # one end position per distinct (n+1)-gram
        n_types = [0] * order
        for n in range(order, 0, -1):
            ends_all = np.flatnonzero(pos >= max(n - 1, 1))
            hkey = hist[n - 2] if n >= 2 else np.zeros(len(seq), np.int64)
            reps_here = None
            if n >= 2:  # distinct n-grams (one representative end each) give order n-1 its continuation counts
                _, hinv = np.unique(hkey[ends_all], return_inverse=True)
                _, first = np.unique(hinv.astype(np.int64) * V + seq[ends_all], return_index=True)
                reps_here = ends_all[first]
            if n == order:
                ends = ends_all  # raw counts
            else:
                bos_started = np.flatnonzero(pos == n - 1) if n >= 2 else np.zeros(0, np.int64)
                ends = np.concatenate([bos_started, reps_above])  # raw for <bos>-started, else continuation
            reps_above = reps_here
            if len(ends) == 0:  # no sentence long enough for this order
                if n >= 2:
                    tables.insert(0, _OrderTable.empty())
                continue
            uh, inv = np.unique(hkey[ends], return_inverse=True)
            types, counts = np.unique(inv.astype(np.int64) * V + seq[ends], return_counts=True)
            n_types[n - 1] = len(types)
            h_of, w_of = types // V, (types % V).astype(np.int32)
            d = np.full(3, float(discount)) if discount is not None else _modified_discounts(counts)
            discounts[n - 1] = d
            dc = _discount_of(counts, d)
            total = np.bincount(h_of, weights=counts, minlength=len(uh))
            mass = np.bincount(h_of, weights=dc, minlength=len(uh))  # D1*N1 + D2*N2 + D3*N3+
            probs = (counts - dc) / total[h_of]
            gammas = mass / total
            if n == 1:
                support = np.ones(V, bool)
                support[list(_NEVER_TARGET)] = False
                unigram[support] = gammas[0] / support.sum()
                np.add.at(unigram, w_of, probs)
            else:
                offsets = np.zeros(len(uh) + 1, np.int64)
                offsets[1:] = np.cumsum(np.bincount(h_of, minlength=len(uh)))
                tables.insert(0, _OrderTable(uh, offsets, w_of, probs, gammas))
        if not sentences:  # no data at all: uniform over the possible targets
            support = np.ones(V, bool)
            support[list(_NEVER_TARGET)] = False
            unigram = support / support.sum()
        info = {"sentences": len(sentences), "tokens": int(np.count_nonzero(pos >= 1)),
                "ngrams": n_types}
        return cls(vocab, order, unigram, tables, discounts, info)

    # ----------------------------------------------------------------- queries

    def _bigram_cache(self) -> tuple[np.ndarray, np.ndarray]:
        """Dense order-2 distributions of the histories with the most followers: (slot per history, rows).

        Those histories (frequent words such as "i", "the") make up most evaluation positions
        and have thousands of followers each; one cached row replaces a scatter per position.
        """
        if self._cache is None:
            table = self.tables[0]
            lens = np.diff(table.offsets)
            top = np.argsort(-lens, kind="stable")[: min(_CACHED_HISTORIES, len(lens))]
            top = top[lens[top] >= _CACHE_MIN_FOLLOWERS]
            slot = np.full(len(lens), -1, np.int64)
            slot[top] = np.arange(len(top))
            dense = table.gammas[top][:, None] * self.unigram[None, :]
            self._scatter(dense, np.arange(len(top)), top, table, np.ones(len(top)))
            self._cache = (slot, dense)
        return self._cache

    @staticmethod
    def _scatter(probs: np.ndarray, rows: np.ndarray, hist: np.ndarray, table: _OrderTable, scale: np.ndarray) -> None:
        """probs[row, follower] += scale[row] * prob for every follower of each row's history."""
        starts, lens = table.offsets[hist], table.offsets[hist + 1] - table.offsets[hist]
        total = int(lens.sum())
        if total == 0:
            return
        # Expand every row's CSR range [start, start + len) without a Python loop.
        run_start = np.repeat(np.cumsum(lens) - lens, lens)
        flat = np.repeat(starts, lens) + (np.arange(total) - run_start)
        r = np.repeat(rows, lens)
        cells = r * probs.shape[1] + table.words[flat]  # flat indices: 1-D fancy indexing is faster
        probs.reshape(-1)[cells] += table.probs[flat] * scale[r]

    def _probs(
        self, keys: np.ndarray, have: np.ndarray, use_cache: bool = False, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Dense probabilities [rows, V] for rows of history keys [order-1, rows] (have: key valid).

        use_cache: read frequent order-2 rows from the dense cache (fastest when the cached rows
        come first, as metric_sums arranges). out: a reusable [>= rows, V] float64 buffer.
        """
        rows = keys.shape[1]
        n_hist = self.order - 1
        idx = np.full((n_hist, rows), -1, np.int64)
        gam = np.ones((n_hist, rows))
        found_prev = np.ones(rows, bool)
        for m in range(1, n_hist + 1):
            table = self.tables[m - 1]
            look = np.where(found_prev & have[m - 1], table.lookup(keys[m - 1]), -1)
            # A longer history is only seen if its suffix is, so the first miss ends the chain.
            found = look >= 0
            idx[m - 1] = look
            if len(table.gammas):
                gam[m - 1] = np.where(found, table.gammas[np.maximum(look, 0)], 1.0)
            found_prev = found
        # p = s_N + g_N (s_{N-1} + g_{N-1} (... + g_2 p_1)): order m+1's sparse part is scaled by
        # the gammas of all longer histories, and p_1 by every gamma.
        suffix = np.ones((n_hist + 1, rows))
        for m in range(n_hist, 0, -1):
            suffix[m - 1] = suffix[m] * gam[m - 1]
        probs = np.empty((rows, len(self.unigram))) if out is None else out[:rows]
        first = 1
        if use_cache and n_hist >= 1:
            slot_of, dense = self._bigram_cache()
            slot = np.where(idx[0] >= 0, slot_of[np.maximum(idx[0], 0)], -1)
            cached = slot >= 0
            n_cached = int(cached.sum())
            if cached[:n_cached].all():  # a prefix: fill in place, no [rows, V] temporaries
                # Runs of one slot (metric_sums sorts by slot) are one broadcast multiply each.
                bounds = np.flatnonzero(np.diff(slot[:n_cached])) + 1
                for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), n_cached]) if n_cached else ():
                    np.multiply(suffix[1][a:b, None], dense[slot[a]][None, :], out=probs[a:b])
                np.multiply(suffix[0][n_cached:, None], self.unigram[None, :], out=probs[n_cached:])
            else:
                probs[cached] = suffix[1][cached, None] * dense[slot[cached]]
                probs[~cached] = suffix[0][~cached, None] * self.unigram[None, :]
            rest = np.flatnonzero(~cached)
            bigram_rows = rest[idx[0][rest] >= 0]
            self._scatter(probs, bigram_rows, idx[0][bigram_rows], self.tables[0], suffix[1])
            first = 2
        else:
            np.multiply(suffix[0][:, None], self.unigram[None, :], out=probs)
        for m in range(first, n_hist + 1):
            hit_rows = np.flatnonzero(idx[m - 1] >= 0)
            if hit_rows.size:
                self._scatter(probs, hit_rows, idx[m - 1][hit_rows], self.tables[m - 1], suffix[m])
        return probs

    def _context_keys(self, context_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        ids = [int(i) for i in context_ids if int(i) != PAD_ID]
        if BOS_ID in ids:  # <bos> only ever starts a sentence: the current sentence is what counts
            ids = ids[len(ids) - 1 - ids[::-1].index(BOS_ID):]
        if not ids:
            ids = [BOS_ID]
        V = len(self.vocab)
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"context ids must be in [0, {V})")
        n_hist = self.order - 1
        keys = np.zeros((n_hist, 1), np.int64)
        have = np.zeros((n_hist, 1), bool)
        acc, scale = 0, 1
        for m in range(1, min(n_hist, len(ids)) + 1):
            acc += ids[-m] * scale
            scale *= V
            keys[m - 1, 0], have[m - 1, 0] = acc, True
        return keys, have

    def next_word_probs(self, context_ids: Sequence[int]) -> np.ndarray:
        keys, have = self._context_keys(context_ids)
        return self._probs(keys, have)[0]

    def next_word_logprobs(self, context_ids: Sequence[int]) -> np.ndarray:
        """log P(next id | context) over the whole vocabulary (context usually starts with <bos>)."""
        with np.errstate(divide="ignore"):
            return np.log(self.next_word_probs(context_ids))

    # ----------------------------------------------------------------- evaluation

    def metric_sums(self, token_lists: Iterable[Sequence[str] | Sequence[int]]) -> dict[str, float]:
        """Mergeable sums (models.metrics.SUM_KEYS) over every next-word target of the sentences."""
        seq, pos = _flatten(_encode_sentences(token_lists, self.vocab))
        n_hist = self.order - 1
        hist = _history_keys(seq, pos, n_hist, len(self.vocab))
        ends = np.flatnonzero(pos >= 1)
        have_all = np.stack([pos >= m for m in range(1, n_hist + 1)]) if n_hist else np.zeros((0, len(seq)), bool)
        if n_hist:
            # Order positions by cached order-2 row (uncached last): cached rows then form a
            # prefix of each block and neighbours read the same row. The sums ignore order.
            slot_of, _ = self._bigram_cache()
            look = np.where(have_all[0, ends], self.tables[0].lookup(hist[0, ends]), -1)
            slot = np.where(look >= 0, slot_of[np.maximum(look, 0)], -1)
            ends = ends[np.lexsort((slot, slot < 0))]
        buffer = np.empty((min(_EVAL_ROWS, len(ends)), len(self.vocab)))
        sums = empty_metric_sums()
        for start in range(0, len(ends), _EVAL_ROWS):
            e = ends[start : start + _EVAL_ROWS]
            probs = self._probs(hist[:, e], have_all[:, e], use_cache=True, out=buffer)
            targets = seq[e]
            p_t = probs[np.arange(len(e)), targets]
            top1, top3 = _rank_sums(probs, targets)
            sums = merge_metric_sums(sums, {
                "tokens": len(e), "oov_tokens": int(np.count_nonzero(targets == OOV_ID)),
                "loss_sum": float(-np.log(p_t).sum()), "top1_hits": top1, "top3_hits": top3,
            })
        return sums

    def evaluate(self, token_lists: Iterable[Sequence[str] | Sequence[int]]) -> dict[str, float]:
        """The models.metrics.evaluate_logits dict over all sentences (tokens or ids)."""
        return finalize_metric_sums(self.metric_sums(token_lists))

    # ----------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike) -> Path:
        """One compressed .npz: the arrays plus a JSON header (with the vocabulary)."""
        path = Path(path)
        header = {"format_version": NGRAM_FORMAT_VERSION, "kind": "kneser-ney", "order": self.order,
                  "vocab": self.vocab.to_dict(), "info": self.info}
        arrays: dict[str, np.ndarray] = {"header": np.array(json.dumps(header)), "unigram": self.unigram,
                                         "discounts": self.discounts}
        for m, t in enumerate(self.tables, start=1):
            for field in _OrderTable.__slots__:
                arrays[f"h{m}_{field}"] = getattr(t, field)
        return _save_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NgramModel":
        with np.load(Path(path), allow_pickle=False) as data:
            header = _read_header(data, "kneser-ney")
            order = int(header["order"])
            tables = [_OrderTable(*(data[f"h{m}_{f}"] for f in _OrderTable.__slots__)) for m in range(1, order)]
            return cls(Vocabulary.from_dict(header["vocab"]), order, data["unigram"], tables,
                       data["discounts"], header.get("info"))


# --------------------------------------------------------------------------- unigram


class UnigramModel:
    """Frequency-only predictor: always suggests the most frequent words (the sanity floor).

    Add-one smoothed over the possible targets so every token has a finite loss.
    """

    name = "unigram"
    order = 1

    def __init__(self, vocab: Vocabulary, probs: np.ndarray, info: dict | None = None) -> None:
        self.vocab = vocab
        self.probs = np.asarray(probs, dtype=np.float64)
        self.info = dict(info or {})
        with np.errstate(divide="ignore"):
            self._logprobs = np.log(self.probs)
        # The rank of each id under metrics' rules never changes: compute it once.
        masked = self.probs.copy()
        masked[list(EXCLUDED_PREDICTION_IDS)] = -1.0
        order = np.lexsort((np.arange(len(masked)), -masked))  # descending prob, then lower id
        self._rank = np.empty(len(masked), np.int64)
        self._rank[order] = np.arange(len(masked))

    @classmethod
    def train(cls, token_lists: Iterable[Sequence[str] | Sequence[int]], vocab: Vocabulary, **_: object) -> "UnigramModel":
        seq, pos = _flatten(_encode_sentences(token_lists, vocab))
        counts = np.bincount(seq[pos >= 1], minlength=len(vocab)).astype(np.float64)
        support = np.ones(len(vocab), bool)
        support[list(_NEVER_TARGET)] = False
        counts = np.where(support, counts + 1.0, 0.0)
        return cls(vocab, counts / counts.sum(), {"tokens": int(np.count_nonzero(pos >= 1))})

    def next_word_logprobs(self, context_ids: Sequence[int]) -> np.ndarray:  # noqa: ARG002 - context ignored
        return self._logprobs.copy()

    def metric_sums(self, token_lists: Iterable[Sequence[str] | Sequence[int]]) -> dict[str, float]:
        seq, pos = _flatten(_encode_sentences(token_lists, self.vocab))
        targets = seq[pos >= 1]
        valid = ~np.isin(targets, EXCLUDED_PREDICTION_IDS)
        ranks = self._rank[targets]
        return {"tokens": int(len(targets)), "oov_tokens": int(np.count_nonzero(targets == OOV_ID)),
                "loss_sum": float(-self._logprobs[targets].sum()),
                "top1_hits": int(np.count_nonzero((ranks < 1) & valid)),
                "top3_hits": int(np.count_nonzero((ranks < 3) & valid))}

    def evaluate(self, token_lists: Iterable[Sequence[str] | Sequence[int]]) -> dict[str, float]:
        return finalize_metric_sums(self.metric_sums(token_lists))

    def save(self, path: str | os.PathLike) -> Path:
        header = {"format_version": NGRAM_FORMAT_VERSION, "kind": "unigram", "vocab": self.vocab.to_dict(), "info": self.info}
        return _save_npz(Path(path), {"header": np.array(json.dumps(header)), "probs": self.probs})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UnigramModel":
        with np.load(Path(path), allow_pickle=False) as data:
            header = _read_header(data, "unigram")
            return cls(Vocabulary.from_dict(header["vocab"]), data["probs"], header.get("info"))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write atomically; np.savez appends .npz to names without it, so write to a .npz temp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def _read_header(data: np.lib.npyio.NpzFile, kind: str) -> dict:
    header = json.loads(str(data["header"]))
    if header.get("format_version") != NGRAM_FORMAT_VERSION:
        raise ValueError(f"unsupported n-gram file format version {header.get('format_version')!r}")
    if header.get("kind") != kind:
        raise ValueError(f"file holds a {header.get('kind')!r} model, not {kind!r}")
    return header


def load_model(path: str | os.PathLike) -> NgramModel | UnigramModel:
    """Load whichever count model a file holds."""
    with np.load(Path(path), allow_pickle=False) as data:
        kind = json.loads(str(data["header"])).get("kind")
    return NgramModel.load(path) if kind == "kneser-ney" else UnigramModel.load(path)


__all__ = ["NgramModel", "UnigramModel", "load_model", "SUM_KEYS"]
