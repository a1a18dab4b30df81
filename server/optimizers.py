"""The server optimizer of the aggregation server: models/fedavg.py's optimizers on flat float64 vectors,
with their state persisted between rounds (a dict of arrays, saved as .npz by the store).

The aggregated delta d (trained minus base, averaged) is the negative pseudo-gradient g = -d, and
sgd / momentum / nesterov / adam / yogi / adagrad step on it exactly as models/fedavg.py (and TFF)
define them; sgd with lr 1 is plain FedAvg, w + d.

State files written before models/fedavg.py (keys "velocity", "m", "v") still load: they hold the
same quantities under the old names.

A server learning-rate schedule (--server-lr-schedule, models/lr_schedule.py) makes the rate a function of
the server step: step r (1-based) of a version lineage runs at server_lr_at(r), the function tff_sim uses.
The count lives in the optimizer state as "round" (the steps that produced the state), so it follows the
state exactly: saved with each trained version, the served version's reused after a held-back one (the
step is retried at the same r), restarted where the state is (a promoted candidate; a state saved without
a schedule, i.e. the schedule starts when it is switched on). Without a schedule no count is kept, so
sgd still keeps no state at all.
"""
from __future__ import annotations

import numpy as np

from models import fedavg
from models.lr_schedule import LrSchedule

# Old state keys -> models/fedavg's: momentum's velocity and Adam's m are its accumulator, Adam's v its preconditioner.
_LEGACY_KEYS = {"velocity": "accumulator", "m": "accumulator", "v": "preconditioner"}


def canonical_name(name: str, nesterov: bool = False) -> str:
    """The optimizer name, with the deprecated `momentum` + nesterov flag spelled `nesterov`."""
    return "nesterov" if name == "momentum" and nesterov else name


class ServerOptimizer:
    """One server optimizer and its current state (flat arrays; empty before the first step)."""

    def __init__(self, name: str = "sgd", lr: float = 1.0, momentum: float = 0.9, nesterov: bool = False,
                 beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-3, schedule: LrSchedule | None = None) -> None:
        self.optimizer = fedavg.ServerOptimizer(canonical_name(name, nesterov), float(lr), float(momentum),
                                                float(beta1), float(beta2), float(eps))
        self.schedule = schedule if schedule is not None else LrSchedule()
        self.state: dict[str, np.ndarray] = {}
        self.last_lr: float | None = None  # the rate of the last step (its round: rounds_done)

    @property
    def name(self) -> str:
        return self.optimizer.name

    @classmethod
    def from_config(cls, config) -> "ServerOptimizer":
        return cls(config.server_optimizer, config.server_lr, config.server_momentum, config.nesterov,
                   config.beta1, config.beta2, config.eps, LrSchedule.from_fields(config))

    @property
    def rounds_done(self) -> int:
        """Server steps behind the current state (counted only with a schedule; else 0)."""
        return int(self.state.get("round", 0))

    def next_lr(self) -> float:
        """The learning rate the next step will use: server_lr_at(rounds_done + 1) under the schedule."""
        return self.schedule.lr_at(self.rounds_done + 1, self.optimizer.lr)

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
        if set(arrays) - {"round"} != needed or any(v.ndim != 1 or v.size != dim for v in vectors):
            self.state = {}
            return False
        if self.schedule.is_constant:  # the count matters only to a schedule (and sgd then keeps no state)
            arrays.pop("round", None)
        self.state = {k: (v.astype(np.int64) if k in ("step", "round") else v.astype(np.float64))
                      for k, v in arrays.items()}
        return True

    def reset(self) -> None:
        self.state = {}

    def step(self, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """New weights (float64) from flat float64 weights and the aggregated delta."""
        weights = np.asarray(weights, dtype=np.float64)
        delta = np.asarray(delta, dtype=np.float64)
        if weights.shape != delta.shape:
            raise ValueError(f"weights {weights.shape} and delta {delta.shape} differ")
        has_opt_state = any(k != "round" for k in self.state)
        opt_state = (fedavg.unflat_state(self.state, self.optimizer.state_keys) if has_opt_state
                     else self.optimizer.init([weights]))
        self.last_lr = self.next_lr()
        new = fedavg.server_update(fedavg.ServerState([weights], opt_state, self.rounds_done), [delta], self.optimizer,
                                   self.schedule)
        self.state = fedavg.flat_state(new.opt_state)
        if not self.schedule.is_constant:
            self.state["round"] = np.array(new.round, np.int64)
        return new.weights[0]


__all__ = ["ServerOptimizer", "canonical_name"]
