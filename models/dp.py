"""Differential-privacy math shared by server, device and simulation (numpy + dp_accounting only).

No TensorFlow here: the server imports this module. dp_accounting (which pulls in scipy) is
imported lazily, by the accounting functions only, so clipping and noising stay cheap to import.

DP modes (how the Gaussian noise of DP-FedAvg is produced; Kairouz et al. 2021, Bonawitz et al. 2019):

    none         no noise; updates may still be clipped
    central      devices clip, the server adds N(0, (z*C)^2) to the sum of the clipped updates
    distributed  each device adds N(0, (z*C)^2 / min_count) to its clipped update, so the sum of
                 any >= min_count contributions carries at least the central noise z*C
                 (meant to be combined with secure aggregation: the server only sees the sum)
    local        each device adds the full N(0, (z*C)^2): every single update is itself DP

In every noisy mode the accountant treats a round as one Poisson-subsampled Gaussian mechanism
with noise multiplier z (noise stddev / L2 sensitivity C) and sampling probability
q = cohort size / population.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from models import blas

DP_MODES = ("none", "central", "distributed", "local")
ACCOUNTANTS = ("rdp", "pld")

# The usual RDP orders (as in TF Privacy / dp_accounting's defaults, plus larger ones for small noise).
RDP_ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)


# --------------------------------------------------------------------------- clipping and noise


def l2_norm(tensors: Sequence[np.ndarray] | np.ndarray) -> float:
    """Global L2 norm of a list of arrays (or one array), accumulated in float64 (models.blas)."""
    return math.sqrt(blas.sum_of_squares(tensors, exact=True))


def clip_by_global_norm(
    tensors: Sequence[np.ndarray], clip: float
) -> tuple[list[np.ndarray], float]:
    """Scale all tensors by min(1, clip / global_norm); returns (clipped float32 copies, original norm).

    The factor is computed in float64 and applied once, so a tensor list already within the bound
    comes back bit-identical.
    """
    if not clip > 0 or not math.isfinite(clip):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    norm = l2_norm(tensors)
    if not math.isfinite(norm):
        raise ValueError("cannot clip tensors containing NaN or Inf")
    if norm <= clip:
        return [np.array(t, dtype=np.float32, copy=True) for t in tensors], norm
    factor = clip / norm
    return [(np.asarray(t, dtype=np.float64) * factor).astype(np.float32) for t in tensors], norm


def add_gaussian_noise(
    tensors: Sequence[np.ndarray], stddev: float, rng: np.random.Generator | int | None = None
) -> list[np.ndarray]:
    """tensors + N(0, stddev^2) elementwise (float32 results; stddev 0 returns copies)."""
    if stddev < 0 or not math.isfinite(stddev):
        raise ValueError(f"stddev must be a non-negative finite number, got {stddev!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    out = []
    for t in tensors:
        t = np.asarray(t, dtype=np.float32)
        if stddev == 0:
            out.append(t.copy())
        else:
            noise = rng.standard_normal(t.shape, dtype=np.float32)
            noise *= np.float32(stddev)
            noise += t
            out.append(noise)
    return out


def norm_tolerance(clip: float, stddev: float, dim: int, sigmas: float = 6.0) -> float:
    """High-probability upper bound on ||clipped + noise|| for ||clipped|| <= clip, noise ~ N(0, stddev^2 I_dim).

    ||x + n|| <= clip + ||n||, and ||n|| is stddev-Lipschitz in a standard normal vector with
    E||n|| <= stddev * sqrt(dim), so P(||n|| > stddev * (sqrt(dim) + t)) <= exp(-t^2 / 2)
    (Gaussian concentration). sigmas=6 gives a false-rejection probability below 1.6e-8.
    A small relative slack (1e-5) absorbs float32 rounding of the clipping itself.
    """
    if clip < 0 or stddev < 0 or dim < 0:
        raise ValueError("clip, stddev and dim must be non-negative")
    return (clip + stddev * (math.sqrt(dim) + sigmas)) * (1.0 + 1e-5)


def device_noise_stddev(dp_mode: str, noise_multiplier: float, clip: float, min_count: int) -> float:
    """The Gaussian noise stddev one device adds to its clipped update in `dp_mode` (see module doc)."""
    if dp_mode not in DP_MODES:
        raise ValueError(f"dp_mode must be one of {DP_MODES}, got {dp_mode!r}")
    if dp_mode in ("none", "central"):
        return 0.0
    if dp_mode == "local":
        return float(noise_multiplier * clip)
    return float(noise_multiplier * clip / math.sqrt(max(1, min_count)))


def central_noise_stddev(dp_mode: str, noise_multiplier: float, clip: float) -> float:
    """The noise stddev the server adds to the sum of clipped updates (only in central mode)."""
    return float(noise_multiplier * clip) if dp_mode == "central" else 0.0


def default_delta(population: int) -> float:
    """delta = 1 / population^1.1 (a little below 1/n, the usual rule of thumb)."""
    return 1.0 / max(2, int(population)) ** 1.1


# --------------------------------------------------------------------------- accounting


def _check_params(noise_multiplier: float, sampling_prob: float) -> None:
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if not 0.0 <= sampling_prob <= 1.0:
        raise ValueError(f"sampling_prob must be in [0, 1], got {sampling_prob!r}")


def make_accountant(accountant: str = "rdp"):
    """A fresh dp_accounting PrivacyAccountant ("rdp" with RDP_ORDERS, or "pld")."""
    if accountant == "rdp":
        from dp_accounting.rdp import RdpAccountant

        return RdpAccountant(list(RDP_ORDERS))
    if accountant == "pld":
        from dp_accounting.pld import PLDAccountant

        return PLDAccountant()
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def round_event(noise_multiplier: float, sampling_prob: float):
    """The DpEvent of one round: Poisson-subsampled Gaussian mechanism."""
    import dp_accounting

    _check_params(noise_multiplier, sampling_prob)
    return dp_accounting.PoissonSampledDpEvent(sampling_prob, dp_accounting.GaussianDpEvent(noise_multiplier))


def epsilon_for_rounds(
    rounds: Iterable[tuple[float, float]], delta: float, accountant: str = "rdp"
) -> float:
    """Cumulative epsilon at `delta` over rounds given as (noise_multiplier, sampling_prob) pairs.

    Identical rounds are composed together (one self-composition per distinct pair), so a long
    history with few distinct settings stays fast. No rounds: 0. A round with q > 0 and no
    noise: inf.
    """
    import dp_accounting

    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    counts = Counter((float(z), float(q)) for z, q in rounds)
    events = []
    for (z, q), count in sorted(counts.items()):
        _check_params(z, q)
        if q == 0.0:
            continue
        if z == 0.0:
            return math.inf
        events.append(dp_accounting.SelfComposedDpEvent(round_event(z, q), count))
    if not events:
        return 0.0
    acc = make_accountant(accountant)
    acc.compose(dp_accounting.ComposedDpEvent(events))
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def epsilon(
    noise_multiplier: float, sampling_prob: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon after `steps` Poisson-subsampled Gaussian rounds (RDP or PLD accounting)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    if steps == 0:
        return 0.0
    return _epsilon_steps(noise_multiplier, sampling_prob, steps, delta, accountant)


def _epsilon_steps(z: float, q: float, steps: int, delta: float, accountant: str) -> float:
    import dp_accounting

    _check_params(z, q)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if q == 0.0:
        return 0.0
    if z == 0.0:
        return math.inf
    acc = make_accountant(accountant)
    acc.compose(dp_accounting.SelfComposedDpEvent(round_event(z, q), steps))
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


_PLD_MIN_NOISE = 0.05  # below this PLD accounting is too memory-hungry to probe


def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_prob: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    tol: float = 1e-4,
) -> float:
    """The smallest noise multiplier whose epsilon after `steps` rounds is <= target_epsilon.

    Bisection in log space on z (epsilon falls monotonically as z grows); the answer z satisfies
    epsilon(z) <= target and z - tol is over budget (or z is the lower search limit).
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if steps <= 0 or sampling_prob == 0.0:
        return 0.0

    def eps(z: float) -> float:
        return _epsilon_steps(z, sampling_prob, steps, delta, accountant)

    if accountant == "pld":
        # PLD discretises the privacy loss; at tiny z its grid needs tens of GiB. RDP's epsilon
        # upper-bounds PLD's, so RDP's answer brackets the search from above and we never
        # probe z far below it.
        hi = calibrate_noise_multiplier(target_epsilon, sampling_prob, steps, delta, "rdp", tol)
        lo = hi
        while lo > _PLD_MIN_NOISE and eps(lo / 2.0) <= target_epsilon:
            lo /= 2.0
        lo = max(lo / 2.0, _PLD_MIN_NOISE)
        if eps(lo) <= target_epsilon:
            return lo
    else:
        lo, hi = 1e-3, 1.0
        if eps(lo) <= target_epsilon:
            return lo
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise ValueError(f"no noise multiplier below 1e6 reaches epsilon {target_epsilon}")
    while hi - lo > tol:
        mid = math.sqrt(lo * hi) if hi / lo > 1.5 else (lo + hi) / 2.0
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


class PrivacyLedger:
    """Incremental epsilon for a growing list of rounds (the server's accountant).

    Keeps a live dp_accounting accountant and composes each new round into it, so reporting
    the cumulative epsilon after round n costs one composition, not n.
    """

    def __init__(self, accountant: str = "rdp") -> None:
        self.accountant_name = accountant
        self._acc = None
        self.rounds: list[tuple[float, float]] = []

    def add(self, noise_multiplier: float, sampling_prob: float) -> None:
        _check_params(noise_multiplier, sampling_prob)
        self.rounds.append((float(noise_multiplier), float(sampling_prob)))
        if self._acc is not None:
            self._compose(self._acc, [(float(noise_multiplier), float(sampling_prob))])

    def extend(self, rounds: Iterable[tuple[float, float]]) -> None:
        for z, q in rounds:
            self.add(z, q)

    @staticmethod
    def _compose(acc, rounds: list[tuple[float, float]]) -> None:
        import dp_accounting

        for (z, q), count in Counter(rounds).items():
            if q == 0.0 or z == 0.0:  # q == 0: nothing released; z == 0: epsilon() reports inf
                continue
            event = round_event(z, q)
            acc.compose(dp_accounting.SelfComposedDpEvent(event, count) if count > 1 else event)

    def epsilon(self, delta: float) -> float:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not any(q > 0 for _, q in self.rounds):
            return 0.0
        if any(z == 0 and q > 0 for z, q in self.rounds):
            return math.inf
        if self._acc is None:
            self._acc = make_accountant(self.accountant_name)
            self._compose(self._acc, self.rounds)
        eps = float(self._acc.get_epsilon(delta))
        return eps if math.isfinite(eps) else math.inf


__all__ = [
    "DP_MODES", "ACCOUNTANTS", "RDP_ORDERS",
    "l2_norm", "clip_by_global_norm", "add_gaussian_noise", "norm_tolerance",
    "device_noise_stddev", "central_noise_stddev", "default_delta",
    "make_accountant", "round_event", "epsilon", "epsilon_for_rounds", "calibrate_noise_multiplier",
    "PrivacyLedger",
]
