"""Server building blocks without HTTP: aggregation math, optimizers, metrics text, status page, config, store."""
from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest

from models import dp, wire
from server import aggregation, status_page
from server.config import ServerConfig
from server.metrics import Metrics
from server.optimizers import ServerOptimizer
from server.store import Store
from server.strategy import quantization_error_bound
from tests.server_fixtures import TINY


def test_streaming_mean_matches_batch_and_is_order_exact():
    rng = np.random.default_rng(0)
    ups = [rng.standard_normal(1000).astype(np.float32) for _ in range(7)]
    ws = [1, 3, 5, 7, 2, 4, 6]
    acc = aggregation.MeanAccumulator(1000)
    for u, w in zip(ups, ws):
        acc.add([u[:300], u[300:]], w)  # given as tensors
    want = sum(u.astype(np.float64) * w for u, w in zip(ups, ws)) / sum(ws)
    np.testing.assert_allclose(acc.mean(), want, rtol=1e-12)
    again = aggregation.MeanAccumulator(1000)
    for u, w in zip(ups, ws):
        again.add(u, w)
    np.testing.assert_array_equal(again.sum, acc.sum)  # same order, same bits
    np.testing.assert_allclose(aggregation.weighted_mean(ups), np.mean(np.stack(ups).astype(np.float64), axis=0),
                               rtol=1e-12)
    with pytest.raises(ValueError):
        acc.add(np.zeros(999, np.float32))
    with pytest.raises(ValueError):
        aggregation.MeanAccumulator(3).mean()


def test_trimmed_mean_and_median_chunked_match_numpy():
    rng = np.random.default_rng(1)
    ups = [rng.standard_normal(5000).astype(np.float32) for _ in range(9)]
    stack = np.stack(ups).astype(np.float64)
    small_chunks = 9 * 8 * 1024  # forces several coordinate chunks
    np.testing.assert_allclose(aggregation.coordinate_median(ups, chunk_bytes=small_chunks),
                               np.median(stack, axis=0), rtol=0, atol=0)
    k = aggregation.trim_count(9, 0.2)
    assert k == 1
    want = np.sort(stack, axis=0)[k : 9 - k].mean(axis=0)
    np.testing.assert_allclose(aggregation.trimmed_mean(ups, 0.2, chunk_bytes=small_chunks), want, rtol=1e-12)
    np.testing.assert_allclose(aggregation.trimmed_mean(ups, 0.0), stack.mean(axis=0), rtol=1e-12)
    assert aggregation.trim_count(2, 0.45) == 0 and aggregation.trim_count(10, 0.49) == 4


def test_optimizers_follow_their_formulas():
    w = np.array([1.0, -2.0, 0.5])
    d1, d2 = np.array([0.1, 0.2, -0.3]), np.array([-0.05, 0.1, 0.0])
    sgd = ServerOptimizer("sgd", lr=0.5)
    np.testing.assert_allclose(sgd.step(w, d1), w + 0.5 * d1)
    assert sgd.state == {}

    mom = ServerOptimizer("momentum", lr=0.5, momentum=0.9)
    w1 = mom.step(w, d1)
    np.testing.assert_allclose(w1, w - 0.5 * (-d1))
    w2 = mom.step(w1, d2)
    np.testing.assert_allclose(w2, w1 - 0.5 * (0.9 * -d1 + -d2))

    nes = ServerOptimizer("nesterov", lr=0.5, momentum=0.9)
    w1 = nes.step(w, d1)
    v = -d1
    np.testing.assert_allclose(w1, w - 0.5 * (-d1 + 0.9 * v))
    legacy = ServerOptimizer("momentum", lr=0.5, momentum=0.9, nesterov=True)  # the deprecated spelling
    assert legacy.name == "nesterov"
    np.testing.assert_allclose(legacy.step(w, d1), w1)

    # Adam as TFF computes it (models/fedavg.py): bias correction folded into the rate, eps outside the
    # root; at t = 1 the rate is lr sqrt(1 - b2) / (1 - b1) = lr for b1 0.9, b2 0.99
    adam = ServerOptimizer("adam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    w1 = adam.step(w, d1)
    g = -d1
    m, vv = 0.1 * g, 0.01 * g * g
    np.testing.assert_allclose(w1, w - 0.1 * m / (np.sqrt(vv) + 1e-3))
    # state round trip (as the store persists it), including a refusal of another optimizer's state
    saved = adam.state_dict()
    again = ServerOptimizer("adam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    assert again.load_state_dict(saved, 3)
    np.testing.assert_allclose(again.step(w1, d2), adam.step(w1, d2))
    assert not ServerOptimizer("momentum").load_state_dict(saved, 3)
    assert not ServerOptimizer("adam").load_state_dict(saved, 4)



@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "yogi", "adagrad"])
def test_server_optimizer_is_models_fedavg_through_a_restart(name):
    """Steps with the state saved and reloaded in between (a server restart) = models.fedavg's steps."""
    from models import fedavg

    rng = np.random.default_rng(3)
    w, deltas = rng.standard_normal(6), [rng.standard_normal(6) * s for s in (1.0, 0.1, 0.5)]
    ref = fedavg.ServerOptimizer(name, lr=0.3, momentum=0.8)
    state = fedavg.server_init([w], ref)
    server_w, saved = w, None
    for d in deltas:
        state = fedavg.server_update(state, [d], ref)
        opt = ServerOptimizer(name, lr=0.3, momentum=0.8)
        if saved is not None:
            assert opt.load_state_dict(saved, 6)
        server_w = opt.step(server_w, d)
        saved = opt.state_dict()
        np.testing.assert_allclose(server_w, state.weights[0], rtol=1e-12)
    assert bool(opt.state) == (name != "sgd")  # sgd keeps no state (the store writes none)


def test_server_config_optimizer_names_and_their_old_spellings(tmp_path):
    import json

    from server.__main__ import build_parser, config_from_args

    for name in ("sgd", "momentum", "nesterov", "adam", "yogi", "adagrad"):
        assert ServerConfig(server_optimizer=name).fedavg.server_optimizer == name
    with pytest.raises(ValueError):
        ServerConfig(server_optimizer="rmsprop")
    # momentum + the deprecated nesterov flag is nesterov; for other optimizers the flag changes nothing
    assert ServerConfig(server_optimizer="momentum", nesterov=True).server_optimizer == "nesterov"
    assert ServerConfig(server_optimizer="sgd", nesterov=True).server_optimizer == "sgd"
    c = ServerConfig()
    assert (c.beta1, c.beta2, c.eps) == (0.9, 0.99, 1e-3)  # Reddi et al.: the same defaults as tff_sim
    args = build_parser().parse_args(["--server-optimizer", "momentum", "--nesterov", "--adam-beta2", "0.9",
                                      "--adam-eps", "0.01", "--client-lr", "0.3", "--client-epochs", "2"])
    c = config_from_args(args)
    assert (c.server_optimizer, c.beta2, c.eps, c.learning_rate, c.epochs) == ("nesterov", 0.9, 0.01, 0.3, 2)
    assert {k: c.round_params()[k] for k in ("epochs", "learning_rate")} == {"epochs": 2, "learning_rate": 0.3}
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"adam_beta1": 0.8, "client_lr": 0.2}))
    c = ServerConfig.from_file(path, learning_rate=0.4)  # a flag wins over the file's alias
    assert (c.beta1, c.learning_rate) == (0.8, 0.4)
    with pytest.raises(ValueError):
        ServerConfig.from_dict({"adam_eps": 0.1, "eps": 0.2})


def test_server_optimizer_loads_state_files_written_before_models_fedavg():
    w, d = np.array([1.0, -2.0, 0.5]), np.array([0.1, 0.2, -0.3])
    old_momentum = {"optimizer": np.array("momentum"), "velocity": np.array([0.5, -0.1, 0.2])}
    for name, nesterov in (("momentum", False), ("nesterov", False), ("momentum", True)):
        opt = ServerOptimizer(name, lr=0.5, momentum=0.9, nesterov=nesterov)
        assert opt.load_state_dict(old_momentum, 3), name
        v = 0.9 * old_momentum["velocity"] - d
        want = w - 0.5 * (v if opt.name == "momentum" else -d + 0.9 * v)
        np.testing.assert_allclose(opt.step(w, d), want)
    old_adam = {"optimizer": np.array("adam"), "step": np.array(2), "m": np.zeros(3), "v": np.ones(3)}
    adam = ServerOptimizer("adam")
    assert adam.load_state_dict(old_adam, 3) and int(adam.state["step"]) == 2
    assert not ServerOptimizer("adam").load_state_dict({"optimizer": np.array("adam"), "m": np.zeros(3)}, 3)


def test_quantization_bound_covers_wire_rounding():
    rng = np.random.default_rng(2)
    tensors = [rng.standard_normal(shape).astype(np.float32) for _, shape in TINY.weight_specs()]
    tensors, _ = dp.clip_by_global_norm(tensors, 1.0)
    for dtype in ("float16", "int8", "int16"):
        blob = wire.encode(tensors, TINY, kind="delta", dtype=dtype)
        decoded = wire.decode(blob, TINY).tensors
        err = dp.l2_norm([d.astype(np.float64) - t for d, t in zip(decoded, tensors)])
        bound = quantization_error_bound(decoded, dtype, dp.l2_norm(decoded))
        assert err <= bound, dtype
        assert dp.l2_norm(decoded) <= 1.0 + bound
    assert quantization_error_bound(tensors, "float32", 1.0) == 0.0


def test_metrics_text_format():
    m = Metrics()
    m.inc("fk_uploads_total", {"result": "accepted"}, 3)
    m.inc("fk_uploads_total", {"result": 'we"ird'})
    m.observe("fk_upload_seconds", 0.25)
    text = m.render([("fk_epsilon", "eps", math.inf, None), ("fk_rounds", "r", 2, {"kind": "train", "state": "open"})])
    assert 'fk_uploads_total{result="accepted"} 3' in text
    assert 'fk_uploads_total{result="we\\"ird"} 1' in text
    assert "fk_upload_seconds_count 1" in text and "fk_upload_seconds_sum 0.25" in text
    assert "fk_epsilon +Inf" in text and 'fk_rounds{kind="train",state="open"} 2' in text
    assert "# TYPE fk_uploads_total counter" in text and "# TYPE fk_epsilon gauge" in text


def _fake_rounds(n: int) -> list[dict]:
    now = time.time() - 3600
    out = []
    for i in range(1, n + 1):
        abandoned = i % 5 == 0
        out.append({"id": i, "kind": "train", "state": "abandoned" if abandoned else "closed", "base_version": i,
                    "candidate_version": None, "created_at": now + 60 * i, "deadline": now + 60 * i + 50,
                    "closed_at": now + 60 * i + 40, "result_version": None if abandoned else i + 1,
                    "epsilon": None if abandoned else 0.3 * math.sqrt(i), "delta": 1e-5, "noise_multiplier": 1.0,
                    "sampling_prob": 0.01, "population": 1000, "goal": 100, "min_count": 80, "max_admitted": 130,
                    "admitted": 130, "accepted": 60 if abandoned else 100, "dropouts": 70 if abandoned else 30,
                    "outcome": {"reason": "below_min_count"} if abandoned else
                    {"local_metrics": {"top1_recall": 0.05 + 0.01 * i, "loss": 5 - 0.1 * i}},
                    "params": {}})
    out.append({**out[0], "id": n + 1, "kind": "eval", "state": "closed", "candidate_version": 99, "epsilon": None,
                "outcome": {"decision": "promoted", "candidate": {"recall": 0.2, "loss": 3.0},
                            "baseline": {"recall": 0.18, "loss": 3.2}}})
    return out


def test_status_page_renders_self_contained_svg():
    rounds = _fake_rounds(12)
    versions = [{"version": v, "created_at": time.time() - 3600 + 60 * v, "source": "round", "parent_version": v - 1,
                 "candidate_state": None, "was_global": True, "is_global": v == 12, "is_candidate": False,
                 "note": "<b>x</b>", "info": {}, "sha256": "", "size": 0, "round_id": None} for v in range(1, 13)]
    status = {"global_version": 12, "candidate_version": None, "training_enabled": True,
              "devices": {"registered": 1000, "active_24h": 400},
              "current_round": {"id": 13, "state": "open", "accepted": 5, "goal": 100, "admitted": 20},
              "privacy": {"dp_mode": "distributed", "epsilon": 1.04, "delta": 1e-5, "accountant": "rdp"}}
    page = status_page.render(status, rounds, versions)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 5
    assert "<script" not in page and not re.search(r'(src|href)="https?://', page)
    assert "&lt;b&gt;x&lt;/b&gt;" in page  # escaped
    assert page.count('class="bar"') >= 12 and page.count("<polyline") >= 5
    # empty server: charts say so instead of failing
    empty = status_page.render({"devices": {}, "privacy": None}, [], [])
    assert empty.count("no data yet") == 5


def test_config_validation():
    with pytest.raises(ValueError, match="min_count"):
        ServerConfig(round_goal=5, min_count=6)
    with pytest.raises(ValueError, match="noise_multiplier"):
        ServerConfig(dp_mode="distributed", noise_multiplier=0.0)
    with pytest.raises(ValueError, match="robust"):
        ServerConfig(aggregator="median", dp_mode="distributed", noise_multiplier=1.0)
    ServerConfig(aggregator="median", dp_mode="local", noise_multiplier=1.0)
    c = ServerConfig(round_goal=100, over_admit=1.3, admin_token="secret")
    assert c.max_admitted == 130 and c.public_dict()["admin_token"] == "***"


def test_store_atomic_files_and_garbage_collection(tmp_path):
    store = Store(tmp_path)
    tensors = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7.0], np.float32)]
    rel = store.write_update(3, "d_1", tensors)
    np.testing.assert_array_equal(store.open_update(rel), np.array([0, 1, 2, 3, 4, 5, 7], np.float32))
    model_rel, sha, size = store.write_model(1, b"blob")
    (tmp_path / "models" / ".v000002.fkw.abcd.tmp").write_bytes(b"half")
    orphan = store.write_update(3, "d_2", tensors)
    removed = store.collect_garbage({rel, model_rel})
    assert orphan in removed and "models/.v000002.fkw.abcd.tmp" in removed
    assert (tmp_path / rel).exists() and (tmp_path / model_rel).read_bytes() == b"blob"


@pytest.mark.parametrize("side, accepted", [(+1, True), (-1, False)])
def test_norm_check_decides_close_calls_on_the_exact_norm(monkeypatch, side: int, accepted: bool) -> None:
    """An update within 3e-8 of the bound is decided on the exact float64 norm, not the fast one."""
    from models import blas
    from server.errors import Rejection
    from server.round import Round, TrainParams
    from server.strategy import RoundContext, StreamingMean

    rng = np.random.default_rng(5)
    tensors = [rng.standard_normal(shape).astype(np.float32) for _, shape in TINY.weight_specs()]
    exact = dp.l2_norm(tensors)
    # Make the fast path lie by 5e-8 in the wrong direction: only the exact recheck gets it right.
    if blas.has_dsdot():
        real = blas._DSDOT
        monkeypatch.setattr(blas, "_DSDOT", lambda n, ptr: real(n, ptr) * (1 + side * 1e-7))  # norm off by 5e-8
    clip = exact * (1 + side * 3e-8) / (1 + 1e-5)  # dp.norm_tolerance adds a 1e-5 relative slack
    params = TrainParams(goal=1, min_count=1, max_admitted=1, deadline_s=60.0, clip_norm=clip, norm_sigmas=6.0,
                         upload_dtypes=("float32",), max_examples_per_update=100)
    rnd = Round(id=1, kind="train", state="open", base_version=3, candidate_version=None, created_at=0.0,
                deadline=None, closed_at=None, params=params, params_dict={})
    ctx = RoundContext(TINY, TINY.num_parameters(), 1 << 30, open_update=lambda rel: None)
    body = wire.encode(tensors, TINY, kind="delta", model_version=3, metadata={"num_examples": 5})
    if accepted:
        update = StreamingMean().decode_upload(body, rnd, ctx)
        assert update.norm == pytest.approx(exact, rel=1e-12)
    else:
        with pytest.raises(Rejection) as info:
            StreamingMean().decode_upload(body, rnd, ctx)
        assert info.value.reason == "norm_exceeded"


def test_runtime_tuning_installs_zero_copy_body_on_the_pinned_uvicorn() -> None:
    """`python -m server` installs it; every HTTP upload test then runs through it. Here: that it
    really installs on the pinned uvicorn (so those tests exercise it) and hands chunks over intact."""
    from uvicorn.protocols.http import httptools_impl

    from server import runtime_tuning

    assert runtime_tuning.tune_uvicorn_body() is True
    assert getattr(httptools_impl.RequestResponseCycle, "_fk_zero_copy", False)
    assert runtime_tuning.tune_uvicorn_body() is True  # idempotent
    parts = runtime_tuning._BodyParts()
    chunk = b"abc" * 1000
    parts += chunk
    assert len(parts) == 3000 and parts.take() is chunk  # one chunk: handed over, not copied
    parts += b"xyz"
    assert parts.take() == chunk + b"xyz"


def test_running_sum_group_commit_is_exact_and_a_failed_commit_changes_nothing() -> None:
    import threading

    from server.errors import Rejection
    from server.secagg.running_sum import Claim, RunningSum

    rng = np.random.default_rng(3)
    ys = [rng.integers(0, 2**32, 50, dtype=np.uint64).astype(np.uint32) for _ in range(12)]
    rs = RunningSum(7, 50, np.uint32)
    commits: list[tuple[list[str], np.ndarray, int]] = []

    def commit(claims, new, count):
        commits.append(([c.device_id for c in claims], new.copy(), count))

        def after():
            for c in claims:
                c.finish(answer={"device": c.device_id})
        return after

    claims = [rs.stage(Claim(f"d{i}", f"sha{i}", 1, {}), y) for i, y in enumerate(ys[:5])]
    assert rs.wait(claims[0], commit) == {"device": "d0"}  # one commit took all five staged inputs
    assert len(commits) == 1 and commits[0][0] == [f"d{i}" for i in range(5)] and rs.count == 5
    assert all(c.done for c in claims)
    want = np.zeros(50, np.uint32)
    for y in ys[:5]:
        want += y  # wraps mod 2^32 like the ring
    np.testing.assert_array_equal(rs.current, want)
    # a retry of the same bytes resolves to the first claim; different bytes are refused
    assert rs.stage(Claim("d1", "sha1", 1, {}), ys[1]) is claims[1]
    with pytest.raises(Rejection) as exc:
        rs.stage(Claim("d1", "other", 1, {}), ys[2])
    assert exc.value.reason == "duplicate_upload"

    def failing(claims, new, count):
        raise Rejection("round_closed", "stage closed")

    bad = rs.stage(Claim("d5", "sha5", 1, {}), ys[5])
    with pytest.raises(Rejection):
        rs.wait(bad, failing)
    np.testing.assert_array_equal(rs.current, want)  # unchanged
    assert rs.count == 5 and bad.error is not None
    # the refused device sends again; work after durability that fails (e.g. closing the stage) does not
    # put the in-memory sum behind the durable one

    def durable_then_broken(claims, new, count):
        commit(claims, new, count)()

        def after():
            raise OSError("cleanup failed")
        return after

    d5 = rs.stage(Claim("d5", "sha5", 1, {}), ys[5])
    with pytest.raises(OSError):
        rs.wait(d5, durable_then_broken)
    want += ys[5]
    np.testing.assert_array_equal(rs.current, want)
    assert rs.count == 6 and d5.result() == {"device": "d5"}
    # concurrent stagers all land exactly once
    threads = [threading.Thread(target=lambda i=i: rs.wait(rs.stage(Claim(f"d{i}", f"sha{i}", 1, {}), ys[i]), commit))
               for i in range(6, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for y in ys[6:]:
        want += y
    np.testing.assert_array_equal(rs.current, want)
    assert rs.count == 12 and sorted(d for c in commits for d in c[0]) == sorted(f"d{i}" for i in range(12))


def test_row_cache_never_serves_a_row_older_than_the_last_commit(tmp_path) -> None:
    from server.db import Db

    db = Db(tmp_path / "x.db")
    with db.write():
        rid = db.create_round(kind="train", base_version=0, seed=0,
                              params={"goal": 1, "min_count": 1, "max_admitted": 1, "deadline_s": 60.0})
    assert db.get_round(rid).state == "open"
    assert db._rounds.get(rid, lambda: None) is not None  # cached
    with db.write():
        db.update_round(rid, state="aggregating")
        assert db.get_round(rid).state == "aggregating"  # the writer sees its own change
    assert db.get_round(rid).state == "aggregating"
    with pytest.raises(RuntimeError):
        with db.write():
            db.update_round(rid, state="closed")
            raise RuntimeError("rolled back")
    assert db.get_round(rid).state == "aggregating"  # the rolled-back value is not cached
    # a read that overlapped a write does not fill the cache
    cache = db.cache()
    stale = {"v": 1}

    def slow_load():
        cache.invalidate("k")
        cache.settle()  # a write committed while this (old) value was being read
        return stale

    assert cache.get("k", slow_load) is stale
    assert cache.get("k", lambda: {"v": 2}) == {"v": 2}
    db.close()
