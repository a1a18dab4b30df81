"""Next-word evaluation metrics on logits, numpy only (the server uses them without TensorFlow).

Recall@k follows Hard et al. 2018: the fraction of real (non-pad) target words that are
among the model's top-k predictions. The special ids <pad>, <bos> and <oov> are never
offered as predictions, so their logits are set to -inf before ranking and an <oov>
target is always a miss. Ties are broken towards the lower id (a stable sort by
descending logit), the same rule as tf.math.top_k, so keras_metrics agrees exactly.

Large evaluations: metric_sums() per batch, merge_metric_sums() to combine,
finalize_metric_sums() for the final dict; evaluate_logits() does all three at once.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
OOV_ID = 3
# Ids a keyboard never suggests. <eos> stays: predicting the end of a sentence is legitimate.
EXCLUDED_PREDICTION_IDS: tuple[int, ...] = (PAD_ID, BOS_ID, OOV_ID)

SUM_KEYS = ("tokens", "oov_tokens", "loss_sum", "top1_hits", "top3_hits")

# Elements per chunk of [rows, vocab] work arrays: bounds memory (~16 MB of float32) on big evals.
_CHUNK_ELEMENTS = 1 << 22


def _flatten(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits)
    targets = np.asarray(targets)
    if logits.ndim < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits shape {logits.shape} must be targets shape {targets.shape} + (vocab,)")
    if not np.issubdtype(logits.dtype, np.floating):
        logits = logits.astype(np.float32)
    vocab = logits.shape[-1]
    flat_targets = targets.reshape(-1).astype(np.int64)
    if flat_targets.size and (flat_targets.min() < 0 or flat_targets.max() >= vocab):
        raise ValueError(f"target ids must be in [0, {vocab})")
    return logits.reshape(-1, vocab), flat_targets


def _chunks(n: int, vocab: int) -> Iterable[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, step):
        yield slice(start, start + step)


def _topk_hits(
    logits: np.ndarray, targets: np.ndarray, ks: Sequence[int], excluded_ids: Sequence[int]
) -> list[int]:
    """Hits@k per k over flat, already non-pad rows.

    rank = #ids with a larger logit + #ids with an equal logit and a lower id, i.e. the
    position in a stable descending sort; a hit is rank < k. Excluded ids get -inf first.
    """
    n, vocab = logits.shape
    hits = np.zeros(len(ks), dtype=np.int64)
    excluded = np.asarray([i for i in excluded_ids if 0 <= i < vocab], dtype=np.int64)
    ids = np.arange(vocab)
    for sl in _chunks(n, vocab):
        block = logits[sl].copy()  # a copy: the caller's logits stay unmasked
        tgt = targets[sl]
        block[:, excluded] = -np.inf
        target_logit = block[np.arange(len(tgt)), tgt][:, None]
        ranks = (block > target_logit).sum(axis=1) + (
            (block == target_logit) & (ids[None, :] < tgt[:, None])
        ).sum(axis=1)
        # An excluded target has logit -inf and could still rank < k in a tiny vocabulary.
        valid = ~np.isin(tgt, excluded)
        for j, k in enumerate(ks):
            hits[j] += np.count_nonzero((ranks < k) & valid)
    return [int(h) for h in hits]


def _loss_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of full-softmax cross-entropy (float64, chunked)."""
    total = 0.0
    for sl in _chunks(len(targets), logits.shape[-1]):
        block = logits[sl].astype(np.float64)
        tgt = targets[sl]
        top = block.max(axis=1)
        log_z = top + np.log(np.exp(block - top[:, None]).sum(axis=1))
        total += float((log_z - block[np.arange(len(tgt)), tgt]).sum())
    return total


def topk_recall(
    logits: np.ndarray,
    targets: np.ndarray,
    k: int,
    pad_id: int = PAD_ID,
    excluded_ids: Sequence[int] | None = None,
) -> float:
    """Fraction of non-pad targets among the top-k logits (special ids never predicted).

    logits [..., V], targets [...]. excluded_ids defaults to pad_id, <bos> and <oov>.
    Returns 0.0 when there are no non-pad targets.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    flat_logits, flat_targets = _flatten(logits, targets)
    keep = flat_targets != pad_id
    n = int(np.count_nonzero(keep))
    if n == 0:
        return 0.0
    if excluded_ids is None:
        excluded_ids = _excluded(pad_id, OOV_ID)
    (hits,) = _topk_hits(flat_logits[keep], flat_targets[keep], [k], excluded_ids)
    return hits / n


def _excluded(pad_id: int, oov_id: int) -> tuple[int, ...]:
    return tuple(sorted({pad_id, BOS_ID, oov_id}))


def metric_sums(
    logits: np.ndarray, targets: np.ndarray, pad_id: int = PAD_ID, oov_id: int = OOV_ID
) -> dict[str, float]:
    """Additive sufficient statistics of one batch (see SUM_KEYS); merge, then finalize."""
    flat_logits, flat_targets = _flatten(logits, targets)
    keep = flat_targets != pad_id
    rows, tgt = flat_logits[keep], flat_targets[keep]
    # Loss uses the full softmax (specials included): it is the model's actual distribution.
    loss_sum = _loss_sum(rows, tgt)
    top1, top3 = _topk_hits(rows, tgt, [1, 3], _excluded(pad_id, oov_id))
    return {
        "tokens": int(len(tgt)),
        "oov_tokens": int(np.count_nonzero(tgt == oov_id)),
        "loss_sum": loss_sum,
        "top1_hits": top1,
        "top3_hits": top3,
    }


def empty_metric_sums() -> dict[str, float]:
    return {"tokens": 0, "oov_tokens": 0, "loss_sum": 0.0, "top1_hits": 0, "top3_hits": 0}


def merge_metric_sums(*sums: Mapping[str, float] | Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Add metric_sums() dicts: merge_metric_sums(a, b, c) or merge_metric_sums([a, b, c])."""
    if len(sums) == 1 and not isinstance(sums[0], Mapping):
        sums = tuple(sums[0])  # type: ignore[arg-type]
    total = empty_metric_sums()
    for part in sums:
        for key in SUM_KEYS:
            total[key] += part[key]  # type: ignore[index]
    return total


def finalize_metric_sums(sums: Mapping[str, float]) -> dict[str, float]:
    """The evaluate_logits() dict from merged sums.

    With no tokens, the rates are 0.0 and loss/perplexity NaN (undefined).
    """
    tokens = int(sums["tokens"])
    in_vocab = tokens - int(sums["oov_tokens"])

    def ratio(num: float, den: int) -> float:
        return float(num) / den if den > 0 else 0.0

    if tokens > 0:
        loss = float(sums["loss_sum"]) / tokens
        perplexity = math.exp(loss) if loss < 700 else math.inf  # math.exp overflows past ~709
    else:
        loss = perplexity = math.nan
    # An OOV target is always a miss, so all hits are in-vocabulary hits.
    return {
        "top1_recall": ratio(sums["top1_hits"], tokens),
        "top3_recall": ratio(sums["top3_hits"], tokens),
        "loss": loss,
        "perplexity": perplexity,
        "tokens": tokens,
        "oov_rate": ratio(sums["oov_tokens"], tokens),
        "top1_recall_in_vocab": ratio(sums["top1_hits"], in_vocab),
        "top3_recall_in_vocab": ratio(sums["top3_hits"], in_vocab),
    }


def evaluate_logits(
    logits: np.ndarray, targets: np.ndarray, pad_id: int = PAD_ID, oov_id: int = OOV_ID
) -> dict[str, float]:
    """top1/top3 recall, loss (mean CE over non-pad), perplexity, tokens, oov_rate, in-vocab recalls."""
    return finalize_metric_sums(metric_sums(logits, targets, pad_id=pad_id, oov_id=oov_id))
