"""TFF simulations on a small slice of real chitchat clients (tiny preset, a few rounds)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

tff = pytest.importorskip("tensorflow_federated")

from tff_sim import client_data, process  # noqa: E402
from tff_sim.config import SimConfig  # noqa: E402
from tff_sim.runner import run  # noqa: E402
from tests.tff_fixtures import FedAvgComparison, interrupt_and_resume  # noqa: E402

FAST = dict(preset="tiny", max_train_clients=8, clients_per_round=4, max_examples_per_client=32, batch_size=16,
            eval_clients=4, eval_max_examples_per_client=64, final_eval_max_sentences=400, tensorboard=False,
            progress=False, baselines=None, checkpoint_every=1)


@pytest.fixture(scope="module")
def data():
    return client_data.prepare("chitchat", preset_name="tiny", max_train_clients=8, eval_clients=4,
                               eval_max_examples_per_client=64, final_eval_max_sentences=400)


@pytest.fixture(scope="module")
def fedavg(data, tmp_path_factory):
    """FedAvg, 6 clients per round out of 8, 5 rounds."""
    cfg = SimConfig(**{**FAST, "clients_per_round": 6, "tensorboard": True}, rounds=5, eval_every=5,
                    output=str(tmp_path_factory.mktemp("fedavg")))
    return run(cfg, data)


def test_training_loss_falls_and_recall_beats_chance(fedavg, data):
    rows = {row["round"]: row for row in fedavg.history}
    assert rows[5]["train_loss"] < rows[1]["train_loss"] - 0.2
    assert rows[5]["eval_loss"] < rows[0]["eval_loss"] - 0.3
    chance = 1.0 / (len(data.vocab) - 3)  # <pad>, <bos>, <oov> are never predicted
    assert rows[0]["eval_top1_recall"] < 3 * chance  # the untrained model is near chance
    for split in ("test", "heldout"):
        final = fedavg.summary["final"][split]
        assert final["top1_recall"] > 10 * chance and final["top3_recall"] > final["top1_recall"]
    out = fedavg.output
    for name in ("metrics.csv", "metrics.json", "summary.json", "report.md", "recall.png", "loss.png",
                 "model/weights.fkw", "checkpoint.npz"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    assert len(json.loads((out / "metrics.json").read_text())) == 6  # round 0 evaluation + 5 rounds


def test_exported_model_loads_with_models_alone_and_predicts_like_tff(fedavg, data):
    from models.keras_model import build_model, set_weights

    contexts = [[1], [1, 5, 9, 4], [1, *range(10, 30)]]
    script = (
        "import json, sys\n"
        "from models.bundle import load_bundle\n"
        "from models.keras_model import NextWordPredictor\n"
        "b = load_bundle(sys.argv[1])\n"
        "p = NextWordPredictor(b.config, b.weights)\n"
        "out = [p.next_word_logprobs(c).tolist() for c in json.loads(sys.argv[2])]\n"
        "assert not [m for m in sys.modules if m.startswith(('tff_sim', 'tensorflow_federated'))]\n"
        "print(json.dumps({'version': b.model_version, 'vocab': len(b.vocab), 'logprobs': out}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(fedavg.output / "model"), json.dumps(contexts)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["version"] == 5 and got["vocab"] == len(data.vocab)

    import tensorflow as tf

    model = build_model(data.model_config)
    set_weights(model, fedavg.weights, data.model_config)  # the TFF process' final global weights
    for context, logprobs in zip(contexts, got["logprobs"]):
        window = context[-data.model_config.seq_len:]  # the predictor reads the last seq_len ids
        want = tf.nn.log_softmax(model(np.array([window], np.int32))[0, -1]).numpy()
        np.testing.assert_allclose(np.array(logprobs), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("server_optimizer", ["sgd", "momentum", "nesterov", "adam", "yogi", "adagrad"])
def test_tff_round_equals_plain_keras_fedavg(data, server_optimizer):
    """The TFF process computes exactly FedAvg: the same result as plain Keras clients + models/fedavg.py
    (weighted mean of trained - base, server optimizer on -mean), for every server optimizer."""
    from tff_sim.plain_fedavg import plain_round

    # server_lr 0.5: the adaptive optimizers' first steps are ~lr per coordinate, so keep them moderate
    cfg = SimConfig(**FAST, rounds=3, server_optimizer=server_optimizer, server_lr=0.5 if server_optimizer in
                    ("adam", "yogi", "adagrad") else 1.0)
    both = FedAvgComparison(cfg, data)
    for r in (1, 2, 3):
        datasets, batches = both.cohort(r)
        both.state = both.learning.next(both.state, datasets).state
        both.plain, _ = plain_round(both.trainer, both.plain, batches, both.server)
    tff_w = both.assert_same_weights()
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(tff_w, both.w0))
    assert moved > 1e-2  # far beyond the tolerance: the comparison can fail


def test_tff_clients_train_with_dropout(data):
    """--dropout reaches TFF's client training: at dropout 0 a round equals plain FedAvg (above); at 0.5
    the same cohort's round lands far from it, and from a second dropout run (fresh masks)."""
    cfg = SimConfig(**FAST, rounds=1, dropout=0.5)
    both = FedAvgComparison(cfg, data)
    datasets, batches = both.cohort(1)
    first = both.learning.next(both.state, datasets).state
    second = both.learning.next(both.state, datasets).state
    from tff_sim.plain_fedavg import plain_round

    plain, _ = plain_round(both.trainer, both.plain, batches, both.server)
    w1, w2 = (process.get_weights_from_state(both.learning, s) for s in (first, second))
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w1, plain.weights)) > 1e-3
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2)) > 1e-3
    with pytest.raises(ValueError, match="dropout"):
        SimConfig(**FAST, dropout=1.0)


def test_averaged_run_serves_the_ema_of_its_rounds_models_and_resumes(data, tmp_path):
    """--average-decay: training is unchanged (the last round's model is the plain run's), while the run's
    model (evaluated, exported) is the bias-corrected EMA of the rounds' models, also across a resume."""
    from models.bundle import load_bundle
    from models.iterate_average import ema_update, ema_weights

    plain_cfg = dict(FAST, eval_every=0, output=str(tmp_path / "plain"))
    iterates = [run(SimConfig(**plain_cfg, rounds=r), data).weights for r in (1, 2, 3)]  # each extends the last
    decay = 0.6
    cfg = SimConfig(**FAST, rounds=3, eval_every=3, average_decay=decay, output=str(tmp_path / "avg"))
    averaged = interrupt_and_resume(cfg, data, stop_after=2)
    m = None
    for w in iterates:
        m = ema_update(m, w, decay)
    want = ema_weights(m, 3, decay)
    for got, expect in zip(averaged.weights, want):
        np.testing.assert_allclose(got, expect, atol=1e-5)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(want, iterates[-1])) > 1e-3  # the check can fail
    for got, expect in zip(load_bundle(averaged.output / "model").weights, want):
        np.testing.assert_allclose(got, expect, atol=1e-5)
    summary = averaged.summary
    assert summary["average_decay"] == decay and summary["final"] != summary["final_iterate"]
    plain_final = json.loads((tmp_path / "plain" / "summary.json").read_text())["final"]
    assert summary["final_iterate"]["heldout"]["top1_recall"] == pytest.approx(plain_final["heldout"]["top1_recall"])
    assert "average of the rounds' models at decay 0.6" in (averaged.output / "report.md").read_text()
    with pytest.raises(ValueError, match="decay"):
        SimConfig(**FAST, average_decay=1.0)


def test_dp_epsilon_is_finite_and_grows_and_resume_equals_uninterrupted(data, tmp_path):
    cfg = SimConfig(**FAST, rounds=4, dp=True, noise_multiplier=0.8, clip=0.5, eval_every=0, allow_noisy_dp=True)
    whole = run(cfg.replace(output=str(tmp_path / "whole")), data)
    eps = [[row[f"epsilon_{acc}"] for row in whole.history if row["round"] > 0] for acc in ("rdp", "pld")]
    for series in eps:
        assert len(series) == 4 and all(np.isfinite(series)) and all(a < b for a, b in zip(series, series[1:]))
    assert whole.summary["privacy"]["final_epsilon"]["rdp"] == eps[0][-1]
    assert any(row["clients"] != 4 for row in whole.history)  # DP samples Poisson cohorts (q = 4/8)

    parts = cfg.replace(output=str(tmp_path / "parts"), checkpoint_every=3)
    resumed = interrupt_and_resume(parts, data)
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(whole.weights, resumed.weights):
        np.testing.assert_array_equal(a, b)  # bit-exact, DP noise included (seeded noise)
    with pytest.raises(SystemExit):  # a checkpoint of another configuration is refused
        run(parts.replace(client_lr=0.1), data)


def test_huge_client_update_is_clipped_to_the_bound_in_the_aggregate():
    import tensorflow as tf

    from tff_sim.dp_aggregators import dp_factory

    value_type = tff.types.to_type([(np.float32, (3,)), (np.float32, (2,))])
    huge = [np.array([3e6, -4e6, 0.0], np.float32), np.array([0.0, 1.2e7], np.float32)]
    small = [np.array([0.1, 0.0, 0.0], np.float32), np.array([0.0, 0.0], np.float32)]
    for noise in ("seeded", "tff"):
        for adaptive in (False, True):
            agg = dp_factory(0.0, 2, 2.0, adaptive=adaptive, noise=noise).create(value_type)
            out = agg.next(agg.initialize(), [huge, small])
            total = [2 * np.asarray(r) for r in out.result]  # the mean over clients_per_round = 2, times 2
            clipped_huge = [t - s for t, s in zip(total, small)]
            norm = float(np.sqrt(sum(np.sum(c.astype(np.float64) ** 2) for c in clipped_huge)))
            assert norm == pytest.approx(2.0, rel=1e-5), (noise, adaptive)
            direction = np.concatenate(huge) / np.linalg.norm(np.concatenate(huge).astype(np.float64))
            np.testing.assert_allclose(np.concatenate(clipped_huge) / 2.0, direction, atol=1e-6)

    # Seeded noise: reproducible from the same state, fresh every round.
    agg = dp_factory(1.0, 2, 1.0, noise="seeded", seed=3).create(value_type)
    state = agg.initialize()
    first = agg.next(state, [small, small])
    again = agg.next(state, [small, small])
    second = agg.next(first.state, [small, small])
    assert all(np.array_equal(a, b) for a, b in zip(first.result, again.result))
    assert not np.array_equal(first.result[0], second.result[0])
    noise = np.concatenate([np.asarray(r) - s / 1.0 for r, s in zip(first.result, small)])
    assert 0 < np.std(noise) < 5  # stddev z*C/m = 0.5 per coordinate
    del tf


def test_dp_process_keeps_a_huge_client_update_within_the_clip(data):
    """End to end: a client learning rate of 1e4 makes huge updates; the server step stays within the clip."""
    from tff_sim import sampling

    cfg = SimConfig(**FAST, rounds=1, dp=True, noise_multiplier=0.0, clip=0.05, client_lr=1e4, server_optimizer="sgd",
                    sampling="uniform")
    mc = data.model_config
    w0 = process.initial_weights(mc, cfg.seed)
    learning = process.build_learning_process(cfg, mc, noise_multiplier=0.0)
    ids = sampling.sample_clients(data.train_ids, 1, cfg.seed, cfg.clients_per_round, "uniform")
    state = learning.next(process.initialize(learning, w0),
                          [client_data.client_dataset(data.train[c], 1, 0, 1, 16, 32) for c in ids]).state
    step = [a - b for a, b in zip(process.get_weights_from_state(learning, state), w0)]
    norm = float(np.sqrt(sum(np.sum(s.astype(np.float64) ** 2) for s in step)))
    assert 0 < norm <= 0.05 * (1 + 1e-5)
