"""Will the DP noise swamp the model? The noise of one round's averaged update, against the clip.

Pure numpy + math (models.dp / models.dp_ftrl only): the server (server/dp_sanity.py) runs it at
start-up and per round, tff_sim before a --dp run. Issue #19: with distributed DP, clip 1, noise
multiplier 1 and 18-20 devices per round, each round's aggregate of a 440k-weight model had norm ~35,
about what the noise alone gives, and three rounds took the model below random.

The averaged update of a round is mean = (sum of n clipped updates + noise) / n, and every clipped
update has norm <= C, so the *signal* of a round has norm <= C whatever the data. The noise is
isotropic Gaussian with a per-weight standard deviation `std`, so its expected L2 norm over the d
weights is E||N(0, std^2 I_d)|| = std * sqrt(2) * Gamma((d+1)/2) / Gamma(d/2) (the chi expectation,
~ std * sqrt(d - 1/2)). Per weight, for noise multiplier z (models/dp.py's modes):

    central      the server adds N(0, (zC)^2) to the sum                       std = z C / n
    distributed  each of n devices adds N(0, (zC)^2 / m), m = min_count        std = z C / sqrt(n m)   (= z C / n at n = m)
    local        each device adds N(0, (zC)^2)                                 std = z C / sqrt(n)
    ftrl         tree aggregation (models/dp_ftrl.py), nodes N(0, (zC)^2)      std = F(T) z C / n

F(T) (`ftrl_noise_factor`) is the largest standard deviation, in units of one node's, of what a round
of a tree with T leaves releases: the noise of the prefix sum s_t (what the FTRL model w0 - lr s_t / n
carries) or the residual s_t - s_{t-1} (the round's step), whichever is larger, computed exactly by
running models/dp_ftrl.py's tree on one-hot node draws (T <= FTRL_EXACT_MAX_ROUNDS; beyond it the
plain tree's bound sqrt(tree_depth(T)), which the efficient tree never exceeds). F(10) = 1.50 (efficient)
/ 2.0 (plain), F(1000) = 2.30 / 3.16: the noise grows with the tree depth, slowly.

The ratio noise_to_clip = E||noise|| / C does not depend on C (noise and signal bound both scale with
it): z, the cohort and the model size decide it. With an SGD-like server step of learning rate lr the
round moves the weights by lr * (signal + noise), and `server_lr` scales the ratio the verdict uses
(lowering it trades speed for a smaller random walk; adaptive optimizers normalise the step, so callers
leave it None for them).

DEFAULT_MAX_NOISE_TO_CLIP = 10: isotropic noise spreads over all d directions, while a real update
(norm <= C) points along the few directions of high curvature, so a round's signal still shows in the
loss when the noise's norm is a few times C, and is lost when the noise's *energy* is ~1,000 times the
signal's (cosine between the noisy and the true step ~ 1/ratio; the harm of the noise grows with
ratio^2). Measured on this project's small preset (440k weights, scripts/demo.py, server momentum
0.9; scripts/demo_settings.py): ratio ~9 (80 updates, min_count 72, z = 1) was absorbed; ratio ~14
(50 updates per round, noise 0.021 per weight) diverged after 5 rounds; ratio ~35 (the tutorial's 18-20
devices, issue #19) fell below random in 3 rounds. 10 is the round number that refuses both failures and accepts the working setting; for a
model to learn *quickly* (not merely survive) aim for a ratio <= 1-3, what DP-FedAvg deployments with
thousands of devices per round reach (McMahan et al. 2018).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from models import dp, dp_ftrl

MECHANISMS = ("none", "central", "distributed", "local", "ftrl")
DEFAULT_MAX_NOISE_TO_CLIP = 10.0  # see the module docstring for why 10
FTRL_EXACT_MAX_ROUNDS = 4096  # ftrl_noise_factor runs the tree exactly up to this many leaves
FTRL_DEFAULT_HORIZON = 1000  # leaves assumed for a tree that never restarts, when the caller knows no length


@dataclasses.dataclass(frozen=True)
class Knobs:
    """How the caller's command line spells each knob (named in the message)."""

    cohort: str = "cohort"
    noise: str = "noise multiplier"
    server_lr: str = "server learning rate"
    override: str = "--allow-noisy-dp"
    limit: str = "--max-noise-to-clip"


SERVER_KNOBS = Knobs("--min-count (and --round-goal)", "--noise-multiplier", "--server-lr")
SIM_KNOBS = Knobs("--clients-per-round", "--noise-multiplier", "--server-lr")


@dataclasses.dataclass(frozen=True)
class NoiseReport:
    """The noise of one round's averaged update, its verdict and the knobs that would fix it."""

    mechanism: str
    noise_multiplier: float
    clip: float
    cohort: int  # updates averaged
    min_count: int  # distributed: the count the device noise is calibrated for
    dim: int
    server_lr: float | None
    std_per_weight: float
    expected_noise_norm: float
    noise_to_clip: float  # expected_noise_norm / clip
    step_noise_to_clip: float  # noise_to_clip * server_lr (= noise_to_clip without a server_lr): the verdict's ratio
    max_noise_to_clip: float
    ok: bool
    ftrl_rounds: int | None  # ftrl: the tree's leaves the factor is for
    ftrl_factor: float  # 1 outside ftrl
    min_cohort: int | None  # the cohort (min_count) that passes at this z and server_lr; None without noise
    max_noise_multiplier: float | None  # the largest z that passes at this cohort
    max_server_lr: float | None  # the largest server_lr that passes (None: no server_lr given)
    message: str

    @property
    def verdict(self) -> str:
        return "ok" if self.ok else "too_noisy"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "verdict": self.verdict}


def expected_chi(dim: int) -> float:
    """E||x|| for x ~ N(0, I_dim): sqrt(2) Gamma((dim+1)/2) / Gamma(dim/2), exactly (via lgamma)."""
    if dim < 0:
        raise ValueError(f"dim must be >= 0, got {dim}")
    if dim == 0:
        return 0.0
    return math.sqrt(2.0) * math.exp(math.lgamma((dim + 1) / 2.0) - math.lgamma(dim / 2.0))


@functools.lru_cache(maxsize=256)
def ftrl_noise_factor(rounds: int, efficient: bool = True) -> float:
    """max over the rounds t <= `rounds` of one tree of the std (in node stddevs) of the prefix-sum noise
    s_t or of the residual s_t - s_{t-1}, from models/dp_ftrl.py's own tree (see the module docstring)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if rounds > FTRL_EXACT_MAX_ROUNDS:
        return math.sqrt(dp.tree_depth(rounds))  # the plain tree's max; the efficient tree stays below it
    size = 2 * rounds + 2  # draws: one per leaf plus one per merge (efficient), < 2 per leaf

    def one_hot(k: int, dim: int) -> np.ndarray:
        e = np.zeros(dim, np.float64)
        e[k] = 1.0
        return e

    state = dp_ftrl.tree_init(size, 1.0, 0, efficient=efficient, node=one_hot)
    previous = np.zeros(size)
    worst = 0.0
    for _ in range(rounds):
        cumsum, state = dp_ftrl.tree_cumsum_and_update(state, one_hot)
        cumsum = np.asarray(cumsum, np.float64)
        residual = cumsum - previous
        worst = max(worst, float(cumsum @ cumsum), float(residual @ residual))
        previous = cumsum
    return math.sqrt(worst)


def _divisor(mechanism: str, cohort: float, min_count: float) -> float:
    """std_per_weight = z * C * factor / divisor."""
    if mechanism == "local":
        return math.sqrt(cohort)
    if mechanism == "distributed":
        return math.sqrt(cohort * min_count)
    return float(cohort)


def noise_std_per_weight(mechanism: str, noise_multiplier: float, clip: float, cohort: int,
                         min_count: int | None = None, ftrl_rounds: int | None = None,
                         ftrl_efficient: bool = True) -> float:
    """Standard deviation, per weight, of the noise in the mean of `cohort` updates (module docstring)."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if cohort < 1:
        raise ValueError(f"cohort must be >= 1, got {cohort}")
    if noise_multiplier < 0 or clip < 0:
        raise ValueError("noise_multiplier and clip must be >= 0")
    if mechanism == "none":
        return 0.0
    factor = ftrl_noise_factor(ftrl_rounds or FTRL_DEFAULT_HORIZON, ftrl_efficient) if mechanism == "ftrl" else 1.0
    return float(noise_multiplier * clip * factor / _divisor(mechanism, cohort, min_count or cohort))


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"


def check(mechanism: str, noise_multiplier: float, clip: float, cohort: int, dim: int, *,
          min_count: int | None = None, server_lr: float | None = None,
          max_noise_to_clip: float = DEFAULT_MAX_NOISE_TO_CLIP, ftrl_rounds: int | None = None,
          ftrl_efficient: bool = True, knobs: Knobs = Knobs()) -> NoiseReport:
    """The noise of a round's mean of `cohort` updates of a `dim`-weight model, against the clip.

    min_count: distributed only, the count the device noise is calibrated for (default `cohort`).
    server_lr: the SGD-like server learning rate (None: not scaled). ftrl_rounds: leaves of one tree
    (default FTRL_DEFAULT_HORIZON). ok iff step_noise_to_clip <= max_noise_to_clip.
    """
    if not max_noise_to_clip > 0:
        raise ValueError(f"max_noise_to_clip must be > 0, got {max_noise_to_clip!r}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if server_lr is not None and not server_lr > 0:
        raise ValueError(f"server_lr must be > 0, got {server_lr!r}")
    if clip <= 0 and mechanism != "none":
        raise ValueError(f"DP needs clip > 0, got {clip!r}")
    m = int(min_count or cohort)
    ftrl_rounds = (ftrl_rounds or FTRL_DEFAULT_HORIZON) if mechanism == "ftrl" else None
    std = noise_std_per_weight(mechanism, noise_multiplier, clip, cohort, m, ftrl_rounds, ftrl_efficient)
    chi = expected_chi(dim)
    norm = std * chi
    ratio = norm / clip if clip > 0 else 0.0
    lr = 1.0 if server_lr is None else float(server_lr)
    step_ratio = ratio * lr
    ok = step_ratio <= max_noise_to_clip
    factor = ftrl_noise_factor(ftrl_rounds, ftrl_efficient) if mechanism == "ftrl" else 1.0

    min_cohort = max_z = max_lr = None
    if mechanism != "none" and noise_multiplier > 0:
        # ratio = lr * z * factor * chi / divisor(cohort): solve each knob for ratio == max_noise_to_clip
        need = lr * noise_multiplier * factor * chi / max_noise_to_clip  # the divisor that passes
        # distributed: the knob is min_count with the cohort at least that (n = m): divisor = m
        min_cohort = max(1, math.ceil(need ** 2 - 1e-9) if mechanism == "local" else math.ceil(need - 1e-9))
        divisor = _divisor(mechanism, cohort, m)
        max_z = max_noise_to_clip * divisor / (lr * factor * chi)
        if server_lr is not None:
            max_lr = max_noise_to_clip * divisor / (noise_multiplier * factor * chi)

    what = f"{mechanism} DP, noise multiplier {noise_multiplier:g}, clip {clip:g}, {cohort:,} updates per round"
    if mechanism == "distributed" and m != cohort:
        what += f" (device noise calibrated for {m:,})"
    if mechanism == "ftrl":
        what += f", a tree of {ftrl_rounds:,} rounds (noise x{factor:.3g})"
    what += f", {dim:,} weights"
    numbers = (f"the averaged update carries noise of std {std:.3g} per weight, expected L2 norm {_fmt(norm)} = "
               f"{ratio:.3g}x the clip (the largest norm a real averaged update can have)")
    if server_lr is not None and server_lr != 1.0:
        numbers += f"; x server learning rate {server_lr:g} = {step_ratio:.3g}x the clip per step"
    if ok:
        message = f"DP noise check: {what}: {numbers}; limit {max_noise_to_clip:g}x: ok"
    else:
        fixes = [f"a cohort of >= {min_cohort:,} devices ({knobs.cohort}) at noise multiplier {noise_multiplier:g}",
                 f"noise multiplier <= {max_z:.3g} ({knobs.noise}) at {cohort:,} devices (a smaller multiplier "
                 "spends more privacy budget: recheck epsilon)"]
        if max_lr is not None:
            fixes.append(f"server learning rate <= {max_lr:.3g} ({knobs.server_lr}; the model then learns "
                         "correspondingly slower)")
        message = (f"DP noise would swamp the model: {what}: {numbers}; limit {max_noise_to_clip:g}x. "
                   f"Turn one knob: {'; or '.join(fixes)}. The clip does not help (noise and signal both scale "
                   f"with it). To run anyway: {knobs.override} (or raise {knobs.limit}).")
    return NoiseReport(mechanism, float(noise_multiplier), float(clip), int(cohort), m, int(dim),
                       None if server_lr is None else float(server_lr), std, norm, ratio, step_ratio,
                       float(max_noise_to_clip), ok, ftrl_rounds, factor, min_cohort, max_z, max_lr, message)


def max_dim_within_limit(mechanism: str, noise_multiplier: float, cohort: int, *, min_count: int | None = None,
                         server_lr: float | None = None, max_noise_to_clip: float = DEFAULT_MAX_NOISE_TO_CLIP,
                         ftrl_rounds: int | None = None, ftrl_efficient: bool = True) -> int | None:
    """The largest model (weights) whose round noise stays within the limit (None: any size; for a
    server that has no model yet). Uses E||noise|| <= std * sqrt(dim)."""
    std_per_clip = noise_std_per_weight(mechanism, noise_multiplier, 1.0, cohort, min_count, ftrl_rounds,
                                        ftrl_efficient) * (1.0 if server_lr is None else server_lr)
    if std_per_clip <= 0:
        return None
    return int((max_noise_to_clip / std_per_clip) ** 2)


__all__ = ["MECHANISMS", "DEFAULT_MAX_NOISE_TO_CLIP", "FTRL_EXACT_MAX_ROUNDS", "FTRL_DEFAULT_HORIZON", "Knobs",
           "SERVER_KNOBS", "SIM_KNOBS", "NoiseReport", "expected_chi", "ftrl_noise_factor", "noise_std_per_weight",
           "check", "max_dim_within_limit"]
