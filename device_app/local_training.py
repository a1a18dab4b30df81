"""On-device training: SGD on the user's own messages with a task's hyperparameters, the
model delta, and its privatization (clip to the round's L2 bound, add Gaussian noise).

Two trainers with one interface (train, evaluate, logprobs, lock), chosen at run time per process
by training_backend() and shown on the status screen:

* "tflite": TFLiteTrainer runs the `train` signature of the config's TFLite training template
  (models.tflite_templates; train_builtin.tflite with zero weights, builtin ops only) in
  tflite_runtime: no TensorFlow. Its batch is fixed (16); a smaller batch is padded with all-<pad>
  rows, which the masked loss ignores, so each step is the Keras step on the same rows.
* "keras": LocalTrainer, one Keras model per config built once per process and shared (fleet mode
  runs many simulated devices in one process); its train step is a tf.function with a fixed
  input signature, so neither a new task, a new learning rate nor a short last batch retraces it.

$FK_TRAIN_BACKEND picks one (tflite | keras); the default, auto, is TFLite where TensorFlow is
not installed (a phone) and a training template exists for the config, else Keras: where both
exist Keras is the faster of the two (it sends only the real positions through the V x E output
layer; about 20 ms against 45 ms a batch of 16 for the small preset on this machine), and the
simulations it is checked against use it. This module imports TensorFlow only in LocalTrainer.
Clipping and noise are the pure numpy functions of models.dp.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from models import dp, fedavg
from models.config import ModelConfig
from models.examples import make_examples
from models.metrics import PAD_ID, empty_metric_sums, finalize_metric_sums, merge_metric_sums, metric_sums
from models.tflite_templates import find_templates, has_templates, runtime_available, tensorflow_available
from models.tokenizer import tokenize_sentences
from models.vocab import Vocabulary

TRAIN_BACKEND_ENV = "FK_TRAIN_BACKEND"
BACKENDS = ("tflite", "keras")
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


StepFn = Callable[[np.ndarray, np.ndarray], float]  # one SGD step on a batch -> its loss


def _check_hyperparameters(n: int, epochs: int, batch_size: int, lr: float) -> None:
    if epochs < 1 or batch_size < 1 or not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"bad hyperparameters: epochs={epochs}, batch_size={batch_size}, lr={lr}")
    if n == 0:
        raise ValueError("no training examples")


def _sgd_epochs(step_fn: StepFn, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
                seed: int | None, max_steps: int | None, progress: Progress | None,
                should_stop: Callable[[], bool] | None) -> tuple[int, list[float]]:
    """Minibatch SGD over (x, y), shuffled per epoch: (steps taken, each epoch's mean batch loss).
    Both trainers share it, so a seed gives both the same batches."""
    n = int(len(x))
    rng = np.random.default_rng(seed)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    epoch_losses: list[float] = []
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        losses, sizes = [], []
        for b in range(steps_per_epoch):
            if step >= total_steps:
                break
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"stopped after {step} of {total_steps} steps")
            idx = order[b * batch_size : (b + 1) * batch_size]
            losses.append(step_fn(x[idx], y[idx]))
            sizes.append(len(idx))
            step += 1
            if progress is not None:
                progress(step / total_steps, f"training: epoch {epoch + 1}/{epochs}, step {step}/{total_steps}")
        if losses:
            epoch_losses.append(float(np.average(losses, weights=sizes)))
    return step, epoch_losses


def _result(trained: list[np.ndarray], x: np.ndarray, y: np.ndarray, steps: int, epochs: int,
            epoch_losses: list[float], start: float) -> TrainingResult:
    if not all(np.all(np.isfinite(w)) for w in trained):
        raise FloatingPointError("training diverged (non-finite weights); lower the learning rate")
    return TrainingResult(
        weights=trained,
        num_examples=int(len(x)),
        num_tokens=int(np.count_nonzero(y)),
        steps=steps,
        epochs=epochs,
        loss_first_epoch=epoch_losses[0] if epoch_losses else float("nan"),
        loss_last_epoch=epoch_losses[-1] if epoch_losses else float("nan"),
        seconds=time.perf_counter() - start,
    )


class LocalTrainer:
    """A Keras model of one config plus compiled train/eval steps. Not thread-safe on its own:
    use `trainer_for(config)`, whose `.lock` serializes users."""

    backend = "keras"

    def __init__(self, config: ModelConfig) -> None:
        import tensorflow as tf  # only this trainer needs it

        from models.keras_model import build_model

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

        self._tf = tf
        self._train_step = train_step
        self._logits_step = logits_step
        self._logprobs_step = logprobs_step
        self._check_against_model(mean_loss)

    def _check_against_model(self, mean_loss: Callable[..., Any]) -> None:
        """The fast path must compute exactly what the Keras model and its masked loss do."""
        from models.keras_model import masked_loss

        tf = self._tf
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

    def _set(self, weights: Sequence[np.ndarray]) -> None:
        from models.keras_model import set_weights

        set_weights(self.model, weights, self.config)

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
        from models.keras_model import get_weights

        _check_hyperparameters(int(len(x)), epochs, batch_size, lr)
        tf = self._tf
        start = time.perf_counter()
        lr_t = tf.constant(float(lr), dtype=tf.float32)

        def step(bx: np.ndarray, by: np.ndarray) -> float:
            return float(self._train_step(tf.constant(bx), tf.constant(by), lr_t))

        with self.lock:
            self._set(weights)
            steps, losses = _sgd_epochs(step, x, y, epochs=epochs, batch_size=batch_size, seed=seed,
                                        max_steps=max_steps, progress=progress, should_stop=should_stop)
            trained = get_weights(self.model)
        return _result(trained, x, y, steps, epochs, losses, start)

    def evaluate(self, weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> dict[str, float]:
        """models.metrics on the model's logits (top1/top3 recall, loss, ...)."""
        if len(x) == 0:
            return finalize_metric_sums(empty_metric_sums())
        tf = self._tf
        sums = []
        with self.lock:
            self._set(weights)
            for b in range(0, len(x), batch_size):
                logits, targets = self._logits_step(tf.constant(x[b : b + batch_size]), tf.constant(y[b : b + batch_size]))
                sums.append(metric_sums(logits.numpy(), targets.numpy()))
        return finalize_metric_sums(merge_metric_sums(sums))

    def logprobs(self, weights: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
        """Next-word log-probabilities [n, seq_len, V] (float32) of windows x under `weights`: the
        personal cache's blend needs every word's probability, not just the target's. Callers pass
        batches (V floats per position add up)."""
        with self.lock:
            self._set(weights)
            return self._logprobs_step(self._tf.constant(np.asarray(x, np.int32))).numpy()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


class TFLiteTrainer:
    """The same interface on a TFLite training model (train, infer, get_weights, set_weights; builtin
    ops) run by tflite_runtime: no TensorFlow. Weights go in and out through set_weights and
    get_weights in config.weight_specs() order, so the wire format is unchanged."""

    backend = "tflite"

    def __init__(self, config: ModelConfig, model: bytes, num_threads: int | None = None) -> None:
        from models.tflite_predictor import load_interpreter_class

        self.config = config
        self.lock = threading.RLock()
        self._model = model  # the interpreter reads model_content in place: keep it alive
        interpreter = load_interpreter_class()(model_content=model, num_threads=num_threads)
        run = interpreter.get_signature_runner
        self._interpreter = interpreter
        self._train, self._infer = run("train"), run("infer")
        self._get, self._put = run("get_weights"), run("set_weights")
        self.batch_size = int(self._train.get_input_details()["x"]["shape"][0])
        self._names = [f"w{i}" for i in range(len(config.weight_specs()))]

    def _set(self, weights: Sequence[np.ndarray]) -> None:
        self._put(**{name: np.asarray(w, np.float32) for name, w in zip(self._names, weights)})

    def _weights(self) -> list[np.ndarray]:
        out = self._get()
        return [np.array(out[name], np.float32) for name in self._names]

    def _padded(self, rows: np.ndarray) -> np.ndarray:
        """rows [b <= batch_size, seq_len] topped up with all-<pad> rows to the model's fixed batch."""
        pad = np.full((self.batch_size - len(rows), rows.shape[1]), PAD_ID, np.int32)
        return np.vstack([np.asarray(rows, np.int32), pad])

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
        """As LocalTrainer.train; batch_size at most the model's fixed batch (a larger one cannot be one step)."""
        _check_hyperparameters(int(len(x)), epochs, batch_size, lr)
        if batch_size > self.batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the TFLite training model's "
                             f"{self.batch_size}; export one with --train-batch {batch_size}")
        start = time.perf_counter()
        lr_f = np.float32(lr)

        def step(bx: np.ndarray, by: np.ndarray) -> float:
            return float(self._train(x=self._padded(bx), y=self._padded(by), learning_rate=lr_f)["loss"])

        with self.lock:
            self._set(weights)
            steps, losses = _sgd_epochs(step, x, y, epochs=epochs, batch_size=batch_size, seed=seed,
                                        max_steps=max_steps, progress=progress, should_stop=should_stop)
            trained = self._weights()
        return _result(trained, x, y, steps, epochs, losses, start)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return self._infer(ids=np.asarray(x, np.int32))["logits"]

    def evaluate(self, weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> dict[str, float]:
        """models.metrics on the real (non-pad) positions' logits, as LocalTrainer.evaluate."""
        if len(x) == 0:
            return finalize_metric_sums(empty_metric_sums())
        sums = []
        with self.lock:
            self._set(weights)
            for b in range(0, len(x), batch_size):
                by = np.asarray(y[b : b + batch_size])
                keep = by != PAD_ID
                sums.append(metric_sums(self._logits(x[b : b + batch_size])[keep], by[keep]))
        return finalize_metric_sums(merge_metric_sums(sums))

    def logprobs(self, weights: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
        """Next-word log-probabilities [n, seq_len, V] (float32), as LocalTrainer.logprobs."""
        with self.lock:
            self._set(weights)
            return _log_softmax(self._logits(x))


Trainer = LocalTrainer | TFLiteTrainer


def backend_setting() -> str:
    """$FK_TRAIN_BACKEND: "tflite", "keras" or "auto" (the default)."""
    value = os.environ.get(TRAIN_BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in (*BACKENDS, "auto"):
        raise ValueError(f"${TRAIN_BACKEND_ENV} must be tflite, keras or auto, not {value!r}")
    return value


def training_backend(config: ModelConfig) -> str:
    """Which trainer trains this config in this process: "tflite" or "keras" (see the module docstring)."""
    setting = backend_setting()
    if setting != "auto":
        return setting
    if tensorflow_available() or not runtime_available():
        return "keras"
    return "tflite" if has_templates(config, need_train=True) else "keras"


def _build_trainer(config: ModelConfig, backend: str) -> Trainer:
    if backend == "keras":
        return LocalTrainer(config)
    templates = find_templates(config, need_train=True)
    if templates is None or templates.train is None:
        raise RuntimeError(f"no TFLite training template for model config {config.config_hash()[:8]}: "
                           "build one with `python -m models.tflite_export --templates` or train with Keras")
    return TFLiteTrainer(config, templates.train)


_TRAINERS: dict[tuple[str, str], Trainer] = {}
_TRAINERS_LOCK = threading.Lock()


def trainer_for(config: ModelConfig, backend: str | None = None) -> Trainer:
    """The process-wide trainer of this config (built on first use), on `backend` or training_backend()'s."""
    backend = backend or training_backend(config)
    if backend not in BACKENDS:
        raise ValueError(f"unknown training backend {backend!r}")
    key = (backend, config.config_hash())
    with _TRAINERS_LOCK:
        trainer = _TRAINERS.get(key)
        if trainer is None:
            trainer = _TRAINERS[key] = _build_trainer(config, backend)
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
    "BACKENDS",
    "LocalTrainer",
    "TFLiteTrainer",
    "TRAIN_BACKEND_ENV",
    "Trainer",
    "PrivatizedDelta",
    "TrainingCancelled",
    "TrainingResult",
    "compute_delta",
    "examples_for",
    "privatize",
    "trainer_for",
    "training_backend",
]
