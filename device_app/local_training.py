"""On-device training: SGD on the user's own messages with a task's hyperparameters, the
model delta, and its privatization (clip to the round's L2 bound, add Gaussian noise).

One Keras model per model config is built once per process and shared (fleet mode runs many
simulated devices in one process); its train step is a tf.function with a fixed input
signature, so neither a new task, a new learning rate nor a short last batch retraces it.
Clipping and noise are the pure numpy functions of models.dp.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tensorflow as tf

from models import dp, fedavg
from models.config import ModelConfig
from models.examples import make_examples
from models.keras_model import PAD_ID, build_model, get_weights, masked_loss, set_weights
from models.metrics import empty_metric_sums, finalize_metric_sums, merge_metric_sums, metric_sums
from models.tokenizer import tokenize_sentences
from models.vocab import Vocabulary

Progress = Callable[[float, str], None]


class TrainingCancelled(Exception):
    """Training was stopped (the user typed, the device lost eligibility, the app closed)."""


def examples_for(messages: Iterable[str], vocab: Vocabulary, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Messages -> (x, y) next-word examples, sentence by sentence, as in the simulations."""
    token_lists = [tokens for message in messages for tokens in tokenize_sentences(message)]
    return make_examples(token_lists, vocab, seq_len)


@dataclass
class TrainingResult:
    weights: list[np.ndarray]
    num_examples: int  # training windows (what FedAvg weights by)
    num_tokens: int  # real (non-pad) target tokens
    steps: int
    epochs: int
    loss_first_epoch: float
    loss_last_epoch: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "steps": self.steps,
            "epochs": self.epochs,
            "loss_first_epoch": self.loss_first_epoch,
            "loss_last_epoch": self.loss_last_epoch,
            "train_seconds": round(self.seconds, 3),
        }


class LocalTrainer:
    """A Keras model of one config plus compiled train/eval steps. Not thread-safe on its own:
    use `trainer_for(config)`, whose `.lock` serializes users."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.lock = threading.RLock()
        self.model = build_model(config)
        model = self.model
        embedding = model.get_layer("embedding")
        cifg = model.get_layer("cifg")
        output = model.get_layer("output")
        spec = tf.TensorSpec([None, config.seq_len], tf.int32)

        # The model's own layers and variables, composed so that only the real (non-pad)
        # positions go through the V x E output layer (one 2-D matmul against the tied
        # embedding): about half the positions of a keyboard batch are padding. Same math as
        # model(x) followed by the masked loss, checked at construction (_check_against_model).
        def real_logits(x: tf.Tensor, y: tf.Tensor, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
            states = cifg(embedding(x, training=training), training=training)
            keep = tf.not_equal(y, PAD_ID)
            rows = tf.boolean_mask(states, keep)
            logits = tf.matmul(rows, embedding.embeddings, transpose_b=True) + output.output_bias
            return logits, tf.boolean_mask(y, keep)

        def mean_loss(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
            return tf.math.divide_no_nan(tf.reduce_sum(ce), tf.cast(tf.size(ce), ce.dtype))

        @tf.function(input_signature=[spec, spec, tf.TensorSpec([], tf.float32)])
        def train_step(x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = mean_loss(*real_logits(x, y, True))
            grads = tape.gradient(loss, model.trainable_variables)
            for var, grad in zip(model.trainable_variables, grads):
                var.assign_sub(lr * tf.convert_to_tensor(grad))
            return loss

        @tf.function(input_signature=[spec, spec])
        def logits_step(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return real_logits(x, y, False)

        @tf.function(input_signature=[spec])
        def logprobs_step(x: tf.Tensor) -> tf.Tensor:
            return tf.nn.log_softmax(model(x, training=False))

        self._train_step = train_step
        self._logits_step = logits_step
        self._logprobs_step = logprobs_step
        self._check_against_model(mean_loss)

    def _check_against_model(self, mean_loss: Callable[..., tf.Tensor]) -> None:
        """The fast path must compute exactly what the Keras model and its masked loss do."""
        rng = np.random.default_rng(0)
        x = rng.integers(1, self.config.vocab_size, size=(2, self.config.seq_len)).astype(np.int32)
        y = np.roll(x, -1, axis=1)
        y[0, self.config.seq_len // 2 :] = PAD_ID
        want = float(masked_loss()(tf.constant(y), self.model(tf.constant(x))))
        got = float(mean_loss(*self._logits_step(tf.constant(x), tf.constant(y))))
        if not np.isclose(want, got, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"fast training path disagrees with the Keras model: loss {got} vs {want}")

    @property
    def tracing_counts(self) -> tuple[int, int]:
        return (
            int(self._train_step.experimental_get_tracing_count()),
            int(self._logits_step.experimental_get_tracing_count()),
        )

    def train(
        self,
        weights: Sequence[np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int | None = None,
        max_steps: int | None = None,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainingResult:
        """Plain minibatch SGD from `weights` over (x, y) for `epochs` epochs, shuffled per epoch."""
        if epochs < 1 or batch_size < 1 or not np.isfinite(lr) or lr <= 0:
            raise ValueError(f"bad hyperparameters: epochs={epochs}, batch_size={batch_size}, lr={lr}")
        n = int(len(x))
        if n == 0:
            raise ValueError("no training examples")
        start = time.perf_counter()
        rng = np.random.default_rng(seed)
        steps_per_epoch = (n + batch_size - 1) // batch_size
        total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
        lr_t = tf.constant(float(lr), dtype=tf.float32)
        epoch_losses: list[float] = []
        step = 0
        with self.lock:
            set_weights(self.model, weights, self.config)
            for epoch in range(epochs):
                order = rng.permutation(n)
                losses, sizes = [], []
                for b in range(steps_per_epoch):
                    if step >= total_steps:
                        break
                    if should_stop is not None and should_stop():
                        raise TrainingCancelled(f"stopped after {step} of {total_steps} steps")
                    idx = order[b * batch_size : (b + 1) * batch_size]
                    loss = self._train_step(tf.constant(x[idx]), tf.constant(y[idx]), lr_t)
                    losses.append(float(loss))
                    sizes.append(len(idx))
                    step += 1
                    if progress is not None:
                        progress(step / total_steps, f"training: epoch {epoch + 1}/{epochs}, step {step}/{total_steps}")
                if losses:
                    epoch_losses.append(float(np.average(losses, weights=sizes)))
            trained = get_weights(self.model)
        if not all(np.all(np.isfinite(w)) for w in trained):
            raise FloatingPointError("training diverged (non-finite weights); lower the learning rate")
        return TrainingResult(
            weights=trained,
            num_examples=n,
            num_tokens=int(np.count_nonzero(y)),
            steps=step,
            epochs=epochs,
            loss_first_epoch=epoch_losses[0] if epoch_losses else float("nan"),
            loss_last_epoch=epoch_losses[-1] if epoch_losses else float("nan"),
            seconds=time.perf_counter() - start,
        )

    def evaluate(self, weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> dict[str, float]:
        """models.metrics on the model's logits (top1/top3 recall, loss, ...)."""
        if len(x) == 0:
            return finalize_metric_sums(empty_metric_sums())
        sums = []
        with self.lock:
            set_weights(self.model, weights, self.config)
            for b in range(0, len(x), batch_size):
                logits, targets = self._logits_step(tf.constant(x[b : b + batch_size]), tf.constant(y[b : b + batch_size]))
                sums.append(metric_sums(logits.numpy(), targets.numpy()))
        return finalize_metric_sums(merge_metric_sums(sums))


    def logprobs(self, weights: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
        """Next-word log-probabilities [n, seq_len, V] (float32) of windows x under `weights`: the
        personal cache's blend needs every word's probability, not just the target's. Callers pass
        batches (V floats per position add up)."""
        with self.lock:
            set_weights(self.model, weights, self.config)
            return self._logprobs_step(tf.constant(np.asarray(x, np.int32))).numpy()


_TRAINERS: dict[str, LocalTrainer] = {}
_TRAINERS_LOCK = threading.Lock()


def trainer_for(config: ModelConfig) -> LocalTrainer:
    """The process-wide trainer of this config (built on first use)."""
    key = config.config_hash()
    with _TRAINERS_LOCK:
        trainer = _TRAINERS.get(key)
        if trainer is None:
            trainer = _TRAINERS[key] = LocalTrainer(config)
        return trainer


# ---------------------------------------------------------------------- delta and privacy


def compute_delta(trained: Sequence[np.ndarray], base: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The update a device uploads: trained - base, tensor by tensor, float32 (models.fedavg.client_delta;
    the server steps on the mean of these with pseudo-gradient -mean)."""
    return fedavg.client_delta(trained, base)


@dataclass
class PrivatizedDelta:
    delta: list[np.ndarray]
    norm_before_clip: float
    clip_norm: float
    clipped: bool
    norm_after_clip: float
    noise_stddev: float
    norm_sent: float

    def summary(self) -> dict[str, Any]:
        return {
            "norm_before_clip": self.norm_before_clip,
            "clip_norm": self.clip_norm,
            "clipped": self.clipped,
            "norm_after_clip": self.norm_after_clip,
            "noise_stddev": self.noise_stddev,
            "norm_sent": self.norm_sent,
        }


def privatize(
    delta: Sequence[np.ndarray],
    clip_norm: float | None,
    noise_stddev: float,
    rng: np.random.Generator | None = None,
) -> PrivatizedDelta:
    """Clip the delta to L2 norm `clip_norm` (None or <= 0: no clipping), then add
    N(0, noise_stddev^2) to every coordinate (0: no noise)."""
    rng = rng if rng is not None else np.random.default_rng()
    delta = [np.asarray(d, np.float32) for d in delta]
    norm_before = float(dp.l2_norm(delta))
    if clip_norm is not None and clip_norm > 0:
        clipped_delta = _clip(delta, float(clip_norm))
    else:
        clipped_delta = delta
    norm_clipped = float(dp.l2_norm(clipped_delta))
    if noise_stddev and noise_stddev > 0:
        sent = _noise(clipped_delta, float(noise_stddev), rng)
    else:
        sent = clipped_delta
    return PrivatizedDelta(
        delta=[np.asarray(d, np.float32) for d in sent],
        norm_before_clip=norm_before,
        clip_norm=float(clip_norm or 0.0),
        clipped=bool(clip_norm and clip_norm > 0 and norm_before > clip_norm),
        norm_after_clip=norm_clipped,
        noise_stddev=float(noise_stddev or 0.0),
        norm_sent=float(dp.l2_norm(sent)),
    )


def _clip(delta: list[np.ndarray], clip_norm: float) -> list[np.ndarray]:
    out = dp.clip_by_global_norm(delta, clip_norm)
    return list(out[0]) if isinstance(out, tuple) else list(out)


def _noise(delta: list[np.ndarray], stddev: float, rng: np.random.Generator) -> list[np.ndarray]:
    return list(dp.add_gaussian_noise(delta, stddev, rng))


__all__ = [
    "LocalTrainer",
    "PrivatizedDelta",
    "TrainingCancelled",
    "TrainingResult",
    "compute_delta",
    "examples_for",
    "privatize",
    "trainer_for",
]
