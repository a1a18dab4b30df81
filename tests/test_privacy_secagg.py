"""Secure aggregation end to end: a real server subprocess, real devices over HTTP, real crypto.

Devices are device_app.privacy_sim.SimDevice (the device-side protocol of device_app/secagg.py on a
given delta, no training); one test runs DeviceClients with real local training. Dropouts are devices
that stop after sharing keys; tampering is done in flight by a TamperTransport (a malicious relay) or
by a device that sends a garbage masked vector.
"""
from __future__ import annotations

import base64
import hashlib
import io
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from device_app.privacy_sim import SimDevice, TamperTransport, run_round
from models import secagg_math as sm
from tests.server_fixtures import TINY, ServerProcess

N = 6  # devices per round; threshold 4 of 6 (2/3): up to 2 dropouts after sharing keys
DIM = TINY.num_parameters()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("secagg")
    s = ServerProcess(root / "srv", ["--init-preset", "tiny", "--round-goal", str(N), "--min-count", "3",
                                     "--over-admit", "1.0", "--secure-aggregation", "secagg", "--clip-norm", "1.0",
                                     "--deadline-s", "6", "--secagg-stage-s", "4", "--tick-s", "0.05"],
                      root / "srv.log").start()
    yield s
    s.stop()


def _deltas(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(0.0, 0.004, DIM)
        out.append((x * min(1.0, 0.9 / np.linalg.norm(x))).astype(np.float32))  # within the clip norm
    return out


def _devices(srv: ServerProcess, n: int = N, transports: dict[int, Any] | None = None, seed: int = 0) -> list[SimDevice]:
    transports = transports or {}
    return [SimDevice(srv.url, seed=seed + i, transport=transports.get(i)) for i in range(n)]


def _expected_model(base: list[np.ndarray], qsum: np.ndarray, scale: float, n: int) -> np.ndarray:
    flat = np.concatenate([b.reshape(-1) for b in base]).astype(np.float64)
    return (flat + (qsum.astype(np.float64) / scale) / n).astype(np.float32)


def _flat(tensors: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([t.reshape(-1) for t in tensors])


def _round_of(devs: list[SimDevice]) -> int:
    return devs[0].task.round_id


def _check_exact(srv: ServerProcess, devs, results, survivors: list[int], base) -> dict:
    rid = _round_of(devs)
    r = srv.wait_round(rid, timeout=60)
    assert r["state"] == "closed", r
    info = r["secure_aggregation"]
    qsum = sum(results[i].quantized for i in survivors)
    assert info["n_u3"] == len(survivors)
    # the server's integer sum is exactly the sum of the survivors' quantized updates
    assert info["sum_sha256"] == hashlib.sha256(qsum.astype("<i8").tobytes()).hexdigest()
    version, weights = srv.model(r["result_version"])
    np.testing.assert_array_equal(_flat(weights), _expected_model(base, qsum, info["scale"], len(survivors)))
    return r


def test_secure_sum_equals_plain_sum_exactly(srv: ServerProcess) -> None:
    base_version, base = srv.model()
    devs = _devices(srv)
    deltas = _deltas(N, 1)
    results = run_round(devs, deltas)
    assert [x.status for x in results] == ["uploaded"] * N, [x.detail for x in results]
    r = _check_exact(srv, devs, results, list(range(N)), base)
    assert r["outcome"]["aggregator"] == "mean+secagg" and r["outcome"]["aggregated"] == N
    # quantization: the secure mean is within 1/scale of the float mean
    info = r["secure_aggregation"]
    _, new = srv.model(r["result_version"])
    mean = np.mean(deltas, axis=0)
    assert np.max(np.abs(_flat(new) - _flat(base) - mean)) <= 1.5 / info["scale"] + 1e-7
    for d in devs:
        d.close()


def test_lockstep_round_is_exact_and_times_every_message(srv: ServerProcess) -> None:
    """The benchmark's lockstep mode (every device computes a message before any sends it) runs the
    same protocol: the exact sum, and one release time per message, in protocol order."""
    from device_app.privacy_sim import Lockstep

    _, base = srv.model()
    devs = _devices(srv, seed=11)
    step = Lockstep(N, timeout=60)
    results = run_round(devs, _deltas(N, 11), lockstep=step)
    assert [x.status for x in results] == ["uploaded"] * N, [x.detail for x in results]
    _check_exact(srv, devs, results, list(range(N)), base)
    labels = ["advertise_keys", "share_keys", "masked_input", "consistency", "unmasking"]
    assert list(step.released) == labels
    times = [step.released[k] for k in labels]
    assert times == sorted(times)
    assert all(x.timings.get("consistency_compute_s", 0) > 0 for x in results)
    for d in devs:
        d.close()


def test_one_round_trip_per_stage(srv: ServerProcess) -> None:
    """Each message's answer carries the next stage's view: a device sends its 5 messages and never
    needs a separate long-poll GET (which stays available as the fallback, tested by the tamper tests)."""
    seen: dict[int, list[tuple[str, str]]] = {i: [] for i in range(N)}

    def recorder(i: int) -> TamperTransport:
        def hook(path: str, method: str, body: bytes) -> None:
            if "/secagg/" in path:
                seen[i].append((method, path.rsplit("/", 1)[-1]))
        return TamperTransport(request_hook=hook)

    _, base = srv.model()
    devs = _devices(srv, seed=12, transports={i: recorder(i) for i in range(N)})
    results = run_round(devs, _deltas(N, 12))
    assert [x.status for x in results] == ["uploaded"] * N, [x.detail for x in results]
    _check_exact(srv, devs, results, list(range(N)), base)
    for i in range(N):
        assert seen[i] == [("POST", "advertise_keys"), ("POST", "share_keys"), ("POST", "masked_input"),
                           ("POST", "consistency"), ("POST", "unmasking")], seen[i]


def test_dropouts_within_threshold_still_give_the_exact_sum(srv: ServerProcess) -> None:
    _, base = srv.model()
    devs = _devices(srv, seed=100)
    results = run_round(devs, _deltas(N, 2), drop_after={1: "share", 4: "share"})
    assert [x.status for x in results] == ["uploaded", "dropped", "uploaded", "uploaded", "dropped", "uploaded"], \
        [x.detail for x in results]
    r = _check_exact(srv, devs, results, [0, 2, 3, 5], base)
    assert r["secure_aggregation"]["dropped_after_sharing"] == 2
    assert sorted(r["secure_aggregation"]["dropped_recovered"]) == sorted([devs[1].device_id, devs[4].device_id])
    assert r["dropouts"] == 2


def test_dropouts_past_threshold_fail_safely(srv: ServerProcess) -> None:
    version_before, _ = srv.model()
    devs = _devices(srv, seed=200)
    results = run_round(devs, _deltas(N, 3), drop_after={0: "share", 2: "share", 4: "share"})
    assert sum(x.status == "dropped" for x in results) == 3
    assert all(x.status == "failed" and "secagg_below_threshold" in x.detail
               for i, x in enumerate(results) if i % 2 == 1), [x.detail for x in results]
    r = srv.wait_round(_round_of(devs), timeout=30)
    assert r["state"] == "abandoned" and r["outcome"]["reason"] == "secagg_below_threshold"
    assert r["secure_aggregation"]["stage"] == "failed"
    assert srv.model()[0] == version_before  # nothing released
    _wait_cleaned(srv)


def _wait_cleaned(srv: ServerProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = srv.data_dir / "secagg"
        if not d.exists() or not any(p.is_file() for p in d.rglob("*")):
            return
        time.sleep(0.05)
    raise AssertionError(f"secagg files left behind: {list((srv.data_dir / 'secagg').rglob('*'))}")


def _stored_bytes(data_dir: Path) -> list[tuple[str, bytes]]:
    return [(str(p.relative_to(data_dir)), p.read_bytes()) for p in sorted(data_dir.rglob("*")) if p.is_file()]


def _chunks(arr: np.ndarray, n: int = 4, width: int = 16) -> list[bytes]:
    """A few byte windows of an array, from places where the values are not all equal."""
    raw = np.ascontiguousarray(arr).tobytes()
    step = max(1, len(raw) // (n + 1))
    return [raw[i: i + width * arr.itemsize] for i in range(step, len(raw) - width * arr.itemsize, step)][:n]


def test_server_storage_holds_no_individual_update(srv: ServerProcess) -> None:
    """Between the last masked upload and unmasking, and after the round, nothing the server stored
    (SQLite file, WAL, blob files) contains any device's quantized update or float delta; the running sum
    file holds exactly the modular sum of the masked vectors. Each masked vector (uniform in the ring
    without seeds the server never gets for an honest survivor) is kept, in its own file only, until the
    round closes, so that a cheater's can be taken out (server/secagg/ingest.py); after the round, none is."""
    devs = _devices(srv, seed=300)
    deltas = _deltas(N, 4)
    gate = threading.Event()
    seen: dict[str, Any] = {}

    def pause() -> None:
        gate.wait(30)

    out: list = []
    t = threading.Thread(target=lambda: out.extend(run_round(devs, deltas, before_finish=pause)), daemon=True)
    t.start()
    rid = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until every masked input is in (stage moved past masked)
        if devs[0].task is not None:
            rid = devs[0].task.round_id
            info = srv.round(rid).get("secure_aggregation") or {}
            if info.get("stage") in ("consistency", "unmask"):
                break
        time.sleep(0.05)
    assert rid is not None
    seen["mid"] = _stored_bytes(srv.data_dir)
    gate.set()
    t.join(60)
    results = out
    assert [x.status for x in results] == ["uploaded"] * N, [x.detail for x in results]
    r = srv.wait_round(rid, timeout=30)
    assert r["state"] == "closed"
    _wait_cleaned(srv)
    seen["after"] = _stored_bytes(srv.data_dir)

    bits = r["secure_aggregation"]["bits"]
    ring_sum = np.zeros(DIM, dtype=sm.ring_dtype(bits))
    for x in results:
        ring_sum += x.masked
    sum_files = [(name, data) for name, data in seen["mid"] if name.startswith("secagg/") and "sum-" in name]
    assert len(sum_files) == 1, [n for n, _ in seen["mid"]]  # one running sum, the previous ones replaced
    stored_sum = np.load(io.BytesIO(sum_files[0][1]))
    np.testing.assert_array_equal(stored_sum, ring_sum)  # positive control: we read the right bytes
    assert not (srv.data_dir / "updates").exists() or not any(p.is_file() for p in (srv.data_dir / "updates").rglob("*"))
    kept = {name for name, _ in seen["mid"] if name.startswith(f"secagg/r{rid:06d}/in-")}
    assert sorted(name.split("/in-")[1][:-len("-0123456789abcdef.npy")] for name in kept) == \
        sorted(d.device_id for d in devs)
    for phase in ("mid", "after"):
        for i, x in enumerate(results):
            masked = _chunks(x.masked) + [base64.b64encode(c).decode().encode() for c in _chunks(x.masked)]
            for name, data in seen[phase]:
                own = phase == "mid" and name.startswith(f"secagg/r{rid:06d}/in-{devs[i].device_id}-")
                if own:  # positive control: its file holds exactly its masked vector
                    np.testing.assert_array_equal(np.load(io.BytesIO(data)), x.masked)
                needles = _chunks(sm.to_ring(x.quantized, bits)) + _chunks(deltas[i]) + ([] if own else masked)
                for needle in needles:
                    assert needle not in data, f"{phase}: device {i}'s update found in {name}"


def _view(method: str, data: Any) -> dict[str, Any] | None:
    """The stage view in a response as the relay sees it: a GET's answer, or the "next" view that a
    message's POST answer carries (device_app.secagg: one round trip per stage)."""
    view = data if method == "GET" else (data.get("next") if isinstance(data, dict) else None)
    return view if isinstance(view, dict) and view.get("ready") else None


def _only_it_stopped(srv: ServerProcess, devs, results, i: int, reason: str, base) -> None:
    """Device i stopped with `reason`; every other device uploaded and the sum is exactly theirs."""
    assert results[i].status == "failed" and results[i].detail.startswith(reason), results[i]
    survivors = [j for j in range(N) if j != i]
    assert all(results[j].status == "uploaded" for j in survivors), [x.detail for x in results]
    _check_exact(srv, devs, results, survivors, base)


def test_tampered_relayed_share_is_detected_by_its_recipient(srv: ServerProcess) -> None:
    """The relay flips a byte of one encrypted share: AES-GCM authentication fails at the recipient, which
    holds no share of that sender and goes on (the other holders' shares rebuild the sender's secrets): the
    round ends with the exact sum of all six, and the recipient names the sender (issue #18)."""
    _, base = srv.model()
    sender: dict[str, str] = {}

    def flip(path: str, method: str, data: Any) -> Any:
        view = _view(method, data) if path.endswith("/secagg/share_keys") else None
        if view and view.get("shares"):
            sender["id"] = view["shares"][0]["from"]
            ct = bytearray(base64.b64decode(view["shares"][0]["ct"]))
            ct[20] ^= 0x01
            view["shares"][0]["ct"] = base64.b64encode(bytes(ct)).decode()
            return data
        return None

    devs = _devices(srv, seed=400, transports={3: TamperTransport(response_hook=flip)})
    results = run_round(devs, _deltas(N, 5))
    assert all(x.status == "uploaded" for x in results), [x.detail for x in results]
    r = _check_exact(srv, devs, results, list(range(N)), base)
    (named,) = r["secure_aggregation"]["offenders"]
    assert named["device_id"] == sender["id"] and named["reported_by"] == [devs[3].device_id]
    assert named["reason"] == "secagg_share_not_delivered"  # its signature failed: the relay, not the sender


def test_substituted_peer_key_is_detected(srv: ServerProcess) -> None:
    """The relay replaces a peer's advertised mask key with its own: the signature by the peer's identity
    key no longer verifies, so the device refuses to go on (the server cannot impersonate peers)."""
    _, base = srv.model()
    _, fake_pk = sm.x25519_keypair()

    def swap(path: str, method: str, data: Any) -> Any:
        view = _view(method, data) if path.endswith("/secagg/advertise_keys") else None
        if view:
            for p in view["participants"]:
                if p["device_id"] != devs[2].device_id:
                    p["s_pk"] = sm.b64(fake_pk)
                    break
            return data
        return None

    devs = _devices(srv, seed=500, transports={2: TamperTransport(response_hook=swap)})
    _only_it_stopped(srv, devs, run_round(devs, _deltas(N, 6)), 2, "bad_signature", base)


def test_masked_vector_damaged_in_flight_is_rejected(srv: ServerProcess) -> None:
    _, base = srv.model()

    def damage(path: str, method: str, body: bytes) -> bytes | None:
        if method == "POST" and path.endswith("/secagg/masked_input"):
            b = bytearray(body)
            b[len(b) // 2] ^= 0xFF
            return bytes(b)
        return None

    devs = _devices(srv, seed=600, transports={5: TamperTransport(request_hook=damage)})
    results = run_round(devs, _deltas(N, 7))
    assert results[5].status == "failed" and "checksum_mismatch" in results[5].detail, results[5]
    _check_exact(srv, devs, results, list(range(5)), base)


def test_garbage_masked_vector_makes_the_round_fail_safely(srv: ServerProcess) -> None:
    """A device uploads a validly framed but altered masked vector: the unmasked sum keeps a residue the
    size of the ring, the range check catches it, and the round is abandoned (no model released)."""
    version_before, _ = srv.model()
    devs = _devices(srv, seed=700)
    results = run_round(devs, _deltas(N, 8), corrupt=[1])
    r = srv.wait_round(_round_of(devs), timeout=30)
    assert r["state"] == "abandoned" and r["outcome"]["reason"] == "secagg_integrity", r
    assert srv.model()[0] == version_before
    assert all(x.status in ("uploaded", "failed") for x in results)


def test_tampered_unmasking_share_makes_the_round_fail_safely(srv: ServerProcess) -> None:
    """Every device reveals a wrong share of the same seed in the unmasking stage: no t of them rebuild a
    seed that matches the owner's commitment, and the round is abandoned instead of releasing a wrong sum.
    (One lying revealer is left out instead: tests/test_secagg_attacks.py.)"""
    version_before, _ = srv.model()

    def alter(path: str, method: str, body: bytes) -> bytes | None:
        if method == "POST" and path.endswith("/secagg/unmasking"):
            import json

            data = json.loads(body)
            v = sorted(data["b_shares"])[0]
            share = sm.share_to_bytes(secrets.randbelow(sm.PRIME))  # random: no t copies can agree by chance
            data["b_shares"][v] = base64.b64encode(share).decode()
            return json.dumps(data).encode()
        return None

    transports = {i: TamperTransport(request_hook=alter) for i in range(N)}  # every copy altered: t of them used
    devs = _devices(srv, seed=800, transports=transports)
    run_round(devs, _deltas(N, 9))
    r = srv.wait_round(_round_of(devs), timeout=30)
    assert r["state"] == "abandoned" and r["outcome"]["reason"] == "secagg_bad_share", r
    assert srv.model()[0] == version_before


def test_plain_upload_refused_and_identity_never_replaced(srv: ServerProcess) -> None:
    from tests.server_fixtures import encode_delta

    dev = SimDevice(srv.url, seed=900)
    task = dev.checkin()
    assert task is not None and task.secure_aggregation["protocol"] == "secagg"
    r = dev.api._client.post(f"/v1/rounds/{task.round_id}/update", content=encode_delta(
        [np.zeros(s, np.float32) for _, s in TINY.weight_specs()], task.base_version),
        headers={"Authorization": f"Bearer {dev.api.token}"})
    assert r.status_code == 409 and r.json()["error"] == "wrong_protocol"
    _, pk1 = sm.ed25519_keypair()
    _, pk2 = sm.ed25519_keypair()
    assert dev.api.post_json("/v1/devices/identity", {"public_key": sm.b64(pk1)})["created"]
    with pytest.raises(Exception) as exc:
        dev.api.post_json("/v1/devices/identity", {"public_key": sm.b64(pk2)})
    assert getattr(exc.value, "reason", "") == "identity_exists"
    assert dev.api.get_json(f"/v1/devices/{dev.device_id}/identity")["public_key"] == sm.b64(pk1)
    # this device will never advertise: abandon its round so later tests are not affected
    with httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer test-admin-token"}) as c:
        c.post("/v1/admin/training/stop")
        c.post("/v1/admin/training/start")


def test_kill9_mid_masked_input_keeps_every_accepted_upload(tmp_path: Path) -> None:
    """kill -9 after half the masked inputs were accepted: the restarted server holds their running sum and
    contributor list, the rest upload after the restart, and the round ends with the exact sum."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = ServerProcess(tmp_path / "srv", ["--port", str(port), "--init-preset", "tiny", "--round-goal", str(N),
                                           "--min-count", "3", "--over-admit", "1.0", "--secure-aggregation",
                                           "secagg", "--clip-norm", "1.0", "--deadline-s", "60",
                                           "--secagg-stage-s", "30", "--tick-s", "0.05"], tmp_path / "srv.log").start()
    try:
        _, base = srv.model()
        devs = _devices(srv, seed=1000)
        gate = threading.Event()
        out: list = []
        t = threading.Thread(target=lambda: out.extend(run_round(
            devs, _deltas(N, 10), before_upload={i: (lambda: gate.wait(60)) for i in (3, 4, 5)})), daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if devs[0].task is not None and srv.round(devs[0].task.round_id)["accepted"] == 3:
                break
            time.sleep(0.05)
        rid = devs[0].task.round_id
        assert srv.round(rid)["accepted"] == 3
        srv.kill9()
        sums = [p for p in (srv.data_dir / "secagg").rglob("sum-*.npy")]
        assert len(sums) == 1  # durable before the 200s
        srv.start()
        summary = srv.round(rid)
        assert summary["state"] == "open" and summary["accepted"] == 3
        assert summary["secure_aggregation"]["stage"] == "masked"
        gate.set()
        t.join(120)
        assert [x.status for x in out] == ["uploaded"] * N, [x.detail for x in out]
        _check_exact(srv, devs, out, list(range(N)), base)
    finally:
        srv.stop()


def test_a_stopping_device_leaves_a_secagg_stage_wait_before_the_next_poll():
    """DeviceClient.cancel() (Ctrl-C, the app closing) reaches a device waiting in a SecAgg stage: it drops
    out at its next poll like a dropout, instead of riding the protocol to its end."""
    from device_app.secagg import SecAggError, _wait

    polls: list[str] = []

    class Api:
        def get_json(self, url, params=None, timeout=None):
            polls.append(url)
            stop.append(True)  # the signal arrives while this long-poll is out
            return {"ready": False}

    stop: list[bool] = []
    with pytest.raises(SecAggError) as err:
        _wait(Api(), "/v1/secagg/1/stage", time.time() + 60, poll_s=0.01, should_stop=lambda: bool(stop))
    assert err.value.reason == "cancelled" and polls == ["/v1/secagg/1/stage"]
