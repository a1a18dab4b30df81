"""SGD with Nesterov momentum as a tff.learning optimizer (Gboard's server optimizer, momentum 0.9).

TFF 0.87 ships build_sgdm with heavy-ball momentum only. Nesterov, in the form Keras and
PyTorch use:  v = m * v + g;  w = w - lr * (g + m * v)  (models/fedavg.py's `nesterov`, its numpy
reference; tests/test_fedavg.py checks the two agree).
"""
from __future__ import annotations

import collections
from typing import Any

import tensorflow as tf
from tensorflow_federated.python.learning.optimizers import nest_utils, optimizer

_MOMENTUM = "momentum"
_ACCUMULATOR = "accumulator"


class _Nesterov(optimizer.Optimizer):
    def __init__(self, learning_rate: float, momentum: float) -> None:
        if learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self._lr = learning_rate
        self._momentum = momentum

    def initialize(self, specs: Any) -> collections.OrderedDict:
        return collections.OrderedDict([
            (optimizer.LEARNING_RATE_KEY, self._lr),
            (_MOMENTUM, self._momentum),
            (_ACCUMULATOR, tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), specs)),
        ])

    def next(self, state, weights, gradients):
        gradients = optimizer.handle_indexed_slices_gradients(gradients)
        optimizer.check_weights_gradients_match(weights, gradients)
        lr, momentum = state[optimizer.LEARNING_RATE_KEY], state[_MOMENTUM]
        optimizer.check_weights_state_match(weights, state[_ACCUMULATOR], "accumulator")

        def update(w, v, g):
            if g is None:
                return w, v
            v = tf.cast(momentum, v.dtype) * v + g
            w = w - tf.cast(lr, w.dtype) * (g + tf.cast(momentum, v.dtype) * v)
            return w, v

        new_weights, new_accumulator = nest_utils.map_at_leaves(
            update, weights, state[_ACCUMULATOR], gradients, num_outputs=2
        )
        return collections.OrderedDict([
            (optimizer.LEARNING_RATE_KEY, lr), (_MOMENTUM, momentum), (_ACCUMULATOR, new_accumulator)
        ]), new_weights

    def get_hparams(self, state):
        return collections.OrderedDict([(k, state[k]) for k in (optimizer.LEARNING_RATE_KEY, _MOMENTUM)])

    def set_hparams(self, state, hparams):
        new = collections.OrderedDict(state)
        new.update(hparams)
        return new


def build_nesterov(learning_rate: float = 1.0, momentum: float = 0.9) -> optimizer.Optimizer:
    return _Nesterov(learning_rate, momentum)
