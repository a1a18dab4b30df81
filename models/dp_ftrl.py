"""DP-FTRL with tree aggregation (Kairouz et al. 2021, "Practical and Private (Deep) Learning without
Sampling or Shuffling"; Xu et al. 2023, Gboard), in numpy, one round at a time.

No TensorFlow here: a server runs `aggregate` / `ftrl_round` once per round and persists the
state between rounds (`state_to_arrays` / `state_from_arrays`: plain arrays for an .npz file).

The variant, exactly as TFF 0.87 / tensorflow_privacy build it
(`tff.aggregators.DifferentiallyPrivateFactory.tree_aggregation` and `tree_adaptive`):

* Noise: the online binary tree of Gaussian node noise, each node N(0, (z*C)^2) per coordinate,
  over the rounds since the last restart. By default the *efficient* tree of Honaker (2015),
  which is what TFF's factory uses (`use_efficient=True`, tensorflow_privacy's
  `EfficientTreeAggregator`): a completed node stores 0.5*(left + right) + fresh noise, and
  the cumulative noise is sum_levels node / (2 - 2^-level) (never more variance than the plain
  tree's; about half of it for a complete subtree). `efficient=False` gives the plain tree
  (`TreeAggregator`). Both release
  functions of the same noisy nodes, so the privacy accounting is identical.
* The released per-round value is the *residual* of the noised cumulative sum
  (`TreeResidualSumQuery`): sum of clipped updates + tree_cumsum_t - tree_cumsum_{t-1},
  divided by clients_per_round (`NormalizedQuery`). Summing the residuals over rounds gives
  the noised cumulative sum s_t of the tree, so server SGD over the residuals IS FTRL:
  w_t = w_0 - lr * s_t (Kairouz et al. Alg. 1 with lambda = 1/lr). With heavy-ball momentum
  gamma on the residuals (TFF's `build_sgdm`: m = gamma*m + g; w -= lr*m) it is DP-FTRLM
  (Kairouz et al. Sec. 4: v_t = gamma*v_{t-1} + s_t, w_t = w_0 - lr*v_t), since
  v_t - v_{t-1} obeys the same recursion as m. This is how TFF runs DP-FTRL and what
  `server_update` does; tests/test_dp_ftrl.py checks the FTRL form too.
* Restarts (`restart_query.RestartQuery` + `PeriodicRoundRestartIndicator(period)`): after the
  round whose 1-based index is a multiple of `restart_period` the tree starts over and the
  previous cumulative noise is forgotten (the finished tree's noise stays in the model).
  TFF's fixed-clip factory never restarts; with a client taking part at most once per epoch
  one restarts every epoch (DP-FTRL-TreeRestart, Kairouz et al. App. D.1).
* Adaptive clipping (Andrew et al. 2019, as `QAdaClipTreeResSumQuery`): the quantile estimate
  moves every round from a tree-noised count of clients whose norm was <= the estimate, but the
  clip in use (and the node noise z*C) changes only at restarts, so one tree has one clip.

Noise of node k of a tree stream is N(0, 1) from numpy's Generator seeded with (seed, stream, k),
times the node stddev: stateless like TFF's seeded generator, so a restored state continues the
same noise. Anyone who knows the seed knows the noise: a server must keep the seed secret.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Sequence

import numpy as np

from models import dp

VALUE_STREAM = 0
COUNT_STREAM = 1

NodeFn = Callable[[int, int], np.ndarray]  # (draw index k, dim) -> unit-variance node noise


# --------------------------------------------------------------------------- the noise tree


@dataclasses.dataclass(frozen=True)
class TreeNoiseState:
    """One tree of node noise (tensorflow_privacy's TreeState + the residual's previous cumsum).

    levels[i] is the tree level of buffer[i], lowest first (TF's level_buffer_idx); the buffer
    always holds the node of the *next* leaf already (TF draws it eagerly at init and reset).
    """

    dim: int
    stddev: float
    seed: int
    stream: int
    draws: int  # nodes drawn so far in this stream (across restarts)
    levels: tuple[int, ...]
    buffer: np.ndarray  # (len(levels), dim) float32
    previous: np.ndarray  # (dim,) float32: the cumulative noise released by the previous round
    efficient: bool = True


def gaussian_node(seed: int, stream: int) -> NodeFn:
    """Unit Gaussian node noise, a pure function of (seed, stream, k)."""

    def node(k: int, dim: int) -> np.ndarray:
        return np.random.default_rng([int(seed), int(stream), int(k)]).standard_normal(dim, dtype=np.float32)

    return node


def _draw(state: TreeNoiseState, node: NodeFn | None, k: int) -> np.ndarray:
    if state.stddev == 0 and node is None:  # no noise: skip generating a model's worth of normals per node
        return np.zeros(state.dim, np.float32)
    fn = node or gaussian_node(state.seed, state.stream)
    value = np.asarray(fn(k, state.dim), dtype=np.float32)
    return value * np.float32(state.stddev)


def tree_init(dim: int, stddev: float, seed: int, *, stream: int = VALUE_STREAM, efficient: bool = True,
              node: NodeFn | None = None) -> TreeNoiseState:
    """A fresh tree whose first leaf node is drawn (TF's init_state)."""
    if dim < 0 or not stddev >= 0 or not math.isfinite(stddev):
        raise ValueError(f"need dim >= 0 and a finite stddev >= 0, got {dim!r}, {stddev!r}")
    empty = TreeNoiseState(int(dim), float(stddev), int(seed), int(stream), 0, (), np.zeros((0, dim), np.float32),
                           np.zeros(dim, np.float32), bool(efficient))
    return tree_restart(empty, node)


def tree_restart(state: TreeNoiseState, node: NodeFn | None = None, stddev: float | None = None) -> TreeNoiseState:
    """Start a new tree (TF's reset_state): a freshly drawn first leaf, no previous noise.

    `stddev` changes the node noise from here on (adaptive clipping's new clip * z).
    """
    state = state if stddev is None else dataclasses.replace(state, stddev=float(stddev))
    leaf = _draw(state, node, state.draws)
    return dataclasses.replace(state, draws=state.draws + 1, levels=(0,), buffer=leaf[None, :],
                               previous=np.zeros(state.dim, np.float32))


def _level_weights(levels: Sequence[int], efficient: bool) -> np.ndarray:
    if not efficient:
        return np.ones(len(levels), np.float32)
    lv = np.asarray(levels, np.float32)
    return (np.float32(1.0) / (np.float32(2.0) - np.power(np.float32(0.5), lv))).astype(np.float32)


def tree_cumsum_and_update(state: TreeNoiseState, node: NodeFn | None = None) -> tuple[np.ndarray, TreeNoiseState]:
    """(cumulative noise of the current leaf, state ready for the next leaf): TF's get_cumsum_and_update.

    Plain tree: the cumulative noise is the sum of the buffered nodes (one per set bit of the
    leaf count), and the new leaf's single draw becomes the node at the lowest free level.
    Efficient tree (Honaker 2015): buffered nodes weighted 1/(2 - 2^-level); completing a node
    stores 0.5*(left + right) + a fresh draw, one draw per merged level, bottom up.
    """
    weights = _level_weights(state.levels, state.efficient)
    cumsum = np.tensordot(weights, state.buffer, axes=1).astype(np.float32) if state.levels else \
        np.zeros(state.dim, np.float32)
    k = state.draws
    new = _draw(state, node, k)
    k += 1
    level = 0
    while level < len(state.levels) and state.levels[level] == level:
        if state.efficient:
            new = np.float32(0.5) * (state.buffer[level] + new) + _draw(state, node, k)
            k += 1
        level += 1
    levels = (level,) + tuple(state.levels[level:])
    buffer = np.concatenate([new[None, :], state.buffer[level:]], axis=0)
    return cumsum, dataclasses.replace(state, draws=k, levels=levels, buffer=buffer)


def tree_residual(state: TreeNoiseState, node: NodeFn | None = None) -> tuple[np.ndarray, TreeNoiseState]:
    """The noise this round adds: cumsum_t - cumsum_{t-1} of the tree (TreeResidualSumQuery)."""
    cumsum, state = tree_cumsum_and_update(state, node)
    residual = cumsum - state.previous
    return residual, dataclasses.replace(state, previous=cumsum)


def restart_due(rounds_done: int, period: int | None, warmup: int = 0) -> bool:
    """PeriodicRoundRestartIndicator: restart after the round whose 1-based index r has r % period == warmup."""
    if period is None:
        return False
    if period < 1:
        raise ValueError(f"restart period must be >= 1, got {period}")
    return rounds_done % period == warmup


def noise_for_round(state: TreeNoiseState, rounds_done: int, restart_period: int | None,
                    node: NodeFn | None = None) -> tuple[np.ndarray, TreeNoiseState]:
    """The residual noise of round `rounds_done` (1-based) and the state for the next round
    (restarted when the period ends with this round, as RestartQuery does)."""
    noise, state = tree_residual(state, node)
    if restart_due(rounds_done, restart_period):
        state = tree_restart(state, node)
    return noise, state


# --------------------------------------------------------------------------- DP-FTRL aggregation


@dataclasses.dataclass(frozen=True)
class AdaptiveClip:
    """Quantile-based adaptive clipping (Andrew et al. 2019), geometric update, tree-noised count."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float = 0.0  # stddev of the tree noise on the (unnormalised) below-estimate count


@dataclasses.dataclass(frozen=True)
class FtrlParams:
    noise_multiplier: float  # total z: node noise stddev / clip (split with the count when adaptive)
    clients_per_round: float  # the mean's denominator (TFF's NormalizedQuery)
    clip: float  # fixed clip, or the initial clip when adaptive
    restart_period: int | None = None  # restart the trees after every this many rounds (one epoch)
    server_lr: float = 1.0
    momentum: float = 0.0  # heavy-ball momentum on the residuals (DP-FTRLM)
    efficient: bool = True
    adaptive: AdaptiveClip | None = None

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.clients_per_round <= 0 or self.clip <= 0:
            raise ValueError("need noise_multiplier >= 0, clients_per_round > 0 and clip > 0")
        if self.restart_period is not None and self.restart_period < 1:
            raise ValueError(f"restart_period must be >= 1, got {self.restart_period}")

    @property
    def value_noise_multiplier(self) -> float:
        """z on the updates; adaptive clipping gives part of the budget to the count."""
        if self.adaptive is None:
            return float(self.noise_multiplier)
        return adaptive_value_noise_multiplier(self.noise_multiplier, self.adaptive.count_stddev)


# A device's adaptive-clipping bit travels in its update's metrics under this name: 1 when its delta's L2
# norm before clipping was <= the round's quantile estimate, else 0.
BELOW_ESTIMATE_METRIC = "below_clip_estimate"


def below_count(bits: Iterable[float | None]) -> float:
    """Adaptive clipping's count: sum of (bit - 1/2) over the round's updates. A missing or invalid bit
    (a device that did not report one) adds 0, as if that update sat exactly at the estimate."""
    return float(sum(float(b) - 0.5 for b in bits if b in (0, 1)))


def adaptive_value_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_v with z_v^-2 + (2*sigma_count)^-2 = z^-2, so values + count together are a z-mechanism
    (TFF's adaptive_clip_noise_params; the count's sensitivity is 1/2)."""
    if noise_multiplier == 0:
        return 0.0
    if noise_multiplier >= 2 * count_stddev:
        raise ValueError(f"count_stddev {count_stddev} is too low for noise multiplier {noise_multiplier}")
    return float((noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5)


@dataclasses.dataclass(frozen=True)
class FtrlState:
    rounds_done: int
    clip: float  # the clip in use (changes only at restarts)
    tree: TreeNoiseState
    momentum: np.ndarray  # (dim,) float32
    estimate: float | None = None  # adaptive: the running quantile estimate of update norms
    count_tree: TreeNoiseState | None = None


def init(params: FtrlParams, dim: int, seed: int) -> FtrlState:
    z_v = params.value_noise_multiplier
    tree = tree_init(dim, params.clip * z_v, seed, stream=VALUE_STREAM, efficient=params.efficient)
    count_tree = estimate = None
    if params.adaptive is not None:
        # TreeQuantileEstimatorQuery: clip 0.5 and noise multiplier 2*sigma -> node stddev sigma; always efficient.
        count_tree = tree_init(1, params.adaptive.count_stddev, seed, stream=COUNT_STREAM, efficient=True)
        estimate = float(params.clip)
    return FtrlState(0, float(params.clip), tree, np.zeros(dim, np.float32), estimate, count_tree)


def flatten(tensors: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(t, np.float32).ravel() for t in tensors]) if tensors else np.zeros(0, np.float32)


def unflatten(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(flat[start:start + size].reshape(shape).copy())
        start += size
    if start != flat.size:
        raise ValueError(f"{flat.size} values do not fill shapes {list(shapes)}")
    return out


def aggregate(state: FtrlState, params: FtrlParams, updates: Sequence[Sequence[np.ndarray]]
              ) -> tuple[np.ndarray, FtrlState, dict[str, float]]:
    """One round of the DP mean: clip each update to state.clip, sum, add the tree residual noise,
    divide by clients_per_round; adapt the clip estimate; restart the trees when the period ends.

    `updates` are the clients' model deltas (initial - trained, TFF's sign). Returns the flat
    noised mean, the next state and metrics (clip in use, quantile estimate).
    """
    dim = state.tree.dim
    total = np.zeros(dim, np.float32)
    below = 0.0
    for update in updates:
        clipped, norm = dp.clip_by_global_norm(list(update), state.clip)
        total += flatten(clipped)
        if state.estimate is not None:
            below += (1.0 if norm <= state.estimate else 0.0) - 0.5
    cumsum, tree = tree_cumsum_and_update(state.tree)
    noised = (total + cumsum) - state.tree.previous  # TreeResidualSumQuery's a + b - c, in float32
    tree = dataclasses.replace(tree, previous=cumsum)
    mean = (noised / np.float32(params.clients_per_round)).astype(np.float32)
    new_state, metrics = advance(state, params, tree, below, params.clients_per_round)
    return mean, new_state, metrics


def release_noise(state: FtrlState, params: FtrlParams, below: float, count_denominator: float
                  ) -> tuple[np.ndarray, FtrlState, dict[str, float]]:
    """A server's round without the updates in hand: the residual noise to add to the round's sum of
    clipped updates (float32; the same noise `aggregate` adds), and the next state.

    below: sum over the round's updates of (1 if its norm was <= state.estimate else 0) - 1/2 (adaptive
    clipping; 0 otherwise); count_denominator: what the count is divided by (the number of updates)."""
    residual, tree = tree_residual(state.tree)
    new_state, metrics = advance(state, params, tree, below, count_denominator)
    return residual, new_state, metrics


def advance(state: FtrlState, params: FtrlParams, tree: TreeNoiseState, below: float, count_denominator: float
            ) -> tuple[FtrlState, dict[str, float]]:
    """The state after a round whose value noise was drawn from `state.tree` (giving `tree`): the adaptive
    quantile estimate moves by the tree-noised count of updates below it (geometric update, Andrew et al.),
    and when the restart period ends the trees restart, adopting the estimate as the clip in use."""
    rounds_done = state.rounds_done + 1
    estimate, count_tree = state.estimate, state.count_tree
    if params.adaptive is not None and count_tree is not None and estimate is not None:
        count_noise, count_tree = tree_residual(count_tree)
        fraction = float(np.float32(below) + count_noise[0]) / count_denominator + 0.5
        fraction = min(1.0, max(0.0, fraction))
        estimate = float(estimate * math.exp(-params.adaptive.learning_rate * (fraction - params.adaptive.target_quantile)))
    clip = state.clip
    if restart_due(rounds_done, params.restart_period):
        if params.adaptive is not None and count_tree is not None:
            clip = max(float(estimate), 0.0)  # QAdaClipTreeResSumQuery.reset_state adopts the estimate
            count_tree = tree_restart(count_tree)
        tree = tree_restart(tree, stddev=clip * params.value_noise_multiplier)
    metrics = {"clip": state.clip, **({"estimate_clip": estimate} if estimate is not None else {})}
    return dataclasses.replace(state, rounds_done=rounds_done, clip=clip, tree=tree, estimate=estimate,
                               count_tree=count_tree), metrics


def server_update(weights: np.ndarray, momentum: np.ndarray, update: np.ndarray, lr: float,
                  momentum_coef: float) -> tuple[np.ndarray, np.ndarray]:
    """TFF's build_sgdm on the noised residual: m = gamma*m + g; w = w - lr*m (DP-FTRLM, see module doc)."""
    if momentum_coef:
        momentum = (np.float32(momentum_coef) * momentum + update).astype(np.float32)
        step = momentum
    else:
        step = update
    return (weights - np.float32(lr) * step).astype(np.float32), momentum


def ftrl_round(weights: Sequence[np.ndarray], state: FtrlState, params: FtrlParams,
               updates: Sequence[Sequence[np.ndarray]]) -> tuple[list[np.ndarray], FtrlState, dict[str, float]]:
    """A whole server round: DP mean of the clients' deltas, then the FTRL(M) step on the model."""
    shapes = [np.shape(w) for w in weights]
    mean, state, metrics = aggregate(state, params, updates)
    flat, momentum = server_update(flatten(weights), state.momentum, mean, params.server_lr, params.momentum)
    return unflatten(flat, shapes), dataclasses.replace(state, momentum=momentum), metrics


def ftrl_weights(w0: np.ndarray, cumulative_sums: Sequence[np.ndarray], lr: float, momentum_coef: float) -> np.ndarray:
    """FTRL(M) in its own form (Kairouz et al. Alg. 1 / Sec. 4): v_t = gamma*v_{t-1} + s_t, w = w0 - lr*v_t,
    for the noised cumulative sums s_1..s_t. Equals running server_update over the residuals."""
    v = np.zeros_like(w0, dtype=np.float64)
    for s in cumulative_sums:
        v = momentum_coef * v + np.asarray(s, np.float64)
    return (np.asarray(w0, np.float64) - lr * v).astype(np.float32)


# --------------------------------------------------------------------------- persistence


def _tree_arrays(tree: TreeNoiseState, prefix: str) -> dict[str, np.ndarray]:
    return {
        f"{prefix}meta": np.array([tree.dim, tree.seed, tree.stream, tree.draws, int(tree.efficient)], np.int64),
        f"{prefix}stddev": np.array(tree.stddev, np.float64),
        f"{prefix}levels": np.array(tree.levels, np.int64),
        f"{prefix}buffer": tree.buffer,
        f"{prefix}previous": tree.previous,
    }


def _tree_from(arrays: dict[str, np.ndarray], prefix: str) -> TreeNoiseState:
    dim, seed, stream, draws, efficient = (int(x) for x in arrays[f"{prefix}meta"])
    return TreeNoiseState(dim, float(arrays[f"{prefix}stddev"]), seed, stream, draws,
                          tuple(int(x) for x in arrays[f"{prefix}levels"]),
                          np.asarray(arrays[f"{prefix}buffer"], np.float32).reshape(-1, dim),
                          np.asarray(arrays[f"{prefix}previous"], np.float32), bool(efficient))


def state_to_arrays(state: FtrlState) -> dict[str, np.ndarray]:
    """The whole state as named numpy arrays (np.savez-able; exact round trip)."""
    out = {"rounds_done": np.array(state.rounds_done, np.int64), "clip": np.array(state.clip, np.float64),
           "momentum": state.momentum, **_tree_arrays(state.tree, "tree_")}
    if state.count_tree is not None and state.estimate is not None:
        out["estimate"] = np.array(state.estimate, np.float64)
        out.update(_tree_arrays(state.count_tree, "count_tree_"))
    return out


def state_from_arrays(arrays: dict[str, np.ndarray]) -> FtrlState:
    adaptive = "estimate" in arrays
    return FtrlState(int(arrays["rounds_done"]), float(arrays["clip"]), _tree_from(arrays, "tree_"),
                     np.asarray(arrays["momentum"], np.float32),
                     float(arrays["estimate"]) if adaptive else None,
                     _tree_from(arrays, "count_tree_") if adaptive else None)


__all__ = [
    "TreeNoiseState", "gaussian_node", "tree_init", "tree_restart", "tree_cumsum_and_update", "tree_residual",
    "restart_due", "noise_for_round", "AdaptiveClip", "FtrlParams", "FtrlState", "adaptive_value_noise_multiplier",
    "BELOW_ESTIMATE_METRIC", "below_count", "init", "aggregate", "release_noise", "advance", "server_update", "ftrl_round", "ftrl_weights", "flatten", "unflatten",
    "state_to_arrays", "state_from_arrays",
]
