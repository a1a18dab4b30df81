"""How a finished client update leaves the device. Two implementations of one Upload protocol:

WireUpload       the privatized delta in the clear, as a wire-format delta (models/wire.py). Offline
                 (or a 5xx), it waits in pending/ until the round's deadline (flush_pending retries).
ProtectedUpload  a secure-aggregation hook (device_app/secagg.py: SecAgg masks, Paillier encrypts)
                 around the upload: its stages before training, then it uploads itself. Synchronous
                 with the round, so nothing waits in pending/ when the network fails.

Every attempt is written to the sent log; an accepted update is counted in state.json.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from device_app.connection import ServerConnection
from device_app.device_state import DeviceState
from device_app.http_client import FINAL_UPLOAD_REASONS, Offline, ServerError
from device_app.outcome import Outcome
from device_app.pending import PendingUploads
from device_app.progress import ProgressReporter
from device_app.secagg import SecAggError, SecureAggregation, choose
from device_app.sent_log import SentLog
from models import wire

if TYPE_CHECKING:  # client_update imports TensorFlow; the types only are needed here
    from device_app.client_update import ClientOutput

log = logging.getLogger("device_app.client")


@dataclass
class UploadContext:
    """What every way of uploading shares."""

    link: ServerConnection
    sent_log: SentLog
    pending: PendingUploads
    state: DeviceState
    progress: ProgressReporter


class Upload(Protocol):
    name: str | None  # the secure-aggregation protocol; None in the clear

    def begin(self, task: Any) -> Outcome | None:
        """Before local training; an Outcome when the round cannot go on for this device."""
        ...

    def abort(self, task: Any) -> None:
        """The device left the round after begin() without sending."""
        ...

    def send(self, task: Any, output: "ClientOutput") -> Outcome:
        ...


def upload_for(task: Any, hooks: Sequence[SecureAggregation], ctx: UploadContext,
               preferred_dtype: str) -> Upload | None:
    """The upload the task asks for; None when it asks for secure aggregation no hook can do."""
    hook = choose(hooks, task.secure_aggregation)
    if hook is not None:
        return ProtectedUpload(ctx, hook)
    if task.secure_aggregation:
        return None
    return WireUpload(ctx, preferred_dtype)


class WireUpload:
    name = None

    def __init__(self, ctx: UploadContext, preferred_dtype: str) -> None:
        self.ctx = ctx
        self.preferred_dtype = preferred_dtype

    def begin(self, task: Any) -> Outcome | None:
        return None  # nothing to agree on before training

    def abort(self, task: Any) -> None:
        return None  # nothing was sent

    def send(self, task: Any, output: "ClientOutput") -> Outcome:
        rid = task.round_id
        dtype = self.preferred_dtype if self.preferred_dtype in task.upload_dtypes else task.upload_dtypes[0]
        blob = wire.encode(output.delta, output.config, kind="delta", model_version=task.base_version, dtype=dtype,
                           metadata=output.metadata())
        entry = {
            "type": "update",
            "round_id": rid,
            "base_version": task.base_version,
            "url": task.upload_url,
            "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "dtype": dtype,
            "num_examples": output.num_examples,
            "metrics": output.metrics,
            "dp_mode": task.dp_mode,
            "secure_aggregation": None,
            "deadline": task.deadline,
            **output.privacy,
            "training": output.training,
        }
        self.ctx.progress.report(0.95, f"round {rid}: uploading {len(blob) / 1e6:.1f} MB")
        return deliver(self.ctx, rid, blob, entry, task.upload_url)


class ProtectedUpload:
    def __init__(self, ctx: UploadContext, hook: SecureAggregation) -> None:
        self.ctx = ctx
        self.hook = hook
        self.name = hook.name

    def begin(self, task: Any) -> Outcome | None:
        rid = task.round_id
        self.ctx.progress.report(0.07, f"round {rid}: secure aggregation key exchange")
        try:
            self.ctx.link.call(lambda api: self.hook.begin(api, task))
        except SecAggError as exc:
            self.ctx.sent_log.append({"type": "secagg", "round_id": rid, "status": "failed", "error": exc.reason})
            return Outcome("secagg_failed", f"{exc.reason}: {exc.detail}", rid)
        return None

    def abort(self, task: Any) -> None:
        self.hook.abort(self.ctx.link.api, task)

    def send(self, task: Any, output: "ClientOutput") -> Outcome:
        rid, ctx, name = task.round_id, self.ctx, self.hook.name
        entry = {"type": "update", "round_id": rid, "base_version": task.base_version, "dp_mode": task.dp_mode,
                 "secure_aggregation": name, "num_examples": output.num_examples, "metrics": output.metrics,
                 "deadline": task.deadline, **output.privacy, "training": output.training}
        ctx.progress.report(0.95, f"round {rid}: {name} upload")
        try:
            answer = ctx.link.call(lambda api: self.hook.submit(api, task, output.delta, output.metadata()))
        except SecAggError as exc:
            ctx.sent_log.append({**entry, "status": "failed", "error": exc.reason})
            return Outcome("secagg_failed", f"{exc.reason}: {exc.detail}", rid)
        except Offline as exc:
            ctx.link.offline(exc)
            ctx.sent_log.append({**entry, "status": "dropped", "error": "offline"})
            return Outcome("dropped", "offline during a secure-aggregation round", rid)
        ctx.sent_log.append({**entry, "status": "accepted", "bytes": answer.get("bytes"),
                             "sha256": answer.get("payload_sha256"), "timings": answer.get("timings")})
        ctx.state.record_contribution({"round_id": rid, "base_version": task.base_version, "at": time.time(),
                                       "num_examples": output.num_examples, "clipped": entry["clipped"],
                                       "secure_aggregation": name})
        return Outcome("uploaded", f"{answer.get('bytes')} bytes via {name}", rid, info=answer)


def deliver(ctx: UploadContext, rid: int, blob: bytes, entry: dict[str, Any], url: str | None) -> Outcome:
    """Upload wire bytes; offline or a server error (5xx), they wait in pending/ for the next try."""
    try:
        answer = ctx.link.call(lambda api: api.upload_update(rid, blob, url=url))
    except Offline as exc:
        ctx.link.offline(exc)
        ctx.pending.save(rid, blob, entry)
        ctx.sent_log.append({**entry, "status": "pending"})
        return Outcome("pending", "offline: the update waits for the network until the round's deadline", rid)
    except ServerError as exc:
        ctx.link.online()
        status = "dropped" if exc.reason in FINAL_UPLOAD_REASONS else "rejected"
        ctx.sent_log.append({**entry, "status": status, "error": exc.reason})
        if status == "rejected" and exc.status >= 500:
            ctx.pending.save(rid, blob, entry)
            return Outcome("pending", f"server error {exc.reason}; will retry", rid)
        return Outcome(status, f"{exc.reason}: {exc.detail}", rid)
    ctx.sent_log.append({**entry, "status": "accepted"})
    ctx.state.record_contribution({"round_id": rid, "base_version": entry["base_version"], "at": time.time(),
                                   "num_examples": entry["num_examples"], "clipped": entry["clipped"]})
    return Outcome("uploaded", f"{entry['bytes']} bytes, {entry['num_examples']} examples", rid, info=answer)


def flush_pending(ctx: UploadContext) -> None:
    """Send what waits in pending/ (dropping what missed its round's deadline); Offline if still offline."""
    for rid in ctx.pending.rounds():
        entry, blob = ctx.pending.load(rid)
        deadline = entry.get("deadline")
        if blob is None or (deadline is not None and time.time() > float(deadline)):
            ctx.pending.drop(rid)
            ctx.sent_log.append({**entry, "status": "dropped", "error": "deadline_passed", "bytes_sent": 0})
            continue
        ctx.pending.drop(rid)
        outcome = deliver(ctx, rid, blob, entry, entry.get("url"))
        log.info("pending upload of round %s: %s", rid, outcome)
        if outcome.status == "pending":
            raise Offline("still offline")
