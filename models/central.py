"""Centrally trained ("server-trained") reference: the same Keras model on the pooled training data.

Hard et al. (2018) compare federated training with the same CIFG model trained on the server.
Here the pooled train split of the training clients is the server's data. Adam with lr 1e-3
is the default: it converges in far fewer steps than plain SGD, which matters on a CPU budget.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
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


def split_validation(
    sentences: Sequence[Sequence[str]], fraction: float, max_sentences: int | None, seed: int
) -> tuple[list[Sequence[str]], list[Sequence[str]]]:
    """(train, validation): a seeded random `fraction` of the sentences (at most max_sentences) held back.

    Early stopping needs text the model does not train on; it comes from the training users'
    own text, never from the test or held-out splits that the tables report.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = int(round(fraction * len(sentences)))
    if max_sentences is not None:
        n_val = min(n_val, max_sentences)
    if n_val == 0:
        return list(sentences), []
    held = set(random.Random(f"validation-{seed}").sample(range(len(sentences)), n_val))
    train = [s for i, s in enumerate(sentences) if i not in held]
    val = [s for i, s in enumerate(sentences) if i in held]
    return train, val


@dataclass(frozen=True)
class StopDecision:
    best_epoch: int  # 1-based epoch with the lowest validation loss
    stop: bool
    reason: str


def early_stopping(val_losses: Sequence[float], patience: int, min_delta: float = 0.0) -> StopDecision:
    """Stop once `patience` epochs in a row failed to beat the best loss by more than min_delta.

    Pure, so the rule is tested on its own; a non-finite loss stops at once (diverged).
    """
    if not val_losses:
        return StopDecision(0, False, "")
    best, best_epoch, wait = math.inf, 0, 0
    for epoch, loss in enumerate(val_losses, start=1):
        if not math.isfinite(loss):
            return StopDecision(best_epoch, True, f"validation loss not finite at epoch {epoch}")
        if loss < best - min_delta:
            best, best_epoch, wait = loss, epoch, 0
        else:
            wait += 1
    if patience > 0 and wait >= patience:
        return StopDecision(best_epoch, True, f"no improvement > {min_delta} for {patience} epoch(s)")
    return StopDecision(best_epoch, False, "")


def _epoch_data(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int) -> tf.data.Dataset:
    """The epoch's batches in an order that depends on (seed, epoch) only, so a resumed run sees
    exactly the batches an uninterrupted one would."""
    order = np.random.default_rng([seed, epoch]).permutation(len(x))
    return tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _make_optimizer(name: str, lr: float) -> tf.keras.optimizers.Optimizer:
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate=lr)
    if name == "sgd":
        return tf.keras.optimizers.SGD(learning_rate=lr)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


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
    validation: Sequence[Sequence[str]] | None = None,
    patience: int = 0,
    min_delta: float = 1e-3,
    max_wall_s: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Train on the training clients' train split, pooled and shuffled, for at most `epochs` epochs.

    max_sentences caps the (seeded, random) sample of sentences trained on. With `validation`
    sentences, each epoch ends with their loss and top-1; `patience` > 0 stops early
    (`early_stopping`) and the best epoch's weights are returned. max_wall_s stops after the
    epoch that crosses it. checkpoint_dir keeps the model, the optimizer and the history after
    every epoch; the same call resumes there (a converged run outlasts a session).
    Returns the weights in config.weight_specs() order and a history dict (per-epoch loss,
    val_loss, val_top1, best epoch, why it stopped, what was trained on). log_dir adds
    TensorBoard logs. sentences: the already tokenized training sentences of `dataset`.
    """
    _check_vocab(config, vocab)
    started = time.time()
    if sentences is None:
        sentences = token_lists(dataset.all_train_sentences())
    sentences = sample_sentences(sentences, max_sentences, seed)
    x, y = make_examples(sentences, vocab, config.seq_len)
    if len(x) == 0:
        raise ValueError("no training examples: the training clients have no text")
    tf.keras.utils.set_random_seed(seed)  # python, numpy and TF: same seed -> same initial model
    model = build_model(config, seed=seed)
    opt = _make_optimizer(optimizer, lr)
    model.compile(optimizer=opt, loss=masked_loss())
    identity = {"config": config.config_hash(), "vocab": vocab.content_hash(), "examples": int(len(x)),
                "batch_size": int(batch_size), "lr": float(lr), "optimizer": optimizer, "seed": int(seed),
                "validation": len(validation or [])}
    ckpt = _Checkpoint(checkpoint_dir, model, opt, identity) if checkpoint_dir else None
    history: dict[str, Any] = {"loss": [], "val_loss": [], "val_top1": [], "epoch_seconds": []}
    best_weights: list[np.ndarray] | None = None
    resumed_from = 0
    if ckpt is not None and ckpt.exists():
        history, best_weights = ckpt.restore()
        resumed_from = len(history["loss"])
    callbacks: list[tf.keras.callbacks.Callback] = []
    if log_dir:
        # write_graph=False: the tied output layer is not JSON-serialisable (Keras would warn).
        callbacks.append(
            tf.keras.callbacks.TensorBoard(log_dir=str(log_dir), update_freq=50, profile_batch=0, write_graph=False)
        )
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2  # a progress bar only where it renders
    if validation:
        val_x, val_y = make_examples(validation, vocab, config.seq_len)
        val_sums = _sums_function(model)  # traced once, reads the live training variables
    decision = early_stopping(history["val_loss"], patience, min_delta)
    reason = decision.reason
    epoch = resumed_from
    while epoch < epochs and not decision.stop:
        if max_wall_s is not None and time.time() - started >= max_wall_s:
            reason = f"wall-time limit {max_wall_s:.0f} s"
            break
        t0 = time.time()
        # epochs=epochs so Keras prints "Epoch e/max"; _StopAfterOneEpoch returns after this one, since
        # validation, checkpointing and early stopping happen here between epochs.
        fit = model.fit(_epoch_data(x, y, batch_size, seed, epoch), initial_epoch=epoch, epochs=epochs,
                        callbacks=[*callbacks, _StopAfterOneEpoch()], verbose=verbose)
        epoch += 1
        history["loss"].append(float(fit.history["loss"][-1]))
        if validation:
            val = finalize_metric_sums(_sum_batches(val_sums, val_x, val_y, 256))
            history["val_loss"].append(float(val["loss"]))
            history["val_top1"].append(float(val["top1_recall"]))
        history["epoch_seconds"].append(round(time.time() - t0, 2))
        decision = early_stopping(history["val_loss"], patience, min_delta)
        if validation and decision.best_epoch == epoch:
            best_weights = get_weights(model)
        if verbose:
            val_text = (f", validation loss {history['val_loss'][-1]:.4f} top-1 {history['val_top1'][-1]:.2%}"
                        f" (best: epoch {decision.best_epoch})" if validation else "")
            print(f"epoch {epoch}/{epochs}: loss {history['loss'][-1]:.4f}{val_text}", flush=True)
        if ckpt is not None:
            ckpt.save(history, best_weights)
        reason = decision.reason
    if not reason:
        reason = f"reached {epochs} epoch(s)"
    weights = best_weights if validation and best_weights is not None else get_weights(model)
    history.update(
        {
            "sentences": len(sentences),
            "examples": int(len(x)),
            "tokens": int(np.count_nonzero(y)),
            "validation_sentences": len(validation or []),
            "steps_per_epoch": int(math.ceil(len(x) / batch_size)),
            "epochs": len(history["loss"]),
            "max_epochs": int(epochs),
            "best_epoch": decision.best_epoch if validation else len(history["loss"]),
            "stopped": reason,
            "patience": int(patience),
            "batch_size": int(batch_size),
            "lr": float(lr),
            "optimizer": optimizer,
            "max_sentences": max_sentences,
            "seed": int(seed),
            "resumed_from_epoch": resumed_from,
            "train_seconds": round(time.time() - started + (ckpt.previous_seconds if ckpt else 0.0), 2),
        }
    )
    return weights, history


class _StopAfterOneEpoch(tf.keras.callbacks.Callback):
    """Ends model.fit after the epoch it started (the caller runs one epoch per fit)."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.model.stop_training = True


class _Checkpoint:
    """Model + optimizer (tf.train.Checkpoint) and the history/best weights (JSON + npz) of a central run."""

    def __init__(self, folder: str | os.PathLike, model: tf.keras.Model, opt: Any, identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.identity = identity
        self.model, self.optimizer = model, opt
        self.tf_ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
        _ = self.tf_ckpt.save_counter  # created now, so it is written too and restore can demand a full match
        self.previous_seconds = 0.0
        self._since = time.time()

    def exists(self) -> bool:
        return (self.folder / "state.json").exists()

    def restore(self) -> tuple[dict[str, Any], list[np.ndarray] | None]:
        state = json.loads((self.folder / "state.json").read_text())
        if state["identity"] != self.identity:
            raise SystemExit(f"{self.folder} holds a checkpoint of another run ({state['identity']} vs "
                             f"{self.identity}); remove it or choose another output folder")
        self.optimizer.build(self.model.trainable_variables)  # slots exist only after a first step otherwise
        self.tf_ckpt.restore(str(self.folder / "model")).assert_existing_objects_matched()
        self.previous_seconds = float(state.get("seconds", 0.0))
        best = None
        if (self.folder / "best.npz").exists():
            with np.load(self.folder / "best.npz") as z:
                best = [z[f"w{i}"] for i in range(len(z.files))]
        return state["history"], best

    def save(self, history: dict[str, Any], best: list[np.ndarray] | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tf_ckpt.write(str(self.folder / "model"))
        if best is not None:
            tmp = self.folder / "best.tmp.npz"
            np.savez(tmp, **{f"w{i}": w for i, w in enumerate(best)})
            os.replace(tmp, self.folder / "best.npz")
        seconds = self.previous_seconds + time.time() - self._since
        tmp = self.folder / "state.tmp.json"
        tmp.write_text(json.dumps({"identity": self.identity, "history": history, "seconds": seconds}))
        os.replace(tmp, self.folder / "state.json")  # the epoch counts once its state file lands


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
    return _sum_batches(_sums_function(model), x, y, batch_size, progress)


def _sum_batches(batch_sums: Any, x: np.ndarray, y: np.ndarray, batch_size: int, progress: bool = False
                 ) -> dict[str, float]:
    """Merge a _sums_function over (x, y) in batches."""
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
