"""A background thread for everything slow (training, network), so suggestions never wait.

The UI (or the headless loop) submits named jobs; the worker runs them one at a time, and
between jobs runs the client's periodic chores (`DeviceClient.tick`) every `interval_s`.
Listeners hear about each finished job (from the worker thread: a UI must hop back to its
own thread, e.g. with kivy.clock.Clock.schedule_once).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from device_app.client import DeviceClient

log = logging.getLogger("device_app.worker")

JOBS = ("tick", "sync", "train_now", "participate", "personalize", "forget", "privacy")
Listener = Callable[[str, Any, "BaseException | None"], None]


class BackgroundWorker:
    def __init__(self, client: DeviceClient, interval_s: float = 30.0, auto: bool = True) -> None:
        self.client = client
        self.interval_s = float(interval_s)
        self.auto = auto
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._listeners: list[Listener] = []
        self.current: str | None = None
        self.last_results: dict[str, Any] = {}
        self.last_error: str | None = None
        self._pending: set[str] = set()
        self._lock = threading.Lock()

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    @property
    def busy(self) -> bool:
        return self.current is not None or not self._queue.empty()

    def start(self) -> "BackgroundWorker":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="device-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self.client.cancel()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: str) -> bool:
        """Queue a job; a job already waiting is not queued twice. False if it was a duplicate."""
        if job not in JOBS:
            raise ValueError(f"unknown job {job!r}; choose from {JOBS}")
        with self._lock:
            if job in self._pending:
                return False
            self._pending.add(job)
        self._queue.put(job)
        return True

    def wait_idle(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.busy:
                return True
            time.sleep(0.02)
        return False

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        next_tick = time.monotonic() if self.auto else float("inf")
        while not self._stopping.is_set():
            timeout = max(0.0, next_tick - time.monotonic()) if self.auto else None
            try:
                job = self._queue.get(timeout=timeout)
            except queue.Empty:
                job = "tick"
            if job is None:
                break
            with self._lock:
                self._pending.discard(job)
            self._execute(job)
            if job == "tick" and self.auto:
                next_tick = time.monotonic() + self.interval_s

    def _execute(self, job: str) -> None:
        self.current = job
        result: Any = None
        error: BaseException | None = None
        try:
            result = self._dispatch(job)
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - report, keep the worker alive
            log.exception("background job %s failed", job)
            error = exc
            self.last_error = f"{job}: {exc}"
        finally:
            self.current = None
        self.last_results[job] = result
        for fn in list(self._listeners):
            try:
                fn(job, result, error)
            except Exception:  # noqa: BLE001
                log.exception("worker listener failed")

    def _dispatch(self, job: str) -> Any:
        c = self.client
        if job == "tick":
            return c.tick()
        if job == "sync":
            installed = c.sync()
            c.refresh_privacy()
            return installed
        if job == "participate":
            return c.participate_once()
        if job == "train_now":
            # The user asked: personalize now, and join a round if the device may (idle waived).
            gain = c.personalize()
            outcome = c.participate_once(force=True) if c.api is not None else None
            c.refresh_privacy()
            return {"personal_gain": gain, "round": str(outcome) if outcome else None}
        if job == "personalize":
            return c.personalize()
        if job == "forget":
            c.forget_data()
            return True
        if job == "privacy":
            return c.refresh_privacy()
        raise ValueError(job)


__all__ = ["BackgroundWorker", "JOBS"]
