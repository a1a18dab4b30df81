"""The server learning-rate schedule (models/lr_schedule.py) where it is used: models/fedavg.py's server step,
the aggregation server's optimizer (server/optimizers.py, ServerConfig) and tff_sim (config, the TFF process's
hyperparameters, the runner's per-round rate, its records and resume)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from models import fedavg
from models.lr_schedule import LrSchedule, server_lr_at
from server.config import ServerConfig
from server.optimizers import ServerOptimizer
from tests.server_fixtures import server_factory  # noqa: F401  (a fixture)
from tff_sim.config import SimConfig, parse_args

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "yogi", "adagrad")
COSINE = LrSchedule("cosine", total_rounds=5, warmup_rounds=1, min_lr_fraction=0.1)


# --------------------------------------------------------------------------- models/fedavg.py


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_numpy_server_step_r_runs_at_server_lr_at_r(name):
    """server_update with a schedule = the optimizer at server_lr_at(r) for step r, state carried over."""
    rng = np.random.default_rng(0)
    w = [rng.standard_normal(4).astype(np.float32)]
    deltas = [[rng.standard_normal(4).astype(np.float32) * 0.1] for _ in range(6)]
    opt = fedavg.ServerOptimizer(name, lr=0.4)
    scheduled = by_hand = fedavg.server_init(w, opt)
    for r, d in enumerate(deltas, start=1):
        scheduled = fedavg.server_update(scheduled, d, opt, COSINE)
        lr = server_lr_at(r, 0.4, "cosine", total_rounds=5, warmup_rounds=1, min_lr_fraction=0.1)
        by_hand = fedavg.server_update(by_hand, d, opt.with_lr(lr))
        assert scheduled.round == r
        np.testing.assert_array_equal(scheduled.weights[0], by_hand.weights[0])
    if name == "sgd":  # the formula itself: w_r = w_{r-1} + lr_r d_r
        want = w[0].astype(np.float64) + sum(COSINE.lr_at(r, 0.4) * d[0] for r, d in enumerate(deltas, start=1))
        np.testing.assert_allclose(scheduled.weights[0], want, rtol=1e-5)
    constant = fedavg.server_init(w, opt)
    for d in deltas:
        constant = fedavg.server_update(constant, d, opt)
    assert not np.allclose(constant.weights[0], scheduled.weights[0])  # the schedule changed something


# --------------------------------------------------------------------------- the aggregation server


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_server_optimizer_step_r_uses_server_lr_at_r_through_restarts(name):
    """The server's numpy step r (state saved and reloaded between steps, as the store does) runs at
    server_lr_at(r): equal to models.fedavg with the schedule."""
    rng = np.random.default_rng(1)
    w, deltas = rng.standard_normal(6), [rng.standard_normal(6) * s for s in (1.0, 0.1, 0.5, 0.2, 0.3, 0.1)]
    ref_opt = fedavg.ServerOptimizer(name, lr=0.3, momentum=0.8)
    ref = fedavg.server_init([w], ref_opt)
    server_w, saved = w, None
    for r, d in enumerate(deltas, start=1):
        ref = fedavg.server_update(ref, [d], ref_opt, COSINE)
        opt = ServerOptimizer(name, lr=0.3, momentum=0.8, schedule=COSINE)
        if saved is not None:
            assert opt.load_state_dict(saved, 6)
        assert opt.rounds_done == r - 1 and opt.next_lr() == server_lr_at(r, 0.3, "cosine", 5, 1, 0.1)
        before = server_w
        server_w = opt.step(server_w, d)
        assert opt.last_lr == COSINE.lr_at(r, 0.3)
        if name == "sgd":
            np.testing.assert_allclose(server_w, before + COSINE.lr_at(r, 0.3) * d, rtol=1e-12)
        saved = opt.state_dict()
        assert int(saved["round"]) == r
        np.testing.assert_allclose(server_w, ref.weights[0], rtol=1e-12)


def test_server_optimizer_without_a_schedule_keeps_no_count():
    sgd = ServerOptimizer("sgd", lr=0.5)
    sgd.step(np.zeros(3), np.ones(3))
    assert sgd.state == {} and sgd.last_lr == 0.5  # as before schedules: sgd writes no state file
    scheduled = ServerOptimizer("momentum", lr=0.5, schedule=LrSchedule(warmup_rounds=4))
    scheduled.step(np.zeros(3), np.ones(3))
    assert scheduled.last_lr == 0.125 and int(scheduled.state["round"]) == 1
    # the schedule switched off: the count is dropped, the momentum kept
    plain = ServerOptimizer("momentum", lr=0.5)
    assert plain.load_state_dict(scheduled.state_dict(), 3) and "round" not in plain.state
    # switched on over a state saved without it: the schedule starts at step 1
    on = ServerOptimizer("momentum", lr=0.5, schedule=LrSchedule(warmup_rounds=4))
    assert on.load_state_dict(plain.state_dict(), 3) and on.next_lr() == 0.125


def test_server_config_flags_build_the_schedule():
    from server.__main__ import build_parser, config_from_args

    args = build_parser().parse_args(["--server-optimizer", "nesterov", "--server-lr-schedule", "cosine",
                                      "--server-lr-total-rounds", "600", "--server-lr-warmup-rounds", "20",
                                      "--server-lr-min-fraction", "0.05", "--open-registration"])
    c = config_from_args(args)
    assert ServerOptimizer.from_config(c).schedule == LrSchedule("cosine", 600, 20, 0.05)
    assert ServerOptimizer.from_config(ServerConfig()).schedule.is_constant
    with pytest.raises(ValueError, match="needs its length"):  # the server's rounds are open-ended
        ServerConfig(server_lr_schedule="cosine")
    with pytest.raises(ValueError, match="must be one of"):
        ServerConfig(server_lr_schedule="linear")
    with pytest.raises(ValueError, match="DP-FTRL needs a constant server learning rate"):
        ServerConfig(dp_mode="ftrl", clip_norm=1.0, noise_multiplier=1.0, server_lr_schedule="step",
                     server_lr_step_rounds=10)


def test_devices_get_the_client_lr_decayed_with_the_server_steps_through_a_restart(server_factory):
    """client_lr_decay: round r's task carries LrSchedule.decay_at(r, learning_rate), r = the server step its
    aggregate makes (counted in the global version's optimizer state, so a restart keeps the count)."""
    from tests.server_fixtures import dyadic_delta, encode_delta

    srv = server_factory("--round-goal", "1", "--min-count", "1", "--server-optimizer", "nesterov",
                         "--server-lr-schedule", "cosine", "--server-lr-total-rounds", "4",
                         "--server-lr-warmup-rounds", "1", "--learning-rate", "0.4", "--client-lr-decay",
                         "--deadline-s", "60")
    schedule = LrSchedule("cosine", 4, 1, 0.1)
    d = srv.device()
    got = []
    for r in range(1, 6):
        if r == 3:
            srv.restart()
            d.client.base_url = srv.url
        task = d.task()
        got.append(task["learning_rate"])
        assert d.upload(task["round_id"], encode_delta(dyadic_delta(r), task["base_version"])).status_code == 200
        assert srv.wait_round(task["round_id"])["outcome"]["server_lr"] == pytest.approx(schedule.lr_at(r, 1.0))
    assert got == pytest.approx([schedule.decay_at(r, 0.4) for r in range(1, 6)])
    assert got[0] == got[1] == 0.4 and got[1] > got[2] > got[3] > got[4] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="client_lr_decay follows the server lr schedule"):
        ServerConfig(client_lr_decay=True)


# --------------------------------------------------------------------------- tff_sim configuration


def test_sim_config_schedule_fields_flags_and_identity():
    cfg = parse_args(["--server-lr-schedule", "cosine", "--server-lr-warmup-rounds", "3", "--rounds", "30"])
    assert cfg.lr_schedule == LrSchedule("cosine", 30, 3, 0.1)  # cosine decays over --rounds by default
    assert cfg.server_lr_at(1) == pytest.approx(1 / 3) and cfg.server_lr_at(31) == pytest.approx(0.1)
    # a cosine over --rounds makes the rounds part of the run's identity; an explicit length does not
    assert cfg.config_hash() != cfg.replace(rounds=40).config_hash()
    fixed = cfg.replace(server_lr_total_rounds=30)
    assert fixed.config_hash() == fixed.replace(rounds=40).config_hash()
    # the defaults stay out of the identity: runs made before schedules keep their hash (and resume)
    assert not any(k.startswith("server_lr_") for k in SimConfig().identity())
    assert SimConfig().lr_schedule.is_constant
    with pytest.raises(ValueError, match="step rounds"):
        SimConfig(server_lr_schedule="step")
    with pytest.raises(ValueError, match="DP-FTRL needs a constant server learning rate"):
        SimConfig(dp=True, dp_mechanism="dp-ftrl", server_optimizer="momentum", server_lr_schedule="inverse_sqrt")


def test_sim_config_client_lr_decay_follows_the_schedule_without_its_warmup():
    cfg = parse_args(["--server-lr-schedule", "cosine", "--server-lr-warmup-rounds", "3", "--rounds", "30",
                      "--client-lr", "0.4", "--client-lr-decay"])
    assert cfg.client_lr_decay and cfg.client_lr_at(1) == cfg.client_lr_at(4) == 0.4  # no warmup ramp
    assert cfg.client_lr_at(20) == pytest.approx(0.4 * cfg.server_lr_at(20)) and cfg.client_lr_at(40) == pytest.approx(0.04)
    assert cfg.replace(client_lr_decay=False).client_lr_at(20) == 0.4
    assert cfg.config_hash() != cfg.replace(client_lr_decay=False).config_hash()
    assert "client_lr_decay" not in SimConfig().identity()  # older runs keep their hash
    with pytest.raises(ValueError, match="--client-lr-decay follows the server lr schedule"):
        SimConfig(client_lr_decay=True, server_lr_warmup_rounds=5)  # a warmup alone decays nothing


def test_the_documented_cosine_runs_and_the_sweep_report(tmp_path):
    """docs/sweeps/chitchat-donors.toml's cosine runs are the "nesterov" recipe with a 600-round cosine; the
    sweep report marks a scheduled server lr."""
    from pathlib import Path

    from tff_sim import sweep

    base, runs, _ = sweep.load_sweep(Path(__file__).resolve().parents[1] / "docs/sweeps/chitchat-donors.toml")
    cfgs = {r["name"]: SimConfig.from_dict(sweep.run_fields(base, r)) for r in runs}
    plain, cos, warm = cfgs["nesterov"], cfgs["nesterov-cosine600"], cfgs["nesterov-cosine600-warmup20"]
    assert cos.lr_schedule == LrSchedule("cosine", 600, 0, 0.1) and warm.lr_schedule == LrSchedule("cosine", 600, 20, 0.1)
    assert cos.replace(server_lr_schedule="constant", server_lr_total_rounds=None, rounds=300) == plain  # nothing else
    assert cos.server_lr_at(1) == 1.0 and warm.server_lr_at(1) == 0.05
    assert cos.server_lr_at(600) == pytest.approx(0.1, abs=1e-4)
    assert len({c.config_hash() for c in cfgs.values()}) == len(cfgs) - 1  # nesterov-1500rounds = nesterov's hash
    out = tmp_path / "out"
    (out / "nesterov-cosine600").mkdir(parents=True)
    rows = sweep.collect(out, base, [r for r in runs if r["name"] in ("nesterov", "nesterov-cosine600")])
    sweep.write_report(out, rows, [], "s.toml")
    text = (out / "sweep.md").read_text()
    assert "| nesterov | nesterov | 1 | 0.5 |" in text and "| nesterov-cosine600 | nesterov | 1 (cosine) | 0.5 |" in text


# --------------------------------------------------------------------------- tff_sim with TFF

tff = pytest.importorskip("tensorflow_federated")

from tff_sim import client_data, process  # noqa: E402
from tff_sim.runner import run  # noqa: E402
from tests.tff_fixtures import FedAvgComparison, interrupt_and_resume  # noqa: E402

FAST = dict(preset="tiny", max_train_clients=8, clients_per_round=4, max_examples_per_client=32, batch_size=16,
            eval_clients=4, eval_max_examples_per_client=64, final_eval_max_sentences=200, tensorboard=False,
            progress=False, baselines=None, checkpoint_every=1, plots=False)


@pytest.fixture(scope="module")
def data():
    return client_data.prepare("chitchat", preset_name="tiny", max_train_clients=8, eval_clients=4,
                               eval_max_examples_per_client=64, final_eval_max_sentences=200)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tff_rounds_with_the_lr_set_through_hparams_equal_numpy_fedavg_with_the_schedule(data, name):
    """Each TFF server optimizer takes its lr from the state set through set_hparams: two TFF rounds at a
    warmup's 0.5x and 1x rates equal plain Keras clients + models.fedavg's scheduled server step."""
    base_lr = 0.5 if name in ("adam", "yogi", "adagrad") else 1.0
    cfg = SimConfig(**FAST, rounds=2, server_optimizer=name, server_lr=base_lr, server_lr_warmup_rounds=2)
    both = FedAvgComparison(cfg, data)
    for r in (1, 2):
        both.state = process.set_server_lr(both.learning, both.state, cfg.server_lr_at(r))
        assert process.server_lr(both.learning, both.state) == pytest.approx(base_lr * r / 2)
        datasets, batches = both.cohort(r)
        both.state = both.learning.next(both.state, datasets).state
        results = [both.trainer.train(both.plain.weights, b) for b in batches]
        both.plain = fedavg.fedavg_round(both.plain, [t for t, _, _ in results], [n for _, n, _ in results], both.server,
                                         cfg.lr_schedule)
    both.assert_same_weights()


def test_tff_round_at_a_client_lr_set_through_hparams_equals_plain_clients_at_that_lr(data):
    from tff_sim.plain_fedavg import KerasClientTrainer

    cfg = SimConfig(**FAST, rounds=1, client_lr=0.5)
    both = FedAvgComparison(cfg, data)
    both.state = process.set_client_lr(both.learning, both.state, 0.125)
    both.trainer = KerasClientTrainer(data.model_config, 0.125)
    datasets, batches = both.cohort(1)
    both.state = both.learning.next(both.state, datasets).state
    results = [both.trainer.train(both.plain.weights, b) for b in batches]
    both.plain = fedavg.fedavg_round(both.plain, [t for t, _, _ in results], [n for _, n, _ in results], both.server)
    both.assert_same_weights()


def test_dp_fedavg_process_exposes_the_server_lr(data):
    cfg = SimConfig(**FAST, rounds=2, dp=True, noise_multiplier=0.5, allow_noisy_dp=True, server_optimizer="momentum",
                    server_lr_schedule="cosine")
    learning = process.build_learning_process(cfg, data.model_config, noise_multiplier=0.5)
    state = process.set_server_lr(learning, learning.initialize(), 0.25)
    assert process.server_lr(learning, state) == 0.25


def test_tiny_cosine_run_records_the_lr_per_round_and_a_resumed_run_continues_the_schedule(data, tmp_path):
    cfg = SimConfig(**FAST, rounds=5, eval_every=5, server_lr_schedule="cosine", server_lr_warmup_rounds=1,
                    server_lr_min_fraction=0.1, client_lr_decay=True)
    want = [server_lr_at(r, 1.0, "cosine", total_rounds=5, warmup_rounds=1, min_lr_fraction=0.1) for r in range(1, 6)]
    assert want[0] == want[1] == 1.0 and want[2] > want[3] > want[4] > 0.1
    whole = run(cfg.replace(output=str(tmp_path / "whole"), tensorboard=True), data)
    assert [row["server_lr"] for row in whole.history if row["round"] > 0] == want
    assert [row["client_lr"] for row in whole.history if row["round"] > 0] == pytest.approx([0.5 * x for x in want])
    with open(tmp_path / "whole" / "metrics.csv", newline="") as f:
        lrs = [float(row["server_lr"]) for row in csv.DictReader(f) if row["server_lr"]]
    assert lrs == pytest.approx(want)
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())[-1]["server_lr"] == want[-1]
    assert whole.summary["server_lr_schedule"] == "cosine from 1 to 0.1 over 5 rounds, 1 warmup round"
    assert "(lr cosine from 1 to 0.1 over 5 rounds" in (tmp_path / "whole" / "report.md").read_text()
    import tensorflow as tf

    logged = {}
    for event in (tmp_path / "whole" / "tensorboard").glob("events.out.tfevents.*"):
        for e in tf.compat.v1.train.summary_iterator(str(event)):
            for v in e.summary.value:
                if v.tag == "train/server_lr":
                    logged[e.step] = float(tf.make_ndarray(v.tensor))
    assert [logged[r] for r in range(1, 6)] == pytest.approx(want)

    parts = cfg.replace(output=str(tmp_path / "parts"), checkpoint_every=3)
    resumed = interrupt_and_resume(parts, data)
    assert [row["server_lr"] for row in resumed.history if row["round"] > 0] == want
    for a, b in zip(whole.weights, resumed.weights):
        np.testing.assert_array_equal(a, b)  # the resumed run recomputed rounds 3-5's rates: bit-exact
    constant = run(cfg.replace(output=str(tmp_path / "constant"), server_lr_schedule="constant",
                               server_lr_warmup_rounds=0, client_lr_decay=False), data)
    assert all(row["server_lr"] == 1.0 for row in constant.history if row["round"] > 0)
    assert not all(np.array_equal(a, b) for a, b in zip(whole.weights, constant.weights))
