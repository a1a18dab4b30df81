"""Every rejection reason over HTTP, each a 4xx with a machine-readable reason that changes nothing."""
from __future__ import annotations

import json
import struct

import httpx
import numpy as np

from models import wire
from models.config import ModelConfig
from tests.server_fixtures import (  # noqa: F401  (server_factory is a fixture)
    ADMIN_TOKEN, TINY, assert_weights_equal, dyadic_delta, encode_delta, expected_mean, server_factory,
)


def split_blob(blob: bytes) -> tuple[dict, bytes]:
    header_len = struct.unpack_from("<I", blob, 6)[0]
    return json.loads(blob[10 : 10 + header_len]), blob[10 + header_len : -32]


def crafted(**changes) -> bytes:
    """A correctly framed (valid checksum) delta whose header fields were changed."""
    header, payload = split_blob(encode_delta(dyadic_delta(77), 1))
    header.update(changes)
    return wire.frame(header, payload)


def with_nan() -> bytes:
    header, payload = split_blob(encode_delta(dyadic_delta(78), 1))
    values = np.frombuffer(payload, dtype="<f4").copy()
    values[123] = np.nan
    return wire.frame(header, values.tobytes())


def swapped_shape() -> bytes:
    header, payload = split_blob(encode_delta(dyadic_delta(79), 1))
    rows, cols = header["tensors"][0]["shape"]
    header["tensors"][0]["shape"] = [cols, rows]
    return wire.frame(header, payload)


def test_every_upload_rejection_changes_nothing(server_factory):
    valid_size = len(encode_delta(dyadic_delta(0), 1))
    srv = server_factory("--round-goal", "3", "--min-count", "3", "--clip-norm", "1.0", "--deadline-s", "120",
                         "--upload-dtypes", "float32", "float16", "--max-upload-bytes", str(valid_size + 4096))
    _, base = srv.model()
    a, b, c, late, outsider = (srv.device() for _ in range(5))
    rid = a.task()["round_id"]
    for d in (b, c, late):
        assert d.task()["round_id"] == rid
    delta_a, delta_b, delta_c = dyadic_delta(1), dyadic_delta(2), dyadic_delta(3)
    body_a = encode_delta(delta_a, 1, num_examples=3)
    first = a.upload(rid, body_a)
    assert first.status_code == 200

    def update_files() -> int:
        return len(list((srv.data_dir / "updates").rglob("*.npy")))

    valid = encode_delta(delta_b, 1, num_examples=4)
    big = [t * 1000 for t in dyadic_delta(4)]
    too_big = valid + b"\0" * 8192
    cases = [
        (outsider, rid, valid, 403, "not_admitted"),
        (b, 999, valid, 404, "unknown_round"),
        (b, rid, encode_delta(delta_b, 2), 409, "stale_base_version"),
        (b, rid, encode_delta(delta_b, 0), 409, "stale_base_version"),
        (b, rid, swapped_shape(), 400, "shape_mismatch"),
        (b, rid, encode_delta(delta_b, 1, config=ModelConfig(**{**TINY.to_dict(), "seq_len": 11})), 409,
         "config_mismatch"),
        (b, rid, with_nan(), 400, "non_finite"),
        (b, rid, encode_delta(big, 1), 400, "norm_exceeded"),
        (b, rid, too_big, 413, "too_large"),
        (a, rid, encode_delta(delta_c, 1), 409, "duplicate_upload"),
        (b, rid, valid[:-40] + bytes([valid[-40] ^ 1]) + valid[-39:], 400, "checksum_mismatch"),
        (b, rid, valid[: len(valid) // 2], 400, "truncated"),
        (b, rid, b"XXXX" + valid[4:], 400, "bad_magic"),
        (b, rid, b"", 400, "truncated"),
        (b, rid, crafted(format_version=2), 400, "corrupt_header"),
        (b, rid, wire.frame({"kind": "delta"}, b""), 400, "corrupt_header"),
        (b, rid, encode_delta(delta_b, 1, dtype="int8"), 400, "unsupported_dtype"),
        (b, rid, crafted(dtype="float64"), 400, "unsupported_dtype"),
        (b, rid, wire.encode(delta_b, TINY, kind="weights", model_version=1), 400, "wrong_kind"),
        (b, rid, encode_delta(delta_b, 1, num_examples=0), 400, "bad_metadata"),
        (b, rid, wire.encode(delta_b, TINY, kind="delta", model_version=1, metadata={}), 400, "bad_metadata"),
        (b, rid, encode_delta(delta_b, 1, metrics={"loss": "high"}), 400, "bad_metadata"),
        (b, rid, encode_delta(delta_b, 1, num_examples=10**9), 400, "bad_metadata"),
    ]
    seen = set()
    for device, round_id, body, status, reason in cases:
        r = device.upload(round_id, body)
        assert (r.status_code, r.json().get("error")) == (status, reason), (reason, r.text)
        assert r.json()["detail"]
        seen.add(reason)
        rnd = srv.round(rid)
        assert rnd["accepted"] == 1 and rnd["state"] == "open", reason
        assert update_files() == 1, reason
    # unsupported_format_version: a frame of a future format
    future = wire.frame(*split_blob(valid), format_version=2)
    r = b.upload(rid, future)
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_format_version")
    assert srv.round(rid)["accepted"] == 1

    # a retry of the accepted payload gets the same answer and changes nothing
    again = a.upload(rid, body_a)
    assert again.status_code == 200 and again.json() == first.json()
    assert srv.round(rid)["accepted"] == 1 and update_files() == 1

    # the metrics saw the rejections
    text = srv.admin().get("/metrics").text
    assert 'fk_uploads_total{result="norm_exceeded"} 1' in text
    assert 'fk_uploads_total{result="repeat"} 1' in text

    # the round completes with exactly the valid updates
    assert b.upload(rid, valid).status_code == 200
    assert c.upload(rid, encode_delta(delta_c, 1, num_examples=5)).status_code == 200
    assert srv.wait_round(rid)["state"] == "closed"
    _, weights = srv.model()
    assert_weights_equal(weights, expected_mean(base, [delta_a, delta_b, delta_c], [3, 4, 5]))
    r = late.upload(rid, encode_delta(dyadic_delta(9), 1))
    assert (r.status_code, r.json()["error"]) == (409, "round_closed")
    # a retry after the round closed still gets its original answer
    assert a.upload(rid, body_a).json() == first.json()
    assert seen >= {"not_admitted", "unknown_round", "stale_base_version", "shape_mismatch", "config_mismatch",
                    "non_finite", "norm_exceeded", "too_large", "duplicate_upload", "checksum_mismatch", "truncated",
                    "bad_magic", "corrupt_header", "unsupported_dtype", "wrong_kind", "bad_metadata"}


def test_auth_failures(server_factory):
    srv = server_factory("--registration-key", "let-me-in")
    anon = srv.anon()
    r = anon.post("/v1/devices/register")
    assert (r.status_code, r.json()["error"]) == (403, "registration_refused")
    r = anon.post("/v1/devices/register", json={"registration_key": "wrong"})
    assert (r.status_code, r.json()["error"]) == (403, "registration_refused")
    r = anon.post("/v1/devices/register", json={"registration_key": "let-me-in"})
    assert r.status_code == 201
    token = r.json()["token"]

    def call(method: str, path: str, auth: str | None, headers: dict | None = None, **kw) -> httpx.Response:
        headers = dict(headers or {}, **({"Authorization": auth} if auth is not None else {}))
        return anon.request(method, path, headers=headers, **kw)

    device_routes = [("POST", "/v1/checkin", {"json": {"eligibility": {}}}),
                     ("POST", "/v1/rounds/1/update", {"content": b"x"}),
                     ("POST", "/v1/rounds/1/eval", {"json": {"results": []}}),
                     ("GET", "/v1/models/current", {}), ("GET", "/v1/model/info", {})]
    for method, path, kw in device_routes:
        for auth in (None, "Bearer", "Bearer not-a-token", f"Basic {token}", f"Bearer {token}x"):
            r = call(method, path, auth, **kw)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", (path, auth, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer"
    # the admin token is not a device
    r = call("POST", "/v1/checkin", f"Bearer {ADMIN_TOKEN}", json={"eligibility": {}})
    assert r.status_code == 401
    admin_routes = [("GET", "/v1/admin/status"), ("GET", "/v1/admin/rounds"), ("GET", "/v1/admin/versions"),
                    ("POST", "/v1/admin/training/stop"), ("POST", "/v1/admin/rollback"), ("POST", "/v1/admin/models"),
                    ("GET", "/v1/admin/privacy")]
    for method, path in admin_routes:
        r = call(method, path, None)
        assert (r.status_code, r.json()["error"]) == (401, "unauthorized"), path
        r = call(method, path, "Bearer wrong-admin-token")
        assert (r.status_code, r.json()["error"]) == (401, "unauthorized"), path
        r = call(method, path, f"Bearer {token}")
        assert (r.status_code, r.json()["error"]) == (403, "forbidden"), path
    # nothing changed: training still on, round untouched
    status = srv.admin_get("/v1/admin/status")
    assert status["training_enabled"] is True and status["global_version"] == 1
    # the admin token may download models; unknown routes and bad JSON are machine-readable too
    assert call("GET", "/v1/models/current", f"Bearer {ADMIN_TOKEN}").status_code == 200
    assert call("GET", "/v1/nope", None).json()["error"] == "not_found"
    r = call("POST", "/v1/checkin", f"Bearer {token}", content=b"{not json", headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (422, "bad_request")


def test_eval_report_rejections(server_factory):
    srv = server_factory("--candidate-eval-fraction", "1.0", "--eval-goal", "2", "--eval-min-count", "1",
                         "--no-training-on-start")
    weights = [np.array(t) for t in srv.model()[1]]
    r = srv.admin_post("/v1/admin/models", content=wire.encode(weights, TINY, kind="weights", model_version=7))
    assert r.status_code == 200 and r.json()["state"] == "candidate"
    cand = r.json()["version"]
    d, other = srv.device(), srv.device()
    task = d.task()
    assert task["type"] == "evaluate" and task["candidate_version"] == cand and task["baseline_version"] == 1
    rid = task["round_id"]
    good = [{"model_version": cand, "num_examples": 10, "recall": 0.2, "loss": 3.0},
            {"model_version": 1, "num_examples": 10, "recall": 0.1, "loss": 3.5}]
    bad_cases = [
        (other, rid, good, 403, "not_admitted"),
        (d, 999, good, 404, "unknown_round"),
        (d, rid, good[:1], 400, "bad_report"),
        (d, rid, [dict(good[0], model_version=5), good[1]], 400, "bad_report"),
        (d, rid, [dict(good[0], recall=1.5), good[1]], 400, "bad_report"),
        (d, rid, [dict(good[0], loss=-1.0), good[1]], 400, "bad_report"),
        (d, rid, [dict(good[0], num_examples=0), good[1]], 400, "bad_report"),
        (d, rid, [dict(good[0], bogus=1), good[1]], 422, "bad_request"),
    ]
    for device, round_id, results, status, reason in bad_cases:
        r = device.report(round_id, results)
        assert (r.status_code, r.json()["error"]) == (status, reason), (reason, r.text)
        assert srv.round(rid)["accepted"] == 0
    first = d.report(rid, good)
    assert first.status_code == 200
    assert d.report(rid, list(reversed(good))).json() == first.json()  # same report: same answer
    r = d.report(rid, [dict(good[0], recall=0.3), good[1]])
    assert (r.status_code, r.json()["error"]) == (409, "duplicate_upload")
    assert srv.round(rid)["accepted"] == 1


def test_large_bodies_wait_for_an_upload_slot_and_all_get_their_answer(server_factory):
    """With one upload slot, a burst of large bodies is read one at a time (the others wait unread)
    and every one still gets its own answer: here a 4xx for a body that is not a delta."""
    import threading

    srv = server_factory("--upload-slots", "1", "--round-goal", "6", "--min-count", "6", "--deadline-s", "120")
    devices = [srv.device() for _ in range(6)]
    rid = devices[0].task()["round_id"]
    for d in devices[1:]:
        assert d.task()["round_id"] == rid
    junk = b"\x00" * ((1 << 20) + 4096)  # above the 1 MiB that takes a slot, under the size limit
    answers: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        answers[i] = devices[i].upload(rid, junk)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(answers) == list(range(6))
    assert {r.status_code for r in answers.values()} == {400}, [r.text for r in answers.values()]
    assert {r.json()["error"] for r in answers.values()} == {"bad_magic"}, [r.json() for r in answers.values()]
    good = devices[0].upload(rid, encode_delta(dyadic_delta(5), 1))
    assert good.status_code == 200, good.text
