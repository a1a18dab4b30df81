"""A round as the code sees it: typed, immutable, built from its database row in one place.

The rounds table stores the parameters frozen at creation as JSON (ServerConfig.round_params /
eval_params). `Round.from_row` parses that row once; everything else reads attributes. Rounds are
snapshots: a state change is a database write followed by a fresh `Db.get_round`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from models.dp_ftrl import adaptive_value_noise_multiplier


@dataclasses.dataclass(frozen=True)
class CohortParams:
    """What every round kind has: its cohort size and deadline."""

    goal: int
    min_count: int
    max_admitted: int
    deadline_s: float


@dataclasses.dataclass(frozen=True)
class FtrlRule:
    """DP-FTRL's participation rule: what admission enforces (server/ftrl.py) and the accountant assumes
    (models.dp.ftrl_epsilon). Rounds are counted in released rounds (leaves of the noise tree)."""

    rule: str  # restart | min_separation (models.dp.FTRL_RULES)
    restart_rounds: int  # restart: K, each device in at most one round per K-round period; tree restarted
    min_separation: int  # min_separation: rounds strictly between two rounds of a device (one tree)
    max_participations: int  # min_separation: rounds a device may ever take part in

    @property
    def restart_period(self) -> int | None:
        return self.restart_rounds if self.rule == "restart" else None

    def epsilon_args(self) -> dict[str, int]:
        """models.dp.ftrl_epsilon's rule arguments."""
        if self.rule == "restart":
            return {"rounds_per_epoch": self.restart_rounds}
        return {"min_separation": self.min_separation, "max_participations": self.max_participations}


@dataclasses.dataclass(frozen=True)
class TrainParams(CohortParams):
    """A training round's frozen configuration. Defaults cover rows written before a key existed."""

    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 0.5
    dp_mode: str = "none"
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    aggregator: str = "mean"
    trim_fraction: float = 0.1
    norm_sigmas: float = 6.0
    max_examples_per_update: int = 100_000
    upload_dtypes: tuple[str, ...] = ("float32",)
    secure_aggregation: str = "none"
    secagg_threshold: float = 2 / 3
    secagg_neighbors: int = 0
    secagg_bits: int = 32
    secagg_headroom_bits: int = 8
    secagg_stage_s: float = 60.0
    secagg_min_participants: int = 3
    paillier_value_bits: int = 24
    ftrl_rule: str = "restart"  # dp_mode ftrl: the participation rule (server/ftrl.py)
    ftrl_restart_rounds: int = 10
    ftrl_min_separation: int = 0
    ftrl_max_participations: int = 1
    ftrl_efficient: bool = True
    # dp_mode ftrl with adaptive clipping (server/ftrl.py, models.dp_ftrl.advance): the clip in use
    # (clip_norm, changed only at tree restarts) and the quantile estimate devices compare their update's norm
    # with (clip_estimate) are the tree's at the round's creation; ftrl_initial_clip is the configured clip
    ftrl_adaptive_clip: bool = False
    ftrl_target_quantile: float = 0.5
    ftrl_clip_lr: float = 0.2
    ftrl_clip_count_stddev: float = 0.0
    ftrl_initial_clip: float | None = None
    clip_estimate: float | None = None
    # DP-FedAvg's secret Poisson selection (server/strategy/dp.py): each device in the round's cohort with
    # probability selection_q (None: no selection, accounted without amplification); selection_max_cohort:
    # the cap on that cohort, if any (then one device may displace another: sensitivity 2C)
    selection_q: float | None = None
    selection_max_cohort: int | None = None

    @property
    def ftrl(self) -> FtrlRule:
        return FtrlRule(self.ftrl_rule, self.ftrl_restart_rounds, self.ftrl_min_separation,
                        self.ftrl_max_participations)

    @property
    def value_noise_multiplier(self) -> float:
        """The noise multiplier on the updates: all of z, or with adaptive clipping what the count leaves
        (models.dp_ftrl.adaptive_value_noise_multiplier: values and count together are a z-mechanism)."""
        if not self.ftrl_adaptive_clip:
            return float(self.noise_multiplier)
        return adaptive_value_noise_multiplier(float(self.noise_multiplier), float(self.ftrl_clip_count_stddev))


@dataclasses.dataclass(frozen=True)
class EvalParams(CohortParams):
    promotion_tolerance: float = 0.0
    promotion_loss_tolerance: float | None = None


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    # Unknown keys are kept in Round.params_dict (reports show them) but have no typed field.
    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: v for k, v in data.items() if k in names}
    if "upload_dtypes" in out:
        out["upload_dtypes"] = tuple(out["upload_dtypes"])
    if out.get("secure_aggregation") is None and "secure_aggregation" in out:
        out["secure_aggregation"] = "none"
    return out


def parse_params(kind: str, data: Mapping[str, Any]) -> TrainParams | EvalParams:
    cls = TrainParams if kind == "train" else EvalParams
    return cls(**_known(cls, data))


@dataclasses.dataclass(frozen=True)
class Round:
    id: int
    kind: str  # train | eval
    state: str  # open | aggregating | closed | abandoned
    base_version: int
    candidate_version: int | None
    created_at: float
    deadline: float | None  # set by the first admission
    closed_at: float | None
    params: TrainParams | EvalParams
    params_dict: dict[str, Any] = dataclasses.field(repr=False, compare=False)  # as stored (shared: do not mutate)
    seed: int = 0  # secret: seeds the round's central noise, never served
    result_version: int | None = None
    noise_multiplier: float | None = None
    sampling_prob: float | None = None
    population: int | None = None
    epsilon: float | None = None
    delta: float | None = None
    outcome: dict[str, Any] | None = None
    # counts some queries join in (Db.list_rounds); None: not fetched
    n_admitted: int | None = None
    n_updates: int | None = None
    n_reports: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Round":
        """The one place a rounds-table row becomes a Round."""
        params = json.loads(row["params"]) if row.get("params") else {}
        outcome = json.loads(row["outcome"]) if row.get("outcome") else None
        return cls(
            id=int(row["id"]), kind=row["kind"], state=row["state"], base_version=row["base_version"],
            candidate_version=row["candidate_version"], created_at=row["created_at"], deadline=row["deadline"],
            closed_at=row["closed_at"], params=parse_params(row["kind"], params), params_dict=params,
            seed=int(row["seed"]), result_version=row["result_version"], noise_multiplier=row["noise_multiplier"],
            sampling_prob=row["sampling_prob"], population=row["population"], epsilon=row["epsilon"],
            delta=row["delta"], outcome=outcome, n_admitted=row.get("n_admitted"), n_updates=row.get("n_updates"),
            n_reports=row.get("n_reports"),
        )

    @property
    def train(self) -> TrainParams:
        """The parameters of a training round (a programming error on an evaluation round)."""
        if not isinstance(self.params, TrainParams):
            raise TypeError(f"round {self.id} is a {self.kind} round")
        return self.params

    @property
    def protocol(self) -> str:
        """The secure-aggregation protocol of a training round ("none" for plain and evaluation rounds)."""
        return self.params.secure_aggregation if isinstance(self.params, TrainParams) else "none"

    @property
    def is_over(self) -> bool:
        return self.state in ("closed", "abandoned")

    def past_deadline(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


__all__ = ["CohortParams", "FtrlRule", "TrainParams", "EvalParams", "Round", "parse_params"]
