"""Release gating over HTTP (--release-gate eval): a version produced by training rounds is served only after an
evaluation round finds it not worse than the served version; a regressing one is held back with its reason,
training continues from the served version (and its optimizer state), N held-back versions in a row stop
training, and a restart while a version awaits its evaluation resumes it.

Devices here are test clients: they upload chosen deltas and report chosen recalls, so each decision is known.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models import wire
from server.config import ServerConfig
from server.evaluation import promote, shortfall
from server.round import EvalParams
from tests.server_fixtures import (  # noqa: F401  (server_factory is a fixture)
    TINY, Device, ServerProcess, dyadic_delta, encode_delta, server_factory, wait_for,
)

GATED = ("--release-gate", "eval", "--round-goal", "2", "--min-count", "2", "--deadline-s", "60",
         "--candidate-eval-fraction", "1.0", "--eval-goal", "2", "--eval-min-count", "2", "--eval-deadline-s", "60",
         "--promotion-tolerance", "0.005")


def _train(srv: ServerProcess, devices: list[Device], deltas: list[list[np.ndarray]]) -> tuple[int, dict]:
    """One training round with these deltas: (produced version, the closed round)."""
    tasks = [d.task() for d in devices]
    assert all(t["type"] == "train" for t in tasks), tasks
    rid = tasks[0]["round_id"]
    for d, t, delta in zip(devices, tasks, deltas):
        assert d.upload(rid, encode_delta(delta, t["base_version"])).status_code == 200
    rnd = srv.wait_round(rid)
    assert rnd["state"] == "closed", rnd
    return rnd["result_version"], rnd


def _evaluate(devices: list[Device], cand_recall: float, base_recall: float) -> dict[str, Any]:
    """Every device reports candidate vs baseline recall; returns the (first) evaluate task."""
    first = None
    for d in devices:
        task = d.task()
        assert task["type"] == "evaluate", task
        r = d.report(task["round_id"], [
            {"model_version": task["candidate_version"], "num_examples": 20, "recall": cand_recall, "loss": 3.0},
            {"model_version": task["baseline_version"], "num_examples": 20, "recall": base_recall, "loss": 3.0}])
        assert r.status_code == 200, r.text
        first = first or task
    return first


def _versions(srv: ServerProcess) -> dict[int, dict[str, Any]]:
    return {v["version"]: v for v in srv.admin_get("/v1/admin/versions")["versions"]}


def _flat(weights: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([w.reshape(-1).astype(np.float64) for w in weights])


def _mean(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    return (_flat(a) + _flat(b)) / 2.0


def test_regressing_version_is_held_back_and_training_continues_from_the_served_one(server_factory):
    # heavy-ball momentum: the optimizer state belongs to a version, so a held-back version's must not be used
    srv = server_factory(*GATED, "--server-optimizer", "momentum", "--server-momentum", "0.9", "--server-lr", "1.0")
    devices = [srv.device() for _ in range(2)]
    deltas = {k: [dyadic_delta(10 * k + i) for i in range(2)] for k in range(1, 5)}

    # round 1 -> version 2, unpublished until its evaluation
    v2, _ = _train(srv, devices, deltas[1])
    listing = srv.admin_get("/v1/admin/versions")
    assert (listing["global_version"], listing["awaiting_evaluation"], listing["candidate_version"]) == (1, v2, None)
    assert listing["versions"][-1]["release_state"] == "awaiting_evaluation"
    assert srv.model()[0] == 1  # devices download the served version meanwhile
    assert devices[0].client.get("/v1/model/info").json()["global_version"] == 1
    # an improving version is released: it becomes global as itself (no copy)
    task = _evaluate(devices, 0.12, 0.11)
    assert (task["candidate_version"], task["baseline_version"]) == (v2, 1)
    assert srv.wait_round(task["round_id"])["outcome"]["decision"] == "released"
    assert srv.model()[0] == v2
    w2 = srv.model()[1]
    versions = _versions(srv)
    assert versions[v2]["release_state"] == "served" and versions[1]["release_state"] == "superseded"

    # round 2 -> version 3 regresses beyond the tolerance: held back, the served version stays global
    v3, _ = _train(srv, devices, deltas[2])
    task = _evaluate(devices, 0.081, 0.112)
    rnd = srv.wait_round(task["round_id"])
    reason = "held back: recall 0.081 vs served 0.112 on 2 devices, tolerance 0.005"
    assert rnd["outcome"]["decision"] == "held_back" and rnd["outcome"]["reason"] == reason
    versions = _versions(srv)
    assert versions[v3]["release_state"] == "held_back" and versions[v3]["release_reason"] == reason
    assert not versions[v3]["was_global"] and versions[v2]["release_state"] == "served"
    assert srv.model()[0] == v2 and srv.admin_get("/v1/admin/status")["release"]["consecutive_held_back"] == 1
    current = devices[0].client.get("/v1/models/current")  # what a device syncs: never the held-back version
    assert current.headers["X-Model-Version"] == str(v2)
    assert devices[0].client.get("/v1/model/info").json()["global_version"] == v2
    page = srv.admin().get("/status").text
    assert 'id="held-back"' in page and reason in page

    # training continues from version 2 with version 2's optimizer state (not the held-back one's)
    v4, rnd = _train(srv, devices, deltas[3])
    assert rnd["base_version"] == v2
    want = _flat(w2) + 0.9 * _mean(*deltas[1]) + _mean(*deltas[3])  # a2 = -mean1; a4 = 0.9 a2 - mean3
    np.testing.assert_allclose(_flat(srv.model(v4)[1]), want.astype(np.float32), rtol=0, atol=2e-6)
    assert not (srv.data_dir / "optimizer" / f"v{v3:06d}.npz").exists(), "a held-back version's state is dropped"
    # an equal version is released; the served version's optimizer state goes once it is replaced
    task = _evaluate(devices, 0.112, 0.112)
    assert srv.wait_round(task["round_id"])["outcome"]["decision"] == "released"
    assert srv.model()[0] == v4 and srv.admin_get("/v1/admin/status")["release"]["consecutive_held_back"] == 0
    wait_for(lambda: not (srv.data_dir / "optimizer" / f"v{v2:06d}.npz").exists(), "version 2's state deleted")
    assert (srv.data_dir / "optimizer" / f"v{v4:06d}.npz").exists()


def test_consecutive_held_back_versions_stop_training_with_the_reason(server_factory):
    srv = server_factory(*GATED, "--max-rejected-versions", "2")
    devices = [srv.device() for _ in range(2)]
    for k in range(2):
        version, _ = _train(srv, devices, [dyadic_delta(100 + 2 * k + i) for i in range(2)])
        # while the version awaits its evaluation, no training round opens
        assert srv.admin_get("/v1/admin/status")["current_round"] is None
        _evaluate(devices, 0.05, 0.2)
        wait_for(lambda v=version: _versions(srv)[v]["release_state"] == "held_back", f"version {version} held back")
    status = wait_for(lambda: (s := srv.admin_get("/v1/admin/status"))["training_enabled"] is False and s,
                       "training stopped")
    why = status["release"]["training_stopped_reason"]
    assert "2 consecutive held-back versions" in why and "recall 0.050 vs served 0.200" in why
    assert status["global_version"] == 1 and srv.model()[0] == 1
    answer = devices[0].checkin()
    assert answer["action"] == "retry" and answer["reason"] == "training_stopped"
    assert why in srv.admin().get("/status").text
    # a start clears the reason and the streak; training continues from the served version
    assert srv.admin_post("/v1/admin/training/start").json()["training_enabled"] is True
    release = srv.admin_get("/v1/admin/status")["release"]
    assert release["training_stopped_reason"] is None and release["consecutive_held_back"] == 0
    assert devices[0].task()["base_version"] == 1


def test_restart_while_a_version_awaits_evaluation_resumes(server_factory):
    srv = server_factory(*GATED)
    devices = [srv.device() for _ in range(3)]
    v2, _ = _train(srv, devices[:2], [dyadic_delta(200 + i) for i in range(2)])
    # one report in, then a crash
    task = devices[0].task()
    assert task["type"] == "evaluate" and task["candidate_version"] == v2
    r = devices[0].report(task["round_id"], [
        {"model_version": v2, "num_examples": 20, "recall": 0.2, "loss": 3.0},
        {"model_version": 1, "num_examples": 20, "recall": 0.1, "loss": 3.0}])
    assert r.status_code == 200
    srv.kill9()
    srv.start()
    for d in devices:
        d.client.base_url = srv.url
    listing = srv.admin_get("/v1/admin/versions")
    assert listing["global_version"] == 1 and listing["awaiting_evaluation"] == v2
    assert srv.round(task["round_id"])["state"] == "open" and srv.model()[0] == 1
    # a device that already reported waits for the decision; training waits too
    answer = devices[0].checkin()
    assert answer["action"] == "retry" and answer["reason"] == "awaiting_release"
    _evaluate(devices[1:2], 0.2, 0.1)
    assert srv.wait_round(task["round_id"])["outcome"]["decision"] == "released"
    assert srv.model()[0] == v2
    assert devices[2].task()["base_version"] == v2  # the next training round trains the released version


def test_a_new_global_model_supersedes_the_version_awaiting_evaluation(server_factory):
    srv = server_factory(*GATED)
    devices = [srv.device() for _ in range(2)]
    v2, _ = _train(srv, devices, [dyadic_delta(300 + i) for i in range(2)])
    ev = devices[0].task()
    assert ev["type"] == "evaluate"
    # an admin push waits as the candidate behind the trained version's evaluation round
    weights = [np.full(shape, 0.125, np.float32) for _, shape in TINY.weight_specs()]
    pushed = srv.admin_post("/v1/admin/models", content=wire.encode(weights, TINY, kind="weights"))
    assert pushed.json()["state"] == "candidate" and pushed.json()["eval_round_id"] is None
    assert srv.round(ev["round_id"])["state"] == "open"
    # a model pushed straight to global replaces the served version the trained one was evaluated against
    r = srv.admin_post("/v1/admin/models", params={"promote": "true"},
                       content=wire.encode(weights, TINY, kind="weights"))
    assert r.status_code == 200 and r.json()["state"] == "global"
    versions = _versions(srv)
    assert versions[v2]["release_state"] == "superseded" and "became global" in versions[v2]["release_reason"]
    assert srv.round(ev["round_id"])["outcome"]["reason"] == "global_changed"
    assert srv.admin_get("/v1/admin/versions")["awaiting_evaluation"] is None
    assert srv.model()[0] == r.json()["version"]


def test_shortfall_reasons_and_gate_settings():
    params = EvalParams(goal=2, min_count=2, max_admitted=2, deadline_s=60, promotion_tolerance=0.005,
                        promotion_loss_tolerance=0.1)
    served = {"recall": 0.112, "loss": 3.9, "devices": 14}
    assert shortfall({"recall": 0.081, "loss": 3.9, "devices": 14}, served, params) == \
        "recall 0.081 vs served 0.112 on 14 devices, tolerance 0.005"
    assert shortfall({"recall": 0.112, "loss": 4.21, "devices": 14}, served, params) == \
        "loss 4.210 vs served 3.900 on 14 devices, loss tolerance 0.1"
    equal = {"recall": 0.108, "loss": 3.95, "devices": 14}  # within both tolerances
    assert shortfall(equal, served, params) is None and promote(equal, served, params)
    assert ServerConfig().release_gate == "eval" and ServerConfig().max_rejected_versions == 0
    for bad in ({"release_gate": "maybe"}, {"max_rejected_versions": -1},
                {"release_gate": "eval", "candidate_eval_fraction": 0.0}):
        with pytest.raises(ValueError):
            ServerConfig(**bad)
    ServerConfig(release_gate="off", candidate_eval_fraction=0.0)
