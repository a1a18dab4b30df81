"""The round worker: the background thread that drives deadlines, new rounds and aggregation
(RoundManager.tick) every tick_s, or at once when woken; and the start-up warm-up thread."""
from __future__ import annotations

import gc
import logging
import threading
from typing import Callable

log = logging.getLogger("server.rounds")


def start_warm_up(import_accountant: bool, warm: threading.Event) -> None:
    """In a thread: the slow imports, then `warm` (reported by /healthz) is set."""
    def warm_up() -> None:
        try:
            if import_accountant:
                # dp_accounting (and scipy) take a second or two to import: now, not in the first aggregation
                __import__("dp_accounting")
            # The hundreds of thousands of objects the imports made live as long as the server: keep
            # them out of the cyclic collector, which otherwise walks them all on every full collection
            # while requests wait.
            gc.collect()
            gc.freeze()
        finally:
            warm.set()

    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()


class RoundWorker:
    def __init__(self, tick: Callable[[], None], tick_s: float, wake: threading.Event) -> None:
        self._tick, self._tick_s, self._wake = tick, tick_s, wake
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:
                log.exception("round worker tick failed")
                self._stop.wait(1.0)
            self._wake.wait(self._tick_s)
            self._wake.clear()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="round-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


__all__ = ["RoundWorker", "start_warm_up"]
