"""DP-FedAvg aggregators: TFF's DifferentiallyPrivateFactory, with fixed or adaptive clipping.

Two noise sources, the same mechanism:

  "tff"     tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed / gaussian_adaptive
            as shipped. Their Gaussian noise comes from an unseeded stateful TF op, so two
            runs (or a resumed run) never see the same noise.
  "seeded"  (default) the very queries those two constructors build (tensorflow_privacy's
            NormalizedQuery over GaussianSumQuery, or over QuantileAdaptiveClipSumQuery for
            adaptive clipping), with each Gaussian draw taken from a stateless generator whose
            seed lives in the aggregator state and advances every round. The noise is
            N(0, (z*C)^2) per coordinate exactly as before, but a run is reproducible from
            its seed and a resumed run continues the same noise stream, bit for bit.

Seeded noise is for simulation only: anyone who knows the seed knows the noise.
"""
from __future__ import annotations

import collections

import dp_accounting
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp
from tensorflow_privacy.privacy.dp_query import quantile_estimator_query

_VALUE_STREAM = 0x7A1
_COUNT_STREAM = 0x7C2


def _initial_seed(seed: int, stream: int) -> tf.Tensor:
    return tf.constant([int(seed) * 4096 + stream, 0], dtype=tf.int64)


def _advance(noise_seed: tf.Tensor) -> tf.Tensor:
    return noise_seed + tf.constant([0, 1], dtype=tf.int64)


class SeededGaussianSumQuery(tfp.GaussianSumQuery):
    """GaussianSumQuery whose noise is tf.random.stateless_normal with a seed in the global state."""

    _GlobalState = collections.namedtuple("_GlobalState", ["l2_norm_clip", "stddev", "noise_seed"])

    def __init__(self, l2_norm_clip: float, stddev: float, seed: int = 0, stream: int = _VALUE_STREAM) -> None:
        super().__init__(l2_norm_clip, stddev)
        self._seed = int(seed)
        self._stream = int(stream)

    def make_global_state(self, l2_norm_clip, stddev, noise_seed=None):  # noqa: D102 - DPQuery API
        if noise_seed is None:
            noise_seed = _initial_seed(self._seed, self._stream)
        return self._GlobalState(tf.cast(l2_norm_clip, tf.float32), tf.cast(stddev, tf.float32), noise_seed)

    def initial_global_state(self):  # noqa: D102
        return self.make_global_state(self._l2_norm_clip, self._stddev)

    def get_noised_result(self, sample_state, global_state):  # noqa: D102
        leaves = tf.nest.flatten(sample_state)
        noised = []
        for i, value in enumerate(leaves):
            leaf_seed = tf.random.experimental.stateless_fold_in(global_state.noise_seed, i)
            noise = tf.random.stateless_normal(tf.shape(value), seed=leaf_seed, stddev=global_state.stddev)
            noised.append(value + tf.cast(noise, value.dtype))
        result = tf.nest.pack_sequence_as(sample_state, noised)
        new_state = global_state._replace(noise_seed=_advance(global_state.noise_seed))
        event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
        return result, new_state, event


class SeededQuantileEstimatorQuery(quantile_estimator_query.QuantileEstimatorQuery):
    """QuantileEstimatorQuery whose noisy below-estimate count uses SeededGaussianSumQuery."""

    def __init__(self, *args, seed: int = 0, **kwargs) -> None:
        self._noise_seed = int(seed)  # read by _construct_below_estimate_query during super().__init__
        super().__init__(*args, **kwargs)

    def _construct_below_estimate_query(self, below_estimate_stddev, expected_num_records):
        return tfp.NormalizedQuery(
            SeededGaussianSumQuery(l2_norm_clip=0.5, stddev=below_estimate_stddev, seed=self._noise_seed,
                                   stream=_COUNT_STREAM),
            denominator=expected_num_records,
        )


class SeededQuantileAdaptiveClipSumQuery(tfp.QuantileAdaptiveClipSumQuery):
    """QuantileAdaptiveClipSumQuery with both of its Gaussian draws seeded."""

    def __init__(self, initial_l2_norm_clip, noise_multiplier, target_unclipped_quantile, learning_rate,
                 clipped_count_stddev, expected_num_records, geometric_update=True, seed: int = 0) -> None:
        super().__init__(initial_l2_norm_clip, noise_multiplier, target_unclipped_quantile, learning_rate,
                         clipped_count_stddev, expected_num_records, geometric_update)
        self._quantile_estimator_query = SeededQuantileEstimatorQuery(
            initial_l2_norm_clip, target_unclipped_quantile, learning_rate, clipped_count_stddev,
            expected_num_records, geometric_update, seed=seed,
        )
        self._sum_query = SeededGaussianSumQuery(initial_l2_norm_clip, noise_multiplier * initial_l2_norm_clip,
                                                 seed=seed, stream=_VALUE_STREAM)

    def get_noised_result(self, sample_state, global_state):  # noqa: D102
        result, new_state, event = super().get_noised_result(sample_state, global_state)
        # The parent rebuilds the sum state from the new clip; carry the advanced noise seed over.
        sum_state = new_state.sum_state._replace(noise_seed=_advance(global_state.sum_state.noise_seed))
        return result, new_state._replace(sum_state=sum_state), event


def adaptive_count_stddev(noise_multiplier: float, clients_per_round: float) -> float:
    """Noise on the clipped count of adaptive clipping.

    TFF's default is clients_per_round / 20, which only works while noise_multiplier <
    clients_per_round / 10 (the count noise takes its share of the privacy budget). Small
    cohorts with large noise get count noise = noise_multiplier instead, which spends a
    quarter of the budget's variance on the count: value noise z' = z / sqrt(3/4).
    """
    default = 0.05 * clients_per_round
    return default if noise_multiplier < 2 * default else float(noise_multiplier)


def dp_factory(
    noise_multiplier: float,
    clients_per_round: float,
    clip: float,
    *,
    adaptive: bool = False,
    target_quantile: float = 0.5,
    clip_lr: float = 0.2,
    noise: str = "seeded",
    seed: int = 0,
) -> tff.aggregators.UnweightedAggregationFactory:
    """The DP mean aggregator of DP-FedAvg (clip each client update, sum, add noise, divide by m)."""
    z, m, c = float(noise_multiplier), float(clients_per_round), float(clip)
    if noise == "tff":
        if adaptive:
            return tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
                z, m, initial_l2_norm_clip=c, target_unclipped_quantile=float(target_quantile),
                learning_rate=float(clip_lr), clipped_count_stddev=adaptive_count_stddev(z, m),
            )
        return tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(z, m, c)
    if noise != "seeded":
        raise ValueError(f"noise must be 'seeded' or 'tff', got {noise!r}")
    if adaptive:
        count_stddev = adaptive_count_stddev(z, m)
        value_z, count_stddev = _value_noise(z, m, count_stddev)
        query = SeededQuantileAdaptiveClipSumQuery(
            initial_l2_norm_clip=c, noise_multiplier=value_z, target_unclipped_quantile=float(target_quantile),
            learning_rate=float(clip_lr), clipped_count_stddev=count_stddev, expected_num_records=m,
            geometric_update=True, seed=seed,
        )
    else:
        query = SeededGaussianSumQuery(l2_norm_clip=c, stddev=c * z, seed=seed)
    return tff.aggregators.DifferentiallyPrivateFactory(tfp.NormalizedQuery(query, denominator=m))


def _value_noise(noise_multiplier: float, clients_per_round: float, count_stddev: float) -> tuple[float, float]:
    from tensorflow_federated.python.aggregators.differential_privacy import adaptive_clip_noise_params

    return adaptive_clip_noise_params(noise_multiplier, clients_per_round, count_stddev)


# --------------------------------------------------------------------------- DP-FTRL (tree aggregation)
#
# TFF's DP-FTRL aggregators are DifferentiallyPrivateFactory.tree_aggregation (fixed clip, one tree,
# never restarted) and tree_adaptive (adaptive clip, restarts at rounds r with r % frequency ==
# warmup, warmup >= 1). Restarting at every epoch boundary, which the per-epoch accounting needs
# (a client at most once per tree), is neither, so ftrl_factory builds the very queries those two
# constructors build (tensorflow_privacy's TreeResidualSumQuery / QAdaClipTreeResSumQuery inside a
# NormalizedQuery) and wraps them in a RestartQuery with PeriodicRoundRestartIndicator(period=epoch).
# Their Gaussian node noise is tf.random.stateless_normal from a seed kept in the aggregator state:
# "seeded" fixes that seed from the run seed (reproducible, and a resumed run continues the same
# noise); "tff" leaves it to TFF (seeded from the clock at initialize, as the stock factories do; it
# is in the state too, so a resume from a checkpoint is still exact, but two fresh runs differ).

_FTRL_SEED_SPACING = 2 ** 41  # node k of a tree uses seed (s + k*leaves): keep the two trees' seeds apart


def ftrl_noise_seeds(seed: int) -> tuple[int, int]:
    """(value tree seed, count tree seed) for a run seed in [0, 2^20)."""
    if not 0 <= int(seed) < 2 ** 20:
        raise ValueError(f"the DP-FTRL noise needs a seed in [0, 2^20), got {seed}")
    value = int(seed) * 2 * _FTRL_SEED_SPACING + _VALUE_STREAM
    return value, value + _FTRL_SEED_SPACING


class SeededTreeQuantileEstimatorQuery(quantile_estimator_query.TreeQuantileEstimatorQuery):
    """TreeQuantileEstimatorQuery whose count tree takes a noise seed (tensorflow_privacy leaves it to the clock)."""

    def __init__(self, *args, noise_seed: int | None = None, **kwargs) -> None:
        self._count_noise_seed = noise_seed  # read by _construct_below_estimate_query during super().__init__
        super().__init__(*args, **kwargs)

    def _construct_below_estimate_query(self, below_estimate_stddev, expected_num_records):
        from tensorflow_privacy.privacy.dp_query import tree_aggregation_query

        sum_query = tree_aggregation_query.TreeResidualSumQuery.build_l2_gaussian_query(
            clip_norm=0.5, noise_multiplier=2 * below_estimate_stddev, record_specs=tf.TensorSpec([]),
            noise_seed=self._count_noise_seed)
        return tfp.NormalizedQuery(sum_query, denominator=expected_num_records)


def adaptive_tree_query(value_z: float, m: float, clip: float, record_specs, target_quantile: float,
                        clip_lr: float, count_stddev: float, seeds: tuple[int, int] | None):
    """tree_adaptive's QAdaClipTreeResSumQuery (value noise multiplier value_z, count noise stddev
    count_stddev), with both trees seeded when `seeds` is given."""
    query = tfp.QAdaClipTreeResSumQuery(clip, value_z, record_specs, target_quantile, clip_lr, count_stddev, m,
                                        geometric_update=True, noise_seed=seeds[0] if seeds else None)
    if seeds is not None:
        query._quantile_estimator_query = SeededTreeQuantileEstimatorQuery(  # noqa: SLF001 - same object, seeded
            clip, target_quantile, clip_lr, count_stddev, m, True, noise_seed=seeds[1])
    return query


def ftrl_query(
    noise_multiplier: float,
    clients_per_round: float,
    clip: float,
    record_specs,
    *,
    restart_period: int | None,
    adaptive: bool = False,
    target_quantile: float = 0.5,
    clip_lr: float = 0.2,
    noise: str = "seeded",
    seed: int = 0,
    efficient: bool = True,
):
    """The DP-FTRL mean query: tree-noised residual sum of clipped updates / clients_per_round."""
    from tensorflow_privacy.privacy.dp_query import restart_query, tree_aggregation_query

    z, m, c = float(noise_multiplier), float(clients_per_round), float(clip)
    if noise not in ("seeded", "tff"):
        raise ValueError(f"noise must be 'seeded' or 'tff', got {noise!r}")
    seeds = ftrl_noise_seeds(seed) if noise == "seeded" else None
    if adaptive:
        if not efficient:
            raise ValueError("adaptive clipping uses tensorflow_privacy's efficient tree only")
        count_stddev = adaptive_count_stddev(z, m)
        value_z, count_stddev = _value_noise(z, m, count_stddev)
        sum_query = adaptive_tree_query(value_z, m, c, record_specs, float(target_quantile), float(clip_lr),
                                         count_stddev, seeds)
    else:
        sum_query = tree_aggregation_query.TreeResidualSumQuery.build_l2_gaussian_query(
            c, z, record_specs, noise_seed=seeds[0] if seeds else None, use_efficient=efficient)
    if restart_period is not None:
        sum_query = restart_query.RestartQuery(sum_query, restart_query.PeriodicRoundRestartIndicator(restart_period))
    return tfp.NormalizedQuery(sum_query, denominator=m)


def ftrl_factory(noise_multiplier: float, clients_per_round: float, clip: float, record_specs, *,
                 restart_period: int | None, adaptive: bool = False, target_quantile: float = 0.5,
                 clip_lr: float = 0.2, noise: str = "seeded", seed: int = 0,
                 efficient: bool = True) -> tff.aggregators.UnweightedAggregationFactory:
    """The DP-FTRL aggregator (use with server SGD, optionally momentum: see models/dp_ftrl.py).

    With noise "tff", a fixed clip and no restarts this is literally TFF's
    DifferentiallyPrivateFactory.tree_aggregation.
    """
    if noise == "tff" and not adaptive and restart_period is None:
        return tff.aggregators.DifferentiallyPrivateFactory.tree_aggregation(
            float(noise_multiplier), float(clients_per_round), float(clip), record_specs, use_efficient=efficient)
    return tff.aggregators.DifferentiallyPrivateFactory(ftrl_query(
        noise_multiplier, clients_per_round, clip, record_specs, restart_period=restart_period, adaptive=adaptive,
        target_quantile=target_quantile, clip_lr=clip_lr, noise=noise, seed=seed, efficient=efficient))
