"""Federated averaging, the numpy reference: client deltas, their weighted mean, the server step.

One convention everywhere (Reddi et al. 2021, "Adaptive Federated Optimization"):

    client delta      d_k = w_k(trained) - w(base)                      (client_delta)
    mean delta        d   = sum_k n_k d_k / sum_k n_k                   (weighted_mean; n_k = examples)
    pseudo-gradient   g   = -d                                           (server_update)
    server step       w  <- optimizer(w, g)                              (sgd, lr 1: w + d = plain FedAvg)

This is what tff.learning's FedAvg does too: its clients report initial - trained (= -d_k) and the
server optimizer takes the weighted mean as the gradient. The server optimizers compute exactly what
TFF 0.87's tff.learning.optimizers compute (tests/test_fedavg.py checks them against TFF):

    sgd        w <- w - lr g                                                           build_sgdm(lr)
    momentum   a <- m a + g;  w <- w - lr a                      (heavy ball)          build_sgdm(lr, m)
    nesterov   a <- m a + g;  w <- w - lr (g + m a)              (Keras/PyTorch form)  tff_sim/nesterov.py
    adam       a <- a + (1-b1)(g - a);  p <- p + (1-b2)(g^2 - p);  t <- t + 1          build_adam
               w <- w - lr sqrt(1-b2^t)/(1-b1^t) a / (sqrt(p) + eps)
               (bias correction folded into the rate, eps outside the root: TFF's form, not
               m_hat / (sqrt(v_hat) + eps), which differs while t is small)
    yogi       as adam, but p <- p + (1-b2) sign(g^2 - p) g^2, p starts at 1e-6   build_yogi
    adagrad    p <- p + g^2 (p starts at 0.1);  w <- w - lr g / sqrt(p + eps)          build_adagrad

A server learning-rate schedule (models/lr_schedule.py) makes lr a function of the round: server_update
with `schedule` steps round state.round + 1 at schedule.lr_at(state.round + 1, optimizer.lr), the rate
TFF's state holds for that round in tff_sim (the runner sets it through set_hparams). For adam / yogi the
scheduled lr is the one bias correction scales, as in TFF.

Defaults (FedAdam/FedYogi per Reddi et al.): b1 0.9, b2 0.99, eps (their tau) 1e-3, momentum 0.9.
Optimizer state is a dict of per-tensor numpy arrays ("accumulator", "preconditioner") plus an
integer "step", so a server can persist it as .npz. Pure numpy: no TensorFlow here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from models.lr_schedule import LrSchedule

Weights = list[np.ndarray]
OptState = dict[str, Any]  # "accumulator" / "preconditioner": list of arrays like the weights; "step": int

SERVER_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "yogi", "adagrad")
# The preconditioners' starting values, as TFF's builders default them. Yogi's 1e-6 is tau^2 for
# Reddi et al.'s tau = 1e-3; Adagrad's 0.1 is TFF's (and Keras') initial accumulator value.
YOGI_INITIAL_PRECONDITIONER = 1e-6
ADAGRAD_INITIAL_PRECONDITIONER = 0.1

# The server's training task (HTTP contract, server -> device) names three hyperparameters its own
# way; the wire keeps those names, and this is the one place that maps them.
TASK_KEYS = {"client_epochs": "epochs", "batch_size": "batch_size", "client_lr": "learning_rate"}


# ---------------------------------------------------------------------- hyperparameters


@dataclasses.dataclass(frozen=True)
class FedAvgHyperparams:
    """The hyperparameters of one FedAvg round, under the names tff_sim, the server and the device share."""

    client_lr: float = 0.5  # client SGD learning rate
    client_epochs: int = 1  # local epochs over the client's examples
    batch_size: int = 16
    server_optimizer: str = "sgd"  # one of SERVER_OPTIMIZERS
    server_lr: float = 1.0
    server_momentum: float = 0.9  # momentum / nesterov
    beta1: float = 0.9  # adam / yogi: first-moment decay
    beta2: float = 0.99  # adam / yogi: second-moment decay
    eps: float = 1e-3  # adam / yogi: added to sqrt(p); adagrad: added to p under the root

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = validation_errors(self)
        if problems:
            raise ValueError("; ".join(problems))

    def replace(self, **changes: Any) -> "FedAvgHyperparams":
        return dataclasses.replace(self, **changes)


def validation_errors(hp: FedAvgHyperparams) -> list[str]:
    """What is wrong with `hp` (empty when nothing is)."""
    out = []
    if not (math.isfinite(hp.client_lr) and hp.client_lr >= 0):
        out.append(f"client_lr must be >= 0, got {hp.client_lr!r}")
    if hp.client_epochs < 1 or hp.batch_size < 1:
        out.append(f"client_epochs and batch_size must be >= 1, got {hp.client_epochs!r}, {hp.batch_size!r}")
    if hp.server_optimizer not in SERVER_OPTIMIZERS:
        out.append(f"server_optimizer must be one of {SERVER_OPTIMIZERS}, got {hp.server_optimizer!r}")
    if not (math.isfinite(hp.server_lr) and hp.server_lr > 0):
        out.append(f"server_lr must be > 0, got {hp.server_lr!r}")
    if not 0 <= hp.server_momentum < 1:
        out.append(f"server_momentum must be in [0, 1), got {hp.server_momentum!r}")
    if not (0 <= hp.beta1 < 1 and 0 <= hp.beta2 < 1):
        out.append(f"beta1 and beta2 must be in [0, 1), got {hp.beta1!r}, {hp.beta2!r}")
    if not hp.eps > 0:
        out.append(f"eps must be > 0, got {hp.eps!r}")
    return out


def task_fields(hp: FedAvgHyperparams) -> dict[str, Any]:
    """The client hyperparameters as the server's training task sends them (wire names)."""
    return {wire: getattr(hp, name) for name, wire in TASK_KEYS.items()}


def hyperparams_from_task(task: Mapping[str, Any]) -> FedAvgHyperparams:
    """The client hyperparameters of a training task's JSON (missing keys: the defaults).

    "lr" is accepted for "learning_rate" (an early server spelling).
    """
    d = FedAvgHyperparams()
    lr = task.get(TASK_KEYS["client_lr"], task.get("lr"))
    epochs, batch = task.get(TASK_KEYS["client_epochs"]), task.get(TASK_KEYS["batch_size"])
    return FedAvgHyperparams(
        client_lr=d.client_lr if lr is None else float(lr),
        client_epochs=d.client_epochs if epochs is None else int(epochs),
        batch_size=d.batch_size if batch is None else int(batch),
    )


# ---------------------------------------------------------------------- client side and averaging


def client_delta(trained: Sequence[np.ndarray], base: Sequence[np.ndarray]) -> Weights:
    """d = trained - base, tensor by tensor, in float32 (what a device uploads)."""
    if len(trained) != len(base):
        raise ValueError(f"trained ({len(trained)} tensors) and base ({len(base)}) differ in length")
    return [np.asarray(t, np.float32) - np.asarray(b, np.float32) for t, b in zip(trained, base)]


def weighted_mean(deltas: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> Weights:
    """sum_k w_k d_k / sum_k w_k, summed in float64, returned in the first delta's dtypes."""
    if not deltas or len(deltas) != len(weights):
        raise ValueError(f"need one weight per delta and at least one delta, got {len(deltas)} and {len(weights)}")
    total = float(sum(weights))
    if not total > 0 or any(not w >= 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    sums = [np.zeros(np.shape(t), np.float64) for t in deltas[0]]
    for delta, w in zip(deltas, weights):
        for acc, t in zip(sums, delta):
            acc += float(w) * np.asarray(t, np.float64)
    return [(s / total).astype(np.asarray(t).dtype) for s, t in zip(sums, deltas[0])]


# ---------------------------------------------------------------------- server optimizers
# One pure function per optimizer and tensor, in the order and form of TFF's update (so float32
# results agree with TFF to rounding). Scalars are Python floats: numpy keeps the arrays' dtype.


def _sgd(lr: float, w: np.ndarray, g: np.ndarray) -> np.ndarray:
    return w - lr * g


def _momentum(lr: float, m: float, w: np.ndarray, a: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = m * a + g
    return w - lr * a, a


def _nesterov(lr: float, m: float, w: np.ndarray, a: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = m * a + g
    return w - lr * (g + m * a), a


def _adam(lr_t: float, b1: float, b2: float, eps: float, w: np.ndarray, a: np.ndarray, p: np.ndarray,
          g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = a + (g - a) * (1.0 - b1)
    p = p + (np.square(g) - p) * (1.0 - b2)
    return w - lr_t * a / (np.sqrt(p) + eps), a, p


def _yogi(lr_t: float, b1: float, b2: float, eps: float, w: np.ndarray, a: np.ndarray, p: np.ndarray,
          g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = a + (g - a) * (1.0 - b1)
    g2 = np.square(g)
    p = p + (1.0 - b2) * np.sign(g2 - p) * g2  # additive: p moves towards g^2 by at most (1-b2) g^2
    return w - lr_t * a / (np.sqrt(p) + eps), a, p


def _adagrad(lr: float, eps: float, w: np.ndarray, p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = p + np.square(g)
    return w - lr * g / np.sqrt(p + eps), p


def bias_corrected_lr(lr: float, beta1: float, beta2: float, step: int) -> float:
    """Adam's and Yogi's rate at step t >= 1: lr sqrt(1 - b2^t) / (1 - b1^t)."""
    return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


@dataclasses.dataclass(frozen=True)
class ServerOptimizer:
    """A server optimizer: init(weights) -> state; apply(state, weights, grads) -> (state, weights). Pure."""

    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS}, got {self.name!r}")

    @property
    def state_keys(self) -> tuple[str, ...]:
        """The per-tensor state this optimizer keeps (besides the integer "step" of adam/yogi)."""
        return {"sgd": (), "momentum": ("accumulator",), "nesterov": ("accumulator",),
                "adam": ("accumulator", "preconditioner"), "yogi": ("accumulator", "preconditioner"),
                "adagrad": ("preconditioner",)}[self.name]

    def with_lr(self, lr: float) -> "ServerOptimizer":
        """The same optimizer at learning rate `lr` (a schedule's rate for one round)."""
        return dataclasses.replace(self, lr=float(lr))

    def init(self, weights: Sequence[np.ndarray]) -> OptState:
        state: OptState = {}
        if "accumulator" in self.state_keys:
            state["accumulator"] = [np.zeros_like(w) for w in weights]
        if self.name in ("adam", "yogi"):
            state["step"] = 0
        start = {"adam": 0.0, "yogi": YOGI_INITIAL_PRECONDITIONER, "adagrad": ADAGRAD_INITIAL_PRECONDITIONER}
        if self.name in start:
            state["preconditioner"] = [np.full_like(w, start[self.name]) for w in weights]
        return state

    def apply(self, state: OptState, weights: Sequence[np.ndarray], grads: Sequence[np.ndarray]
              ) -> tuple[OptState, Weights]:
        """One step on gradient `grads`; returns (new state, new weights). Inputs are not modified."""
        if len(weights) != len(grads):
            raise ValueError(f"weights ({len(weights)} tensors) and gradients ({len(grads)}) differ in length")
        for w, g in zip(weights, grads):
            if np.shape(w) != np.shape(g):
                raise ValueError(f"weight shape {np.shape(w)} and gradient shape {np.shape(g)} differ")
        name = self.name
        if name == "sgd":
            return {}, [_sgd(self.lr, w, g) for w, g in zip(weights, grads)]
        if name in ("momentum", "nesterov"):
            leaf = _momentum if name == "momentum" else _nesterov
            out = [leaf(self.lr, self.momentum, w, a, g) for w, a, g in zip(weights, state["accumulator"], grads)]
            return {"accumulator": [a for _, a in out]}, [w for w, _ in out]
        if name in ("adam", "yogi"):
            step = int(state["step"]) + 1
            lr_t = bias_corrected_lr(self.lr, self.beta1, self.beta2, step)
            leaf3 = _adam if name == "adam" else _yogi
            out3 = [leaf3(lr_t, self.beta1, self.beta2, self.eps, w, a, p, g)
                    for w, a, p, g in zip(weights, state["accumulator"], state["preconditioner"], grads)]
            return ({"step": step, "accumulator": [a for _, a, _ in out3], "preconditioner": [p for _, _, p in out3]},
                    [w for w, _, _ in out3])
        out = [_adagrad(self.lr, self.eps, w, p, g) for w, p, g in zip(weights, state["preconditioner"], grads)]
        return {"preconditioner": [p for _, p in out]}, [w for w, _ in out]


def build_server_optimizer(hp: FedAvgHyperparams) -> ServerOptimizer:
    return ServerOptimizer(hp.server_optimizer, hp.server_lr, hp.server_momentum, hp.beta1, hp.beta2, hp.eps)


# ---------------------------------------------------------------------- server state and round


@dataclasses.dataclass(frozen=True)
class ServerState:
    """The global model, the server optimizer's state and how many server steps produced them."""

    weights: Weights
    opt_state: OptState
    round: int = 0


def server_init(weights: Sequence[np.ndarray], optimizer: ServerOptimizer) -> ServerState:
    weights = [np.asarray(w) for w in weights]
    return ServerState(weights, optimizer.init(weights), 0)


def server_update(state: ServerState, mean_delta: Sequence[np.ndarray], optimizer: ServerOptimizer,
                  schedule: LrSchedule | None = None) -> ServerState:
    """One server step: the optimizer applied to the pseudo-gradient g = -mean_delta; with `schedule`, at
    the rate of round state.round + 1 (optimizer.lr is the schedule's base rate)."""
    if schedule is not None and not schedule.is_constant:
        optimizer = optimizer.with_lr(schedule.lr_at(state.round + 1, optimizer.lr))
    grads = [-np.asarray(d, np.asarray(w).dtype) for d, w in zip(mean_delta, state.weights)]
    opt_state, weights = optimizer.apply(state.opt_state, state.weights, grads)
    return ServerState(weights, opt_state, state.round + 1)


def fedavg_round(state: ServerState, trained: Sequence[Sequence[np.ndarray]], num_examples: Sequence[int],
                 optimizer: ServerOptimizer, schedule: LrSchedule | None = None) -> ServerState:
    """A whole round from the clients' trained weights (each started from state.weights)."""
    deltas = [client_delta(t, state.weights) for t in trained]
    return server_update(state, weighted_mean(deltas, num_examples), optimizer, schedule)


# ---------------------------------------------------------------------- persistence (flat .npz dicts)


def flat_state(state: OptState) -> dict[str, np.ndarray]:
    """A one-tensor optimizer state as {key: array} (what np.savez stores); "step" as a 0-d int64."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key == "step":
            out[key] = np.array(int(value), np.int64)
        else:
            if len(value) != 1:
                raise ValueError(f"flat_state needs one tensor per key, {key!r} has {len(value)}")
            out[key] = value[0]
    return out


def unflat_state(arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> OptState:
    """flat_state's inverse for `keys` (plus "step" where present)."""
    state: OptState = {key: [np.asarray(arrays[key])] for key in keys}
    if "step" in arrays:
        state["step"] = int(np.asarray(arrays["step"]))
    return state


__all__ = [
    "ADAGRAD_INITIAL_PRECONDITIONER", "FedAvgHyperparams", "SERVER_OPTIMIZERS", "ServerOptimizer", "ServerState",
    "TASK_KEYS", "YOGI_INITIAL_PRECONDITIONER", "bias_corrected_lr", "build_server_optimizer", "client_delta",
    "fedavg_round", "flat_state", "hyperparams_from_task", "server_init", "server_update", "task_fields",
    "unflat_state", "validation_errors", "weighted_mean",
]
