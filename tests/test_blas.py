"""models/blas.py: float64-accumulated sum of squares (BLAS dsdot, and the cast fallback)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from models import blas


def _exact(arrays) -> float:
    return math.fsum(float(v) * float(v) for a in arrays for v in np.asarray(a, dtype=np.float64).ravel())


@pytest.fixture(params=["dsdot", "fallback"])
def path(request, monkeypatch):
    if request.param == "dsdot":
        if not blas.has_dsdot():
            pytest.skip("numpy's bundled OpenBLAS has no dsdot here")
    else:
        monkeypatch.setattr(blas, "_DSDOT", None)
    return request.param


def test_matches_exact_sum_across_dtypes_and_layouts(path: str) -> None:
    rng = np.random.default_rng(3)
    arrays = [
        rng.standard_normal(300_001).astype(np.float32),  # > one fallback chunk
        rng.standard_normal((7, 9)).astype(np.float16),
        rng.standard_normal(50),  # float64
        np.arange(-5, 6, dtype=np.int64),
        rng.standard_normal((40, 30)).astype(np.float32)[:, ::3],  # not contiguous
        np.zeros(0, dtype=np.float32),
    ]
    rel = blas.DSDOT_REL_ERROR if path == "dsdot" else 1e-12
    assert blas.sum_of_squares(arrays) == pytest.approx(_exact(arrays), rel=rel)
    assert blas.sum_of_squares(arrays[0]) == pytest.approx(_exact(arrays[:1]), rel=rel)
    assert blas.sum_of_squares(arrays, exact=True) == pytest.approx(_exact(arrays), rel=1e-12)
    assert blas.sum_of_squares([]) == 0.0


def test_float64_accuracy_where_float32_accumulation_fails(path: str) -> None:
    # One large value and a million small ones: a float32 accumulator drops the small squares.
    x = np.full(1_000_001, 1e-3, dtype=np.float32)
    x[0] = 1e3
    exact = _exact([x])
    assert abs(blas.sum_of_squares(x) - exact) / exact < blas.DSDOT_REL_ERROR
    naive32 = float(np.cumsum(x * x, dtype=np.float32)[-1])  # float32 accumulator: every 1e-6 is lost
    assert abs(naive32 - exact) / exact > 1e-7  # what the check above rules out


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_give_non_finite_sum(path: str, bad: float) -> None:
    x = np.ones(100_000, dtype=np.float32)
    x[77_777] = bad
    assert not math.isfinite(blas.sum_of_squares(x))


def test_largest_float32_values_do_not_overflow(path: str) -> None:
    x = np.full(1000, np.finfo(np.float32).max, dtype=np.float32)
    got = blas.sum_of_squares(x)
    assert math.isfinite(got) and got == pytest.approx(1000 * float(np.finfo(np.float32).max) ** 2, rel=1e-12)
