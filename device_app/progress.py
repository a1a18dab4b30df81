"""Progress of the device's long jobs (sync, training, personalization), fanned out to listeners (the UI)."""
from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("device_app.client")

Progress = Callable[[float, str], None]


class ProgressReporter:
    """`current` is (fraction, message) while a job runs, None between jobs."""

    def __init__(self) -> None:
        self.current: tuple[float, str] | None = None
        self._listeners: list[Progress] = []

    def add_listener(self, fn: Progress) -> None:
        self._listeners.append(fn)

    def report(self, fraction: float, message: str) -> None:
        self.current = (max(0.0, min(1.0, fraction)), message)
        self._notify(*self.current)

    def done(self) -> None:
        self.current = None
        self._notify(1.0, "")

    def _notify(self, fraction: float, message: str) -> None:
        for fn in list(self._listeners):
            try:
                fn(fraction, message)
            except Exception:  # noqa: BLE001 - a UI callback must not break training
                log.exception("progress listener failed")
