"""Centrally trained ("server-trained") reference: the same Keras model on the pooled training data.

Hard et al. (2018) compare federated training with the same CIFG model trained on the server.
Here the pooled train split of the training clients is the server's data. Adam with lr 1e-3
is the default: it converges in far fewer steps than plain SGD, which matters on a CPU budget.
"""
from __future__ import annotations

import math
import random
import sys
import time
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow as tf

from models.config import ModelConfig
from models.data.types import FederatedDataset
from models.examples import make_examples
from models.keras_model import build_model, get_weights, masked_loss, set_weights
from models.metrics import EXCLUDED_PREDICTION_IDS, OOV_ID, PAD_ID, empty_metric_sums, finalize_metric_sums, merge_metric_sums
from models.tokenizer import tokenize_sentences
from models.vocab import Vocabulary


def token_lists(items: Iterable[str], lowercase: bool = True) -> list[list[str]]:
    """Raw text items (messages) -> sentences of tokens, as the model and the keyboard see them."""
    return [tokens for text in items for tokens in tokenize_sentences(text, lowercase)]


def sample_sentences(sentences: Sequence[Sequence[str]], max_sentences: int | None, seed: int) -> list[Sequence[str]]:
    """A seeded random sample of at most max_sentences (all of them, in order, when None)."""
    if max_sentences is None or max_sentences >= len(sentences):
        return list(sentences)
    rng = random.Random(seed)
    keep = sorted(rng.sample(range(len(sentences)), max_sentences))
    return [sentences[i] for i in keep]


def _check_vocab(config: ModelConfig, vocab: Vocabulary) -> None:
    if config.vocab_size != len(vocab):
        raise ValueError(
            f"config.vocab_size {config.vocab_size} != len(vocab) {len(vocab)}; use preset(name, vocab_size=len(vocab))"
        )


def train_central(
    dataset: FederatedDataset,
    vocab: Vocabulary,
    config: ModelConfig,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    max_sentences: int | None = None,
    seed: int = 0,
    log_dir: str | None = None,
    optimizer: str = "adam",
    verbose: int | None = None,
    sentences: Sequence[Sequence[str]] | None = None,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Train on the training clients' train split, pooled and shuffled.

    max_sentences caps the (seeded, random) sample of sentences trained on. Returns the
    weights in config.weight_specs() order and a history dict (per-epoch loss plus what
    was trained on). log_dir adds TensorBoard logs. optimizer: "adam" or "sgd".
    sentences: the already tokenized training sentences of `dataset`, to skip tokenizing again.
    """
    _check_vocab(config, vocab)
    started = time.time()
    if sentences is None:
        sentences = token_lists(dataset.all_train_sentences())
    sentences = sample_sentences(sentences, max_sentences, seed)
    x, y = make_examples(sentences, vocab, config.seq_len)
    if len(x) == 0:
        raise ValueError("no training examples: the training clients have no text")
    tf.keras.utils.set_random_seed(seed)  # python, numpy and TF: same seed -> same initial model and order
    model = build_model(config, seed=seed)
    if optimizer == "adam":
        opt = tf.keras.optimizers.Adam(learning_rate=lr)
    elif optimizer == "sgd":
        opt = tf.keras.optimizers.SGD(learning_rate=lr)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    model.compile(optimizer=opt, loss=masked_loss())
    data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    callbacks: list[tf.keras.callbacks.Callback] = []
    if log_dir:
        # write_graph=False: the tied output layer is not JSON-serialisable (Keras would warn).
        callbacks.append(
            tf.keras.callbacks.TensorBoard(log_dir=str(log_dir), update_freq=50, profile_batch=0, write_graph=False)
        )
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2  # a progress bar only where it renders
    fit = model.fit(data, epochs=epochs, callbacks=callbacks, verbose=verbose)
    history: dict[str, Any] = {key: [float(v) for v in values] for key, values in fit.history.items()}
    history.update(
        {
            "sentences": len(sentences),
            "examples": int(len(x)),
            "tokens": int(np.count_nonzero(y)),
            "steps_per_epoch": int(math.ceil(len(x) / batch_size)),
            "epochs": int(epochs),
            "batch_size": int(batch_size),
            "lr": float(lr),
            "optimizer": optimizer,
            "max_sentences": max_sentences,
            "seed": int(seed),
            "train_seconds": round(time.time() - started, 2),
        }
    )
    return get_weights(model), history


def _sums_function(model: tf.keras.Model) -> Any:
    """A tf.function giving one batch's models.metrics sums, with metrics' exact rules.

    Same as models.metrics.metric_sums on the model's logits (float32 loss instead of
    float64), but in TF: it runs multi-threaded and never copies [tokens, vocab] to numpy.
    """
    excluded_ids = tf.constant(EXCLUDED_PREDICTION_IDS, tf.int32)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None], tf.int32)])
    def sums(x: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = tf.cast(model(x, training=False), tf.float32)
        vocab = tf.shape(logits)[-1]
        flat = tf.reshape(logits, tf.stack([-1, vocab]))
        targets = tf.reshape(y, [-1])
        keep = tf.not_equal(targets, PAD_ID)
        flat, targets = tf.boolean_mask(flat, keep), tf.boolean_mask(targets, keep)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=flat)
        ids = tf.range(vocab)
        is_excluded = tf.reduce_any(tf.equal(ids[:, None], excluded_ids[None, :]), axis=1)
        masked = tf.where(is_excluded[None, :], tf.constant(-np.inf, tf.float32), flat)
        target_logit = tf.gather(masked, targets, batch_dims=1)[:, None]
        # rank = position in a stable descending sort (ties to the lower id), as in metrics.
        above = tf.reduce_sum(tf.cast(masked > target_logit, tf.int32), axis=1)
        ties = tf.reduce_sum(
            tf.cast(tf.logical_and(tf.equal(masked, target_logit), ids[None, :] < targets[:, None]), tf.int32), axis=1
        )
        rank = above + ties
        valid = tf.logical_not(tf.gather(is_excluded, targets))
        return {
            "tokens": tf.size(targets),
            "oov_tokens": tf.reduce_sum(tf.cast(tf.equal(targets, OOV_ID), tf.int32)),
            "loss_sum": tf.reduce_sum(tf.cast(ce, tf.float64)),
            "top1_hits": tf.reduce_sum(tf.cast(tf.logical_and(rank < 1, valid), tf.int32)),
            "top3_hits": tf.reduce_sum(tf.cast(tf.logical_and(rank < 3, valid), tf.int32)),
        }

    return sums


def keras_metric_sums(
    config: ModelConfig,
    weights: Sequence[np.ndarray],
    token_lists: Iterable[Sequence[str]],
    vocab: Vocabulary,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, float]:
    """Mergeable models.metrics sums (SUM_KEYS) of the Keras model over the sentences' examples."""
    _check_vocab(config, vocab)
    x, y = make_examples(token_lists, vocab, config.seq_len)
    model = build_model(config)
    set_weights(model, weights, config)
    batch_sums = _sums_function(model)
    starts = range(0, len(x), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="evaluate", unit="batch", leave=False, disable=None)  # None: off without a TTY
    total = empty_metric_sums()
    for start in starts:
        got = batch_sums(tf.constant(x[start : start + batch_size]), tf.constant(y[start : start + batch_size]))
        total = merge_metric_sums(total, {k: (float(v) if k == "loss_sum" else int(v)) for k, v in got.items()})
    return total


def evaluate_keras(
    config: ModelConfig,
    weights: Sequence[np.ndarray],
    token_lists: Iterable[Sequence[str]],
    vocab: Vocabulary,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, float]:
    """The models.metrics.evaluate_logits dict of the Keras model on sentences of tokens.

    Sentences become <bos> .. <eos> windows of config.seq_len (models.examples), the same
    examples the model trains on; computed batch by batch and merged, so memory stays small.
    """
    return finalize_metric_sums(keras_metric_sums(config, weights, token_lists, vocab, batch_size, progress))


__all__ = ["train_central", "evaluate_keras", "keras_metric_sums", "token_lists", "sample_sentences"]
