"""Aggregation math (pure numpy): streaming weighted mean, coordinate-wise trimmed mean and median.

Updates are flat float32 vectors in config.weight_specs() order. The mean is streamed: each
accepted update is added into one float64 sum as it arrives, so a 1,000-update round holds one
sum vector, never 1,000 deltas. The robust aggregators need every value of a coordinate at once;
they walk the coordinates in chunks over memory-mapped update files, so their working set is
n_updates x chunk values, not n_updates x dimension.
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

# Bytes of float64 working set a robust aggregator may use per coordinate chunk.
ROBUST_CHUNK_BYTES = 64 << 20
_ADD_CHUNK = 1 << 18  # elements per float64 temporary in weighted adds


class MeanAccumulator:
    """Running sum of weight * update (float64) and of the weights.

    Addition order is the only source of floating-point differences, so replaying the same
    updates in the same order reproduces the sum bit for bit. add() is thread-safe: concurrent
    adds take turns.
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.sum = np.zeros(self.dim, dtype=np.float64)
        self.total_weight = 0.0
        self.count = 0
        self._scratch: np.ndarray | None = None  # reused for weighted adds (no fresh pages per update)
        self._lock = threading.Lock()

    def add(self, parts: Sequence[np.ndarray] | np.ndarray, weight: float = 1.0) -> None:
        """Add one update given as a flat vector or as tensors that concatenate to one."""
        if isinstance(parts, np.ndarray):
            parts = [parts]
        sizes = [int(p.size) for p in parts]
        if sum(sizes) != self.dim:
            raise ValueError(f"update has {sum(sizes)} values, accumulator expects {self.dim}")
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight!r}")
        with self._lock:
            offset = 0
            w = float(weight)
            for part, size in zip(parts, sizes):
                flat = np.asarray(part).reshape(-1)
                target = self.sum[offset : offset + size]
                if w == 1.0:
                    np.add(target, flat, out=target)  # float32 -> float64 exactly, no temporary
                else:
                    if self._scratch is None:
                        self._scratch = np.empty(_ADD_CHUNK, dtype=np.float64)
                    for s in range(0, size, _ADD_CHUNK):
                        part_in = flat[s : s + _ADD_CHUNK]
                        buf = self._scratch[: part_in.size]
                        np.multiply(part_in, w, out=buf, dtype=np.float64)  # in float64, exact for float32 * int
                        out = target[s : s + _ADD_CHUNK]
                        np.add(out, buf, out=out)
                offset += size
            self.total_weight += w
            self.count += 1

    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no updates to average")
        return self.sum / self.total_weight


def weighted_mean(updates: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """sum_i w_i u_i / sum_i w_i in float64 (uniform when weights is None)."""
    if not updates:
        raise ValueError("no updates to average")
    acc = MeanAccumulator(updates[0].size)
    for i, u in enumerate(updates):
        acc.add(u, 1.0 if weights is None else weights[i])
    return acc.mean()


def _chunked(
    n: int, dim: int, get_chunk: Callable[[int, int, int], np.ndarray], reduce: Callable[[np.ndarray], np.ndarray],
    chunk_bytes: int,
) -> np.ndarray:
    out = np.empty(dim, dtype=np.float64)
    step = max(1024, chunk_bytes // max(1, n * 8))
    block = None
    for start in range(0, dim, step):
        stop = min(dim, start + step)
        if block is None or block.shape[1] != stop - start:
            block = np.empty((n, stop - start), dtype=np.float64)
        for i in range(n):
            block[i] = get_chunk(i, start, stop)
        out[start:stop] = reduce(block)
    return out


def trim_count(n: int, trim_fraction: float) -> int:
    """How many values each end drops: floor(fraction * n), keeping at least one value."""
    k = int(np.floor(trim_fraction * n + 1e-9))
    return min(k, (n - 1) // 2)


def trimmed_mean(updates: Sequence[np.ndarray], trim_fraction: float, chunk_bytes: int = ROBUST_CHUNK_BYTES) -> np.ndarray:
    """Coordinate-wise trimmed mean: per coordinate drop the k largest and k smallest values, average the rest."""
    if not updates:
        raise ValueError("no updates to aggregate")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    n, dim = len(updates), int(updates[0].size)
    k = trim_count(n, trim_fraction)

    def reduce(block: np.ndarray) -> np.ndarray:
        if k == 0:
            return block.mean(axis=0)
        block.sort(axis=0)
        return block[k : n - k].mean(axis=0)

    return _chunked(n, dim, lambda i, a, b: updates[i][a:b], reduce, chunk_bytes)


def coordinate_median(updates: Sequence[np.ndarray], chunk_bytes: int = ROBUST_CHUNK_BYTES) -> np.ndarray:
    """Coordinate-wise median (mean of the two middle values for an even count)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    n, dim = len(updates), int(updates[0].size)
    return _chunked(n, dim, lambda i, a, b: updates[i][a:b], lambda block: np.median(block, axis=0), chunk_bytes)


__all__ = ["MeanAccumulator", "weighted_mean", "trimmed_mean", "coordinate_median", "trim_count"]
