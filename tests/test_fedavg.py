"""models/fedavg.py: the delta convention, each server optimizer against a hand-computed step and
against TFF's own optimizer, state persistence, and the hyperparameters' one set of names."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from models import fedavg
from models.fedavg import FedAvgHyperparams, ServerOptimizer

W = np.array([1.0, -2.0])
G1, G2 = np.array([0.5, -1.0]), np.array([-0.2, 0.4])


def two_steps(opt: ServerOptimizer) -> tuple[np.ndarray, np.ndarray]:
    state = opt.init([W])
    state, (w1,) = opt.apply(state, [W], [G1])
    _, (w2,) = opt.apply(state, [w1], [G2])
    return w1, w2


# --------------------------------------------------------------------------- convention and averaging


def test_delta_is_trained_minus_base_and_sgd_lr1_is_the_weighted_average_of_the_models():
    base = [np.array([1.0, 2.0], np.float32), np.array([[0.5]], np.float32)]
    a = [np.array([2.0, 2.0], np.float32), np.array([[1.5]], np.float32)]
    b = [np.array([1.0, 5.0], np.float32), np.array([[0.5]], np.float32)]
    np.testing.assert_array_equal(fedavg.client_delta(a, base)[0], [1.0, 0.0])
    state = fedavg.server_init(base, ServerOptimizer("sgd", lr=1.0))
    new = fedavg.fedavg_round(state, [a, b], [1, 3], ServerOptimizer("sgd", lr=1.0))
    for got, x, y in zip(new.weights, a, b):
        np.testing.assert_allclose(got, (1 * x + 3 * y) / 4, rtol=1e-6)
        assert got.dtype == np.float32
    assert new.round == 1 and state.round == 0  # pure: the old state is untouched
    np.testing.assert_array_equal(state.weights[0], [1.0, 2.0])
    # the pseudo-gradient is -mean_delta: a positive delta moves the weights up under every optimizer
    for name in fedavg.SERVER_OPTIMIZERS:
        opt = ServerOptimizer(name, lr=0.1)
        moved = fedavg.server_update(fedavg.server_init([W], opt), [np.array([0.3, -0.3])], opt).weights[0] - W
        assert moved[0] > 0 and moved[1] < 0, name


def test_weighted_mean_matches_the_servers_streaming_mean():
    from server.aggregation import MeanAccumulator

    rng = np.random.default_rng(0)
    deltas = [[rng.standard_normal(5).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)]
              for _ in range(4)]
    counts = [3, 1, 7, 2]
    acc = MeanAccumulator(11)
    for d, n in zip(deltas, counts):
        acc.add(d, n)
    got = np.concatenate([t.reshape(-1).astype(np.float64) for t in fedavg.weighted_mean(deltas, counts)])
    np.testing.assert_allclose(got, acc.mean(), rtol=1e-6)
    with pytest.raises(ValueError):
        fedavg.weighted_mean(deltas, counts[:3])
    with pytest.raises(ValueError):
        fedavg.weighted_mean(deltas, [0, 0, 0, 0])


# --------------------------------------------------------------------------- each optimizer by hand


def test_sgd_momentum_and_nesterov_by_hand():
    w1, w2 = two_steps(ServerOptimizer("sgd", lr=0.1))
    np.testing.assert_allclose(w1, [0.95, -1.9])
    np.testing.assert_allclose(w2, [0.97, -1.94])

    w1, w2 = two_steps(ServerOptimizer("momentum", lr=0.1, momentum=0.9))
    np.testing.assert_allclose(w1, [0.95, -1.9])  # a = g
    np.testing.assert_allclose(w2, [0.95 - 0.1 * (0.45 - 0.2), -1.9 - 0.1 * (-0.9 + 0.4)])  # a = 0.9 g1 + g2

    w1, w2 = two_steps(ServerOptimizer("nesterov", lr=0.1, momentum=0.9))
    np.testing.assert_allclose(w1, [1.0 - 0.1 * 1.9 * 0.5, -2.0 + 0.1 * 1.9 * 1.0])  # g + 0.9 a, a = g
    a2 = 0.9 * G1 + G2
    np.testing.assert_allclose(w2, w1 - 0.1 * (G2 + 0.9 * a2))


def test_adam_is_tffs_form_bias_correction_in_the_rate_and_eps_outside_the_root():
    opt = ServerOptimizer("adam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    w1, w2 = two_steps(opt)
    # t = 1: a = 0.1 g, p = 0.01 g^2, rate 0.1 * sqrt(0.01) / 0.1 = 0.1
    np.testing.assert_allclose(w1, [1.0 - 0.1 * 0.05 / (0.05 + 1e-3), -2.0 + 0.1 * 0.1 / (0.1 + 1e-3)])
    # the textbook form m_hat / (sqrt(v_hat) + eps) differs at t = 1 (eps is not rescaled): 0.0998 vs 0.0980
    assert abs((1.0 - 0.1 * 0.5 / (0.5 + 1e-3)) - w1[0]) > 1e-3
    a = 0.9 * 0.1 * G1 + 0.1 * G2
    p = 0.99 * 0.01 * G1**2 + 0.01 * G2**2
    rate = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    np.testing.assert_allclose(w2, w1 - rate * a / (np.sqrt(p) + 1e-3))


def test_yogi_and_adagrad_by_hand_with_their_initial_preconditioners():
    w1, w2 = two_steps(ServerOptimizer("yogi", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3))
    p1 = 1e-6 + 0.01 * G1**2  # g^2 > p: p grows by (1 - b2) g^2
    np.testing.assert_allclose(w1, W - 0.1 * (0.1 * G1) / (np.sqrt(p1) + 1e-3))
    p2 = p1 + 0.01 * np.sign(G2**2 - p1) * G2**2
    a2 = 0.09 * G1 + 0.1 * G2
    np.testing.assert_allclose(w2, w1 - 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2) * a2 / (np.sqrt(p2) + 1e-3))

    w1, w2 = two_steps(ServerOptimizer("adagrad", lr=0.1, eps=1e-3))
    np.testing.assert_allclose(w1, W - 0.1 * G1 / np.sqrt(0.1 + G1**2 + 1e-3))
    np.testing.assert_allclose(w2, w1 - 0.1 * G2 / np.sqrt(0.1 + G1**2 + G2**2 + 1e-3))


# --------------------------------------------------------------------------- the same as TFF

HP = dict(server_lr=0.3, server_momentum=0.7, beta1=0.8, beta2=0.95, eps=1e-2)  # not the defaults: catches swaps


@pytest.mark.parametrize("name", fedavg.SERVER_OPTIMIZERS)
@pytest.mark.parametrize("hp", [HP, {}], ids=["custom", "defaults"])
def test_numpy_server_update_equals_tff_optimizer(name, hp):
    """Six steps of models.fedavg.server_update against TFF's optimizer from tff_sim.process (what the
    simulations run), on two float32 tensors with gradients of changing sign and size."""
    pytest.importorskip("tensorflow_federated")
    import tensorflow as tf

    from tff_sim.process import tff_server_optimizer

    params = FedAvgHyperparams(server_optimizer=name, **hp)
    rng = np.random.default_rng(1)
    w0 = [rng.standard_normal(4).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)]
    deltas = [[(rng.standard_normal(w.shape) * s).astype(np.float32) for w in w0] for s in (1.0, 0.1, 2.0, 0.01, 0.5, 1.0)]
    deltas[3][0][:] = 0.0  # a zero gradient (Yogi's sign term, Adagrad's unchanged preconditioner)

    tff_opt = tff_server_optimizer(params)
    tff_state = tff_opt.initialize([tf.TensorSpec(w.shape, tf.float32) for w in w0])
    tff_w = [tf.constant(w) for w in w0]
    opt = fedavg.build_server_optimizer(params)
    state = fedavg.server_init(w0, opt)
    for step, delta in enumerate(deltas, 1):
        # TFF's FedAvg hands its optimizer initial - trained = -delta as the gradient
        tff_state, tff_w = tff_opt.next(tff_state, tff_w, [tf.constant(-d) for d in delta])
        state = fedavg.server_update(state, delta, opt)
        for got, want in zip(state.weights, tff_w):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want.numpy(), rtol=2e-5, atol=2e-6, err_msg=f"{name}, step {step}")
    moved = max(float(np.max(np.abs(w - w_0))) for w, w_0 in zip(state.weights, w0))
    assert moved > 1e-2  # the comparison says something: the weights moved far beyond the tolerance
    for key in opt.state_keys:  # and the optimizer states agree too (TFF's keys are the same)
        for got, want in zip(state.opt_state[key], tff_state[key]):
            np.testing.assert_allclose(got, np.asarray(want), rtol=2e-5, atol=1e-7)


# --------------------------------------------------------------------------- state and hyperparameters


@pytest.mark.parametrize("name", fedavg.SERVER_OPTIMIZERS)
def test_state_round_trips_through_flat_arrays(name, tmp_path):
    opt = ServerOptimizer(name, lr=0.2)
    w = np.linspace(-1, 1, 5)
    state = fedavg.server_init([w], opt)
    state = fedavg.server_update(state, [np.full(5, 0.1)], opt)
    path = tmp_path / "opt.npz"
    np.savez(path, **fedavg.flat_state(state.opt_state))
    with np.load(path) as saved:
        restored = fedavg.unflat_state(dict(saved), opt.state_keys)
    resumed = fedavg.server_update(fedavg.ServerState(state.weights, restored, 1), [np.full(5, -0.3)], opt)
    straight = fedavg.server_update(state, [np.full(5, -0.3)], opt)
    np.testing.assert_array_equal(resumed.weights[0], straight.weights[0])
    assert set(restored) == set(state.opt_state)


def test_hyperparams_validate_and_map_to_the_task_keys():
    hp = FedAvgHyperparams()
    assert (hp.beta1, hp.beta2, hp.eps, hp.server_momentum) == (0.9, 0.99, 1e-3, 0.9)
    for bad in (dict(server_optimizer="rmsprop"), dict(server_lr=0.0), dict(server_momentum=1.0),
                dict(beta2=1.0), dict(eps=0.0), dict(client_epochs=0), dict(client_lr=-1.0)):
        with pytest.raises(ValueError):
            FedAvgHyperparams(**bad)
    custom = FedAvgHyperparams(client_lr=0.2, client_epochs=3, batch_size=8)
    task = fedavg.task_fields(custom)
    assert task == {"epochs": 3, "batch_size": 8, "learning_rate": 0.2}  # the HTTP contract's names
    back = fedavg.hyperparams_from_task(task)
    assert (back.client_lr, back.client_epochs, back.batch_size) == (0.2, 3, 8)
    assert fedavg.hyperparams_from_task({"lr": 0.7}).client_lr == 0.7
    assert fedavg.hyperparams_from_task({}) == FedAvgHyperparams()


def test_iterate_average_is_the_bias_corrected_ema_of_the_rounds_models():
    from models.iterate_average import check_decay, ema_update, ema_weights

    rng = np.random.default_rng(0)
    rounds = [[rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)] for _ in range(4)]
    b = 0.9
    m = None
    for t, w in enumerate(rounds, start=1):
        m = ema_update(m, w, b)
        got = ema_weights(m, t, b)
        # by hand: sum_i b^(t-i) (1-b) w_i / (1 - b^t)
        coeffs = [(1 - b) * b ** (t - i) for i in range(1, t + 1)]
        for k in range(2):
            want = sum(c * rounds[i][k].astype(np.float64) for i, c in enumerate(coeffs)) / (1 - b ** t)
            np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7)
            assert got[k].dtype == np.float32
    np.testing.assert_array_equal(ema_weights(ema_update(None, rounds[0], b), 1, b)[1], rounds[0][1])  # round 1: w_1
    zero = ema_weights(ema_update(ema_update(None, rounds[0], 0.0), rounds[1], 0.0), 2, 0.0)
    np.testing.assert_array_equal(zero[0], rounds[1][0])  # decay 0: the last round's model
    for bad in (1.0, -0.01):
        with pytest.raises(ValueError, match="decay"):
            check_decay(bad)
    with pytest.raises(ValueError, match="at least one round"):
        ema_weights(m, 0, b)
    with pytest.raises(ValueError, match="tensors"):
        ema_update(m, rounds[0][:1], b)


def test_models_fedavg_imports_no_tensorflow_or_other_packages():
    import subprocess
    import sys

    code = ("import sys, models.fedavg, models.iterate_average\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'server', 'tff_sim', 'device_app')]\n"
            "assert not bad, bad\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
