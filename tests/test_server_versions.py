"""Versions over HTTP: candidate gating by evaluation rounds, rollback, admin push, training start/stop, ops pages."""
from __future__ import annotations

import re

import numpy as np

from models import wire
from tests.pg_fixture import server_database_args
from tests.server_fixtures import (  # noqa: F401  (server_factory is a fixture)
    TINY, assert_weights_equal, dyadic_delta, encode_delta, server_factory,
)


def _train_round(srv, devices, seed: int) -> int:
    tasks = [d.task() for d in devices]
    rid = tasks[0]["round_id"]
    for i, (d, t) in enumerate(zip(devices, tasks)):
        assert d.upload(rid, encode_delta(dyadic_delta(seed + i), t["base_version"])).status_code == 200
    return srv.wait_round(rid)["result_version"]


def _push(srv, weights, **params):
    return srv.admin_post("/v1/admin/models", content=wire.encode(weights, TINY, kind="weights", model_version=123,
                                                                  metadata={"source": "tff_sim"}), params=params)


def _evaluate(devices, cand_recall: float, base_recall: float) -> list[dict]:
    answers = []
    for d in devices:
        task = d.task()
        assert task["type"] == "evaluate"
        r = d.report(task["round_id"], [
            {"model_version": task["candidate_version"], "num_examples": 20, "recall": cand_recall, "loss": 3.0},
            {"model_version": task["baseline_version"], "num_examples": 20, "recall": base_recall, "loss": 3.0}])
        assert r.status_code == 200, r.text
        answers.append(task)
    return answers


def test_candidate_gating_rejects_worse_and_promotes_not_worse(server_factory):
    srv = server_factory("--round-goal", "2", "--min-count", "2", "--deadline-s", "60", "--candidate-eval-fraction",
                         "1.0", "--eval-goal", "2", "--eval-min-count", "2", "--promotion-tolerance", "0.01")
    trainers = [srv.device() for _ in range(2)]
    v2 = _train_round(srv, trainers, 0)
    assert v2 == 2
    # a worse candidate (recall 0.10 vs 0.15: beyond the 0.01 tolerance) is rejected
    worse = [np.full(shape, 0.5, np.float32) for _, shape in TINY.weight_specs()]
    r = _push(srv, worse, note="bad sim run")
    assert r.status_code == 200 and r.json()["state"] == "candidate"
    cand = r.json()["version"]
    assert cand == 3 and r.json()["eval_round_id"]
    assert srv.admin_get("/v1/admin/status")["candidate_version"] == cand
    # the candidate is downloadable for evaluation, but /current is still the global model
    assert srv.model(cand)[0] == cand and srv.model()[0] == 2
    evaluators = [srv.device() for _ in range(2)]
    tasks = _evaluate(evaluators, 0.10, 0.15)
    assert tasks[0]["baseline_version"] == 2
    rnd = srv.wait_round(tasks[0]["round_id"])
    assert rnd["outcome"]["decision"] == "rejected"
    assert rnd["outcome"]["candidate"]["recall"] == 0.10 and rnd["outcome"]["baseline"]["recall"] == 0.15
    versions = srv.admin_get("/v1/admin/versions")
    assert versions["global_version"] == 2 and versions["candidate_version"] is None
    assert {v["version"]: v["candidate_state"] for v in versions["versions"]}[cand] == "rejected"
    assert srv.model()[0] == 2

    # a candidate within tolerance (0.145 vs 0.15) is promoted as a new version with its weights
    good = [np.full(shape, 0.25, np.float32) for _, shape in TINY.weight_specs()]
    open_train = trainers[0].task()  # a training round is open on version 2 meanwhile
    assert open_train["type"] == "train"
    cand2 = _push(srv, good).json()["version"]
    evaluators2 = [srv.device() for _ in range(2)]
    tasks = _evaluate(evaluators2, 0.145, 0.15)
    rnd = srv.wait_round(tasks[0]["round_id"])
    assert rnd["outcome"]["decision"] == "promoted"
    version, weights = srv.model()
    assert version == rnd["result_version"] == cand2 + 1
    assert_weights_equal(weights, good)
    # the training round on the replaced model was abandoned, the next one trains the promoted model
    old = srv.round(open_train["round_id"])
    assert old["state"] == "abandoned" and old["outcome"]["reason"] == "global_changed"
    late = trainers[0].upload(open_train["round_id"], encode_delta(dyadic_delta(5), 2))
    assert late.json()["error"] == "round_closed"
    assert trainers[1].task()["base_version"] == version


def test_rollback_to_any_earlier_version(server_factory):
    srv = server_factory("--round-goal", "1", "--min-count", "1", "--deadline-s", "60")
    d = srv.device()
    history = {1: srv.model()[1]}
    for i in range(3):
        v = _train_round(srv, [d], 10 + i)
        history[v] = srv.model()[1]
    assert sorted(history) == [1, 2, 3, 4]
    r = srv.admin_post("/v1/admin/rollback", json={"version": 2, "note": "v3 regressed"})
    assert r.status_code == 200 and r.json() == {"version": 5, "rollback_of": 2}
    version, weights = srv.model()
    assert version == 5
    assert_weights_equal(weights, history[2])
    versions = {v["version"]: v for v in srv.admin_get("/v1/admin/versions")["versions"]}
    assert versions[5]["source"] == "rollback" and versions[5]["parent_version"] == 2 and versions[5]["is_global"]
    # training continues from the rolled-back weights
    task = d.task()
    assert task["base_version"] == 5
    # refusals change nothing
    for body, status, reason in [({"version": 99}, 404, "unknown_version"), ({"version": 5}, 409, "already_global")]:
        r = srv.admin_post("/v1/admin/rollback", json=body)
        assert (r.status_code, r.json()["error"]) == (status, reason)
    cand = _push(srv, history[1]).json()["version"]
    r = srv.admin_post("/v1/admin/rollback", json={"version": cand})
    assert (r.status_code, r.json()["error"]) == (409, "not_a_global_version")
    assert srv.model()[0] == 5
    # back to the very first model
    assert srv.admin_post("/v1/admin/rollback", json={"version": 1}).status_code == 200
    assert_weights_equal(srv.model()[1], history[1])


def test_push_promote_discard_and_training_start_stop(server_factory):
    srv = server_factory("--round-goal", "2", "--min-count", "2", "--deadline-s", "60")
    d = srv.device()
    rid = d.task()["round_id"]
    r = srv.admin_post("/v1/admin/training/stop")
    assert r.status_code == 200 and r.json()["training_enabled"] is False
    assert srv.round(rid)["state"] == "abandoned" and srv.round(rid)["outcome"]["reason"] == "stopped"
    answer = d.checkin()
    assert answer["action"] == "retry" and answer["reason"] == "training_stopped"
    # a pushed model with promote=true becomes global at once
    weights = [np.full(shape, 0.125, np.float32) for _, shape in TINY.weight_specs()]
    r = _push(srv, weights, promote="true")
    assert r.json()["state"] == "global"
    version, got = srv.model()
    assert version == r.json()["version"]
    assert_weights_equal(got, weights)
    # wrong pushes are refused with reasons
    bad = srv.admin_post("/v1/admin/models", content=encode_delta(dyadic_delta(1), 1))
    assert (bad.status_code, bad.json()["error"]) == (400, "wrong_kind")
    # stage then discard a candidate
    cand = _push(srv, weights).json()["version"]
    assert srv.admin_post("/v1/admin/candidate/discard").json() == {"discarded": cand}
    r = srv.admin_post("/v1/admin/candidate/discard")
    assert (r.status_code, r.json()["error"]) == (409, "no_candidate")
    assert srv.admin_post("/v1/admin/training/start").json()["training_enabled"] is True
    task = d.task()
    assert task["type"] == "train" and task["base_version"] == version


def test_status_page_metrics_and_openapi(server_factory):
    srv = server_factory("--round-goal", "2", "--min-count", "2", "--deadline-s", "60", "--dp-mode", "local",
                         "--clip-norm", "100", "--noise-multiplier", "0.01")
    devices = [srv.device() for _ in range(2)]
    for i in range(2):
        tasks = [d.task() for d in devices]
        for j, (d, t) in enumerate(zip(devices, tasks)):
            body = encode_delta(dyadic_delta(50 + 2 * i + j), t["base_version"], metrics={"top1_recall": 0.1 + i / 10})
            assert d.upload(t["round_id"], body).status_code == 200
        srv.wait_round(tasks[0]["round_id"])
    anon = srv.anon()
    admin = srv.admin()  # /status and /metrics need the admin token (no --public-status here)
    page = admin.get("/status")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for chart in ("chart-rounds", "chart-participants", "chart-versions", "chart-recall", "chart-epsilon"):
        assert f'id="{chart}"' in html
    assert html.count("<svg") == 5 and "<script" not in html.lower()
    assert not re.search(r'(src|href)="https?://', html), "the page must not load anything from the internet"
    assert "polyline" in html and "<rect" in html
    metrics = admin.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert "fk_devices_registered 2" in text and "fk_global_version 3" in text
    assert re.search(r"^fk_epsilon \d", text, re.M)
    assert 'fk_rounds{kind="train",state="closed"} 2' in text
    for line in text.splitlines():  # every sample line is "name{labels} value"
        assert line.startswith("#") or re.fullmatch(r'[a-z_0-9]+(\{[^}]*\})? [-+0-9.eInfa]+', line), line
    status = srv.admin_get("/v1/admin/status")
    assert status["privacy"]["dp_rounds"] == 2 and status["privacy"]["epsilon"] > 0
    assert status["devices"]["registered"] == 2
    spec = anon.get("/openapi.json").json()
    for path in ("/v1/checkin", "/v1/rounds/{round_id}/update", "/v1/models/{version}", "/v1/admin/rollback",
                 "/healthz", "/metrics", "/status"):
        assert path in spec["paths"], path
    health = anon.get("/healthz").json()
    assert health == {"status": "ok", "initialized": True, "global_version": 3, "warm": True, "role": health["role"]}
    assert health["role"] == ("aggregator" if "--cluster" in srv.args + server_database_args(srv.data_dir) else "single")


def test_uninitialised_server_and_admin_init(server_factory):
    srv = server_factory(init=False)
    d = srv.device()
    answer = d.checkin()
    assert answer["action"] == "retry" and answer["reason"] == "not_initialized"
    r = d.client.get("/v1/models/current")
    assert (r.status_code, r.json()["error"]) == (503, "not_initialized")
    from server.bootstrap import synthetic_vocab
    r = srv.admin_post("/v1/admin/init", json={"config": TINY.to_dict(),
                                               "vocab": synthetic_vocab(TINY.vocab_size).to_dict()})
    assert r.status_code == 201 and r.json()["version"] == 1
    assert d.task()["base_version"] == 1
    r = srv.admin_post("/v1/admin/init", json={"config": TINY.to_dict(),
                                               "vocab": synthetic_vocab(TINY.vocab_size).to_dict()})
    assert (r.status_code, r.json()["error"]) == (409, "already_initialized")


def test_init_from_model_bundle(server_factory, tmp_path):
    from models.bundle import save_bundle
    from server.bootstrap import random_weights, synthetic_vocab

    vocab = synthetic_vocab(TINY.vocab_size)
    weights = random_weights(TINY, seed=5)
    bundle = save_bundle(tmp_path / "bundle", TINY, vocab, weights, model_version=17, meta={"trained_by": "test"})
    srv = server_factory("--init-bundle", str(bundle), init=False)
    d = srv.device()
    info = d.client.get("/v1/model/info").json()
    assert info["config_hash"] == TINY.config_hash() and info["vocab_hash"] == vocab.content_hash()
    assert d.client.get("/v1/model/vocab").json() == vocab.to_dict()
    version, got = srv.model()
    assert version == 1
    assert_weights_equal(got, weights)
    versions = srv.admin_get("/v1/admin/versions")["versions"]
    assert versions[0]["info"]["bundle_model_version"] == 17
    # a restart with --init-bundle again keeps the data dir as it is
    srv.restart()
    assert srv.model()[0] == 1 and len(srv.admin_get("/v1/admin/versions")["versions"]) == 1
