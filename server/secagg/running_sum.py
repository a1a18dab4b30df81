"""The running modular sum of one SecAgg round's masked inputs, and its group commit.

A masked input is added to a staging sum as soon as it is decoded, so its request body can go;
one writer at a time then folds everything staged into the durable sum (current + staged, written
by the caller, then current and spare swap). The four buffers of the model's size (current, spare,
staging, spare staging) are allocated once per round: no upload or batch allocates or copies a
model-sized array, and a failed commit leaves the current sum as it was.

Each device holds at most one claim per round: a second, different masked input is refused, and a
retry of the same bytes waits for the first one's outcome instead of being added twice.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from server.errors import Rejection


class Claim:
    """One device's masked input in a round: staged, then committed (answer) or refused (error)."""

    __slots__ = ("device_id", "sha", "num_examples", "metrics", "answer", "error", "_done")

    def __init__(self, device_id: str, sha: str, num_examples: int, metrics: dict[str, Any]) -> None:
        self.device_id, self.sha = device_id, sha
        self.num_examples, self.metrics = num_examples, metrics
        self.answer: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def finish(self, answer: dict[str, Any] | None = None, error: BaseException | None = None) -> None:
        if not self._done.is_set():
            self.answer, self.error = answer, error
            self._done.set()

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        assert self.answer is not None
        return self.answer


Commit = Callable[[list[Claim], np.ndarray, int], Callable[[], None]]


class RunningSum:
    """current: the durable sum of `count` inputs (None before the first commit); adds wrap modulo 2^bits."""

    def __init__(self, round_id: int, dim: int, dtype: np.dtype, current: np.ndarray | None = None,
                 count: int = 0) -> None:
        self.round_id, self.dim, self.dtype = round_id, dim, np.dtype(dtype)
        self.current = current
        self.count = count  # inputs in `current`
        self.writer = threading.Lock()  # one commit at a time
        self._lock = threading.Lock()  # staging state and claims
        self._staging: np.ndarray | None = None
        self._staged: list[Claim] = []
        self._spare_staging: np.ndarray | None = None
        self._spare: np.ndarray | None = None
        self._claims: dict[str, Claim] = {}

    def stage(self, claim: Claim, y: np.ndarray) -> Claim:
        """Add `y` under `claim`; returns the claim that owns the device (an earlier one with the same
        bytes, for a retry: its outcome is this request's). A different earlier input is refused."""
        with self._lock:
            prev = self._claims.get(claim.device_id)
            if prev is not None:
                if prev.sha != claim.sha:
                    raise Rejection("duplicate_upload", "this round already holds a different masked input "
                                                        "from this device")
                return prev
            if self._staging is None:
                self._staging = np.zeros(self.dim, self.dtype)
            np.add(self._staging, y, out=self._staging)  # wraps mod 2^bits
            self._claims[claim.device_id] = claim
            self._staged.append(claim)
            return claim

    def commit_pending(self, commit: Commit) -> None:
        """(Caller holds `writer`.) Take everything staged, fold it into the spare buffer and call
        `commit(claims, new_sum, new_count)`, which makes it durable (or raises: then the claims are
        refused and released, and the current sum stays as it was). What `commit` returns is called once
        the new sum is current: the work after durability (answers, cleanup), whose failure must not
        roll the in-memory sum back behind the durable one."""
        with self._lock:
            if not self._staged:
                return
            claims, self._staged = self._staged, []
            staged, self._staging = self._staging, self._spare_staging
            self._spare_staging = None
        new = self._spare if self._spare is not None else np.empty(self.dim, self.dtype)
        if self.current is None:
            np.copyto(new, staged)
        else:
            np.add(self.current, staged, out=new)
        staged.fill(0)
        with self._lock:
            self._spare_staging = staged
        count = self.count + len(claims)
        try:
            after = commit(claims, new, count)
        except BaseException as exc:
            self._spare = new
            self.release(claims, exc)
            raise
        self._spare, self.current, self.count = self.current, new, count
        after()

    def release(self, claims: list[Claim], error: BaseException) -> None:
        """Refuse `claims` (not in the sum) and let their devices try again."""
        with self._lock:
            for c in claims:
                if self._claims.get(c.device_id) is c:
                    del self._claims[c.device_id]
        for c in claims:
            c.finish(error=error if isinstance(error, Rejection) else
                     Rejection("round_closed", f"masked input not accepted: {error}"))

    def wait(self, claim: Claim, commit: Commit) -> dict[str, Any]:
        """The claim's outcome: commit it, with whatever else is staged, unless another writer does.
        (Group commit: inputs staged while a commit is being written go together in the next one.)"""
        with self.writer:
            if not claim.done:
                self.commit_pending(commit)
        if not claim.done:  # every commit answers or refuses all it took
            raise RuntimeError(f"masked input of {claim.device_id} was neither committed nor refused")
        return claim.result()


__all__ = ["Claim", "RunningSum"]
