"""DP-FTRL end to end in TFF (tiny preset, real chitchat clients): participation, accounting, exact resume."""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

tff = pytest.importorskip("tensorflow_federated")

from models import dp  # noqa: E402
from tff_sim import client_data, sampling  # noqa: E402
from tff_sim.config import SimConfig  # noqa: E402
from tff_sim.runner import run  # noqa: E402

# 8 clients, 2 per round: epochs of K = 4 rounds, so 5 rounds cross one tree restart.
FTRL = dict(preset="tiny", max_train_clients=8, clients_per_round=2, max_examples_per_client=16, batch_size=16,
            eval_clients=2, eval_max_examples_per_client=32, final_eval_max_sentences=100, tensorboard=False,
            progress=False, plots=False, baselines=None, checkpoint_every=1, eval_every=0, rounds=5, dp=True,
            dp_mechanism="dp-ftrl", noise_multiplier=0.5, clip=0.3, server_optimizer="momentum", server_lr=1.0,
            server_momentum=0.9, allow_noisy_dp=True)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def data():
    prepared = client_data.prepare("chitchat", preset_name="tiny", max_train_clients=8, eval_clients=2,
                                   eval_max_examples_per_client=32, final_eval_max_sentences=100)
    return dataclasses.replace(prepared, eval_clients={})  # no federated eval process to build: time is the cost


def test_dp_ftrl_run_participation_accounting_and_exact_resume(data, tmp_path):
    cfg = SimConfig(**FTRL)
    assert cfg.sampling_mode == "shuffled"
    whole = run(cfg.replace(output=str(tmp_path / "whole")), data)
    rows = [r for r in whole.history if r["round"] > 0]
    assert [r["clients"] for r in rows] == [2] * 5
    assert all(np.isfinite(r["train_loss"]) for r in rows) and all(r["clip"] == pytest.approx(0.3) for r in rows)
    # each client at most once per epoch of K = 4 rounds (the rule the accountant assumes)
    for epoch in ((1, 2, 3, 4), (5,)):
        ids = [c for r in epoch for c in sampling.sample_clients(data.train_ids, r, cfg.seed, 2, "shuffled")]
        assert max(collections.Counter(ids).values()) == 1
    privacy = whole.summary["privacy"]
    assert privacy["mechanism"] == "dp-ftrl" and privacy["rounds_per_epoch"] == 4 and privacy["delta"] == 1e-6
    expected = dp.ftrl_epsilon(0.5, 5, 1e-6, rule="restart", rounds_per_epoch=4)
    assert rows[-1]["epsilon_rdp"] == pytest.approx(expected) == privacy["final_epsilon"]["rdp"]
    eps = [r["epsilon_rdp"] for r in rows]
    assert all(a <= b for a, b in zip(eps, eps[1:])) and rows[-1]["epsilon_pld"] < rows[-1]["epsilon_rdp"]

    def stop_after_three(row):
        if row["round"] == 3:
            raise _Stop  # like Ctrl-C mid-epoch: the tree state (buffer, seeds, restart counter) is checkpointed

    parts = cfg.replace(output=str(tmp_path / "parts"))
    with pytest.raises(_Stop):
        run(parts, data, on_round=stop_after_three)
    resumed = run(parts, data)
    assert resumed.summary["resumed_from"] == 3
    for a, b in zip(whole.weights, resumed.weights):
        np.testing.assert_array_equal(a, b)  # bit-exact across the restart after round 4, tree noise included


def test_noise_off_tff_dp_ftrl_round_equals_keras_clients_plus_numpy_dp_ftrl(data):
    """With z = 0, TFF's DP-FTRL process (clip, unweighted mean, tree residual, server SGDM) computes exactly
    models/dp_ftrl.ftrl_round on the deltas (initial - trained) of plain Keras clients, across a restart."""
    from models import dp_ftrl
    from tff_sim import process
    from tff_sim.plain_fedavg import KerasClientTrainer

    cfg = SimConfig(**{**FTRL, "clients_per_round": 4, "noise_multiplier": 0.0, "rounds": 3})
    mc, k = data.model_config, sampling.rounds_per_epoch(4, len(data.train_ids))
    w0 = process.initial_weights(mc, cfg.seed)
    learning = process.build_learning_process(cfg, mc, noise_multiplier=0.0, restart_period=k)
    state = process.initialize(learning, w0)
    trainer = KerasClientTrainer(mc, cfg.client_lr)
    params = dp_ftrl.FtrlParams(0.0, 4, cfg.clip, restart_period=k, server_lr=cfg.server_lr,
                                momentum=cfg.server_momentum)
    ftrl_state, weights = dp_ftrl.init(params, sum(w.size for w in w0), seed=0), w0
    for r in (1, 2, 3):  # K = 2: the tree restarts after round 2
        ids = sampling.sample_clients(data.train_ids, r, cfg.seed, 4, cfg.sampling_mode)
        datasets = [client_data.client_dataset(data.train[c], r, cfg.seed, 1, cfg.batch_size,
                                               cfg.max_examples_per_client) for c in ids]
        state = learning.next(state, datasets).state
        deltas = []
        for c in ids:
            batches = client_data.client_batches(data.train[c], r, cfg.seed, 1, cfg.batch_size,
                                                 cfg.max_examples_per_client)
            trained, _, _ = trainer.train(weights, batches)
            deltas.append([b - t for b, t in zip(weights, trained)])
        weights, ftrl_state, _ = dp_ftrl.ftrl_round(weights, ftrl_state, params, deltas)
    tff_w = process.get_weights_from_state(learning, state)
    for a, b in zip(tff_w, weights):
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(tff_w, w0)) > 1e-2  # the comparison can fail
