"""DP-FTRL: the numpy tree noise and update (models/dp_ftrl.py) against tensorflow_privacy / TFF, and its accounting."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from models import dp, dp_ftrl

D = 48  # one-hot node noise: each draw its own coordinate, so a round's noise shows its exact coefficients


def one_hot(k: int, dim: int) -> np.ndarray:
    return np.eye(dim, dtype=np.float32)[k]


def numpy_coefficients(rounds: int, efficient: bool, period: int | None) -> np.ndarray:
    """(rounds, draws): row t = how round t's residual noise combines the i.i.d. node draws."""
    state = dp_ftrl.tree_init(D, 1.0, 0, efficient=efficient, node=one_hot)
    rows = []
    for r in range(1, rounds + 1):
        noise, state = dp_ftrl.noise_for_round(state, r, period, node=one_hot)
        rows.append(noise)
    return np.array(rows)


# --------------------------------------------------------------------------- numpy only


def test_cumulative_noise_is_one_node_per_set_bit_and_the_efficient_tree_has_less_variance():
    plain = np.cumsum(numpy_coefficients(16, False, None), axis=0)  # the residuals add up to the tree's cumsum
    efficient = np.cumsum(numpy_coefficients(16, True, None), axis=0)
    for t in range(1, 17):  # plain tree: the noise of t leaves is one node per set bit of t (Dwork et al. 2010)
        assert np.count_nonzero(plain[t - 1]) == bin(t).count("1")
    var_plain, var_eff = (plain ** 2).sum(axis=1), (efficient ** 2).sum(axis=1)
    np.testing.assert_allclose(var_plain, [bin(t).count("1") for t in range(1, 17)])
    assert np.all(var_eff <= var_plain + 1e-6)
    # Honaker: the root of 16 leaves has variance 1.9375 (v_d = v_{d-1}/2 + 1), weighted by 1/(2 - 2^-4)
    assert var_eff[15] == pytest.approx(1.9375 * (16 / 31) ** 2, rel=1e-5)


def test_restart_forgets_the_previous_tree():
    c = numpy_coefficients(10, True, 4)
    np.testing.assert_array_equal(np.cumsum(c[4:8], axis=0)[0], c[4])  # round 5 starts from zero noise
    assert not np.any(c[4:8][:, np.flatnonzero(np.abs(c[:4]).sum(axis=0))])  # no draw of tree 1 in tree 2
    assert dp_ftrl.restart_due(4, 4) and dp_ftrl.restart_due(8, 4) and not dp_ftrl.restart_due(5, 4)
    assert not dp_ftrl.restart_due(4, None)


def test_numpy_gaussian_noise_has_the_tree_covariance():
    t, dim = 8, 30_000
    coeff = numpy_coefficients(t, True, None)
    state = dp_ftrl.tree_init(dim, 2.0, seed=5)
    rows = []
    for r in range(1, t + 1):
        noise, state = dp_ftrl.noise_for_round(state, r, None)
        rows.append(noise.astype(np.float64))
    empirical = np.array(rows) @ np.array(rows).T / dim
    np.testing.assert_allclose(empirical, 4.0 * coeff @ coeff.T, atol=0.12)  # stddev 2; entries' sd ~ 0.03


def test_state_round_trips_through_arrays_and_continues_the_same_noise():
    params = dp_ftrl.FtrlParams(noise_multiplier=1.1, clients_per_round=3, clip=0.5, restart_period=3, momentum=0.9,
                                server_lr=0.7, adaptive=dp_ftrl.AdaptiveClip(count_stddev=0.8))
    rng = np.random.default_rng(1)
    shapes = [(2, 3), (5,)]
    rounds = [[[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(3)] for _ in range(7)]

    def go(weights, state, todo):
        for updates in todo:
            weights, state, _ = dp_ftrl.ftrl_round(weights, state, params, updates)
        return weights, state

    w0 = [np.zeros(s, np.float32) for s in shapes]
    whole, _ = go(w0, dp_ftrl.init(params, 11, seed=9), rounds)
    half_w, half_state = go(w0, dp_ftrl.init(params, 11, seed=9), rounds[:4])
    arrays = {k: np.array(v) for k, v in dp_ftrl.state_to_arrays(half_state).items()}  # as np.load would give
    resumed, _ = go(half_w, dp_ftrl.state_from_arrays(arrays), rounds[4:])
    for a, b in zip(whole, resumed):
        np.testing.assert_array_equal(a, b)


def test_server_sgd_momentum_over_residuals_is_ftrl_with_momentum():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=6).astype(np.float32)
    residuals = [rng.normal(size=6).astype(np.float32) for _ in range(9)]
    w, m = w0, np.zeros(6, np.float32)
    for g in residuals:
        w, m = dp_ftrl.server_update(w, m, g, 0.3, 0.9)
    s = np.cumsum(np.array(residuals, np.float64), axis=0)  # noised cumulative sums s_t
    np.testing.assert_allclose(w, dp_ftrl.ftrl_weights(w0, list(s), 0.3, 0.9), rtol=1e-5, atol=1e-5)


def test_adaptive_value_noise_keeps_the_total_noise_multiplier():
    z_v = dp_ftrl.adaptive_value_noise_multiplier(1.0, 1.5)
    assert z_v ** -2 + 3.0 ** -2 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        dp_ftrl.adaptive_value_noise_multiplier(2.0, 0.5)


# --------------------------------------------------------------------------- accounting


def test_ftrl_epsilon_restart_per_epoch_uses_dp_accountings_tree_events():
    import dp_accounting

    z = 3.0
    acc = dp.make_ftrl_accountant("rdp")
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.SingleEpochTreeAggregationDpEvent(z, 44), 2))
    acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, 10))
    assert dp.ftrl_epsilon(z, 98, 1e-6, rounds_per_epoch=44) == pytest.approx(acc.get_epsilon(1e-6))
    assert dp.ftrl_sensitivity_sq(98, rounds_per_epoch=44) == 6 + 6 + 4
    # the same mechanism as one Gaussian of multiplier z / sqrt(S): RDP identical, PLD tighter
    gauss = dp.make_accountant("rdp")
    gauss.compose(dp_accounting.GaussianDpEvent(z / 4.0))
    assert gauss.get_epsilon(1e-6) == pytest.approx(acc.get_epsilon(1e-6))
    assert dp.ftrl_epsilon(z, 98, 1e-6, rounds_per_epoch=44, accountant="pld") < acc.get_epsilon(1e-6)
    assert dp.ftrl_epsilon(0.0, 5, rounds_per_epoch=4) == math.inf and dp.ftrl_epsilon(1.0, 0, rounds_per_epoch=4) == 0


@pytest.mark.parametrize("z", [0.3, 0.75, 2.0])
def test_closed_form_gaussian_epsilon_equals_dp_accountings_pld(z):
    import dp_accounting

    acc = dp.make_accountant("pld")
    acc.compose(dp_accounting.GaussianDpEvent(z))
    assert dp.gaussian_epsilon(z, 1e-6) == pytest.approx(acc.get_epsilon(1e-6), rel=1e-6)
    assert dp.ftrl_epsilon(4 * z, 98, 1e-6, rounds_per_epoch=44, accountant="pld") == pytest.approx(
        dp.gaussian_epsilon(z, 1e-6))  # S = 16 there: z_eff = z


@pytest.mark.parametrize("rule,args", [("restart", {"rounds_per_epoch": 44}), ("min_separation", {"min_separation": 43})])
def test_ftrl_calibration_hits_the_target(rule, args):
    z = dp.ftrl_calibrate_noise_multiplier(8.0, 100, 1e-6, rule=rule, **args)
    assert dp.ftrl_epsilon(z, 100, 1e-6, rule=rule, **args) <= 8.0 < dp.ftrl_epsilon(z - 1e-3, 100, 1e-6, rule=rule, **args)


def test_min_separation_sensitivity_matches_tensorflow_privacy():
    pytest.importorskip("tensorflow_privacy")
    from tensorflow_privacy.privacy.analysis import tree_aggregation_accountant as tfp_acc

    for steps, k, b in [(1, 1, 0), (7, 7, 0), (16, 3, 4), (33, 5, 6), (100, 3, 43), (50, 2, 10)]:
        ours = dp.ftrl_single_tree_sensitivity_sq(steps, k, b)
        assert ours == tfp_acc._max_tree_sensitivity_square_sum(k, b, steps), (steps, k, b)  # noqa: SLF001
    orders = list(dp.RDP_ORDERS)
    rdp = tfp_acc.compute_rdp_tree_restart(1.3, [44, 44, 10], orders)
    assert dp.ftrl_sensitivity_sq(98, rounds_per_epoch=44) / (2 * 1.3 ** 2) == pytest.approx(rdp[0] / orders[0])


# --------------------------------------------------------------------------- against tensorflow_privacy / TFF


@pytest.mark.parametrize("efficient", [True, False])
@pytest.mark.parametrize("period", [None, 5])
def test_noise_structure_equals_tensorflow_privacys_tree_residual_query(efficient, period):
    """The same draws in the same order, the same combination of them every round, the same restarts."""
    tf = pytest.importorskip("tensorflow")
    from tensorflow_privacy.privacy.dp_query import restart_query, tree_aggregation, tree_aggregation_query

    class OneHot(tree_aggregation.ValueGenerator):
        def initialize(self):
            return tf.constant(0, tf.int32)

        def next(self, state):
            return tf.one_hot(state, D, dtype=tf.float32), state + 1

    query = tree_aggregation_query.TreeResidualSumQuery(
        record_specs=tf.TensorSpec([D]), noise_generator=OneHot(), clip_fn=lambda r, c: tf.clip_by_global_norm(r, c)[0],
        clip_value=1.0, use_efficient=efficient)
    if period:
        query = restart_query.RestartQuery(query, restart_query.PeriodicRoundRestartIndicator(period))
    state, rows = query.initial_global_state(), []
    for _ in range(13):
        result, state, _ = query.get_noised_result(tf.zeros([D]), state)
        rows.append(result.numpy())
    np.testing.assert_allclose(numpy_coefficients(13, efficient, period), np.array(rows), atol=1e-6)


def test_tff_seeded_gaussian_tree_noise_has_the_numpy_covariance():
    tf = pytest.importorskip("tensorflow")
    from tensorflow_privacy.privacy.dp_query import tree_aggregation_query

    t, dim = 8, 30_000
    query = tree_aggregation_query.TreeResidualSumQuery.build_l2_gaussian_query(
        2.0, 1.0, tf.TensorSpec([dim]), noise_seed=17, use_efficient=True)  # node stddev clip * z = 2
    state, rows = query.initial_global_state(), []
    for _ in range(t):
        result, state, _ = query.get_noised_result(tf.zeros([dim]), state)
        rows.append(result.numpy().astype(np.float64))
    coeff = numpy_coefficients(t, True, None)
    np.testing.assert_allclose(np.array(rows) @ np.array(rows).T / dim, 4.0 * coeff @ coeff.T, atol=0.12)


def _tff_process(adaptive: bool, shapes, m: int, clip: float, period: int):
    tf = pytest.importorskip("tensorflow")
    tff = pytest.importorskip("tensorflow_federated")
    import tensorflow_privacy as tfp
    from tensorflow_privacy.privacy.dp_query import restart_query

    from tff_sim import dp_aggregators

    specs = [tf.TensorSpec(s, tf.float32) for s in shapes]
    if adaptive:  # noise off everywhere, the count included (TFF's defaults would noise the count)
        inner = dp_aggregators.adaptive_tree_query(0.0, float(m), clip, specs, 0.5, 0.3, 0.0, seeds=(1, 2))
        query = tfp.NormalizedQuery(restart_query.RestartQuery(
            inner, restart_query.PeriodicRoundRestartIndicator(period)), denominator=float(m))
        factory = tff.aggregators.DifferentiallyPrivateFactory(query)
    else:
        factory = dp_aggregators.ftrl_factory(0.0, m, clip, specs, restart_period=period, seed=3)
    return factory.create(tff.types.to_type([(np.float32, s) for s in shapes]))


@pytest.mark.parametrize("adaptive", [False, True])
def test_noise_off_numpy_rounds_equal_tff_aggregator_and_server_sgdm(adaptive):
    tf = pytest.importorskip("tensorflow")
    tff = pytest.importorskip("tensorflow_federated")
    shapes, m, clip, period, lr, momentum = [(3, 2), (4,)], 3, 0.6, 2, 0.5, 0.9
    proc = _tff_process(adaptive, shapes, m, clip, period)
    opt = tff.learning.optimizers.build_sgdm(lr, momentum=momentum)
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=s).astype(np.float32) for s in shapes]
    tff_w = [tf.constant(w) for w in weights]
    opt_state, agg_state = opt.initialize([tf.TensorSpec(s, tf.float32) for s in shapes]), proc.initialize()
    params = dp_ftrl.FtrlParams(0.0, m, clip, restart_period=period, server_lr=lr, momentum=momentum,
                                adaptive=dp_ftrl.AdaptiveClip(0.5, 0.3, 0.0) if adaptive else None)
    state = dp_ftrl.init(params, sum(int(np.prod(s)) for s in shapes), seed=0)
    clips = []
    for _ in range(5):  # two restarts; some updates above the clip, some below
        updates = [[(rng.normal(size=s) * scale).astype(np.float32) for s in shapes] for scale in (0.05, 0.3, 2.0)]
        out = proc.next(agg_state, updates)
        agg_state = out.state
        opt_state, tff_w = opt.next(opt_state, tff_w, [tf.constant(np.asarray(x)) for x in out.result])
        weights, state, metrics = dp_ftrl.ftrl_round(weights, state, params, updates)
        clips.append(metrics["clip"])
        for a, b in zip(weights, tff_w):
            np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-6)
    if adaptive:
        assert clips[:2] == [clip, clip] and clips[2] != clip  # the clip moves at the restart, not before


def test_tff_ftrl_noise_seeds_keep_the_trees_apart():
    pytest.importorskip("tensorflow_federated")
    from tff_sim.dp_aggregators import ftrl_noise_seeds

    seeds = [s for seed in range(4) for s in ftrl_noise_seeds(seed)]
    assert len(set(seeds)) == 8 and min(np.diff(sorted(seeds))) >= 2 ** 40


def test_dataclass_state_is_frozen():
    state = dp_ftrl.tree_init(3, 1.0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.draws = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- tff_sim's participation rules and flags


def test_shuffled_rule_is_once_per_epoch_and_cyclic_rule_is_exactly_every_k_rounds():
    from tff_sim import sampling

    ids = [f"c{i}" for i in range(23)]
    k = sampling.rounds_per_epoch(5, 23)
    assert k == 4
    seen: dict[str, list[int]] = {}
    for r in range(1, 4 * k + 1):
        cohort = sampling.sample_clients(ids, r, 3, 5, "shuffled")
        assert len(cohort) == 5 and cohort == sampling.sample_clients(ids, r, 3, 5, "shuffled")  # seeded
        for cid in cohort:
            seen.setdefault(cid, []).append(r)
    for rounds in seen.values():
        epochs = [(r - 1) // k for r in rounds]
        assert len(epochs) == len(set(epochs))  # at most once per epoch
    cyclic = [sampling.sample_clients(ids, r, 3, 5, "cyclic") for r in range(1, 3 * k + 1)]
    assert all(cyclic[i] == cyclic[i + k] for i in range(2 * k))  # every K rounds, never closer
    assert len({c for cohort in cyclic[:k] for c in cohort}) == 5 * k
    with pytest.raises(ValueError):
        sampling.rounds_per_epoch(30, 23)


def test_dp_ftrl_flags_leave_existing_config_hashes_alone_and_check_their_rule():
    from tff_sim.config import SimConfig, parse_args

    for cfg in (SimConfig(), SimConfig(dp=True, noise_multiplier=1.0), SimConfig(dp=True, adaptive_clip=True)):
        assert not {"dp_mechanism", "ftrl_restart", "ftrl_efficient"} & set(cfg.identity())
    ftrl = parse_args(["--dp", "--dp-mechanism", "dp-ftrl", "--server-optimizer", "momentum"])
    assert ftrl.sampling_mode == "shuffled" and ftrl.identity()["dp_mechanism"] == "dp-ftrl"
    assert ftrl.replace(ftrl_restart="none").sampling_mode == "cyclic"
    assert ftrl.config_hash() != ftrl.replace(ftrl_restart="none").config_hash()
    with pytest.raises(ValueError, match="needs --dp"):
        SimConfig(dp_mechanism="dp-ftrl", server_optimizer="sgd")
    with pytest.raises(ValueError, match="participation rule"):
        SimConfig(dp=True, dp_mechanism="dp-ftrl", server_optimizer="sgd", sampling="poisson")
    with pytest.raises(ValueError, match="server-optimizer"):
        SimConfig(dp=True, dp_mechanism="dp-ftrl")  # nesterov (the default) is not FTRL
    with pytest.raises(ValueError, match="DP-FTRL"):
        SimConfig(dp=True, sampling="shuffled")


def test_privacy_plan_accounts_the_rule_the_sampler_enforces():
    from tff_sim import privacy
    from tff_sim.config import SimConfig

    cfg = SimConfig(dp=True, dp_mechanism="dp-ftrl", server_optimizer="momentum", clients_per_round=20, rounds=88,
                    noise_multiplier=1.0)
    plan = privacy.plan(cfg, 886)
    assert (plan.rounds_per_epoch, plan.restart_period, plan.delta) == (44, 44, 1e-6)
    assert plan.epsilon(88)["rdp"] == pytest.approx(dp.ftrl_epsilon(1.0, 88, 1e-6, rounds_per_epoch=44))
    single = privacy.plan(cfg.replace(ftrl_restart="none"), 886)
    assert single.restart_period is None
    assert single.epsilon(88)["rdp"] == pytest.approx(
        dp.ftrl_epsilon(1.0, 88, 1e-6, rule="min_separation", min_separation=43, max_participations=2))
    calibrated = privacy.plan(cfg.replace(noise_multiplier=None, target_epsilon=10.0), 886)
    assert calibrated.epsilon(88)["rdp"] == pytest.approx(10.0, rel=1e-3)


@pytest.mark.parametrize("adaptive", [False, True])
def test_seeded_tff_ftrl_query_is_reproducible_from_its_seed(adaptive):
    """The query inside tff_sim's DP-FTRL aggregator (value tree, and count tree when adaptive) is seeded."""
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_federated")
    from tff_sim.dp_aggregators import ftrl_query

    shapes = [(4,), (2, 2)]
    records = [[tf.constant(np.full(s, 0.1 * i, np.float32)) for s in shapes] for i in range(1, 4)]

    def two_rounds(seed: int) -> list[np.ndarray]:
        query = ftrl_query(1.0, 3, 0.5, [tf.TensorSpec(s, tf.float32) for s in shapes], restart_period=1,
                           adaptive=adaptive, seed=seed)
        state, results = query.initial_global_state(), []
        for _ in range(2):  # restart after each round: the reset trees keep drawing from the seeded streams
            params = query.derive_sample_params(state)
            sample = query.initial_sample_state(records[0])
            for record in records:
                sample = query.accumulate_record(params, sample, record)
            result, state, _ = query.get_noised_result(sample, state)
            results += [np.asarray(x) for x in result]
            if adaptive:
                results.append(np.asarray(state.numerator_state.inner_query_state.quantile_estimator_state.current_estimate))
        return results

    a, b, c = two_rounds(4), two_rounds(4), two_rounds(5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a[:2], c[:2]))
    if adaptive:
        assert not np.array_equal(a[-1], c[-1])  # the count noise is seeded too
