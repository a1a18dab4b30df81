"""models/dp.py: clipping, noise, norm tolerance and privacy accounting."""
from __future__ import annotations

import math

import numpy as np
import pytest

from models import dp


def _tensors(rng, scale=1.0):
    return [rng.standard_normal((30, 4)).astype(np.float32) * scale, rng.standard_normal(7).astype(np.float32) * scale]


def test_l2_norm_matches_flat_norm():
    rng = np.random.default_rng(0)
    ts = _tensors(rng)
    flat = np.concatenate([t.ravel() for t in ts]).astype(np.float64)
    assert dp.l2_norm(ts) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-12)
    assert dp.l2_norm(ts[0]) == pytest.approx(float(np.linalg.norm(ts[0].astype(np.float64))), rel=1e-12)
    assert dp.l2_norm([np.zeros(3)]) == 0.0


def test_clip_exact():
    rng = np.random.default_rng(1)
    ts = _tensors(rng, scale=3.0)
    norm = dp.l2_norm(ts)
    clipped, original = dp.clip_by_global_norm(ts, 1.5)
    assert original == pytest.approx(norm)
    assert dp.l2_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    # direction preserved
    factor = 1.5 / norm
    for c, t in zip(clipped, ts):
        np.testing.assert_allclose(c, t * factor, rtol=1e-6)
    # within bound: bit-identical copies, not views
    small, original = dp.clip_by_global_norm(ts, norm * 2)
    assert original == pytest.approx(norm)
    for s, t in zip(small, ts):
        np.testing.assert_array_equal(s, t)
        assert s is not t
    with pytest.raises(ValueError):
        dp.clip_by_global_norm(ts, 0.0)
    with pytest.raises(ValueError):
        dp.clip_by_global_norm([np.array([np.nan])], 1.0)


def test_noise_statistics_and_determinism():
    ts = [np.zeros((200, 50), np.float32)]
    noisy = dp.add_gaussian_noise(ts, 0.5, np.random.default_rng(3))
    assert noisy[0].dtype == np.float32
    assert float(np.std(noisy[0])) == pytest.approx(0.5, rel=0.05)
    again = dp.add_gaussian_noise(ts, 0.5, np.random.default_rng(3))
    np.testing.assert_array_equal(noisy[0], again[0])
    np.testing.assert_array_equal(dp.add_gaussian_noise(ts, 0.0)[0], ts[0])
    with pytest.raises(ValueError):
        dp.add_gaussian_noise(ts, -1.0)


def test_norm_tolerance_bounds_clipped_plus_noise():
    rng = np.random.default_rng(4)
    dim, clip, stddev = 5000, 1.0, 0.05
    bound = dp.norm_tolerance(clip, stddev, dim)
    assert bound > clip
    for _ in range(50):
        ts = [rng.standard_normal(dim).astype(np.float32) * 10]
        clipped, _ = dp.clip_by_global_norm(ts, clip)
        noisy = dp.add_gaussian_noise(clipped, stddev, rng)
        assert dp.l2_norm(noisy) <= bound
    # not absurdly loose: about clip + stddev*sqrt(dim)
    assert bound < clip + stddev * math.sqrt(dim) + 7 * stddev + 1e-3
    assert dp.norm_tolerance(2.0, 0.0, dim) == pytest.approx(2.0, rel=1e-4)


def test_device_noise_per_mode():
    assert dp.device_noise_stddev("none", 1.0, 2.0, 100) == 0.0
    assert dp.device_noise_stddev("central", 1.0, 2.0, 100) == 0.0
    assert dp.device_noise_stddev("local", 1.0, 2.0, 100) == 2.0
    assert dp.device_noise_stddev("distributed", 1.0, 2.0, 100) == pytest.approx(0.2)
    # the sum of min_count distributed noises has the central stddev
    assert dp.device_noise_stddev("distributed", 1.2, 0.5, 16) * math.sqrt(16) == pytest.approx(1.2 * 0.5)
    assert dp.central_noise_stddev("central", 1.2, 0.5) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        dp.device_noise_stddev("bogus", 1.0, 1.0, 1)


def test_default_delta_is_one_in_a_million():
    assert dp.DEFAULT_DELTA == 1e-6 and dp.FTRL_DEFAULT_DELTA == dp.DEFAULT_DELTA
    assert not hasattr(dp, "default_delta")  # no population-dependent default left anywhere


def test_poisson_selected_is_the_hmac_rule():
    import hashlib
    import hmac

    key = b"round-secret"
    for member in ("a", "device-17", "\u00e9t\u00e9"):
        u = int.from_bytes(hmac.new(key, member.encode(), hashlib.sha256).digest(), "big") / 2 ** 256
        for q in (0.0, 0.1, 0.5, 0.9, 1.0):
            assert dp.poisson_selected(key, member, q) == (u < q)
    assert dp.poisson_selected(key, "x", 1.0) and not dp.poisson_selected(key, "x", 0.0)
    with pytest.raises(ValueError):
        dp.poisson_selected(key, "x", 1.5)


def test_poisson_selected_draws_at_rate_q_and_independently_per_key():
    members = [f"d{i}" for i in range(20_000)]
    a = [dp.poisson_selected(b"k1", m, 0.1) for m in members]
    b = [dp.poisson_selected(b"k2", m, 0.1) for m in members]
    n = len(members)
    assert abs(sum(a) / n - 0.1) < 4 * math.sqrt(0.09 / n)  # Binomial(n, 0.1): within 4 sigma
    both = sum(x and y for x, y in zip(a, b)) / n  # another round's key: an independent draw
    assert abs(both - 0.01) < 4 * math.sqrt(0.0099 / n)


def test_mechanism_label():
    assert dp.mechanism_label("none") == "none"
    assert dp.mechanism_label("dp-ftrl") == "DP-FTRL"
    assert dp.mechanism_label("dp-fedavg", [0.01, 0.01]) == "DP-FedAvg with selection q = 0.01"
    assert dp.mechanism_label("dp-fedavg", [1.0]) == "DP-FedAvg without sampling (no amplification)"
    assert dp.mechanism_label("dp-fedavg") == "DP-FedAvg without sampling (no amplification)"
    mixed = dp.mechanism_label("dp-fedavg", [0.2, 1.0])
    assert "selection q = 0.2" in mixed and "no amplification" in mixed
    with pytest.raises(ValueError):
        dp.mechanism_label("fedsgd")


def test_guarantee_sentence_names_mechanism_epsilon_delta_accountant_and_coverage():
    s = dp.guarantee_sentence("dp-fedavg", 1.2345, 1e-6, "rdp", "device", 12, sampling_probs=[0.05],
                              assumptions=["a trusted server", "a secret draw"])
    assert s.startswith("DP-FedAvg with selection q = 0.05: after 12 released round(s)")
    assert "epsilon 1.23 at delta 1e-06 (RDP accountant)" in s
    assert "all the data of any one device" in s and s.endswith("assuming a trusted server; a secret draw.")
    assert s.count(".") == s.count("1.23") + s.count("0.05") + 1  # one sentence
    s = dp.guarantee_sentence("dp-fedavg", 30.0, 1e-5, "pld", "client", 3)
    assert s.startswith("DP-FedAvg without sampling (no amplification):") and "epsilon 30 at delta 1e-05 (PLD" in s
    assert "any one client" in s and "assuming" not in s
    s = dp.guarantee_sentence("dp-ftrl", 2.0, 1e-6, "rdp", rounds=4, assumptions=["each device once per 4 rounds"])
    assert s.startswith("DP-FTRL: after 4 released round(s)") and "epsilon 2 at delta 1e-06" in s


def test_guarantee_sentence_edge_cases():
    inf = dp.guarantee_sentence("dp-fedavg", math.inf, 1e-6, "rdp", rounds=2)
    assert "no finite epsilon" in inf and "no meaningful guarantee" in inf
    assert "no model has been released yet" in dp.guarantee_sentence("dp-fedavg", 0.0, 1e-6, "rdp", rounds=0)
    none = dp.guarantee_sentence("none", None, 1e-6, "rdp")
    assert none.startswith("No differential privacy (mechanism none)") and "epsilon" in none
    with pytest.raises(ValueError):
        dp.guarantee_sentence("dp-fedavg", 1.0, 0.0, "rdp", rounds=1)
    assert dp.format_epsilon(math.inf) == "inf" and dp.format_epsilon(0.123456) == "0.123"


def test_epsilon_grows_with_steps_and_falls_with_noise():
    delta = 1e-5
    e1 = dp.epsilon(1.0, 0.01, 100, delta)
    e2 = dp.epsilon(1.0, 0.01, 1000, delta)
    e3 = dp.epsilon(2.0, 0.01, 1000, delta)
    assert 0 < e1 < e2
    assert e3 < e2
    assert dp.epsilon(1.0, 0.01, 0, delta) == 0.0
    assert dp.epsilon(0.0, 0.01, 10, delta) == math.inf
    assert dp.epsilon(1.0, 0.0, 10, delta) == 0.0


def test_rdp_and_pld_both_finite_and_pld_tighter():
    delta = 1e-5
    rdp = dp.epsilon(1.1, 0.02, 200, delta, accountant="rdp")
    pld = dp.epsilon(1.1, 0.02, 200, delta, accountant="pld")
    assert math.isfinite(rdp) and math.isfinite(pld)
    assert 0 < pld <= rdp * 1.02


def test_calibration_hits_target():
    q, steps, delta = 0.02, 300, 1e-5
    for target in (1.0, 4.0):
        z = dp.calibrate_noise_multiplier(target, q, steps, delta)
        assert dp.epsilon(z, q, steps, delta) <= target
        assert dp.epsilon(z, q, steps, delta) == pytest.approx(target, rel=0.01)
        assert dp.epsilon(z * 0.98, q, steps, delta) > target


def test_ledger_matches_batch_accounting():
    rounds = [(1.0, 0.01)] * 30 + [(1.5, 0.02)] * 20
    ledger = dp.PrivacyLedger()
    ledger.extend(rounds[:10])
    first = ledger.epsilon(1e-5)
    ledger.extend(rounds[10:])
    assert ledger.epsilon(1e-5) == pytest.approx(dp.epsilon_for_rounds(rounds, 1e-5), rel=1e-9)
    assert first < ledger.epsilon(1e-5)
    fresh = dp.PrivacyLedger()
    fresh.extend(rounds)  # composed lazily in one go: same answer
    assert fresh.epsilon(1e-5) == pytest.approx(ledger.epsilon(1e-5), rel=1e-9)
    assert dp.PrivacyLedger().epsilon(1e-5) == 0.0


@pytest.mark.slow  # PLD accounting takes ~45 s here
def test_pld_calibration_stays_bounded_and_below_rdp():
    """PLD calibration is bracketed by RDP's answer, so it never probes memory-hungry tiny z."""
    from models import dp

    z_rdp = dp.calibrate_noise_multiplier(8.0, 0.2, 3, 1e-3, accountant="rdp")
    z_pld = dp.calibrate_noise_multiplier(8.0, 0.2, 3, 1e-3, accountant="pld")
    assert 0 < z_pld <= z_rdp
    assert dp.epsilon(z_pld, 0.2, 3, 1e-3, accountant="pld") <= 8.0 + 1e-6


def test_tff_sim_plans_default_to_delta_1e6_and_word_their_guarantee():
    from tff_sim import privacy
    from tff_sim.config import SimConfig

    plan = privacy.plan(SimConfig(dp=True, noise_multiplier=1.0, rounds=5, clients_per_round=10), 100)
    assert plan.delta == dp.DEFAULT_DELTA and plan.sampling == "poisson"
    text = plan.guarantee(5)
    want = dp.epsilon(1.0, 0.1, 5, 1e-6)
    assert text.startswith("DP-FedAvg with selection q = 0.1: after 5 released round(s)")
    assert f"epsilon {dp.format_epsilon(want)} at delta 1e-06 (RDP accountant)" in text and "any one client" in text
    uniform = privacy.plan(SimConfig(dp=True, noise_multiplier=1.0, rounds=5, clients_per_round=10,
                                     sampling="uniform"), 100)
    assert "approximation" in uniform.guarantee(5)
    ftrl = privacy.plan(SimConfig(dp=True, dp_mechanism="dp-ftrl", noise_multiplier=1.0, rounds=5,
                                  clients_per_round=10, server_optimizer="sgd"), 100)
    assert ftrl.delta == 1e-6 and ftrl.guarantee(5).startswith("DP-FTRL: after 5 released round(s)")
    assert privacy.plan(SimConfig(dp=True, noise_multiplier=1.0, delta=1e-5), 100).delta == 1e-5  # settable
