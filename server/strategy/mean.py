"""The aggregation strategies themselves: streaming mean, robust (trimmed mean / median), secure sum.

None of them knows about differential privacy: the DP wrappers (server/strategy/dp.py) set the clip
bound and device noise, make the mean uniform, add server noise and record the ledger event.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from server.aggregation import MeanAccumulator, coordinate_median, trimmed_mean
from server.errors import Rejection
from server.round import Round, TrainParams
from server.strategy.base import Aggregate, DecodedUpdate, RoundContext, SecureProtocol, Strategy, UploadBound


class StreamingMean(Strategy):
    """Example-weighted mean of the accepted deltas, accumulated as they arrive (one float64 sum)."""

    name = "mean"
    releases_sum = True

    def weight(self, params: TrainParams, num_examples: int) -> float:
        return float(num_examples)

    def new_state(self, dim: int) -> MeanAccumulator:
        return MeanAccumulator(dim)

    def accept(self, state: MeanAccumulator, update: DecodedUpdate, weight: float) -> None:
        state.add(update.tensors, weight)

    def rebuild(self, rows: list[dict[str, Any]], ctx: RoundContext) -> MeanAccumulator:
        """Replay stored updates in acceptance order (bit-identical to the live sum)."""
        acc = MeanAccumulator(ctx.dim)
        for row in rows:
            acc.add(ctx.open_update(row["file"]), row["weight"])
        return acc

    def aggregate(self, state, rows, rnd, ctx) -> Aggregate:
        if state is None or state.count != len(rows):
            state = self.rebuild(rows, ctx)
        if state.count == 0:
            raise ValueError("no updates to average")
        return Aggregate(state.sum, state.total_weight)


class Robust(Strategy):
    """Coordinate-wise trimmed mean or median over the memory-mapped stored updates (uniform weights)."""

    def __init__(self, method: str) -> None:
        if method not in ("trimmed_mean", "median"):
            raise ValueError(f"unknown robust method {method!r}")
        self.name = method

    def aggregate(self, state, rows, rnd, ctx) -> Aggregate:
        updates = [ctx.open_update(row["file"]) for row in rows]
        if self.name == "median":
            return Aggregate(coordinate_median(updates), 1.0)
        return Aggregate(trimmed_mean(updates, rnd.train.trim_fraction), 1.0)


class SecureSum(Strategy):
    """Secure aggregation (SecAgg or Paillier): the server never holds individual updates, only the sum
    the protocol releases; the mean is uniform (sum / contributors). Uploads arrive through the
    protocol's own endpoints, not decode_upload; admission and deadlines follow the protocol's rules."""

    releases_sum = True

    def __init__(self, protocol_name: str, protocol: SecureProtocol) -> None:
        self.name = f"mean+{protocol_name}"
        self.protocol_name = protocol_name
        self.protocol = protocol

    def protocol_task(self, rnd: Round, bound: UploadBound | None) -> dict[str, Any]:
        if bound is None:
            raise ValueError("secure aggregation needs bounded (clipped) updates")
        return self.protocol.task_params(rnd, bound)

    def admission_open(self, rnd: Round) -> bool:
        return self.protocol.admission_open(rnd)

    def may_reanswer(self, rnd: Round, device_id: str) -> bool:
        return self.protocol.may_reanswer(rnd, device_id)

    def runs_own_deadlines(self, rnd: Round) -> bool:
        return self.protocol.runs_own_deadlines

    def protocol_summary(self, rnd: Round) -> dict[str, Any] | None:
        return self.protocol.summary(rnd.id)

    def decode(self, body, rnd, ctx) -> DecodedUpdate:
        raise Rejection("wrong_protocol", f"round {rnd.id} uses secure aggregation "
                                          f"({self.protocol_name}): upload through its endpoints")

    def aggregate(self, state, rows, rnd, ctx) -> Aggregate:
        total = np.asarray(self.protocol.result_sum(rnd.id), dtype=np.float64)
        return Aggregate(total, max(1, len(rows)))


__all__ = ["StreamingMean", "Robust", "SecureSum"]
