"""Synthetic devices for the privacy protocols: real HTTP, real crypto, no model training.

Tests and benchmarks use these to run SecAgg / Paillier / plain rounds with many devices and
chosen deltas: each SimDevice registers with the server, checks in, and runs the device side of
the round's protocol (device_app/secagg.py) on a given flat delta, optionally dropping out at a
chosen stage or misbehaving. `TamperTransport` alters responses or requests in flight (a
malicious relay) to show what the devices and the server detect.

    devices = [SimDevice(url) for _ in range(10)]
    results = run_round(devices, deltas)            # one thread per device
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import httpx
import numpy as np

from device_app.http_client import Offline, ServerAPI, ServerError, Task
from device_app.secagg import PaillierHook, SecAggError, SecAggHook
from models import secagg_math as sm
from models import wire
from models.config import ModelConfig

ELIGIBLE = {"charging": True, "unmetered": True, "idle": True}
DROP_STAGES = ("advertise", "share", "upload", "consistency")


class TamperTransport(httpx.BaseTransport):
    """Passes requests through; `response_hook(path, method, json)` may return altered JSON for a response,
    `request_hook(path, method, body)` altered bytes for a request body."""

    def __init__(self, inner: httpx.BaseTransport | None = None,
                 response_hook: Callable[[str, str, Any], Any] | None = None,
                 request_hook: Callable[[str, str, bytes], bytes | None] | None = None) -> None:
        self.inner = inner or httpx.HTTPTransport()
        self.response_hook = response_hook
        self.request_hook = request_hook

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.request_hook is not None:
            body = request.read()
            new = self.request_hook(request.url.path, request.method, body)
            if new is not None and new != body:
                headers = dict(request.headers)
                headers["content-length"] = str(len(new))
                request = httpx.Request(request.method, request.url, headers=headers, content=new)
        response = self.inner.handle_request(request)
        if self.response_hook is None or response.status_code != 200 \
                or "json" not in response.headers.get("content-type", ""):
            return response
        response.read()
        data = response.json()
        new = self.response_hook(request.url.path, request.method, data)
        if new is None:
            return httpx.Response(response.status_code, headers=response.headers, content=response.content,
                                  request=request)
        return httpx.Response(response.status_code, json=new, request=request)

    def close(self) -> None:
        self.inner.close()


class Lockstep:
    """Holds every device before each message it sends until all have computed theirs.

    For benchmarks on one machine: the devices' compute (which a real fleet does in parallel, one
    phone each) then never overlaps the server's handling of a stage, so a stage's server-side time
    is measured cleanly from `released[label]` (when the last device finished computing) to the
    stage's close, and each device's compute is measured on its own (thread CPU time)."""

    def __init__(self, n: int, timeout: float = 600.0, on_release: Callable[[str], None] | None = None) -> None:
        self._barrier = threading.Barrier(n, timeout=timeout)
        self._on_release = on_release  # e.g. to read the server's CPU clock at each release
        self.released: dict[str, float] = {}  # message label -> wall clock (time.time) when all were ready

    def sync(self, label: str) -> None:
        if self._barrier.wait() == 0 and label not in self.released:
            if self._on_release is not None:
                self._on_release(label)
            self.released[label] = time.time()


@dataclass
class SimResult:
    device_id: str
    status: str  # uploaded | dropped | failed | no_task
    detail: str = ""
    quantized: np.ndarray | None = None  # the integers this device's masked vector / ciphertexts hold
    masked: np.ndarray | None = None  # what it sent (SecAgg), for the storage test
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    bytes: int = 0


class SimDevice:
    def __init__(self, server_url: str, *, seed: int = 0, transport: httpx.BaseTransport | None = None,
                 client: httpx.Client | None = None, paillier_mode: str = "standard",
                 trusted_keyholder_keys: Sequence[str] | None = None, ca_file: str | None = None,
                 pin_sha256: str | None = None) -> None:
        self.api = ServerAPI(server_url, transport=transport, client=client,
                             timeout=httpx.Timeout(90.0, connect=10.0), ca_file=ca_file, pin_sha256=pin_sha256)
        self.api.register()
        self.rng = np.random.default_rng(seed)
        self.secagg = SecAggHook(rng=self.rng)
        self.paillier = PaillierHook(trusted_keyholder_keys, mode=paillier_mode, rng=self.rng)
        self.task: Task | None = None

    @property
    def device_id(self) -> str:
        return self.api.device_id or ""

    def checkin(self) -> Task | None:
        ci = self.api.check_in(ELIGIBLE, None)
        self.task = ci.task
        return ci.task

    def run(self, delta: np.ndarray, *, drop_after: str | None = None, corrupt_masked: bool = False,
            config: ModelConfig | None = None, num_examples: int = 10,
            before_finish: Callable[[], None] | None = None,
            before_upload: Callable[[], None] | None = None, lockstep: Lockstep | None = None) -> SimResult:
        """The device side of the task's protocol on `delta` (flat float32)."""
        t0 = time.perf_counter()
        task = self.task
        if task is None:
            return SimResult(self.device_id, "no_task")
        params = task.secure_aggregation or {}
        meta = {"num_examples": num_examples, "metrics": {"loss": 1.0}}
        try:
            if params.get("protocol") == "secagg":
                return self._run_secagg(task, delta, meta, drop_after, corrupt_masked, t0, before_finish, before_upload,
                                        lockstep)
            if params.get("protocol") == "paillier":
                answer = self.paillier.submit(self.api, task, [delta], meta)
                return SimResult(self.device_id, "uploaded", quantized=self.paillier.last["quantized"],
                                 timings=answer["timings"], seconds=time.perf_counter() - t0, bytes=answer["bytes"])
            assert config is not None, "plain rounds need the model config to encode a wire delta"
            tensors, offset = [], 0
            for _, shape in config.weight_specs():
                size = int(np.prod(shape))
                tensors.append(delta[offset: offset + size].reshape(shape))
                offset += size
            c0 = time.thread_time()
            blob = wire.encode(tensors, config, kind="delta", model_version=task.base_version, metadata=meta)
            encode_s = time.thread_time() - c0
            if lockstep is not None:
                lockstep.sync("update")
            self.api.upload_update(task.round_id, blob, url=task.upload_url)
            return SimResult(self.device_id, "uploaded", timings={"encode_s": encode_s},
                             seconds=time.perf_counter() - t0, bytes=len(blob))
        except SecAggError as exc:
            return SimResult(self.device_id, "failed", f"{exc.reason}: {exc.detail}", seconds=time.perf_counter() - t0)
        except ServerError as exc:
            return SimResult(self.device_id, "failed", f"{exc.reason}: {exc.detail}", seconds=time.perf_counter() - t0)

    def _run_secagg(self, task: Task, delta: np.ndarray, meta: dict[str, Any], drop_after: str | None,
                    corrupt: bool, t0: float, before_finish: Callable[[], None] | None = None,
                    before_upload: Callable[[], None] | None = None, lockstep: Lockstep | None = None) -> SimResult:
        hook = self.secagg
        hook.register(self.api)
        from device_app.secagg import SecAggSession

        s = SecAggSession(task.secure_aggregation, self.device_id, hook.identity, hook.pins, 2, task.deadline)
        if lockstep is not None:
            s.before_post = lambda url: lockstep.sync(url.rstrip("/").rsplit("/", 1)[-1])
        s.advertise(self.api)
        if drop_after == "advertise":
            return SimResult(self.device_id, "dropped", "after advertising keys")
        s.receive_keys(s.wait_stage(self.api, s.urls["advertise_keys"]))
        s.share(self.api, wait_next=True)  # no training here: nothing to do until every device shared
        if drop_after == "share":
            return SimResult(self.device_id, "dropped", "after sharing keys")
        s.receive_shares(s.wait_stage(self.api, s.urls["share_keys"]))
        blob = s.masked_blob(delta, meta, self.rng)
        header, y, _ = sm.decode_masked(blob, bits=s.q.bits, dim=delta.size)
        masked = np.array(y)
        if corrupt:  # a device that sends a garbage masked vector (validly framed): 1% of the words random
            garbage = np.array(y)
            k = max(1, garbage.size // 100)
            garbage[:k] = self.rng.integers(0, np.iinfo(garbage.dtype).max, size=k, dtype=garbage.dtype)
            blob = sm.encode_masked(garbage, round_id=s.rid, session=s.session, device_id=self.device_id,
                                    bits=s.q.bits, metadata=meta)
        if before_upload is not None:
            before_upload()
        for attempt in range(100):  # a server restarting: the same bytes again until it answers
            try:
                s.post_masked(self.api, blob, announce=attempt == 0)
                break
            except Offline:
                time.sleep(0.2)
        if drop_after == "upload":
            return SimResult(self.device_id, "dropped", "after uploading", quantized=s.quantized, masked=masked)
        if before_finish is not None:
            before_finish()
        s.finish(self.api)
        return SimResult(self.device_id, "uploaded", quantized=s.quantized, masked=masked, timings=dict(s.timings),
                         seconds=time.perf_counter() - t0, bytes=len(blob))

    def close(self) -> None:
        self.api.close()


def run_round(devices: Sequence[SimDevice], deltas: Sequence[np.ndarray], *, drop_after: dict[int, str] | None = None,
              corrupt: Sequence[int] = (), config: ModelConfig | None = None, timeout: float = 600.0,
              before_finish: Callable[[], None] | None = None,
              before_upload: dict[int, Callable[[], None]] | None = None,
              lockstep: Lockstep | None = None) -> list[SimResult]:
    """Check every device in (in order), then run them all at once, one thread each (in `lockstep`,
    if given: no device may drop out then)."""
    drop_after = drop_after or {}
    for d in devices:
        if d.checkin() is None:
            raise RuntimeError(f"device {d.device_id} got no task")
    results: list[SimResult | None] = [None] * len(devices)

    def work(i: int) -> None:
        try:
            results[i] = devices[i].run(deltas[i], drop_after=drop_after.get(i), corrupt_masked=i in corrupt,
                                        config=config, before_finish=before_finish,
                                        before_upload=(before_upload or {}).get(i), lockstep=lockstep)
        except Exception as exc:  # noqa: BLE001 - reported per device
            results[i] = SimResult(devices[i].device_id, "failed", f"{exc.__class__.__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return [r if r is not None else SimResult(devices[i].device_id, "failed", "timeout")
            for i, r in enumerate(results)]


__all__ = ["Lockstep", "SimDevice", "SimResult", "TamperTransport", "run_round", "ELIGIBLE"]
