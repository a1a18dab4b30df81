"""Sum of squares of float32 data accumulated in float64, at single-precision BLAS speed.

BLAS `dsdot` accumulates float32 products in float64: one pass over the data, no float64 copy,
about 7x faster than casting chunks to float64. A kernel may round each product to float32
first, so its relative error is below 2^-24 (6e-8) plus float64 summation error; `exact=True`
takes the cast path, whose only error is float64 summation (relative <= n * 2^-53). numpy does
not expose dsdot; we call it from the OpenBLAS that numpy's wheel bundles, after a probe shows it
really accumulates in double precision. Where that library or symbol is absent, or the probe
fails, every call takes the cast path.

A finite result also proves every value is finite: float32 squares are at most 1.2e77 and their
sum cannot overflow float64, so only a NaN or an infinity in the data gives a non-finite sum.
"""
from __future__ import annotations

import ctypes
import glob
import math
import os
from typing import Callable

import numpy as np

_CHUNK = 1 << 18


def _load_dsdot() -> Callable[[int, int], float] | None:
    """cblas_dsdot from numpy's bundled OpenBLAS (ILP64 `...64_` or LP64 name), or None."""
    if os.environ.get("FK_NO_DSDOT"):
        return None
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "libopenblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name, index in (("cblas_dsdot64_", ctypes.c_int64), ("cblas_dsdot", ctypes.c_int32)):
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            fn.restype = ctypes.c_double
            fn.argtypes = [index, ctypes.c_void_p, index, ctypes.c_void_p, index]
            # 1.0 in each of the first 64 slots (every SIMD lane), then 4032 squares of 2^-26 each:
            # a float32 accumulator loses every small term, a float64 one keeps them exactly.
            probe = np.full(4096, 2.0 ** -13, dtype=np.float32)
            probe[:64] = 1.0
            if fn(probe.size, probe.ctypes.data, 1, probe.ctypes.data, 1) == 64.0 + 4032 * 2.0 ** -26:
                limit = np.iinfo(np.int64 if index is ctypes.c_int64 else np.int32).max
                return lambda n, ptr, fn=fn, limit=limit: fn(n, ptr, 1, ptr, 1) if n <= limit else None
    return None


_DSDOT = _load_dsdot()


def has_dsdot() -> bool:
    """Whether the fast BLAS path is in use (else the chunked float64 fallback)."""
    return _DSDOT is not None


def _sum_sq_cast(flat: np.ndarray, buf: np.ndarray) -> float:
    total = 0.0
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        b = buf[: chunk.size]
        np.copyto(b, chunk, casting="unsafe")
        total += float(np.dot(b, b))
    return total


# Relative error bound of the dsdot path (products possibly rounded to float32), with room for
# the float64 summation error; callers deciding a threshold recompute with exact=True inside it.
DSDOT_REL_ERROR = 1e-7


def sum_of_squares(tensors: list[np.ndarray] | tuple[np.ndarray, ...] | np.ndarray, *, exact: bool = False) -> float:
    """sum(x**2) over all values of all arrays, accumulated in float64. Contiguous float32 arrays go
    through dsdot (relative error < DSDOT_REL_ERROR) unless `exact`."""
    if isinstance(tensors, np.ndarray):
        tensors = [tensors]
    total = 0.0
    buf: np.ndarray | None = None
    for t in tensors:
        a = np.asarray(t)
        if a.size == 0:
            continue
        if not exact and _DSDOT is not None and a.dtype == np.float32 and a.flags.c_contiguous:
            got = _DSDOT(a.size, a.ctypes.data)
            if got is not None and math.isfinite(got):  # else: a product past 1.8e19 may have overflowed
                total += got
                continue
        if a.dtype == np.float64 and a.flags.c_contiguous:
            flat = a.reshape(-1)
            total += float(np.dot(flat, flat))
            continue
        if buf is None:
            buf = np.empty(_CHUNK, dtype=np.float64)
        total += _sum_sq_cast(a.reshape(-1), buf)
    return total
