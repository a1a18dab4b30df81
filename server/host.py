"""What the privacy services (server/secagg/, server/paillier/) may ask of the round manager.

A narrow interface instead of the manager's internals: the shared lock that orders round state
changes, the model dimension, abandoning a round, waking the round worker, and the round's upload
bound (clip and device noise, owned by its strategy's DP mechanism).
"""
from __future__ import annotations

import threading
from typing import Callable, Protocol

from server.metrics import Metrics
from server.round import Round
from server.strategy import UploadBound


class RoundHost(Protocol):
    lock: threading.RLock
    metrics: Metrics

    @property
    def dim(self) -> int: ...

    def abandon(self, rnd: Round, reason: str, also: Callable[[], None] | None = None) -> None:
        """Abandon `rnd` in one transaction together with `also`'s writes; delete its update files."""

    def wake(self) -> None:
        """Have the round worker run now (a round became ready to aggregate)."""

    def upload_bound(self, rnd: Round) -> UploadBound | None:
        """The round's clip bound and device noise."""


__all__ = ["RoundHost"]
