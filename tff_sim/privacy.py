"""Privacy accounting of a DP-FedAvg run, via models.dp (dp_accounting RDP and PLD).

Each round is one Poisson-subsampled Gaussian mechanism with noise multiplier z and
sampling probability q = clients_per_round / population; after r rounds the run is
(epsilon_r, delta)-DP at the user level. With --sampling poisson (the default with DP)
that is exactly how clients are sampled; --sampling uniform (a fixed-size cohort) is
accounted with the same Poisson formula, the usual approximation (McMahan et al. 2018).
"""
from __future__ import annotations

import dataclasses
import math

from models import dp
from tff_sim.config import SimConfig
from tff_sim.sampling import sampling_probability

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

    def epsilon(self, rounds_done: int) -> dict[str, float]:
        """{accountant: epsilon after rounds_done rounds}."""
        return {
            acc: dp.epsilon(self.noise_multiplier, self.sampling_prob, rounds_done, self.delta, accountant=acc)
            for acc in self.accountants
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan(cfg: SimConfig, population: int) -> PrivacyPlan | None:
    """The noise multiplier (given, calibrated or default), q and delta of a DP run; None without DP."""
    if not cfg.dp:
        return None
    q = sampling_probability(cfg.clients_per_round, population)
    delta = cfg.delta if cfg.delta is not None else dp.default_delta(population)
    if cfg.target_epsilon is not None:
        z = dp.calibrate_noise_multiplier(cfg.target_epsilon, q, cfg.rounds, delta, accountant=CALIBRATION_ACCOUNTANT)
    elif cfg.noise_multiplier is not None:
        z = cfg.noise_multiplier
    else:
        z = DEFAULT_NOISE_MULTIPLIER
    return PrivacyPlan(
        noise_multiplier=float(z), sampling_prob=q, delta=float(delta), rounds=cfg.rounds, population=population,
        accountants=tuple(cfg.accountants), calibrated_for=cfg.target_epsilon,
    )


def format_epsilon(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"
