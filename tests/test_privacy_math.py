"""Unit tests of the secure-aggregation math (models/secagg_math.py), no server."""
from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest

from models import privacy_wire
from models import secagg_math as sm


def test_shamir_any_t_shares_reconstruct_fewer_do_not() -> None:
    secret = os.urandom(32)
    xs = list(range(1, 8))
    shares = sm.shamir_split(sm.secret_to_int(secret), xs, 4)
    for subset in itertools.combinations(xs, 4):
        assert sm.int_to_secret(sm.shamir_reconstruct({x: shares[x] for x in subset}, 4)) == secret
    # t - 1 shares: every candidate secret is equally consistent; interpolating them gives something else
    wrong = sm.shamir_reconstruct({x: shares[x] for x in xs[:3]}, 3)
    assert wrong != sm.secret_to_int(secret)
    with pytest.raises(sm.SecAggMathError):
        sm.shamir_reconstruct({x: shares[x] for x in xs[:3]}, 4)
    # a single altered share changes the result
    bad = dict(shares)
    bad[1] = (bad[1] + 1) % sm.PRIME
    assert sm.shamir_reconstruct({x: bad[x] for x in xs[:4]}, 4) != sm.secret_to_int(secret)
    assert sm.share_from_bytes(sm.share_to_bytes(shares[5])) == shares[5]


def test_threshold_is_a_strict_majority() -> None:
    for holders in range(2, 200):
        for frac in (0.51, 0.6, 2 / 3, 0.9, 1.0):
            t = sm.threshold_for(holders, frac)
            assert t > holders / 2 and t <= holders and t >= frac * holders - 1e-9
    assert sm.threshold_for(6, 2 / 3) == 4 and sm.threshold_for(100, 2 / 3) == 67


def test_neighbour_graphs() -> None:
    ids = [f"d{i:03d}" for i in range(30)]
    full = sm.neighbours(ids, 0, b"seed")
    assert all(len(v) == 29 and u not in v for u, v in full.items())
    for k in (4, 6, 10):
        g = sm.neighbours(ids, k, b"seed")
        assert all(len(v) == k for v in g.values())
        assert all(u in g[v] for u in g for v in g[u])  # symmetric
        assert g == sm.neighbours(list(reversed(ids)), k, b"seed")  # independent of input order
        assert g != sm.neighbours(ids, k, b"other seed")


@pytest.mark.parametrize("k", [0, 4])
@pytest.mark.parametrize("bits", [32, 64])
def test_masks_cancel_and_dropouts_are_recovered(k: int, bits: int) -> None:
    rng = np.random.default_rng(0)
    ids = [f"d{i:02d}" for i in range(9)]
    dim = 777
    q = sm.choose_quantization(1.0, 0.05, dim, len(ids), bits=bits)
    ctx = sm.round_context("s", 1)
    keys = {u: sm.x25519_keypair() for u in ids}
    seeds = {u: os.urandom(32) for u in ids}
    graph = sm.neighbours(ids, k, b"g")
    ints = {u: sm.quantize(rng.normal(0, 0.05, dim), q, rng) for u in ids}
    masked = {u: sm.mask(sm.to_ring(ints[u], bits), bits, u, seeds[u], keys[u][0],
                         {v: keys[v][1] for v in graph[u]}, ctx) for u in ids}
    for u in ids:  # a single masked vector looks nothing like its input
        assert np.mean(masked[u] == sm.to_ring(ints[u], bits)) < 0.01
    survivors = [u for u in ids if u not in ("d03", "d07")]
    total = np.zeros(dim, dtype=sm.ring_dtype(bits))
    for u in survivors:
        total += masked[u]
    sm.unmask(total, bits, survivors, {u: seeds[u] for u in survivors}, {v: keys[v][0] for v in ("d03", "d07")},
              {u: keys[u][1] for u in ids}, graph, ctx)
    lifted = sm.lift(total, bits)
    np.testing.assert_array_equal(lifted, sum(ints[u] for u in survivors))
    assert sm.check_range(lifted, len(survivors), q)[0]
    # one mask left in (a dropped device's key not removed): garbage, caught by the range check
    total2 = np.zeros(dim, dtype=sm.ring_dtype(bits))
    for u in survivors:
        total2 += masked[u]
    sm.unmask(total2, bits, survivors, {u: seeds[u] for u in survivors}, {"d03": keys["d03"][0]},
              {u: keys[u][1] for u in ids}, graph, ctx)
    assert not sm.check_range(sm.lift(total2, bits), len(survivors), q)[0]


def test_quantization_never_wraps_and_rounds_without_bias() -> None:
    dim, n_max = 1000, 130
    q = sm.choose_quantization(1.0, 0.1, dim, n_max, bits=32, headroom_bits=8)
    assert n_max * q.qmax <= ((1 << 31) - 1) >> 8
    # n_max devices all at the extreme: the ring sum lifted is the integer sum exactly
    worst = np.full(dim, 10.0)  # beyond the bound: clamped
    qi = sm.quantize(worst, q)
    assert qi.max() == q.qmax
    total = np.zeros(dim, dtype=np.uint32)
    for _ in range(n_max):
        total += sm.to_ring(qi, 32)
    np.testing.assert_array_equal(sm.lift(total, 32), qi * n_max)
    total[:] = 0
    for _ in range(n_max):
        total += sm.to_ring(-qi, 32)
    np.testing.assert_array_equal(sm.lift(total, 32), -qi * n_max)
    # stochastic rounding is unbiased
    rng = np.random.default_rng(1)
    x = np.full(20000, 0.3337 / q.scale)
    assert abs(sm.quantize(x, q, rng).mean() - 0.3337) < 0.01
    # the coordinate bound covers clipped updates plus noise
    assert q.bound == pytest.approx(1.0 + 0.1 * (np.sqrt(2 * np.log(2 * dim)) + 6.0))


def test_shares_are_encrypted_and_authenticated() -> None:
    a_sk, a_pk = sm.x25519_keypair()
    b_sk, b_pk = sm.x25519_keypair()
    ctx = sm.round_context("sess", 9)
    key_ab = sm.share_key(a_sk, b_pk, ctx)
    assert key_ab == sm.share_key(b_sk, a_pk, ctx)
    assert key_ab != sm.share_key(a_sk, b_pk, sm.round_context("sess", 10))
    ct = sm.encrypt_shares(key_ab, ctx, "a", "b", 123, 456)
    assert sm.decrypt_shares(key_ab, ctx, "a", "b", ct) == (123, 456)
    tampered = bytearray(ct)
    tampered[-1] ^= 1
    with pytest.raises(sm.SecAggMathError):
        sm.decrypt_shares(key_ab, ctx, "a", "b", bytes(tampered))
    with pytest.raises(sm.SecAggMathError):  # relayed to the wrong recipient
        sm.decrypt_shares(key_ab, ctx, "a", "c", ct)


def test_signatures_bind_keys_to_round_and_device() -> None:
    sk, pk = sm.ed25519_keypair()
    c_pk, s_pk = sm.x25519_keypair()[1], sm.x25519_keypair()[1]
    sig = sm.sign(sk, sm.advertise_message("s", 1, "d1", c_pk, s_pk))
    assert sm.verify(pk, sig, sm.advertise_message("s", 1, "d1", c_pk, s_pk))
    assert not sm.verify(pk, sig, sm.advertise_message("s", 2, "d1", c_pk, s_pk))
    assert not sm.verify(pk, sig, sm.advertise_message("s", 1, "d2", c_pk, s_pk))
    assert not sm.verify(pk, sig, sm.advertise_message("s", 1, "d1", s_pk, c_pk))
    assert sm.consistency_message("s", 1, ["b", "a"]) == sm.consistency_message("s", 1, ["a", "b"])


def test_prg_and_masked_frame() -> None:
    seed = os.urandom(32)
    p = sm.PRG(1000, 32)
    a = np.array(p.expand(seed))
    assert np.array_equal(a, sm.PRG(1000, 32).expand(seed)) and not np.array_equal(a, p.expand(os.urandom(32)))
    y = a.copy()
    blob = sm.encode_masked(y, round_id=3, session="s", device_id="d", bits=32, metadata={"num_examples": 4})
    header, got, sha = sm.decode_masked(blob, bits=32, dim=1000)
    assert header["metadata"] == {"num_examples": 4} and np.array_equal(got, y)
    damaged = bytearray(blob)
    damaged[200] ^= 1
    with pytest.raises(privacy_wire.FrameError) as exc:
        sm.decode_masked(bytes(damaged), bits=32, dim=1000)
    assert exc.value.reason == "checksum_mismatch"
    with pytest.raises(privacy_wire.FrameError) as exc:
        sm.decode_masked(blob, bits=32, dim=999)
    assert exc.value.reason == "shape_mismatch"


def test_peer_identity_pins_refuse_a_swapped_key(tmp_path) -> None:
    from device_app.secagg import PeerPins, SecAggError

    pins = PeerPins(tmp_path / "pins.json")
    pins.check({"d1": "key-a", "d2": "key-b"})
    pins.check({"d1": "key-a"})  # the same key again: fine
    with pytest.raises(SecAggError) as exc:
        PeerPins(tmp_path / "pins.json").check({"d2": "key-evil"})  # survives a restart of the device
    assert exc.value.reason == "identity_changed"


def test_unmask_probability_matches_enumeration_and_the_measured_fleet_runs() -> None:
    from server.config import ServerConfig
    from server.secagg import neighbourhood_warning

    k, keep, t = 5, 0.7, 4
    brute = 0.0  # enumerate which of the k neighbours are still there
    for alive in itertools.product([0, 1], repeat=k):
        if 1 + sum(alive) >= t:
            brute += math.prod(keep if a else 1 - keep for a in alive)
    assert sm.unmask_probability(k, keep, t, 1) == pytest.approx(brute, rel=1e-12)
    assert sm.unmask_probability(k, keep, t, 3) == pytest.approx(brute ** 3, rel=1e-12)
    assert sm.unmask_probability(k, 1.0, t, 100) == 1.0
    # docs/scaling.md: k = 16 with 30% over-admission abandoned every round, k = 32 with 13% none
    bad = ServerConfig(secure_aggregation="secagg", secagg_neighbors=16, over_admit=1.3, round_goal=140, min_count=120)
    good = ServerConfig(secure_aggregation="secagg", secagg_neighbors=32, over_admit=1.13, round_goal=140,
                        min_count=120)
    assert "probability" in (neighbourhood_warning(bad) or "")
    assert neighbourhood_warning(good) is None
    assert neighbourhood_warning(ServerConfig(secure_aggregation="secagg", secagg_neighbors=0)) is None
