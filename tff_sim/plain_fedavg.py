"""FedAvg without TFF: plain Keras client training and numpy averaging.

The reference the benchmarks time TFF against, and the first half of
examples/three_users.py. It does what tff.learning's weighted FedAvg does, step for step:
every client starts from the global weights, runs SGD over its batches (the batches of
tff_sim.client_data.client_batches), reports delta = start - end and its example count;
the server takes the example-weighted mean delta as a pseudo-gradient for its optimizer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from models.config import ModelConfig
from models.keras_model import build_model, get_weights, masked_loss, set_weights


class KerasClientTrainer:
    """One Keras model reused for every client; one traced SGD step."""

    def __init__(self, config: ModelConfig, client_lr: float) -> None:
        self.config = config
        self.model = build_model(config)
        self.loss = masked_loss()
        lr = tf.constant(client_lr, tf.float32)
        spec = tf.TensorSpec([None, config.seq_len], tf.int32)
        variables = self.model.trainable_weights

        @tf.function(input_signature=[spec, spec])
        def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = self.loss(y, self.model(x, training=True))
            grads = tape.gradient(loss, variables)
            for v, g in zip(variables, grads):
                v.assign_sub(lr * tf.convert_to_tensor(g))
            return loss

        self._step = step

    def train(self, weights: Sequence[np.ndarray], batches: Sequence[tuple[np.ndarray, np.ndarray]]
              ) -> tuple[list[np.ndarray], int, float]:
        """(trained weights, examples seen, mean batch loss) of one client's local training."""
        set_weights(self.model, weights)
        losses, examples = [], 0
        for x, y in batches:
            losses.append(float(self._step(x, y)))
            examples += len(x)
        return get_weights(self.model), examples, float(np.mean(losses)) if losses else float("nan")


def weighted_mean_delta(global_weights: Sequence[np.ndarray], client_weights: Sequence[Sequence[np.ndarray]],
                        counts: Sequence[int]) -> list[np.ndarray]:
    """sum_k n_k (global - w_k) / sum_k n_k: the FedAvg pseudo-gradient."""
    total = float(sum(counts))
    out = [np.zeros_like(w, dtype=np.float32) for w in global_weights]
    for weights, n in zip(client_weights, counts):
        for acc, g, w in zip(out, global_weights, weights):
            acc += (n / total) * (g - w)
    return out


class NumpyServerOptimizer:
    """SGD, heavy-ball momentum or Nesterov momentum on the pseudo-gradient, as tff_sim's server uses."""

    def __init__(self, kind: str = "sgd", lr: float = 1.0, momentum: float = 0.9) -> None:
        if kind not in ("sgd", "momentum", "nesterov"):
            raise ValueError(f"plain FedAvg supports sgd, momentum and nesterov, not {kind!r}")
        self.kind, self.lr, self.momentum = kind, float(lr), float(momentum)
        self.velocity: list[np.ndarray] | None = None

    def apply(self, weights: Sequence[np.ndarray], grad: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.kind == "sgd":
            return [w - np.float32(self.lr) * g for w, g in zip(weights, grad)]
        if self.velocity is None:
            self.velocity = [np.zeros_like(g) for g in grad]
        m = np.float32(self.momentum)
        self.velocity = [m * v + g for v, g in zip(self.velocity, grad)]
        if self.kind == "momentum":
            return [w - np.float32(self.lr) * v for w, v in zip(weights, self.velocity)]
        return [w - np.float32(self.lr) * (g + m * v) for w, g, v in zip(weights, grad, self.velocity)]
