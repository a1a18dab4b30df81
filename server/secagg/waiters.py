"""Long-poll support: async request handlers wait for a round's stage to change; threads notify."""
from __future__ import annotations

import asyncio
import threading
from typing import Callable


class Waiters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def notify(self, rid: int) -> None:
        with self._lock:
            waiting = self._waiters.pop(rid, [])
        for loop, ev in waiting:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed
                pass

    async def wait(self, rid: int, ready: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, timeout)
        while True:
            if ready():
                return True
            remaining = end - loop.time()
            if remaining <= 0:
                return False
            ev = asyncio.Event()
            with self._lock:
                self._waiters.setdefault(rid, []).append((loop, ev))
            if ready():
                return True
            try:
                await asyncio.wait_for(ev.wait(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass


__all__ = ["Waiters"]
