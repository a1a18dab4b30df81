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

Cohort selection of DP-FedAvg (central, distributed, local; TrainParams.selection_q, --selection-q q).
The accountant composes Poisson-subsampled Gaussians (models/dp.py); amplification by sampling needs the
cohort to be a Poisson sample, drawn before and independently of check-in, eligibility and data. So:

  * with selection_q, device d is in round r's cohort iff HMAC-SHA256(key_r, d) / 2^256 < q
    (models.dp.poisson_selected), key_r from the round's secret seed (rounds.seed: drawn with `secrets` at
    round creation, kept in the database, never served). `admission_refusal` turns every other device away
    with retry reason "not_selected" until the round is expected to end; the ledger event has q.
  * the draw is the cohort: config.round_params freezes goal = max_admitted = "uncapped", so no device is
    kept out because others checked in first, and the round aggregates at its deadline (>= min_count
    uploads). A cap or an early close at a goal would let one device's presence displace another's update
    (add/remove sensitivity 2C, not C). With selection_max_cohort (needed by secure aggregation) the cap
    exists and the ledger event says so: sensitivity 2, i.e. noise multiplier z / 2 for the accountant.
  * without selection_q nothing is sampled: the ledger event has q = 1, every device assumed in every round
    (no amplification), and the report says so.

Assumptions the accounting does not cover (documented, not enforced): whether a round is released at all
(>= min_count uploads) and the mean's divisor (the number of uploads) are treated as public.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from models import dp, dp_ftrl
from server.round import FtrlRule, Round, TrainParams, parse_params
from server.strategy.base import Aggregate, DecodedUpdate, LedgerEvent, RoundContext, Strategy, UploadBound


class FtrlTree(Protocol):
    """DP-FTRL's durable noise tree and participation record (server/ftrl.py), as FtrlDP sees it."""

    def noise(self, rnd: Round, dim: int, below: float = 0.0, count: int = 1) -> tuple[np.ndarray, Any]:
        """(the residual noise of the round's leaf, float32; the pending next tree state), writing nothing
        the database points at: a re-run after a crash draws the same noise. `below` / `count`: adaptive
        clipping's count of updates below the estimate (sum of bit - 1/2) and the number of updates."""
        ...

    def commit(self, pending: Any, round_id: int, device_ids: list[str]) -> Callable[[], None]: ...
    def current(self, p: TrainParams) -> tuple[float, float | None]: ...
    def refusal(self, rnd: Round, device_id: str) -> tuple[str, float] | None: ...


NOT_SELECTED = "not_selected"


def _metric(row: dict[str, Any], name: str) -> Any:
    """One value of an update row's metrics (JSON text in the database, a dict in memory), or None."""
    metrics = row.get("metrics") or {}
    if isinstance(metrics, str):
        metrics = json.loads(metrics)
    return metrics.get(name) if isinstance(metrics, dict) else None
SELECTION_DOMAIN = b"fk-dp-fedavg-selection\0"


def selection_key(rnd: Round) -> bytes:
    """The HMAC key of a round's cohort draw: from its secret seed (never served) and its id."""
    return SELECTION_DOMAIN + int(rnd.seed).to_bytes(8, "big") + int(rnd.id).to_bytes(8, "big")


def selected(rnd: Round, device_id: str) -> bool:
    """Whether `device_id` is in the round's cohort (always, without selection_q)."""
    q = rnd.train.selection_q
    return q is None or dp.poisson_selected(selection_key(rnd), device_id, float(q))


def round_end_wait(rnd: Round, now: float | None = None) -> float:
    """Seconds until the round is expected to end (its deadline; before the first admission, a full
    deadline), divided by 0.8 so that the round manager's -20% jitter still lands after it."""
    now = time.time() if now is None else now
    remaining = rnd.deadline - now if rnd.deadline is not None else rnd.params.deadline_s
    return max(0.0, remaining) / 0.8


def ftrl_rule_clause(rule: FtrlRule) -> str:
    """DP-FTRL's participation rule (what admission enforces and the accountant assumes) as a clause."""
    if rule.rule == "restart":
        return (f"each device in at most one round per {rule.restart_rounds}-round period (admission enforces it; "
                "the noise tree restarts after every period)")
    return (f"each device in at most {rule.max_participations} round(s), at least {rule.min_separation} released "
            "rounds strictly between two of them (admission enforces it; one tree, no restarts)")


def ftrl_assumptions(rule: FtrlRule, secure_aggregation: str = "none") -> list[str]:
    """What DP-FTRL's guarantee assumes (models.dp.guarantee_sentence's clauses). With secure aggregation the
    server sees only the round's sum, but it still adds the noise: the guarantee trusts it to do so."""
    seen = ("sees only the securely aggregated sum of the clipped updates" if secure_aggregation != "none"
            else "sees each clipped update")
    return [ftrl_rule_clause(rule), f"a trusted server that {seen} and adds the tree noise with a secret seed",
            "no amplification by sampling"]


def selection_clauses(sampling_probs: Iterable[float], cap: int | None = None) -> list[str]:
    """How DP-FedAvg's rounds drew their cohorts (q = 1: no draw), as guarantee clauses."""
    qs = sorted({float(q) for q in sampling_probs})
    out = []
    if any(q >= 1.0 for q in qs):
        out.append("every device in every round" + (" without a draw" if len(qs) > 1 else "")
                   + " (the server draws no random cohort, so no amplification by sampling)")
    sampled = [q for q in qs if q < 1.0]
    if sampled:
        out.append("each round's cohort is a secret random draw, each device in it with probability "
                   + " or ".join(f"{q:.3g}" for q in sampled) + " whatever it does, the draw never revealed"
                   + (f", at most {cap} devices admitted (accounted at twice the sensitivity)" if cap else ""))
    return out


class DPStrategy(Strategy):
    """A DP mechanism around `inner`: overrides the privacy hooks, delegates the rest."""

    # whose uploads the server may see one by one: the note of the per-upload (local) epsilon report
    device_view_note = ""
    # DP-FedAvg's cohort draw (selection_q) applies; DP-FTRL has its own participation rule instead
    draws_cohort = True
    # who is trusted with what: the first clause of the guarantee's assumptions
    trust = ""

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
        """(z, q): q = selection_q with a draw, else 1 (no amplification); sensitivity 2 under a cohort cap."""
        if params.selection_q is None:
            return LedgerEvent(float(params.noise_multiplier), 1.0)
        return LedgerEvent(float(params.noise_multiplier), float(params.selection_q),
                           sensitivity=2.0 if params.selection_max_cohort is not None else 1.0)

    def admission_refusal(self, rnd: Round, device_id: str) -> tuple[str, float] | None:
        """Devices outside the round's secret draw come back when it is expected to end."""
        if self.draws_cohort and not selected(rnd, device_id):
            return NOT_SELECTED, round_end_wait(rnd)
        return self.inner.admission_refusal(rnd, device_id)

    def assumptions(self, params: TrainParams) -> list[str]:
        trust = self.trust_clause(params)
        q = 1.0 if params.selection_q is None else float(params.selection_q)
        return ([trust] if trust else []) + selection_clauses([q], params.selection_max_cohort)

    def trust_clause(self, params: TrainParams) -> str:
        return self.trust

    # ------------------------------------------------------------------ delegated to the wrapped strategy
    def open_params(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.inner.open_params(params)

    def protocol_task(self, rnd: Round, bound: UploadBound | None) -> dict[str, Any] | None:
        return self.inner.protocol_task(rnd, bound)

    def admission_open(self, rnd: Round) -> bool:
        return self.inner.admission_open(rnd)

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
    trust = "a trusted server that sees each clipped update and adds the noise with a secret seed"

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
    draws_cohort = False

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
        below = dp_ftrl.below_count(_metric(row, dp_ftrl.BELOW_ESTIMATE_METRIC) for row in rows) \
            if rnd.train.ftrl_adaptive_clip else 0.0
        residual, self._pending = self.tree.noise(rnd, ctx.dim, below, len(rows))
        return Aggregate(agg.total - residual.astype(np.float64), agg.divisor)

    def open_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """With adaptive clipping: the tree's clip in use and quantile estimate (changed only between rounds)."""
        params = self.inner.open_params(params)
        if not params.get("ftrl_adaptive_clip"):
            return params
        clip, estimate = self.tree.current(parse_params("train", params))  # type: ignore[arg-type]
        return {**params, "clip_norm": clip, "clip_estimate": estimate}

    def admission_refusal(self, rnd: Round, device_id: str) -> tuple[str, float] | None:
        return self.tree.refusal(rnd, device_id) or self.inner.admission_refusal(rnd, device_id)

    def commit_release(self, round_id: int, device_ids: list[str]) -> Callable[[], None] | None:
        if self._pending is None:
            raise RuntimeError("commit_release before aggregate")
        return self.tree.commit(self._pending, round_id, device_ids)

    def ledger_event(self, params: TrainParams, n_aggregated: int, population: int) -> LedgerEvent:
        # q is not used by DP-FTRL's accounting (no sampling): 1, like DP-FedAvg without a draw
        return LedgerEvent(float(params.noise_multiplier), 1.0, params.ftrl)

    def assumptions(self, params: TrainParams) -> list[str]:
        clauses = ftrl_assumptions(params.ftrl, params.secure_aggregation)
        if params.ftrl_adaptive_clip:
            clauses.append("the clip adapts to a quantile of the update norms from one bit per device (norm below "
                           "the estimate), counted with tree noise within the same noise multiplier")
        return clauses


class DistributedDP(DPStrategy):
    """Each device adds N(0, (zC)^2 / min_count); only the (securely aggregated) sum is private."""

    mechanism = "distributed"
    device_view_note = ("what a server that saw one unmasked upload could claim: distributed noise relies on "
                        "secure aggregation")

    def device_noise_stddev(self, params: TrainParams) -> float:
        return float(params.noise_multiplier * params.clip_norm / math.sqrt(max(1, params.min_count)))

    def trust_clause(self, params: TrainParams) -> str:
        if params.secure_aggregation != "none":
            return (f"the server sees only the securely aggregated sum of at least {params.min_count} noised "
                    "updates")
        return (f"only the released models are seen (without secure aggregation the server sees each upload, "
                f"whose own guarantee is the per-upload epsilon), at least {params.min_count} updates per round")


class LocalDP(DPStrategy):
    """Each device adds the full N(0, (zC)^2): every upload is private on its own."""

    mechanism = "local"
    device_view_note = "the guarantee of local mode"
    trust = "updates noised on each device (what one upload reveals on its own is the per-upload epsilon)"

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


__all__ = ["DPStrategy", "CentralDP", "FtrlDP", "FtrlTree", "DistributedDP", "LocalDP", "device_view_epsilon",
           "NOT_SELECTED", "selection_key", "selected", "round_end_wait", "ftrl_rule_clause",
           "ftrl_assumptions", "selection_clauses"]
