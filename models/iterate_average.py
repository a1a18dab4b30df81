"""Averaging the server's iterates: the model to serve is an exponential moving average of the global
models a run's rounds produce, not the last one (Polyak-Ruppert averaging; Izmailov et al. 2018's SWA).

The rounds' global models scatter around the path of a noisy server step: each round follows a sample of
clients, whose deltas disagree (measured on chitchat, the small preset from the donors' model, round 240 of the
cosine recipe: the last global model 24.38% held-out top-1, the mean of the last 100 rounds' 25.90%). The
average keeps what the rounds agree on. Training continues from the iterates; only what is served and
evaluated is the average.

With decay b and the iterates w_1, w_2, ... (w_0, the start, is not averaged):

    m_t = b m_{t-1} + (1 - b) w_t,  m_0 = 0          (ema_update)
    average_t = m_t / (1 - b^t)                      (ema_weights: Adam's bias correction)

so round 1's average is w_1, and an open-ended server's average is defined from its first round on, with
an effective window of about 1 / (1 - b) rounds. Pure numpy, so the aggregation server can use it as is;
today only tff_sim (--average-decay) serves the average, the server each round's own model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Weights = list[np.ndarray]


def check_decay(decay: float) -> float:
    """An averaging decay in [0, 1): 0 = no averaging (the average is the last iterate)."""
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"the iterate average's decay must be in [0, 1), got {decay!r}")
    return decay


def ema_update(m: Sequence[np.ndarray] | None, weights: Sequence[np.ndarray], decay: float) -> Weights:
    """m_t from m_{t-1} (None before the first round) and the round's global weights w_t."""
    decay = check_decay(decay)
    if m is None:
        return [(1.0 - decay) * np.asarray(w, np.float64) for w in weights]
    if len(m) != len(weights):
        raise ValueError(f"the average has {len(m)} tensors, the weights {len(weights)}")
    return [decay * np.asarray(a, np.float64) + (1.0 - decay) * np.asarray(w, np.float64) for a, w in zip(m, weights)]


def ema_weights(m: Sequence[np.ndarray], steps: int, decay: float) -> Weights:
    """The bias-corrected average after `steps` >= 1 updates, as float32 model weights."""
    decay = check_decay(decay)
    if steps < 1:
        raise ValueError(f"an average needs at least one round, got steps={steps}")
    scale = 1.0 / (1.0 - decay ** steps)
    return [(np.asarray(a, np.float64) * scale).astype(np.float32) for a in m]
