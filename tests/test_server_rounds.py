"""Rounds end to end over HTTP: exact averages, DP rounds, admission, deadlines, abandonment, robust aggregation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from models import dp
from tests.server_fixtures import (  # noqa: F401  (server_factory is a fixture)
    TINY, assert_weights_equal, dyadic_delta, encode_delta, expected_mean, server_factory,
)


def test_full_round_example_weighted_average_is_exact(server_factory):
    srv = server_factory("--round-goal", "3", "--min-count", "3", "--deadline-s", "60")
    base_version, base = srv.model()
    assert base_version == 1
    devices = [srv.device() for _ in range(3)]
    tasks = [d.task() for d in devices]
    rid = tasks[0]["round_id"]
    assert all(t["type"] == "train" and t["round_id"] == rid and t["base_version"] == 1 for t in tasks)
    assert tasks[0]["secure_aggregation"] is None and tasks[0]["noise_stddev"] == 0.0
    deltas = [dyadic_delta(i) for i in range(3)]
    counts = [5, 17, 42]
    for d, delta, n in zip(devices, deltas, counts):
        r = d.upload(rid, encode_delta(delta, 1, num_examples=n, metrics={"loss": 2.0, "top1_recall": 0.1 * n / 42}))
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "accepted"
    rnd = srv.wait_round(rid)
    assert rnd["state"] == "closed" and rnd["accepted"] == 3 and rnd["result_version"] == 2
    assert rnd["outcome"]["dropouts"] == 0
    assert rnd["outcome"]["local_metrics"]["loss"] == pytest.approx(2.0)
    version, weights = srv.model()
    assert version == 2
    assert_weights_equal(weights, expected_mean(base, deltas, counts))
    # the next round opens on the new version
    nxt = devices[0].task()
    assert nxt["round_id"] == rid + 1 and nxt["base_version"] == 2


def test_model_download_etag_info_and_vocab(server_factory):
    srv = server_factory()
    d = srv.device()
    r = d.client.get("/v1/models/current")
    assert r.status_code == 200 and r.headers["X-Model-Version"] == "1"
    etag = r.headers["ETag"]
    assert d.client.get("/v1/models/current", headers={"If-None-Match": etag}).status_code == 304
    assert d.client.get("/v1/models/1", headers={"If-None-Match": f'W/{etag}, "zzz"'}).status_code == 304
    assert d.client.get("/v1/models/1", headers={"If-None-Match": '"other"'}).status_code == 200
    missing = d.client.get("/v1/models/99")
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_version"
    info = d.client.get("/v1/model/info").json()
    assert info["config_hash"] == TINY.config_hash() and info["global_version"] == 1
    vocab = d.client.get("/v1/model/vocab")
    assert vocab.status_code == 200 and len(vocab.json()["tokens"]) == TINY.vocab_size
    assert d.client.get("/v1/model/vocab", headers={"If-None-Match": vocab.headers["ETag"]}).status_code == 304
    assert srv.anon().get("/openapi.json").json()["paths"]["/v1/checkin"]


def test_checkin_eligibility_and_over_admission(server_factory):
    srv = server_factory("--round-goal", "3", "--min-count", "2", "--over-admit", "1.3", "--deadline-s", "60")
    d0 = srv.device()
    for flags in ({}, {"charging": True, "unmetered": True}, {"charging": True, "idle": True, "unmetered": False}):
        answer = d0.checkin(eligible=flags)
        assert answer["action"] == "retry" and answer["reason"] == "ineligible" and answer["retry_after"] > 0
        assert answer["task"] is None
    devices = [srv.device() for _ in range(5)]
    answers = [d.checkin() for d in devices]
    # ceil(3 * 1.3) = 4 admitted, the fifth is paced
    assert [a["action"] for a in answers] == ["train"] * 4 + ["retry"]
    assert answers[4]["reason"] == "round_full" and answers[4]["retry_after"] >= 1
    # check-in again while admitted: same task (idempotent)
    assert devices[0].checkin()["task"] == answers[0]["task"]
    rnd = srv.round(answers[0]["task"]["round_id"])
    assert rnd["admitted"] == 4 and rnd["max_admitted"] == 4
    # after uploading, a device is told to wait for the next round
    rid = answers[0]["task"]["round_id"]
    assert devices[0].upload(rid, encode_delta(dyadic_delta(0), 1)).status_code == 200
    again = devices[0].checkin()
    assert again["action"] == "retry" and again["reason"] == "already_participated"


def test_deadline_with_dropouts_aggregates_what_arrived(server_factory):
    srv = server_factory("--round-goal", "4", "--min-count", "2", "--deadline-s", "1.5")
    _, base = srv.model()
    devices = [srv.device() for _ in range(5)]
    tasks = [d.task() for d in devices]
    rid = tasks[0]["round_id"]
    deltas = [dyadic_delta(10 + i) for i in range(3)]
    for d, delta in zip(devices[:3], deltas):
        assert d.upload(rid, encode_delta(delta, 1, num_examples=7)).status_code == 200
    rnd = srv.wait_round(rid, timeout=15)
    assert rnd["state"] == "closed"
    assert rnd["accepted"] == 3 and rnd["admitted"] == 5 and rnd["dropouts"] == 2
    _, weights = srv.model()
    assert_weights_equal(weights, expected_mean(base, deltas, [7, 7, 7]))
    # a late upload from a dropout is refused, and changes nothing
    late = devices[3].upload(rid, encode_delta(dyadic_delta(99), 1))
    assert late.status_code == 409 and late.json()["error"] == "round_closed"
    assert srv.round(rid)["accepted"] == 3


def test_below_min_count_at_deadline_abandons_and_reopens(server_factory):
    srv = server_factory("--round-goal", "3", "--min-count", "2", "--deadline-s", "1.0")
    d1, d2 = srv.device(), srv.device()
    rid = d1.task()["round_id"]
    d2.task()
    assert d1.upload(rid, encode_delta(dyadic_delta(1), 1)).status_code == 200
    rnd = srv.wait_round(rid, timeout=15)
    assert rnd["state"] == "abandoned"
    assert rnd["outcome"]["reason"] == "below_min_count" and rnd["dropouts"] == 1
    # nothing changed: still version 1, no update files left, and a fresh round on the same base
    assert srv.model()[0] == 1
    assert not any((srv.data_dir / "updates").rglob("*.npy"))
    task = d1.task()
    assert task["round_id"] > rid and task["base_version"] == 1
    late = d2.upload(rid, encode_delta(dyadic_delta(2), 1))
    assert late.json()["error"] == "round_closed"


def test_dp_round_uniform_average_and_epsilon(server_factory):
    clip, z, goal = 1.0, 1.0, 3
    srv = server_factory("--round-goal", str(goal), "--min-count", str(goal), "--dp-mode", "distributed",
                         "--clip-norm", str(clip), "--noise-multiplier", str(z), "--deadline-s", "60", "--allow-noisy-dp")
    srv.wait_warm()  # /healthz turns "warm" once the accountant's start-up import is done
    _, base = srv.model()
    devices = [srv.device() for _ in range(4)]  # population 4 (one never trains)
    tasks = [d.task() for d in devices[:goal]]
    rid = tasks[0]["round_id"]
    stddev = tasks[0]["noise_stddev"]
    assert stddev == pytest.approx(z * clip / math.sqrt(goal))
    rng = np.random.default_rng(7)
    deltas = []
    for i, d in enumerate(devices[:goal]):
        raw = [rng.standard_normal(shape).astype(np.float32) for _, shape in TINY.weight_specs()]
        clipped, _ = dp.clip_by_global_norm(raw, clip)
        noised = dp.add_gaussian_noise(clipped, stddev, rng)
        deltas.append(noised)
        # example counts differ wildly but a DP round averages uniformly
        r = d.upload(rid, encode_delta(noised, 1, num_examples=[1, 100, 10_000][i]))
        assert r.status_code == 200, r.text
    rnd = srv.wait_round(rid)
    assert rnd["state"] == "closed"
    _, weights = srv.model()
    want = expected_mean(base, deltas)
    for g, w in zip(weights, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-7)
    # no --selection-q: no secret cohort draw, so no amplification (q = 1, not goal / population), delta 1e-6
    assert rnd["noise_multiplier"] == z and rnd["sampling_prob"] == 1.0 and rnd["delta"] == 1e-6
    expected_eps = dp.epsilon(z, 1.0, 1, 1e-6)
    assert rnd["epsilon"] == pytest.approx(expected_eps, rel=1e-9)
    privacy = srv.admin_get("/v1/admin/privacy")
    assert privacy["epsilon"] == pytest.approx(expected_eps, rel=1e-9) and privacy["dp_rounds"] == 1
    pld = srv.admin_get("/v1/admin/privacy", params={"accountant": "pld"})
    assert 0 < pld["epsilon"] <= privacy["epsilon"] * 1.05
    seen_by_device = d.client.get("/v1/model/info").json()["privacy"]  # what devices show their users
    assert seen_by_device["epsilon"] == pytest.approx(expected_eps, rel=1e-9)
    assert seen_by_device["delta"] == privacy["delta"] and seen_by_device["dp_rounds"] == 1


def test_central_dp_adds_seeded_noise_to_the_sum(server_factory):
    srv = server_factory("--round-goal", "2", "--min-count", "2", "--dp-mode", "central", "--clip-norm", "1.0",
                         "--noise-multiplier", "0.5", "--deadline-s", "60", "--allow-noisy-dp")
    _, base = srv.model()
    devices = [srv.device() for _ in range(2)]
    rid = [d.task() for d in devices][0]["round_id"]
    deltas = [dyadic_delta(20 + i) for i in range(2)]
    for d, delta in zip(devices, deltas):
        assert d.upload(rid, encode_delta(delta, 1)).status_code == 200
    assert srv.wait_round(rid)["state"] == "closed"
    _, weights = srv.model()
    flat_sum = np.concatenate([(deltas[0][k].astype(np.float64) + deltas[1][k]).ravel() for k in range(len(base))])
    # the noise seed is a per-round secret: read it from the server's store
    seed = srv.query("SELECT seed FROM rounds WHERE id = ?", (rid,))[0]["seed"]
    noise = np.random.default_rng([seed, rid]).standard_normal(flat_sum.size) * 0.5
    want_flat = np.concatenate([b.ravel().astype(np.float64) for b in base]) + (flat_sum + noise) / 2
    got_flat = np.concatenate([w.ravel() for w in weights])
    np.testing.assert_array_equal(got_flat, want_flat.astype(np.float32))


@pytest.mark.parametrize("aggregator", ["trimmed_mean", "median"])
def test_robust_aggregation_resists_a_poisoned_update(server_factory, aggregator):
    srv = server_factory("--round-goal", "5", "--min-count", "5", "--aggregator", aggregator, "--trim-fraction", "0.2",
                         "--clip-norm", "0", "--deadline-s", "60")
    _, base = srv.model()
    devices = [srv.device() for _ in range(5)]
    rid = [d.task() for d in devices][0]["round_id"]
    deltas = [dyadic_delta(30 + i) for i in range(4)]
    poison = [np.full(shape, 1000.0, np.float32) for _, shape in TINY.weight_specs()]
    for d, delta in zip(devices, deltas + [poison]):
        assert d.upload(rid, encode_delta(delta, 1)).status_code == 200
    assert srv.wait_round(rid)["state"] == "closed"
    _, weights = srv.model()
    for k, b in enumerate(base):
        stack = np.stack([d[k].astype(np.float64) for d in deltas + [poison]])
        if aggregator == "median":
            agg = np.median(stack, axis=0)
        else:
            agg = np.sort(stack, axis=0)[1:4].mean(axis=0)  # 5 values, trim 20%: drop 1 at each end
        np.testing.assert_array_equal(weights[k], (b.astype(np.float64) + agg).astype(np.float32))
        assert np.abs(weights[k] - b).max() < 1.0  # the poison did not get through


def test_server_momentum_state_carries_across_rounds_and_restart(server_factory):
    srv = server_factory("--round-goal", "1", "--min-count", "1", "--server-optimizer", "momentum",
                         "--server-lr", "0.5", "--server-momentum", "0.9", "--deadline-s", "60")
    _, w = srv.model()
    d = srv.device()
    velocity = None
    want = [x.astype(np.float64) for x in w]
    for i in range(3):
        if i == 1:
            srv.restart()  # optimizer state comes back from disk
            d.client.base_url = srv.url
        task = d.task()
        delta = dyadic_delta(40 + i)
        assert d.upload(task["round_id"], encode_delta(delta, task["base_version"])).status_code == 200
        srv.wait_round(task["round_id"])
        g = [-x.astype(np.float64) for x in delta]
        velocity = g if velocity is None else [0.9 * v + gi for v, gi in zip(velocity, g)]
        want = [(wk - 0.5 * v).astype(np.float32).astype(np.float64) for wk, v in zip(want, velocity)]
    version, got = srv.model()
    assert version == 4
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_, w_, rtol=0, atol=1e-6)


def test_quantized_uploads_are_accepted_within_the_norm_bound(server_factory):
    srv = server_factory("--round-goal", "3", "--min-count", "3", "--clip-norm", "1.0", "--deadline-s", "60")
    devices = [srv.device() for _ in range(3)]
    rid = [d.task() for d in devices][0]["round_id"]
    rng = np.random.default_rng(3)
    for d, dtype in zip(devices, ["float16", "int8", "int16"]):
        raw = [rng.standard_normal(shape).astype(np.float32) for _, shape in TINY.weight_specs()]
        clipped, _ = dp.clip_by_global_norm(raw, 1.0)  # exactly at the bound: rounding may push it over
        r = d.upload(rid, encode_delta(clipped, 1, dtype=dtype))
        assert r.status_code == 200, r.text
    assert srv.wait_round(rid)["state"] == "closed"
