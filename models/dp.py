"""Differential-privacy math shared by server, device and simulation (numpy + dp_accounting only).

No TensorFlow here: the server imports this module. dp_accounting (which pulls in scipy) is
imported lazily, by the accounting functions only, so clipping and noising stay cheap to import.

Past 500 lines on purpose: every epsilon the project reports (DP-FedAvg's subsampled Gaussian, DP-FTRL's
tree aggregation; RDP and PLD) comes from this one module, so their assumptions sit side by side.

DP modes (how the Gaussian noise of DP-FedAvg is produced; Kairouz et al. 2021, Bonawitz et al. 2019):

    none         no noise; updates may still be clipped
    central      devices clip, the server adds N(0, (z*C)^2) to the sum of the clipped updates
    distributed  each device adds N(0, (z*C)^2 / min_count) to its clipped update, so the sum of
                 any >= min_count contributions carries at least the central noise z*C
                 (meant to be combined with secure aggregation: the server only sees the sum)
    local        each device adds the full N(0, (z*C)^2): every single update is itself DP

In every noisy mode the accountant treats a round as one Poisson-subsampled Gaussian mechanism
with noise multiplier z (noise stddev / L2 sensitivity C) and sampling probability q. q < 1 only
where the cohort really is a Poisson sample: each member drawn independently with probability q,
secretly and before anything it does (the server's --selection-q: `poisson_selected`; the
simulation's --sampling poisson). Without such a draw q = 1: every member is assumed to take part
in every round (no amplification by sampling).

delta is DEFAULT_DELTA = 1e-6 everywhere unless set. `guarantee_sentence` is the one place the
guarantee is put into words, for the server's reports, the simulation's and the device's screen.

DP-FTRL (models/dp_ftrl.py; Kairouz et al. 2021) needs no sampling, only a participation rule;
its accounting is in the "DP-FTRL accounting" section below (`ftrl_epsilon`).
"""
from __future__ import annotations

import functools
import hashlib
import hmac
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


DEFAULT_DELTA = 1e-6  # the delta every report uses unless one is set (server dp_delta, tff_sim --delta)


def poisson_selected(secret: bytes, member: str, q: float) -> bool:
    """Whether `member` is in the Poisson sample of rate q drawn with `secret`:
    HMAC-SHA256(secret, member) / 2^256 < q.

    For a secret key unknown to members, HMAC is a pseudo-random function: each member is in the
    sample independently with probability q, and the draw depends only on (secret, member), never
    on when or whether the member shows up. A fresh secret per round makes rounds independent.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    digest = hmac.new(secret, member.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest, "big") < q * 2.0 ** 256  # int < float compares exactly


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


# --------------------------------------------------------------------------- DP-FTRL accounting
#
# The tree of DP-FTRL releases every node once, each with Gaussian noise z*C (models/dp_ftrl.py).
# Neighbouring datasets replace one client's data by a "special" zero contribution (Kairouz et al.
# App. D: dp_accounting's NeighboringRelation.REPLACE_SPECIAL). A client that takes part once in
# a tree changes the nodes on its leaf's root path, one per level, by at most C each: the release
# is a Gaussian mechanism with L2 sensitivity sqrt(depth)*C, depth = ceil(log2(steps + 1)) for a
# tree of `steps` leaves, even for adaptively chosen inputs (Kairouz et al. Thm. D.1/D.2).
#
# Two participation rules are supported, and the simulation enforces each exactly:
#   restart per epoch  each client at most once per epoch of `rounds_per_epoch` rounds, the tree
#                      restarted after every epoch (DP-FTRL-TreeRestart): the epochs compose,
#                      sum of depths (dp_accounting.SingleEpochTreeAggregationDpEvent per epoch).
#   min separation     one tree, no restarts, each client at most `max_participations` times and
#                      at least `min_separation` rounds strictly between two of its rounds
#                      (DP-FTRL-NoTreeRestart): the squared sensitivity is the worst case over
#                      participation patterns, computed by the dynamic programme of Kairouz et al.
#                      App. D.2 (as tensorflow_privacy's tree_aggregation_accountant, which imports
#                      TensorFlow, so it is re-implemented here; tests compare the two).
# Either way the mechanism is a Gaussian with noise multiplier z / sqrt(S), S = the sum of squared
# sensitivities in units of C^2: "rdp" composes dp_accounting's tree events (same RDP), "pld"
# accounts that Gaussian exactly, its privacy loss distribution in closed form (gaussian_epsilon;
# tighter than RDP's conversion).

FTRL_DEFAULT_DELTA = DEFAULT_DELTA  # the same delta as DP-FedAvg (kept for its callers)
FTRL_RULES = ("restart", "min_separation")


def tree_depth(steps: int) -> int:
    """Levels a leaf's root path crosses in a tree of `steps` leaves: ceil(log2(steps + 1))."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return 0 if steps == 0 else math.floor(math.log2(steps)) + 1


def ftrl_epoch_steps(rounds: int, rounds_per_epoch: int) -> list[int]:
    """The leaves of each tree when the tree restarts every `rounds_per_epoch` rounds."""
    if rounds_per_epoch < 1 or rounds < 0:
        raise ValueError(f"need rounds_per_epoch >= 1 and rounds >= 0, got {rounds_per_epoch}, {rounds}")
    full, rest = divmod(rounds, rounds_per_epoch)
    return [rounds_per_epoch] * full + ([rest] if rest else [])


def _possible(participations: int, min_separation: int, start: int, end: int, steps: int) -> bool:
    return start + (min_separation + 1) * participations <= steps + end


@functools.lru_cache(maxsize=1_000_000)
def _sensitivity_sq(participations: int, min_separation: int, start: int, end: int, size: int) -> float:
    """Worst-case sum over the tree's nodes of (times a client feeds the node)^2 (Kairouz et al. App. D.2).

    `start`: the client's first round is at least this many leaves in; `end`: the separation still
    owed after the last leaf (carried over from the right sibling). Cached across calls, so the
    epsilon after every round of a run reuses the subtrees of the rounds before.
    """
    if not _possible(participations, min_separation, start, end, size):
        return -math.inf
    if participations == 0:
        return 0.0
    if participations == 1 and size == 1:
        return 1.0
    top = math.floor(math.log2(size))
    value = 0.0
    if 2 ** top == size:  # a complete subtree: its root sums every participation below it
        value = float(participations ** 2)
        top -= 1
    best = -math.inf
    for right in range(participations + 1):
        for gap in range(min_separation + 1):
            left = _sensitivity_sq(participations - right, min_separation, start, gap, 2 ** top)
            if left == -math.inf:
                continue
            best = max(best, left + _sensitivity_sq(right, min_separation, gap, end, size - 2 ** top))
    return value + best


def ftrl_single_tree_sensitivity_sq(steps: int, max_participations: int, min_separation: int) -> float:
    """Worst-case squared L2 sensitivity (units of C^2) of one tree of `steps` leaves, a client taking
    part at most `max_participations` times with >= `min_separation` rounds between two of its rounds."""
    if steps < 0 or max_participations < 0 or min_separation < 0:
        raise ValueError("steps, max_participations and min_separation must be >= 0")
    if steps == 0 or max_participations == 0:
        return 0.0
    k = max_participations
    while k > 0 and not _possible(k, min_separation, 0, min_separation, steps):
        k -= 1
    return max(_sensitivity_sq(j, min_separation, 0, min_separation, steps) for j in range(1, k + 1))


def ftrl_sensitivity_sq(rounds: int, rule: str = "restart", *, rounds_per_epoch: int | None = None,
                        min_separation: int | None = None, max_participations: int | None = None) -> float:
    """S: the squared L2 sensitivity (units of C^2) of `rounds` rounds of DP-FTRL under `rule` (see above)."""
    if rule == "restart":
        if rounds_per_epoch is None:
            raise ValueError("the restart rule needs rounds_per_epoch")
        return float(sum(tree_depth(s) for s in ftrl_epoch_steps(rounds, rounds_per_epoch)))
    if rule == "min_separation":
        if min_separation is None:
            raise ValueError("the min_separation rule needs min_separation")
        k = max_participations if max_participations is not None else -(-rounds // (min_separation + 1))
        return ftrl_single_tree_sensitivity_sq(rounds, k, min_separation)
    raise ValueError(f"rule must be one of {FTRL_RULES}, got {rule!r}")


def make_ftrl_accountant(accountant: str = "rdp"):
    """RDP with REPLACE_SPECIAL (what SingleEpochTreeAggregationDpEvent needs), or PLD."""
    if accountant == "rdp":
        from dp_accounting import NeighboringRelation
        from dp_accounting.rdp import RdpAccountant

        return RdpAccountant(list(RDP_ORDERS), NeighboringRelation.REPLACE_SPECIAL)
    return make_accountant(accountant)


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Exact epsilon at `delta` of one Gaussian mechanism with multiplier z (Balle & Wang 2018, Thm. 8):
    delta(eps) = Phi(-eps*z + 1/(2z)) - e^eps * Phi(-eps*z - 1/(2z)).

    This is the Gaussian's privacy loss distribution in closed form (it is itself Gaussian), so
    it is what dp_accounting's PLD accountant approximates on a grid, without the grid: instant,
    and usable at tiny z where the grid would need tens of GiB.
    """
    from scipy.special import log_ndtr

    if noise_multiplier <= 0:
        return math.inf
    z = float(noise_multiplier)

    def delta_at(eps: float) -> float:
        return math.exp(log_ndtr(-eps * z + 0.5 / z)) - math.exp(eps + log_ndtr(-eps * z - 0.5 / z))

    if delta_at(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_at(hi) > delta:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if delta_at(mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return hi


def ftrl_event(noise_multiplier: float, rounds: int, rule: str = "restart", accountant: str = "rdp", **rule_args):
    """The DpEvent of `rounds` rounds of DP-FTRL: per-epoch tree events for RDP with restarts,
    else the equivalent Gaussian GaussianDpEvent(z / sqrt(S)); None when nothing was released."""
    import dp_accounting

    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if rounds <= 0:
        return None
    if rule == "restart" and accountant == "rdp":
        counts = Counter(ftrl_epoch_steps(rounds, rule_args["rounds_per_epoch"]))
        events = [dp_accounting.SelfComposedDpEvent(
            dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, steps), n)
            for steps, n in sorted(counts.items())]
        return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)
    s = ftrl_sensitivity_sq(rounds, rule, **rule_args)
    return dp_accounting.GaussianDpEvent(noise_multiplier / math.sqrt(s)) if s > 0 else None


def ftrl_epsilon(noise_multiplier: float, rounds: int, delta: float = FTRL_DEFAULT_DELTA, rule: str = "restart",
                 accountant: str = "rdp", **rule_args) -> float:
    """User-level epsilon at `delta` after `rounds` rounds of DP-FTRL under participation `rule`.

    restart:        rounds_per_epoch=K (each client at most once per K rounds; restart every K).
    min_separation: min_separation=b, max_participations=k (default ceil(rounds / (b + 1))); no restarts.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if rounds <= 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = ftrl_event(noise_multiplier, rounds, rule, accountant, **rule_args)
    if event is None:
        return 0.0
    if accountant == "pld":  # the event is GaussianDpEvent(z / sqrt(S)): its PLD in closed form
        return gaussian_epsilon(event.noise_multiplier, delta)
    acc = make_ftrl_accountant(accountant)
    acc.compose(event)
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def ftrl_calibrate_noise_multiplier(target_epsilon: float, rounds: int, delta: float = FTRL_DEFAULT_DELTA,
                                    rule: str = "restart", accountant: str = "rdp", tol: float = 1e-4,
                                    **rule_args) -> float:
    """The smallest noise multiplier (within tol) whose DP-FTRL epsilon after `rounds` is <= target.

    The mechanism is one Gaussian with multiplier z / sqrt(S), so this calibrates that Gaussian by
    bisection and scales by sqrt(S) (S does not depend on z).
    """
    import dp_accounting

    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if rounds <= 0:
        return 0.0
    s = ftrl_sensitivity_sq(rounds, rule, **rule_args)
    if s == 0:
        return 0.0

    def eps(z_eff: float) -> float:
        if accountant == "pld":
            return gaussian_epsilon(z_eff, delta)
        acc = make_ftrl_accountant(accountant)
        # RDP of the tree events equals the Gaussian's; compose the Gaussian under the same accountant.
        acc.compose(dp_accounting.GaussianDpEvent(z_eff))
        return float(acc.get_epsilon(delta))

    lo, hi = 1e-3, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise ValueError(f"no noise multiplier below 1e6 reaches epsilon {target_epsilon}")
    if eps(lo) <= target_epsilon:
        hi = lo
    scale = math.sqrt(s)
    while (hi - lo) * scale > tol:
        mid = (lo + hi) / 2.0
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi * scale


# --------------------------------------------------------------------------- the guarantee in words
#
# One sentence per report (server status and /v1/admin/privacy, the device's privacy screen through
# /v1/model/info, the simulation's report): which mechanism, epsilon at which delta, which accountant,
# whose data it covers, and what it assumes. Nothing else in the project words a guarantee.

MECHANISMS = ("dp-ftrl", "dp-fedavg", "none")
ACCOUNTANT_NAMES = {"rdp": "RDP", "pld": "PLD"}


def mechanism_label(mechanism: str, sampling_probs: Iterable[float] = ()) -> str:
    """"DP-FTRL", "DP-FedAvg with selection q = 0.01", "DP-FedAvg without sampling (no amplification)" or
    "none". `sampling_probs`: the q of each DP-FedAvg round (1: no sampling); several: a mixed history."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if mechanism == "none":
        return "none"
    if mechanism == "dp-ftrl":
        return "DP-FTRL"
    qs = sorted({float(q) for q in sampling_probs})
    sampled = [q for q in qs if q < 1.0]
    if not sampled:
        return "DP-FedAvg without sampling (no amplification)"
    label = "DP-FedAvg with selection q = " + ", ".join(f"{q:.3g}" for q in sampled)
    if len(sampled) < len(qs):
        label += " in some rounds and without sampling (no amplification) in others"
    return label


def format_epsilon(epsilon: float) -> str:
    """epsilon for people: 3 significant digits, "inf" when unbounded."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:.3g}"


def guarantee_sentence(mechanism: str, epsilon: float | None, delta: float, accountant: str, unit: str = "device",
                       rounds: int = 0, *, sampling_probs: Iterable[float] = (),
                       assumptions: Sequence[str] = ()) -> str:
    """The guarantee in one sentence a user can read: mechanism (mechanism_label), epsilon at delta, the
    accountant, what it covers (all the data of any one `unit`, over `rounds` released rounds) and what it
    assumes (`assumptions`: short clauses, joined with "; ")."""
    label = mechanism_label(mechanism, sampling_probs)
    if mechanism == "none":
        return (f"No differential privacy (mechanism none): models are trained without noise, so no epsilon bounds "
                f"what they reveal about any one {unit}'s data.")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    acc = ACCOUNTANT_NAMES.get(accountant, accountant)
    if rounds <= 0 or epsilon is None:
        claim = f"no model has been released yet (epsilon 0 at delta {delta:.3g}, {acc} accountant)"
    elif math.isinf(epsilon):
        claim = (f"after {rounds} released round(s) the {acc} accountant bounds no finite epsilon at delta "
                 f"{delta:.3g}, so there is no meaningful guarantee for any one {unit}'s data")
    else:
        claim = (f"after {rounds} released round(s), the released models are differentially private with epsilon "
                 f"{format_epsilon(epsilon)} at delta {delta:.3g} ({acc} accountant) for all the data of any one "
                 f"{unit}")
    tail = f", assuming {'; '.join(assumptions)}" if assumptions else ""
    return f"{label}: {claim}{tail}."


__all__ = [
    "DP_MODES", "ACCOUNTANTS", "RDP_ORDERS",
    "l2_norm", "clip_by_global_norm", "add_gaussian_noise", "norm_tolerance",
    "device_noise_stddev", "central_noise_stddev", "DEFAULT_DELTA", "poisson_selected",
    "make_accountant", "round_event", "epsilon", "epsilon_for_rounds", "calibrate_noise_multiplier",
    "PrivacyLedger",
    "FTRL_DEFAULT_DELTA", "FTRL_RULES", "tree_depth", "ftrl_epoch_steps", "ftrl_single_tree_sensitivity_sq",
    "ftrl_sensitivity_sq", "make_ftrl_accountant", "gaussian_epsilon", "ftrl_event", "ftrl_epsilon", "ftrl_calibrate_noise_multiplier",
    "MECHANISMS", "ACCOUNTANT_NAMES", "mechanism_label", "format_epsilon", "guarantee_sentence",
]
