"""FedAvg without TFF: plain Keras client training; the averaging and server step are models/fedavg.py.

The reference the benchmarks time TFF against and tests/test_tff_sim.py checks TFF with. It does
what tff.learning's weighted FedAvg does, step for step: every client starts from the global
weights and runs SGD over its batches (the batches of tff_sim.client_data.client_batches); the
server averages the deltas (trained - base) weighted by example count and applies its optimizer
to the pseudo-gradient -mean_delta (models.fedavg.server_update).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from models import fedavg
from models.config import ModelConfig
from models.keras_model import build_model, get_weights, masked_loss, set_weights


class KerasClientTrainer:
    """One Keras model reused for every client; one traced SGD step."""

    def __init__(self, config: ModelConfig, client_lr: float, dropout: float = 0.0) -> None:
        self.config = config
        self.model = build_model(config, dropout=dropout)
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


def plain_round(trainer: KerasClientTrainer, state: fedavg.ServerState,
                client_batches: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
                optimizer: fedavg.ServerOptimizer) -> tuple[fedavg.ServerState, list[float]]:
    """One FedAvg round: every client trains from state.weights; (new server state, client mean losses)."""
    results = [trainer.train(state.weights, batches) for batches in client_batches]
    new_state = fedavg.fedavg_round(state, [r[0] for r in results], [r[1] for r in results], optimizer)
    return new_state, [r[2] for r in results]
