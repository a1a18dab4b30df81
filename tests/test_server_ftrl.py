"""DP-FTRL on the server (dp_mode ftrl): the FtrlDP wrapper, its durable noise tree (server/ftrl.py), the
participation rule enforced at admission, and the accountant that assumes exactly that rule.

Unit tests drive the wrapper and the tree store over a real SQLite file and store, without HTTP; the
last tests run a real `python -m server` (tests/server_fixtures.py), restarted in the middle.
"""
from __future__ import annotations

import dataclasses
import json
import math
import threading

import httpx
import numpy as np
import pytest

from models import dp, dp_ftrl
from server.aggregation import MeanAccumulator
from server.config import ServerConfig
from server.db import Db
from server.ftrl import FtrlTreeStore
from server.privacy_account import PrivacyAccount
from server.round import Round, TrainParams
from server.store import Store
from server.strategy import FtrlDP, RoundContext, StreamingMean, strategy_for
from tests.server_fixtures import *  # noqa: F401,F403
from tests.server_fixtures import ELIGIBLE, TINY, dyadic_delta, encode_delta

DIM = 50
Z, CLIP = 1.5, 0.8


def params(**overrides) -> TrainParams:
    base = dict(goal=3, min_count=3, max_admitted=4, deadline_s=60.0, clip_norm=CLIP, noise_multiplier=Z,
                dp_mode="ftrl", ftrl_restart_rounds=2)
    return TrainParams(**{**base, **overrides})


def round_of(p: TrainParams, rid: int, seed: int = 4321) -> Round:
    return Round(id=rid, kind="train", state="aggregating", base_version=1, candidate_version=None, created_at=0.0,
                 deadline=None, closed_at=None, params=p, params_dict={}, seed=seed)


@pytest.fixture
def tree(tmp_path) -> FtrlTreeStore:
    config = ServerConfig(data_dir=str(tmp_path), dp_mode="ftrl", noise_multiplier=Z, clip_norm=CLIP,
                          ftrl_restart_rounds=2, round_goal=3, min_count=3)
    return FtrlTreeStore(config, Db(config.sqlite_path), Store(tmp_path))


def _release(tree: FtrlTreeStore, rnd: Round, updates: list[np.ndarray], devices: list[str],
             rows: list[dict] | None = None) -> np.ndarray:
    """One round through the wrapper: the released (noised) sum, committed as round_close does."""
    strategy = strategy_for(rnd.train, None, tree)
    assert isinstance(strategy, FtrlDP) and strategy.mechanism == "ftrl"
    acc = MeanAccumulator(DIM)
    for u in updates:
        acc.add([u], 1.0)
    agg = strategy.aggregate(acc, rows or [{}] * len(updates), rnd, RoundContext(TINY, DIM, 1 << 20, lambda rel: None))
    with tree.db.write():
        cleanup = strategy.commit_release(rnd.id, devices)
    cleanup()
    return agg.total


def test_noise_is_models_dp_ftrl_tree_residual_and_the_tree_restarts(tree) -> None:
    rng = np.random.default_rng(0)
    rounds = 5
    p = params()
    want_tree = dp_ftrl.tree_init(DIM, Z * CLIP, 4321)  # the first DP-FTRL round's secret seed seeds the tree
    state = dp_ftrl.init(dp_ftrl.FtrlParams(Z, 3, CLIP, restart_period=2), DIM, 4321)
    for t in range(1, rounds + 1):
        updates = [(rng.standard_normal(DIM) * 0.05).astype(np.float32) for _ in range(3)]
        total = _release(tree, round_of(p, rid=10 + t, seed=4321 if t == 1 else 999 + t), updates, [f"d{t}{i}" for i in range(3)])
        residual, want_tree = dp_ftrl.noise_for_round(want_tree, t, 2)
        np.testing.assert_array_equal(total, np.sum(np.float64(updates), axis=0) - residual.astype(np.float64))
        # the same release as models.dp_ftrl.aggregate (TFF's sign: deltas are base - trained)
        mean, state, _ = dp_ftrl.aggregate(state, dp_ftrl.FtrlParams(Z, 3, CLIP, restart_period=2),
                                           [[-u] for u in updates])
        np.testing.assert_allclose(-total / 3, mean, rtol=0, atol=1e-5)
        assert tree.leaves() == t
        assert (tree.load().tree.draws, tree.load().tree.levels) == (want_tree.draws, want_tree.levels)
    assert len(list(tree.store.path("ftrl").iterdir())) == 1  # older states deleted once superseded


def test_adaptive_clip_follows_models_dp_ftrl_and_changes_only_at_restarts(tree) -> None:
    """The server's adaptive DP-FTRL (devices report the bit, the server counts it) releases what
    models.dp_ftrl.aggregate (TFF's tree_adaptive, which sees the unclipped updates) releases."""
    rng = np.random.default_rng(1)
    p = params(ftrl_adaptive_clip=True, ftrl_clip_count_stddev=1.0, ftrl_initial_clip=CLIP, ftrl_clip_lr=0.5)
    fp = dp_ftrl.FtrlParams(Z, 3, CLIP, restart_period=2, adaptive=dp_ftrl.AdaptiveClip(0.5, 0.5, 1.0))
    state = dp_ftrl.init(fp, DIM, 4321)
    strategy = strategy_for(p, None, tree)
    clips = []
    for t in range(1, 6):
        # what a new round is frozen with: the tree's clip in use and quantile estimate
        opened = strategy.open_params({**dataclasses.asdict(p)})
        assert (opened["clip_norm"], opened["clip_estimate"]) == (state.clip, state.estimate)
        rnd = round_of(dataclasses.replace(p, clip_norm=opened["clip_norm"], clip_estimate=opened["clip_estimate"]),
                       rid=10 + t, seed=4321 if t == 1 else 999 + t)
        clips.append(state.clip)
        raw = [(rng.standard_normal(DIM) * 0.02).astype(np.float32) for _ in range(3)]  # norms ~0.14 < CLIP
        clipped = [dp.clip_by_global_norm([u], state.clip)[0][0] for u in raw]
        bits = [{"metrics": json.dumps({dp_ftrl.BELOW_ESTIMATE_METRIC: float(dp.l2_norm(u) <= state.estimate)})}
                for u in raw]
        total = _release(tree, rnd, clipped, [f"d{t}{i}" for i in range(3)], bits)
        mean, state, _ = dp_ftrl.aggregate(state, fp, [[-u] for u in raw])
        np.testing.assert_allclose(-total / 3, mean, rtol=0, atol=1e-5)
        assert tree.current(p) == (state.clip, pytest.approx(state.estimate, rel=1e-12))
    # every norm is below the estimate: it falls every round, the clip in use only after each restart (2 rounds)
    assert clips[0] == clips[1] == CLIP and clips[2] == clips[3] < CLIP and clips[4] < clips[3]
    assert tree.record()["params"]["adaptive"] == {"target_quantile": 0.5, "learning_rate": 0.5, "count_stddev": 1.0}


def test_adaptive_clip_count_ignores_missing_bits() -> None:
    assert dp_ftrl.below_count([1.0, 0.0, 1, None, "x", 0.5]) == 0.5  # only 0/1 bits count, each minus 1/2


def test_adaptive_clip_config_rules() -> None:
    base = dict(dp_mode="ftrl", noise_multiplier=1.0, clip_norm=0.5, ftrl_adaptive_clip=True, round_goal=80,
                min_count=10, server_optimizer="sgd")
    config = ServerConfig(**base)
    assert config.clip_count_stddev == 4.0  # TFF's default: 1/20 of the cohort
    assert config.value_noise_multiplier == pytest.approx((1.0 - 1 / 64) ** -0.5)
    assert config.round_params()["ftrl_initial_clip"] == 0.5
    with pytest.raises(ValueError, match="secure aggregation"):
        ServerConfig(**base, secure_aggregation="secagg")
    with pytest.raises(ValueError, match="needs z < 2"):
        ServerConfig(**base, ftrl_clip_count_stddev=0.4)
    with pytest.raises(ValueError, match="needs dp_mode ftrl"):
        ServerConfig(**{**base, "dp_mode": "central", "server_optimizer": "sgd"})


def test_a_rerun_before_the_commit_draws_the_same_noise(tree) -> None:
    rnd = round_of(params(), rid=3)
    first, pending1 = tree.noise(rnd, DIM)
    again, pending2 = tree.noise(rnd, DIM)  # a crash before the close committed: the old record still holds
    np.testing.assert_array_equal(first, again)
    assert pending1.rel != pending2.rel and tree.leaves() == 0
    tree.recover()  # unreferenced tree files are removed at start
    assert not list(tree.store.path("ftrl").iterdir())


def test_the_tree_parameters_are_fixed_for_a_data_dir(tree, tmp_path) -> None:
    _release(tree, round_of(params(), rid=1), [np.zeros(DIM, np.float32)], ["a"])
    other = ServerConfig(data_dir=str(tmp_path), dp_mode="ftrl", noise_multiplier=Z, clip_norm=CLIP,
                         ftrl_restart_rounds=5, round_goal=3, min_count=3)
    with pytest.raises(ValueError, match="fixed for a data dir"):
        FtrlTreeStore(other, tree.db, tree.store).recover()
    with pytest.raises(RuntimeError, match="differ"):
        tree.noise(round_of(params(noise_multiplier=2 * Z), rid=2), DIM)


@pytest.mark.parametrize("optimizer", ["adam", "yogi", "adagrad", "nesterov"])
def test_ftrl_refuses_server_optimizers_other_than_sgd_and_momentum(optimizer) -> None:
    with pytest.raises(ValueError, match="use --server-optimizer sgd or momentum"):
        ServerConfig(dp_mode="ftrl", noise_multiplier=1.0, server_optimizer=optimizer)
    for ok in ("sgd", "momentum"):
        assert ServerConfig(dp_mode="ftrl", noise_multiplier=1.0, server_optimizer=ok).round_params()["dp_mode"] == "ftrl"


def test_restart_rule_refuses_a_device_until_the_next_period(tree) -> None:
    p = params(ftrl_restart_rounds=3)
    tree.config.ftrl_restart_rounds = 3
    _release(tree, round_of(p, rid=1), [np.zeros(DIM, np.float32)], ["a"])  # leaf 1, period leaves 1..3
    nxt = round_of(p, rid=2)
    assert tree.rounds_to_wait(p, "a") == 2 and tree.rounds_to_wait(p, "b") == 0  # leaves 2 and 3 first
    reason, seconds = tree.refusal(nxt, "a")
    assert reason == "participation_limit" and seconds == 2 * 60.0  # no closed round yet: the deadline each
    _release(tree, nxt, [np.zeros(DIM, np.float32)], ["b"])
    _release(tree, round_of(p, rid=3), [np.zeros(DIM, np.float32)], ["c"])
    assert tree.rounds_to_wait(p, "a") == 0 and tree.refusal(round_of(p, rid=4), "a") is None  # leaf 4: period 2


def test_min_separation_rule(tree) -> None:
    p = params(ftrl_rule="min_separation", ftrl_min_separation=1, ftrl_max_participations=2)
    _release(tree, round_of(p, rid=1), [np.zeros(DIM, np.float32)], ["a"])
    assert tree.rounds_to_wait(p, "a") == 1  # leaf 2 would leave no round between
    _release(tree, round_of(p, rid=2), [np.zeros(DIM, np.float32)], ["b"])
    assert tree.rounds_to_wait(p, "a") == 0
    _release(tree, round_of(p, rid=3), [np.zeros(DIM, np.float32)], ["a"])
    assert tree.rounds_to_wait(p, "a") == math.inf  # max_participations reached


def test_the_ledger_event_is_a_tree_leaf_accounted_under_the_enforced_rule(tree) -> None:
    p = params(ftrl_restart_rounds=2)
    event = strategy_for(p, None, tree).ledger_event(p, 3, 100)
    assert event.ftrl == p.ftrl and event.noise_multiplier == Z
    account = PrivacyAccount(tree.config, tree.db, threading.RLock(), lambda q: strategy_for(q, None, tree))
    fields = account.record(event, 100)
    assert fields["delta"] == dp.FTRL_DEFAULT_DELTA
    assert fields["epsilon"] == dp.ftrl_epsilon(Z, 1, 1e-6, "restart", "rdp", rounds_per_epoch=2)
    report = account.report()
    assert report["mechanism"] == "DP-FTRL" and report["epsilon"] == 0.0 and report["dp_rounds"] == 0
    assert "at most one round per 2-round period" in report["guarantee"]


def test_gaussian_and_ftrl_rounds_are_accounted_apart(tree) -> None:
    db = tree.db
    with db.write():
        for mode, z in (("central", 0.7), ("ftrl", Z), ("central", 0.9)):
            rid = db.create_round(kind="train", base_version=1, params={"dp_mode": mode}, seed=1)
            db.update_round(rid, state="closed", noise_multiplier=z, sampling_prob=0.1)
    assert db.dp_rounds() == [(0.7, 0.1), (0.9, 0.1)] and db.dp_rounds(ftrl=True) == [(Z, 0.1)]
    account = PrivacyAccount(tree.config, db, threading.RLock(), lambda q: strategy_for(q, None, tree))
    report = account.report()
    assert report["dp_rounds"] == 1 and report["gaussian_dp_rounds"] == 2 and "basic composition" in \
        report["composition_note"]
    assert report["epsilon"] == dp.ftrl_epsilon(Z, 1, 1e-6, "restart", "rdp", rounds_per_epoch=2)


# ---------------------------------------------------------------------- a real server
def _device_at(srv, device) -> None:
    """Point a Device's client at the restarted server (it listens on a new port)."""
    device.client.close()
    device.client = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {device.token}"}, timeout=60.0)


def _run_round(srv, devices, seed: int) -> tuple[int, list[list[np.ndarray]]]:
    rid = [d.task() for d in devices][0]["round_id"]
    deltas = [dyadic_delta(seed + i) for i in range(len(devices))]
    for d, delta in zip(devices, deltas):
        assert d.upload(rid, encode_delta(delta, srv.model()[0])).status_code == 200
    assert srv.wait_round(rid)["state"] == "closed"
    return rid, deltas


def test_server_enforces_the_participation_rule_across_a_restart_and_reports_its_epsilon(server_factory):
    z, k = 2.0, 2
    srv = server_factory("--round-goal", "2", "--min-count", "2", "--dp-mode", "ftrl", "--clip-norm", "1.0",
                         "--noise-multiplier", str(z), "--ftrl-restart-rounds", str(k), "--deadline-s", "60",
                         "--allow-noisy-dp")
    _, base = srv.model()
    a, b, c, d = (srv.device() for _ in range(4))
    rid, deltas = _run_round(srv, [a, b], 40)
    # the model moved by (sum - tree residual) / 2: models.dp_ftrl's noise for the round's secret seed
    seed = srv.query("SELECT seed FROM rounds WHERE id = ?", (rid,))[0]["seed"]
    flat = lambda ts: np.concatenate([np.asarray(t, np.float64).ravel() for t in ts])  # noqa: E731
    residual, _ = dp_ftrl.noise_for_round(dp_ftrl.tree_init(TINY.num_parameters(), z, seed), 1, k)
    want = flat(base) + (flat(deltas[0]) + flat(deltas[1]) - residual) / 2
    np.testing.assert_allclose(flat(srv.model()[1]), want, rtol=0, atol=1e-6)

    answer = a.checkin()
    assert (answer["action"], answer["reason"]) == ("retry", "participation_limit") and answer["retry_after"] >= 5
    srv.restart()
    for dev in (a, b, c, d):
        _device_at(srv, dev)
    assert a.checkin()["reason"] == "participation_limit"  # the record is in SQLite
    assert b.checkin(ELIGIBLE)["reason"] == "participation_limit"
    _run_round(srv, [c, d], 50)  # leaf 2 ends the period
    assert a.checkin()["action"] == "train"  # leaf 3: a new period, a new tree

    privacy = srv.admin_get("/v1/admin/privacy")
    assert privacy["mechanism"] == "DP-FTRL" and privacy["dp_mode"] == "ftrl" and privacy["dp_rounds"] == 2
    assert privacy["delta"] == 1e-6
    assert privacy["epsilon"] == pytest.approx(dp.ftrl_epsilon(z, 2, 1e-6, "restart", "rdp", rounds_per_epoch=k),
                                               rel=1e-12)
    assert "at most one round per 2-round period" in privacy["guarantee"]
    pld = srv.admin_get("/v1/admin/privacy", params={"accountant": "pld"})
    assert pld["epsilon"] == pytest.approx(dp.ftrl_epsilon(z, 2, 1e-6, "restart", "pld", rounds_per_epoch=k))
    assert srv.admin_get("/v1/admin/status")["privacy"]["mechanism"] == "DP-FTRL"
    with srv.admin() as admin:
        html = admin.get("/status").text
    assert "DP-FTRL" in html and "at most one round per 2-round period" in html
    rows = [r for r in srv.admin_get("/v1/admin/rounds", params={"kind": "train"})["rounds"] if r["state"] == "closed"]
    assert sorted(r["epsilon"] for r in rows) == pytest.approx(
        [dp.ftrl_epsilon(z, n, 1e-6, "restart", "rdp", rounds_per_epoch=k) for n in (1, 2)])
    print(f"\nDP-FTRL z={z} K={k}, 2 rounds: epsilon {privacy['epsilon']:.4f} (rdp), {pld['epsilon']:.4f} (pld) at 1e-6")


def test_server_enforces_min_separation_and_the_participation_cap(server_factory):
    srv = server_factory("--round-goal", "1", "--min-count", "1", "--dp-mode", "ftrl", "--clip-norm", "1.0",
                         "--noise-multiplier", "3.0", "--ftrl-rule", "min_separation", "--ftrl-min-separation", "1",
                         "--ftrl-max-participations", "2", "--deadline-s", "60", "--retry-max-s", "3600",
                         "--allow-noisy-dp")
    a, b = srv.device(), srv.device()
    _run_round(srv, [a], 60)
    assert a.checkin()["reason"] == "participation_limit"  # one released round must come in between
    _run_round(srv, [b], 61)
    _run_round(srv, [a], 62)  # leaf 3: separated by leaf 2
    answer = a.checkin()
    assert answer["reason"] == "participation_limit" and answer["retry_after"] >= 0.8 * 3600  # capped: never again
    privacy = srv.admin_get("/v1/admin/privacy")
    assert privacy["participation_rule"] == "min_separation" and "at most 2 round(s)" in privacy["guarantee"]
    assert privacy["epsilon"] == pytest.approx(
        dp.ftrl_epsilon(3.0, 3, 1e-6, "min_separation", "rdp", min_separation=1, max_participations=2), rel=1e-12)


def test_server_adapts_the_clip_from_the_devices_bits(server_factory):
    """Adaptive DP-FTRL end to end: the task carries the estimate; devices whose norms are below it pull the
    estimate down every round, and the clip in use follows at the tree's restart (every 2 rounds). The count
    noise is small (stddev 0.05, so z 0.05 leaves z_v ~0.058): with both bits set the noised fraction stays
    far above the target quantile (at stddev 0.5, falling below it was a 2-sigma event: a random red)."""
    srv = server_factory("--round-goal", "2", "--min-count", "2", "--dp-mode", "ftrl", "--clip-norm", "1.0",
                         "--noise-multiplier", "0.05", "--ftrl-restart-rounds", "2", "--ftrl-adaptive-clip",
                         "--ftrl-clip-count-stddev", "0.05", "--ftrl-clip-lr", "0.5", "--deadline-s", "60",
                         "--allow-noisy-dp")
    devices = [srv.device() for _ in range(6)]
    seen, rounds = [], []
    for r in range(3):
        pair = devices[2 * r:2 * r + 2]
        tasks = [d.task() for d in pair]
        seen.append((tasks[0]["clip_norm"], tasks[0]["clip_estimate"]))
        for i, d in enumerate(pair):
            body = encode_delta(dyadic_delta(70 + 2 * r + i), srv.model()[0], metrics={"below_clip_estimate": 1.0})
            assert d.upload(tasks[0]["round_id"], body).status_code == 200
        rounds.append(srv.wait_round(tasks[0]["round_id"]))
        assert rounds[-1]["state"] == "closed"
    (c1, e1), (c2, e2), (c3, e3) = seen
    assert c1 == c2 == e1 == 1.0 and e2 < e1  # the estimate moved after round 1, the clip did not
    assert c3 == e3 < e2  # the trees restarted after round 2: the clip in use is now the estimate
    # each round's frozen parameters say which clip its devices used (reports and the noise check read them)
    assert [(r["params"]["clip_norm"], r["params"]["clip_estimate"]) for r in rounds] == seen
