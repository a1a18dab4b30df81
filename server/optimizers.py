"""Server optimizers (pure numpy) applied to the aggregated delta, with persistable state.

The aggregated device delta d (new local weights minus base, averaged) is treated as a negative
pseudo-gradient g = -d (Reddi et al. 2021, "Adaptive Federated Optimization"):

    sgd        w <- w - lr * g                      (lr = 1: plain FedAvg, w + d)
    momentum   v <- m v + g;  w <- w - lr * v       (nesterov: w <- w - lr * (g + m v))
    adam       m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
               w <- w - lr * m_hat / (sqrt(v_hat) + eps)   with bias correction

All arithmetic is float64; state is a dict of arrays (saved as .npz by the store).
"""
from __future__ import annotations

import numpy as np

from server.config import SERVER_OPTIMIZERS


class ServerOptimizer:
    def __init__(self, name: str = "sgd", lr: float = 1.0, momentum: float = 0.9, nesterov: bool = False,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-3) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS}, got {name!r}")
        self.name, self.lr, self.momentum, self.nesterov = name, float(lr), float(momentum), bool(nesterov)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.state: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, config) -> "ServerOptimizer":
        return cls(config.server_optimizer, config.server_lr, config.server_momentum, config.nesterov,
                   config.adam_beta1, config.adam_beta2, config.adam_eps)

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {k: v for k, v in self.state.items()}
        out["optimizer"] = np.array(self.name)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray], dim: int) -> bool:
        """Adopt saved state if it belongs to this optimizer kind and dimension; returns whether it did."""
        if str(state.get("optimizer", "")) != self.name:
            self.state = {}
            return False
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in state.items() if k != "optimizer"}
        if any(a.ndim == 1 and a.size != dim for a in arrays.values()):
            self.state = {}
            return False
        self.state = arrays
        return True

    def reset(self) -> None:
        self.state = {}

    def step(self, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """New weights (float64) from flat float64 weights and the aggregated delta."""
        weights = np.asarray(weights, dtype=np.float64)
        delta = np.asarray(delta, dtype=np.float64)
        if weights.shape != delta.shape:
            raise ValueError(f"weights {weights.shape} and delta {delta.shape} differ")
        if self.name == "sgd":
            return weights + self.lr * delta
        g = -delta
        if self.name == "momentum":
            v = self.state.get("velocity")
            v = g.copy() if v is None else self.momentum * v + g
            self.state["velocity"] = v
            direction = g + self.momentum * v if self.nesterov else v
            return weights - self.lr * direction
        # adam
        t = int(self.state.get("step", np.array(0))) + 1
        m = self.state.get("m", np.zeros_like(g))
        v = self.state.get("v", np.zeros_like(g))
        m = self.beta1 * m + (1.0 - self.beta1) * g
        v = self.beta2 * v + (1.0 - self.beta2) * (g * g)
        self.state.update(step=np.array(t), m=m, v=v)
        m_hat = m / (1.0 - self.beta1 ** t)
        v_hat = v / (1.0 - self.beta2 ** t)
        return weights - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


__all__ = ["ServerOptimizer"]
