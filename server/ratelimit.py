"""Token buckets per key (e.g. per source address): pure, thread-safe, with an injectable clock.

    limiter = RateLimiter(rate_per_s=1.0, burst=100)
    wait = limiter.take("203.0.113.7")   # 0.0: allowed (one token spent); > 0: refused, retry after `wait` s

Each key's bucket holds at most `burst` tokens and refills at `rate_per_s`; a request spends one. A refused
request spends nothing. Full buckets are forgotten (a full bucket is the same as no bucket), and the table is
bounded (`max_keys`): when it is full the fullest buckets go first, so a flood of distinct addresses cannot
grow memory without bound and a throttled address keeps its empty bucket. rate_per_s <= 0 disables the limit.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Callable

DEFAULT_MAX_KEYS = 100_000


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if burst < 1 and rate_per_s > 0:
            raise ValueError("burst must be >= 1")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.rate = float(rate_per_s)
        self.burst = int(burst)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + max(0.0, now - at) * self.rate)

    def take(self, key: str, cost: float = 1.0) -> float:
        """Spend `cost` tokens of `key`'s bucket: 0.0 when allowed, else the seconds until it would be."""
        if not self.enabled:
            return 0.0
        with self._lock:
            now = self.clock()
            tokens = self._tokens(key, now)
            if tokens + 1e-9 < cost:
                self._buckets[key] = (tokens, now)
                return (cost - tokens) / self.rate
            tokens -= cost
            if tokens >= self.burst:
                self._buckets.pop(key, None)
            else:
                if key not in self._buckets and len(self._buckets) >= self.max_keys:
                    self._evict(now)
                self._buckets[key] = (tokens, now)
            return 0.0

    def retry_after_s(self, key: str, cost: float = 1.0) -> float:
        """Seconds until `key` could spend `cost` tokens (0.0: now); spends nothing."""
        if not self.enabled:
            return 0.0
        with self._lock:
            tokens = self._tokens(key, self.clock())
        return max(0.0, (cost - tokens) / self.rate)

    def _evict(self, now: float) -> None:
        """Drop refilled buckets; if none, the fullest half (never the emptiest, the throttled ones)."""
        full = [k for k in self._buckets if self._tokens(k, now) >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:
            by_fill = sorted(self._buckets, key=lambda k: self._tokens(k, now), reverse=True)
            for k in by_fill[: max(1, len(by_fill) // 2)]:
                del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(seconds: float) -> str:
    """An HTTP Retry-After value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(seconds)))


__all__ = ["RateLimiter", "retry_after_header", "DEFAULT_MAX_KEYS"]
