"""Differential privacy as wrappers around a strategy (like Flower's DifferentialPrivacy*FixedClipping).

Each mechanism owns, for the rounds it wraps:
  * its clip bound and device noise (`upload_bound`: told to devices in the task, enforced on uploads),
  * its server noise (`aggregate`: central noise on the sum, before the division),
  * its privacy-ledger event (`ledger_event`: noise multiplier z and sampling probability q),
and makes the mean uniform (each device's sensitivity is the clip bound, whatever its data).
Everything else is delegated to the wrapped strategy. Noise calibration (models/dp.py), for a
cohort of min_count devices, a noise multiplier z and clip C:

    central       server adds N(0, (zC)^2) to the sum             devices clip only
    distributed   each device adds N(0, (zC)^2 / min_count)       the sum of >= min_count carries (zC)^2
    local         each device adds N(0, (zC)^2)                    every upload is private on its own

A new mechanism (e.g. DP-FTRL's tree aggregation) is one more subclass here and one entry in
server/strategy/factory.py.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from models import dp
from server.round import Round, TrainParams
from server.strategy.base import Aggregate, DecodedUpdate, LedgerEvent, RoundContext, Strategy, UploadBound


class DPStrategy(Strategy):
    """A DP mechanism around `inner`: overrides the privacy hooks, delegates the rest."""

    # whose uploads the server may see one by one: the note of the per-upload (local) epsilon report
    device_view_note = ""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    @property
    def name(self) -> str:  # type: ignore[override]  # the outcome's "aggregator" is the inner strategy's
        return self.inner.name

    # ------------------------------------------------------------------ the mechanism's own hooks
    def device_noise_stddev(self, params: TrainParams) -> float:
        return 0.0

    def server_noise_stddev(self, params: TrainParams) -> float:
        return 0.0

    def upload_bound(self, params: TrainParams) -> UploadBound:
        return UploadBound(params.clip_norm, self.device_noise_stddev(params), params.norm_sigmas)

    def weight(self, params: TrainParams, num_examples: int) -> float:
        return 1.0

    def aggregate(self, state: Any, rows: list[dict[str, Any]], rnd: Round, ctx: RoundContext) -> Aggregate:
        agg = self.inner.aggregate(state, rows, rnd, ctx)
        noise = self.server_noise_stddev(rnd.train)
        if noise > 0:
            # Seeded by the round's secret seed (kept in the database, never served): a re-run after a
            # crash draws the same noise instead of releasing a second noisy sum.
            rng = np.random.default_rng([int(rnd.seed), int(rnd.id)])
            agg = Aggregate(agg.total + rng.standard_normal(ctx.dim) * noise, agg.divisor)
        return agg

    def ledger_event(self, params: TrainParams, n_aggregated: int, population: int) -> LedgerEvent:
        return LedgerEvent(float(params.noise_multiplier), min(1.0, n_aggregated / max(population, 1)))

    # ------------------------------------------------------------------ delegated to the wrapped strategy
    def protocol_task(self, rnd: Round, bound: UploadBound | None) -> dict[str, Any] | None:
        return self.inner.protocol_task(rnd, bound)

    def admission_open(self, rnd: Round) -> bool:
        return self.inner.admission_open(rnd)

    def may_reanswer(self, rnd: Round, device_id: str) -> bool:
        return self.inner.may_reanswer(rnd, device_id)

    def runs_own_deadlines(self, rnd: Round) -> bool:
        return self.inner.runs_own_deadlines(rnd)

    def protocol_summary(self, rnd: Round) -> dict[str, Any] | None:
        return self.inner.protocol_summary(rnd)

    def decode(self, body: bytes, rnd: Round, ctx: RoundContext) -> DecodedUpdate:
        return self.inner.decode(body, rnd, ctx)

    def new_state(self, dim: int) -> Any:
        return self.inner.new_state(dim)

    def rebuild(self, rows: list[dict[str, Any]], ctx: RoundContext) -> Any:
        return self.inner.rebuild(rows, ctx)

    def accept(self, state: Any, update: DecodedUpdate, weight: float) -> None:
        self.inner.accept(state, update, weight)


class CentralDP(DPStrategy):
    """Devices clip; the server adds N(0, (zC)^2) to the sum. Needs a strategy that releases a sum."""

    mechanism = "central"

    def __init__(self, inner: Strategy) -> None:
        if not inner.releases_sum:
            raise ValueError(f"central noise is calibrated to a sum: it cannot wrap {inner.name!r}")
        super().__init__(inner)

    def server_noise_stddev(self, params: TrainParams) -> float:
        return float(params.noise_multiplier * params.clip_norm)


class DistributedDP(DPStrategy):
    """Each device adds N(0, (zC)^2 / min_count); only the (securely aggregated) sum is private."""

    mechanism = "distributed"
    device_view_note = ("what a server that saw one unmasked upload could claim: distributed noise relies on "
                        "secure aggregation")

    def device_noise_stddev(self, params: TrainParams) -> float:
        return float(params.noise_multiplier * params.clip_norm / math.sqrt(max(1, params.min_count)))


class LocalDP(DPStrategy):
    """Each device adds the full N(0, (zC)^2): every upload is private on its own."""

    mechanism = "local"
    device_view_note = "the guarantee of local mode"

    def device_noise_stddev(self, params: TrainParams) -> float:
        return float(params.noise_multiplier * params.clip_norm)


def device_view_epsilon(strategy: Strategy, params: TrainParams, delta: float) -> dict[str, Any]:
    """What one device's single upload reveals to whoever sees it alone (no sampling amplification).

    Sensitivity in the local model is 2C (replace one clipped update by any other), so one upload with
    device noise sigma is a Gaussian mechanism with multiplier sigma / (2C). Empty for mechanisms
    without device noise."""
    if not isinstance(strategy, DPStrategy) or params.clip_norm <= 0 or params.noise_multiplier <= 0:
        return {}
    stddev = strategy.device_noise_stddev(params)
    if stddev <= 0:
        return {}
    z_local = stddev / (2.0 * params.clip_norm)
    try:
        eps1 = dp.epsilon(z_local, 1.0, 1, delta, "rdp")
        eps10 = dp.epsilon(z_local, 1.0, 10, delta, "rdp")
    except Exception:  # noqa: BLE001 - a report, never a failure
        eps1 = eps10 = math.inf
    return {"device_noise_stddev": stddev, "local_noise_multiplier": z_local,
            "local_epsilon_per_upload": eps1, "local_epsilon_10_uploads": eps10,
            "local_epsilon_note": "per device, from its own uploads alone (no sampling amplification); "
                                  + strategy.device_view_note}


__all__ = ["DPStrategy", "CentralDP", "DistributedDP", "LocalDP", "device_view_epsilon"]
