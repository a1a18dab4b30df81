"""Paillier mode: packing math, homomorphic sums, and a round end to end with the key holder as its own
process (python -m server.keyholder), the aggregation server, and devices encrypting over HTTP."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from phe import paillier

from device_app.privacy_sim import SimDevice, run_round
from models import paillier_pack as pp
from models import privacy_wire
from tests.server_fixtures import ROOT, TINY, ServerProcess

TOKEN = "keyholder-test-token"


# ---------------------------------------------------------------------- math
@pytest.fixture(scope="module")
def keys():
    pub, priv = paillier.generate_paillier_keypair(n_length=1024)
    return pp.PublicKey(pub.n, pp.djn_base(pub.n)), priv


def test_pack_unpack_roundtrip_and_capacity() -> None:
    p = pp.choose_packing(1.0, 0.1, 10_000, 100, key_bits=2048, value_bits=24)
    assert (p.slot_bits, p.slots) == (32, 63)  # 24-bit values + 7 carry bits for 100 devices -> 32-bit slots
    gboard = pp.choose_packing(1.0, 0.1, 1_422_638, 130, key_bits=2048)
    assert gboard.n_ciphertexts == 22_582
    rng = np.random.default_rng(0)
    q = pp.quantize(rng.normal(0, 0.3, 10_000), p, rng)
    assert q.min() >= 0 and q.max() < 2 ** 24
    np.testing.assert_array_equal(pp.unpack(pp.pack(q, p), p), q)
    # packing is the shift-and-add of the slots
    m0 = pp.pack(q, p)[0]
    assert m0 == sum(int(v) << (j * 32) for j, v in enumerate(q[:63]))


@pytest.mark.parametrize("mode", ["standard", "djn"])
def test_paillier_sum_is_exact(keys, mode: str) -> None:
    key, priv = keys
    p = pp.choose_packing(0.5, 0.0, 500, 8, key_bits=key.key_bits, value_bits=20)
    enc = pp.Encryptor(key, mode)
    rng = np.random.default_rng(1)
    acc: list = []
    qs = []
    for _ in range(5):
        cts, q = pp.encrypt_delta(rng.normal(0, 0.05, 500), p, enc, rng)
        qs.append(q.astype(np.int64) - p.offset)
        acc = pp.add_into(acc, cts, key.nsquare)
    sums = pp.unpack([priv.raw_decrypt(int(c)) for c in acc], p)
    total, ok = pp.dequantize_sum(sums, 5, p)
    assert ok
    np.testing.assert_array_equal(np.rint(total * p.scale).astype(np.int64), np.sum(qs, axis=0))
    # the server's add is phe's EncryptedNumber addition
    a, b = pp.Encryptor(key, mode).encrypt(7), pp.Encryptor(key, mode).encrypt(35)
    s = paillier.EncryptedNumber(key.phe(), a) + paillier.EncryptedNumber(key.phe(), b)
    assert priv.decrypt(s) == 42 and s.ciphertext(be_secure=False) == pp.add_into([a], [b], key.nsquare)[0]


def test_garbage_ciphertext_fails_the_range_check(keys) -> None:
    key, priv = keys
    p = pp.choose_packing(0.5, 0.0, 200, 8, key_bits=key.key_bits, value_bits=20)
    enc = pp.Encryptor(key, "djn")
    cts, _ = pp.encrypt_delta(np.zeros(200), p, enc)
    cts[0] = enc.encrypt(12345678901234567890123456789)  # a valid ciphertext of garbage
    sums = pp.unpack([priv.raw_decrypt(int(c)) for c in cts], p)
    assert not pp.dequantize_sum(sums, 1, p)[1]


# ---------------------------------------------------------------------- end to end
class KeyHolderProcess:
    def __init__(self, data_dir: Path, min_count: int) -> None:
        port_file = data_dir.parent / "kh.port"
        self.log = open(data_dir.parent / "kh.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "server.keyholder", "--port", "0", "--port-file",
                                      str(port_file), "--data-dir", str(data_dir), "--token", TOKEN, "--min-count",
                                      str(min_count), "--log-level", "warning"], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if port_file.exists() and port_file.read_text().strip():
                self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
                try:
                    if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            assert self.proc.poll() is None, "key holder exited"
            time.sleep(0.05)
        raise RuntimeError("key holder did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("paillier")
    kh = KeyHolderProcess(root / "kh", min_count=3)
    srv = ServerProcess(root / "srv", ["--init-preset", "tiny", "--round-goal", "3", "--min-count", "3",
                                       "--over-admit", "1.0", "--secure-aggregation", "paillier", "--clip-norm", "1.0",
                                       "--dp-mode", "distributed", "--noise-multiplier", "0.3", "--allow-noisy-dp",
                                       "--paillier-keyholder-url", kh.url, "--paillier-keyholder-token", TOKEN,
                                       "--deadline-s", "120"], root / "srv.log").start()
    yield {"kh": kh, "srv": srv, "root": root}
    srv.stop()
    kh.stop()


def test_paillier_round_end_to_end(deployment) -> None:
    srv, kh = deployment["srv"], deployment["kh"]
    _, base = srv.model()
    trusted = [httpx.get(kh.url + "/v1/public_key").json()["verify_key"]]  # pinned out of band
    devs = [SimDevice(srv.url, seed=i, paillier_mode=m, trusted_keyholder_keys=trusted)
            for i, m in enumerate(["standard", "djn", "djn"])]
    rng = np.random.default_rng(5)
    deltas = [(rng.normal(0, 0.004, TINY.num_parameters())).astype(np.float32) for _ in devs]
    results = run_round(devs, deltas)
    assert [r.status for r in results] == ["uploaded"] * 3, [r.detail for r in results]
    rid = devs[0].task.round_id
    packing = pp.Packing.from_dict(devs[0].task.secure_aggregation["packing"])
    r = srv.wait_round(rid, timeout=120)
    assert r["state"] == "closed", r
    assert r["secure_aggregation"]["contributions"] == 3 and r["secure_aggregation"]["slots_per_ciphertext"] == 63
    qsum = sum(x.quantized.astype(np.int64) - packing.offset for x in results)
    flat_base = np.concatenate([b.reshape(-1) for b in base]).astype(np.float64)
    want = (flat_base + (qsum.astype(np.float64) / packing.scale) / 3).astype(np.float32)
    _, new = srv.model(r["result_version"])
    np.testing.assert_array_equal(np.concatenate([w.reshape(-1) for w in new]), want)
    assert r["epsilon"] is not None
    # the key holder decrypted exactly one aggregate for this round, of 3 contributions
    log = [line for line in (deployment["root"] / "kh" / "decryptions.jsonl").read_text().splitlines() if line]
    assert len(log) == 1 and '"count": 3' in log[0]
    # the server kept no ciphertext files once the round closed, and never one per device
    deadline = time.monotonic() + 10
    while any(p.is_file() for p in (srv.data_dir / "paillier").rglob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.is_file() for p in (srv.data_dir / "paillier").rglob("*"))


def test_keyholder_refuses_what_is_not_a_large_enough_aggregate(deployment) -> None:
    kh = deployment["kh"]
    info = httpx.get(kh.url + "/v1/public_key").json()
    key = pp.PublicKey.from_dict(info)
    ct = pp.Encryptor(key, "djn").encrypt(5)
    width = (2 * key.key_bits + 7) // 8

    def ask(count: int, round_id: int, token: str = TOKEN, value: int = ct) -> httpx.Response:
        body = privacy_wire.frame(b"FKPD", {"round_id": round_id, "count": count, "key_id": key.key_id, "n_ct": 1,
                                            "ct_bytes": width}, value.to_bytes(width, "big"))
        return httpx.post(kh.url + "/v1/decrypt", content=body, headers={"Authorization": f"Bearer {token}"})

    assert ask(1, 9001).status_code == 403 and ask(1, 9001).json()["error"] == "below_min_count"
    assert ask(5, 9001, token="wrong").status_code == 401
    ok = ask(5, 9002)
    assert ok.status_code == 200
    _, payload, _ = privacy_wire.unframe(b"FKPR", ok.content)
    assert int.from_bytes(bytes(payload), "big") == 5
    assert ask(5, 9002).status_code == 200  # the same aggregate again (a server retrying after a crash)
    other = pp.Encryptor(key, "djn").encrypt(6)
    refused = ask(5, 9002, value=other)
    assert refused.status_code == 409 and refused.json()["error"] == "already_decrypted"


def test_tampered_ciphertext_abandons_the_round(deployment) -> None:
    srv = deployment["srv"]
    version_before, _ = srv.model()
    devs = [SimDevice(srv.url, seed=10 + i, paillier_mode="djn") for i in range(3)]
    for d in devs:
        d.checkin()
    rng = np.random.default_rng(6)
    deltas = [(rng.normal(0, 0.004, TINY.num_parameters())).astype(np.float32) for _ in devs]
    # device 0 encrypts garbage in its first ciphertext (a valid ciphertext, so the server cannot tell);
    # a ciphertext altered in transit decrypts to a uniformly random plaintext, garbage in every slot
    orig = devs[0].paillier.submit

    def evil_submit(api, task, tensors, metadata):
        real = pp.Encryptor.encrypt_many

        def encrypt_many(self, plaintexts):
            plaintexts = list(plaintexts)
            plaintexts[0] = int(np.random.default_rng(7).integers(1 << 62)) << 1900  # garbage in the top slots
            return real(self, plaintexts)

        pp.Encryptor.encrypt_many = encrypt_many
        try:
            return orig(api, task, tensors, metadata)
        finally:
            pp.Encryptor.encrypt_many = real

    devs[0].paillier.submit = evil_submit
    for d, x in zip(devs, deltas):
        assert d.run(x).status == "uploaded"
    r = srv.wait_round(devs[0].task.round_id, timeout=120)
    assert r["state"] == "abandoned" and r["outcome"]["reason"] == "paillier_integrity", r
    assert srv.model()[0] == version_before
