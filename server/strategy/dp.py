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

    ftrl          server adds the residual of DP-FTRL's tree noise  devices clip only; each node of the
                  (models/dp_ftrl.py, nodes N(0, (zC)^2)) to the sum   tree is released once (FtrlDP below)

A new mechanism is one more subclass here and one entry in server/strategy/factory.py.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import numpy as np

from models import dp
from server.round import Round, TrainParams
from server.strategy.base import Aggregate, DecodedUpdate, LedgerEvent, RoundContext, Strategy, UploadBound


class FtrlTree(Protocol):
    """DP-FTRL's durable noise tree and participation record (server/ftrl.py), as FtrlDP sees it."""

    def noise(self, rnd: Round, dim: int) -> tuple[np.ndarray, Any]:
        """(the residual noise of the round's leaf, float32; the pending next tree state), writing nothing
        the database points at: a re-run after a crash draws the same noise."""
        ...

    def commit(self, pending: Any, round_id: int, device_ids: list[str]) -> Callable[[], None]: ...
    def refusal(self, rnd: Round, device_id: str) -> tuple[str, float] | None: ...


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

    def admission_refusal(self, rnd: Round, device_id: str) -> tuple[str, float] | None:
        return self.inner.admission_refusal(rnd, device_id)

    def commit_release(self, round_id: int, device_ids: list[str]) -> Callable[[], None] | None:
        return self.inner.commit_release(round_id, device_ids)

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


class FtrlDP(DPStrategy):
    """Central DP-FTRL (Kairouz et al. 2021): devices clip; the server adds the residual of the tree noise
    (models/dp_ftrl.py: tree_cumsum_t - tree_cumsum_{t-1}, nodes N(0, (zC)^2)) to the round's sum, so the
    released models are FTRL over the noised cumulative sums. The noise goes on sum(base - trained), TFF's
    sign, so the server's pseudo-gradient equals models.dp_ftrl.aggregate's noised sum. The tree lives in
    `tree` (server/ftrl.py), persisted with the round's close; admission enforces the participation rule
    the accountant assumes (TrainParams.ftrl)."""

    mechanism = "ftrl"

    def __init__(self, inner: Strategy, tree: FtrlTree | None) -> None:
        if not inner.releases_sum:
            raise ValueError(f"DP-FTRL noise is calibrated to a sum: it cannot wrap {inner.name!r}")
        if tree is None:
            raise RuntimeError("dp_mode ftrl needs the server's DP-FTRL tree store")
        super().__init__(inner)
        self.tree = tree
        self._pending: Any = None

    def aggregate(self, state: Any, rows: list[dict[str, Any]], rnd: Round, ctx: RoundContext) -> Aggregate:
        agg = self.inner.aggregate(state, rows, rnd, ctx)
        residual, self._pending = self.tree.noise(rnd, ctx.dim)
        return Aggregate(agg.total - residual.astype(np.float64), agg.divisor)

    def admission_refusal(self, rnd: Round, device_id: str) -> tuple[str, float] | None:
        return self.tree.refusal(rnd, device_id) or self.inner.admission_refusal(rnd, device_id)

    def commit_release(self, round_id: int, device_ids: list[str]) -> Callable[[], None] | None:
        if self._pending is None:
            raise RuntimeError("commit_release before aggregate")
        return self.tree.commit(self._pending, round_id, device_ids)

    def ledger_event(self, params: TrainParams, n_aggregated: int, population: int) -> LedgerEvent:
        return LedgerEvent(float(params.noise_multiplier), min(1.0, n_aggregated / max(population, 1)), params.ftrl)


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


__all__ = ["DPStrategy", "CentralDP", "FtrlDP", "FtrlTree", "DistributedDP", "LocalDP", "device_view_epsilon"]
