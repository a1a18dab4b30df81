"""Privacy accounting of a DP-FedAvg run, via models.dp (dp_accounting RDP and PLD).

Each round is one Poisson-subsampled Gaussian mechanism with noise multiplier z and
sampling probability q = clients_per_round / population; after r rounds the run is
(epsilon_r, delta)-DP at the user level. With --sampling poisson (the default with DP)
that is exactly how clients are sampled; --sampling uniform (a fixed-size cohort) is
accounted with the same Poisson formula, the usual approximation (McMahan et al. 2018),
and the run's guarantee sentence says so.

DP-FTRL (--dp-mechanism dp-ftrl; models/dp_ftrl.py) is accounted by models.dp.ftrl_epsilon under
exactly the participation rule tff_sim/sampling.py enforces, with K = population // m:
  --ftrl-restart epoch  each client at most once per epoch of K rounds, tree restarted after every
                        epoch: one SingleEpochTreeAggregationDpEvent(z, K) per epoch (RDP with
                        REPLACE_SPECIAL), the last possibly partial.
  --ftrl-restart none   one tree, each client every K rounds exactly: min separation K - 1,
                        at most ceil(rounds / K) participations (Kairouz et al. App. D.2).
delta defaults to 1e-6 (models.dp.DEFAULT_DELTA) for both; `PrivacyPlan.guarantee` words the result with
models.dp.guarantee_sentence, the sentence the server and the device use too.
"""
from __future__ import annotations

import dataclasses
import math

from models import dp
from tff_sim.config import SimConfig
from tff_sim.sampling import rounds_per_epoch, sampling_probability

DEFAULT_NOISE_MULTIPLIER = 1.0
# Calibration uses RDP: dp_accounting's PLD needs a very fine grid for small noise multipliers
# (it tried to allocate 38 GiB at z = 0.001 in the bisection of models.dp), and RDP's epsilon
# is an upper bound on PLD's, so a noise multiplier calibrated by RDP also meets the target under PLD.
CALIBRATION_ACCOUNTANT = "rdp"


@dataclasses.dataclass
class PrivacyPlan:
    noise_multiplier: float
    sampling_prob: float
    delta: float
    rounds: int
    population: int
    accountants: tuple[str, ...]
    calibrated_for: float | None = None  # target epsilon, when the noise was calibrated
    mechanism: str = "dp-fedavg"
    ftrl_rule: str | None = None  # dp-ftrl: "restart" (per epoch) or "min_separation" (models.dp.FTRL_RULES)
    rounds_per_epoch: int | None = None  # dp-ftrl: K = population // clients_per_round
    sampling: str = "poisson"  # how the run sampled clients (SimConfig.sampling_mode)

    @property
    def ftrl_rule_args(self) -> dict[str, int]:
        """models.dp.ftrl_epsilon's arguments for this run's participation rule."""
        assert self.rounds_per_epoch is not None
        if self.ftrl_rule == "restart":
            return {"rounds_per_epoch": self.rounds_per_epoch}
        return {"min_separation": self.rounds_per_epoch - 1}

    @property
    def restart_period(self) -> int | None:
        """Rounds between tree restarts (DP-FTRL with per-epoch restarts), else None."""
        return self.rounds_per_epoch if self.ftrl_rule == "restart" else None

    def epsilon(self, rounds_done: int) -> dict[str, float]:
        """{accountant: epsilon after rounds_done rounds}."""
        if self.mechanism == "dp-ftrl":
            return {
                acc: dp.ftrl_epsilon(self.noise_multiplier, rounds_done, self.delta, rule=self.ftrl_rule or "restart",
                                     accountant=acc, **self.ftrl_rule_args)
                for acc in self.accountants
            }
        return {
            acc: dp.epsilon(self.noise_multiplier, self.sampling_prob, rounds_done, self.delta, accountant=acc)
            for acc in self.accountants
        }

    def assumptions(self) -> list[str]:
        """What the run's guarantee assumes (models.dp.guarantee_sentence's clauses)."""
        if self.mechanism == "dp-ftrl":
            rule = (f"each client in at most one round per epoch of {self.rounds_per_epoch} rounds, the tree "
                    "restarted every epoch" if self.ftrl_rule == "restart" else
                    f"each client once every {self.rounds_per_epoch} rounds, one tree")
            return [rule, "no amplification by sampling", "noise unknown to whoever sees the models"]
        how = (f"each round's clients drawn independently with probability {self.sampling_prob:.3g}"
               if self.sampling == "poisson" else
               f"fixed-size cohorts ({self.sampling} sampling) accounted as Poisson sampling with q = "
               f"{self.sampling_prob:.3g}, the usual approximation rather than a proof")
        return [how, "noise unknown to whoever sees the models"]

    def guarantee(self, rounds_done: int, accountant: str | None = None) -> str:
        """The run's guarantee after `rounds_done` rounds, in one sentence (models.dp.guarantee_sentence)."""
        acc = accountant or self.accountants[0]
        mechanism = "dp-ftrl" if self.mechanism == "dp-ftrl" else "dp-fedavg"
        eps = dataclasses.replace(self, accountants=(acc,)).epsilon(rounds_done)[acc]
        return dp.guarantee_sentence(mechanism, eps, self.delta, acc, "client", rounds_done,
                                     sampling_probs=[self.sampling_prob] if mechanism == "dp-fedavg" else (),
                                     assumptions=self.assumptions())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan(cfg: SimConfig, population: int) -> PrivacyPlan | None:
    """The noise multiplier (given, calibrated or default), q and delta of a DP run; None without DP."""
    if not cfg.dp:
        return None
    if cfg.dp_mechanism == "dp-ftrl":
        return _ftrl_plan(cfg, population)
    q = sampling_probability(cfg.clients_per_round, population)
    delta = cfg.delta if cfg.delta is not None else dp.DEFAULT_DELTA
    if cfg.target_epsilon is not None:
        z = dp.calibrate_noise_multiplier(cfg.target_epsilon, q, cfg.rounds, delta, accountant=CALIBRATION_ACCOUNTANT)
    elif cfg.noise_multiplier is not None:
        z = cfg.noise_multiplier
    else:
        z = DEFAULT_NOISE_MULTIPLIER
    return PrivacyPlan(
        noise_multiplier=float(z), sampling_prob=q, delta=float(delta), rounds=cfg.rounds, population=population,
        accountants=tuple(cfg.accountants), calibrated_for=cfg.target_epsilon, sampling=cfg.sampling_mode,
    )


def _ftrl_plan(cfg: SimConfig, population: int) -> PrivacyPlan:
    k = rounds_per_epoch(cfg.clients_per_round, population)
    rule = "restart" if cfg.ftrl_restart == "epoch" else "min_separation"
    delta = cfg.delta if cfg.delta is not None else dp.DEFAULT_DELTA
    base = PrivacyPlan(noise_multiplier=DEFAULT_NOISE_MULTIPLIER, sampling_prob=sampling_probability(
        cfg.clients_per_round, population), delta=float(delta), rounds=cfg.rounds, population=population,
        accountants=tuple(cfg.accountants), calibrated_for=cfg.target_epsilon, mechanism="dp-ftrl",
        ftrl_rule=rule, rounds_per_epoch=k, sampling=cfg.sampling_mode)
    if cfg.target_epsilon is not None:
        z = dp.ftrl_calibrate_noise_multiplier(cfg.target_epsilon, cfg.rounds, delta, rule=rule,
                                               accountant=CALIBRATION_ACCOUNTANT, **base.ftrl_rule_args)
    else:
        z = cfg.noise_multiplier if cfg.noise_multiplier is not None else DEFAULT_NOISE_MULTIPLIER
    return dataclasses.replace(base, noise_multiplier=float(z))


def format_epsilon(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"
