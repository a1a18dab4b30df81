"""The server optimizer of the aggregation server: models/fedavg.py's optimizers on flat float64 vectors,
with their state persisted between rounds (a dict of arrays, saved as .npz by the store).

The aggregated delta d (trained minus base, averaged) is the negative pseudo-gradient g = -d, and
sgd / momentum / nesterov / adam / yogi / adagrad step on it exactly as models/fedavg.py (and TFF)
define them; sgd with lr 1 is plain FedAvg, w + d.

State files written before models/fedavg.py (keys "velocity", "m", "v") still load: they hold the
same quantities under the old names.
"""
from __future__ import annotations

import numpy as np

from models import fedavg

# Old state keys -> models/fedavg's: momentum's velocity and Adam's m are its accumulator, Adam's v its preconditioner.
_LEGACY_KEYS = {"velocity": "accumulator", "m": "accumulator", "v": "preconditioner"}


def canonical_name(name: str, nesterov: bool = False) -> str:
    """The optimizer name, with the deprecated `momentum` + nesterov flag spelled `nesterov`."""
    return "nesterov" if name == "momentum" and nesterov else name


class ServerOptimizer:
    """One server optimizer and its current state (flat arrays; empty before the first step)."""

    def __init__(self, name: str = "sgd", lr: float = 1.0, momentum: float = 0.9, nesterov: bool = False,
                 beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-3) -> None:
        self.optimizer = fedavg.ServerOptimizer(canonical_name(name, nesterov), float(lr), float(momentum),
                                                float(beta1), float(beta2), float(eps))
        self.state: dict[str, np.ndarray] = {}

    @property
    def name(self) -> str:
        return self.optimizer.name

    @classmethod
    def from_config(cls, config) -> "ServerOptimizer":
        return cls(config.server_optimizer, config.server_lr, config.server_momentum, config.nesterov,
                   config.beta1, config.beta2, config.eps)

    def state_dict(self) -> dict[str, np.ndarray]:
        out = dict(self.state)
        out["optimizer"] = np.array(self.name)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray], dim: int) -> bool:
        """Adopt saved state if it belongs to this optimizer kind and dimension; returns whether it did."""
        saved = str(state.get("optimizer", ""))
        # before `nesterov` was a name of its own it was `momentum` + a flag; the velocity is the same
        if saved != self.name and not (saved == "momentum" and self.name == "nesterov"):
            self.state = {}
            return False
        arrays = {_LEGACY_KEYS.get(k, k): np.asarray(v) for k, v in state.items() if k != "optimizer"}
        needed = set(self.optimizer.state_keys) | ({"step"} if self.name in ("adam", "yogi") else set())
        vectors = [arrays.get(k) for k in self.optimizer.state_keys]
        if set(arrays) != needed or any(v.ndim != 1 or v.size != dim for v in vectors):
            self.state = {}
            return False
        self.state = {k: (v.astype(np.int64) if k == "step" else v.astype(np.float64)) for k, v in arrays.items()}
        return True

    def reset(self) -> None:
        self.state = {}

    def step(self, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """New weights (float64) from flat float64 weights and the aggregated delta."""
        weights = np.asarray(weights, dtype=np.float64)
        delta = np.asarray(delta, dtype=np.float64)
        if weights.shape != delta.shape:
            raise ValueError(f"weights {weights.shape} and delta {delta.shape} differ")
        opt_state = (fedavg.unflat_state(self.state, self.optimizer.state_keys) if self.state
                     else self.optimizer.init([weights]))
        new = fedavg.server_update(fedavg.ServerState([weights], opt_state), [delta], self.optimizer)
        self.state = fedavg.flat_state(new.opt_state)
        return new.weights[0]


__all__ = ["ServerOptimizer", "canonical_name"]
