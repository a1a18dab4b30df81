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


def test_default_delta():
    assert dp.default_delta(1000) == pytest.approx(1000 ** -1.1)
    assert dp.default_delta(1000) < 1 / 1000


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
