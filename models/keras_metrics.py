"""Keras metrics for Keras/TFF training and evaluation, matching models.metrics exactly.

Usable in tff.learning.models.from_keras_model(metrics=[...]): every __init__ argument is
in get_config(), so TFF can rebuild the metric from its config to finalize aggregated
sums. The state is plain sums (hits, tokens), which TFF adds across clients, so a
federated recall is the exact token-weighted recall over all clients.
"""
from __future__ import annotations

from typing import Any, Sequence

import tensorflow as tf

from models.metrics import EXCLUDED_PREDICTION_IDS, PAD_ID


def _targets_and_mask(
    y_true: tf.Tensor, y_pred: tf.Tensor, pad_id: int, sample_weight: tf.Tensor | None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Flat int32 targets [N] and float32 token weights [N] (0 for pad)."""
    targets = tf.cast(y_true, tf.int32)
    y_pred = tf.convert_to_tensor(y_pred)
    if targets.shape.rank is not None and targets.shape.rank == y_pred.shape.rank:
        targets = tf.squeeze(targets, axis=-1)  # Keras may hand [b, t, 1] targets
    weights = tf.cast(tf.not_equal(targets, pad_id), tf.float32)
    if sample_weight is not None:
        sw = tf.cast(sample_weight, tf.float32)
        while sw.shape.rank is not None and sw.shape.rank < weights.shape.rank:
            sw = sw[..., None]  # per-example weights [b] apply to every token of the row
        weights *= tf.broadcast_to(sw, tf.shape(weights))
    return tf.reshape(targets, [-1]), tf.reshape(weights, [-1])


class MaskedTopKRecall(tf.keras.metrics.Metric):
    """Recall@k over non-pad targets; excluded ids (<pad>, <bos>, <oov>) are never predicted.

    Same as models.metrics.topk_recall: ties go to the lower id (tf.math.top_k's rule) and
    an excluded target, <oov> in particular, is always a miss.
    """

    def __init__(
        self,
        k: int = 1,
        name: str | None = None,
        pad_id: int = PAD_ID,
        excluded_ids: Sequence[int] = EXCLUDED_PREDICTION_IDS,
        dtype: Any = tf.float32,
    ) -> None:
        super().__init__(name=name or f"top{int(k)}_recall", dtype=dtype)
        if int(k) < 1:
            raise ValueError("k must be >= 1")
        self.k = int(k)
        self.pad_id = int(pad_id)
        self.excluded_ids = tuple(int(i) for i in excluded_ids)
        self.hits = self.add_weight(name="hits", initializer="zeros", dtype=tf.float32)
        self.count = self.add_weight(name="count", initializer="zeros", dtype=tf.float32)

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> None:
        targets, weights = _targets_and_mask(y_true, y_pred, self.pad_id, sample_weight)
        vocab = tf.shape(y_pred)[-1]
        logits = tf.reshape(tf.cast(y_pred, tf.float32), tf.stack([-1, vocab]))
        excluded = tf.constant(self.excluded_ids, dtype=tf.int32)
        is_excluded = tf.reduce_any(tf.equal(tf.range(vocab)[:, None], excluded[None, :]), axis=1)  # [V]
        logits = tf.where(is_excluded[None, :], tf.constant(-float("inf"), tf.float32), logits)
        k = tf.minimum(self.k, vocab)
        _, top = tf.math.top_k(logits, k=k)  # [N, k], ties: lower index first
        hit = tf.reduce_any(tf.equal(top, targets[:, None]), axis=1)
        hit = tf.logical_and(hit, tf.logical_not(tf.gather(is_excluded, targets)))
        self.hits.assign_add(tf.reduce_sum(tf.cast(hit, tf.float32) * weights))
        self.count.assign_add(tf.reduce_sum(weights))

    def result(self) -> tf.Tensor:
        return tf.math.divide_no_nan(self.hits, self.count)

    def reset_state(self) -> None:
        self.hits.assign(0.0)
        self.count.assign(0.0)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "k": self.k,
            "pad_id": self.pad_id,
            "excluded_ids": list(self.excluded_ids),
        }


class MaskedTokenCount(tf.keras.metrics.Metric):
    """Number of non-pad target tokens seen (the denominator of token-level metrics)."""

    def __init__(self, name: str = "num_tokens", pad_id: int = PAD_ID, dtype: Any = tf.float32) -> None:
        super().__init__(name=name, dtype=dtype)
        self.pad_id = int(pad_id)
        self.count = self.add_weight(name="count", initializer="zeros", dtype=tf.float32)

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> None:
        _, weights = _targets_and_mask(y_true, y_pred, self.pad_id, sample_weight)
        self.count.assign_add(tf.reduce_sum(weights))

    def result(self) -> tf.Tensor:
        return tf.identity(self.count)

    def reset_state(self) -> None:
        self.count.assign(0.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pad_id": self.pad_id}


class MaskedMeanCrossEntropy(tf.keras.metrics.Metric):
    """Mean full-softmax cross-entropy per non-pad token (token-weighted across batches/clients).

    TFF's built-in `loss` metric weights batches by example count; this one matches
    models.metrics' loss, so exp() of it is the token-level perplexity.
    """

    def __init__(self, name: str = "token_loss", pad_id: int = PAD_ID, dtype: Any = tf.float32) -> None:
        super().__init__(name=name, dtype=dtype)
        self.pad_id = int(pad_id)
        self.loss_sum = self.add_weight(name="loss_sum", initializer="zeros", dtype=tf.float32)
        self.count = self.add_weight(name="count", initializer="zeros", dtype=tf.float32)

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> None:
        targets, weights = _targets_and_mask(y_true, y_pred, self.pad_id, sample_weight)
        vocab = tf.shape(y_pred)[-1]
        logits = tf.reshape(tf.cast(y_pred, tf.float32), tf.stack([-1, vocab]))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        self.loss_sum.assign_add(tf.reduce_sum(ce * weights))
        self.count.assign_add(tf.reduce_sum(weights))

    def result(self) -> tf.Tensor:
        return tf.math.divide_no_nan(self.loss_sum, self.count)

    def reset_state(self) -> None:
        self.loss_sum.assign(0.0)
        self.count.assign(0.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pad_id": self.pad_id}


def keras_metrics_for_eval(include_token_loss: bool = False) -> list[tf.keras.metrics.Metric]:
    """Fresh metric instances: [top1_recall, top3_recall, num_tokens] (+ token_loss if asked)."""
    metrics: list[tf.keras.metrics.Metric] = [
        MaskedTopKRecall(1, name="top1_recall"),
        MaskedTopKRecall(3, name="top3_recall"),
        MaskedTokenCount(name="num_tokens"),
    ]
    if include_token_loss:
        metrics.append(MaskedMeanCrossEntropy(name="token_loss"))
    return metrics

