"""The Strategy interface: what a training round asks devices for and how it turns uploads into one delta.

In the spirit of Flower's Strategy, a strategy owns the round's algorithm; the round manager
(server/rounds.py) owns locking, persistence and scheduling and calls these hooks:

    configure_train(rnd, ctx) -> task dict       what an admitted device is told to do
    admission_open / may_reanswer / runs_own_deadlines    selection rules of the round's protocol
    admission_refusal(rnd, device_id)            a device that may not join (DP-FedAvg's draw, DP-FTRL's rule)
    decode_upload(body, rnd, ctx) -> DecodedUpdate   validate + decode one upload (raises Rejection)
    weight(params, num_examples)                 the update's weight in the mean
    new_state / rebuild / accept                 per-round running state (called under the round lock)
    finalize(state, rows, rnd, ctx) -> delta     the round's aggregate (flat float64)
    ledger_event(params, n, population)          what the round adds to the privacy ledger
    assumptions(params)                          what that privacy guarantee assumes, in words

Template methods (configure_train, decode_upload, finalize) call the hooks `upload_bound`,
`mechanism`, `decode`, `aggregate` through `self`, so a wrapper (server/strategy/dp.py) that overrides
a hook changes the behaviour of the whole round without the wrapped strategy knowing.
"""
from __future__ import annotations

import abc
import dataclasses
import math
import sys
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from models import blas, dp, wire
from models.config import ModelConfig
from server.errors import Rejection
from server.round import FtrlRule, Round, TrainParams

MAX_METRICS = 32


@dataclasses.dataclass
class DecodedUpdate:
    tensors: list[np.ndarray]  # float32, config.weight_specs() order
    num_examples: int
    metrics: dict[str, float]
    norm: float
    dtype: str
    payload_sha256: str  # the wire trailer: SHA-256 over the blob, verified by wire.decode


@dataclasses.dataclass
class RoundContext:
    model_config: ModelConfig
    dim: int
    max_upload_bytes: int
    open_update: Callable[[str], np.ndarray]  # relative file -> flat float32 memory map


@dataclasses.dataclass(frozen=True)
class UploadBound:
    """What a device does to its delta before uploading: clip to `clip`, then add N(0, noise_stddev^2)."""

    clip: float
    noise_stddev: float
    sigmas: float  # how far past E||noise|| an upload's norm may go before norm_exceeded

    def tolerance(self, dim: int) -> float:
        return dp.norm_tolerance(self.clip, self.noise_stddev, dim, self.sigmas)


@dataclasses.dataclass
class Aggregate:
    """A round's aggregate before the division: the mean is total / divisor (noise goes on the total)."""

    total: np.ndarray  # float64
    divisor: float

    def mean(self) -> np.ndarray:
        return self.total / self.divisor


@dataclasses.dataclass(frozen=True)
class LedgerEvent:
    """One Gaussian-mechanism release for the privacy accountant (models.dp.PrivacyLedger)."""

    noise_multiplier: float
    sampling_prob: float  # Poisson sampling probability the accountant may assume (1: no amplification)
    ftrl: FtrlRule | None = None  # DP-FTRL: a leaf of the noise tree, accounted under this participation rule
    sensitivity: float = 1.0  # the release's L2 sensitivity in units of the clip (2: one device may displace another)

    @property
    def accounted_multiplier(self) -> float:
        """The Gaussian's noise multiplier relative to its sensitivity: what the accountant composes."""
        return self.noise_multiplier / self.sensitivity


class SecureProtocol(Protocol):
    """A secure-aggregation service (server/secagg/, server/paillier/) as a strategy sees it."""

    runs_own_deadlines: bool

    def task_params(self, rnd: Round, bound: UploadBound) -> dict[str, Any]: ...
    def result_sum(self, rid: int) -> np.ndarray: ...
    def admission_open(self, rnd: Round) -> bool: ...
    def may_reanswer(self, rnd: Round, device_id: str) -> bool: ...
    def summary(self, rid: int) -> dict[str, Any] | None: ...


def quantization_error_bound(tensors: Sequence[np.ndarray], dtype: str, norm: float) -> float:
    """Upper bound on ||decoded - original|| introduced by the wire dtype's rounding.

    int8/int16: symmetric per-tensor scale = max|x| / qmax, rounding error <= scale / 2 per value.
    float16: relative error <= 2^-11 per value (plus 2^-25 absolute for subnormals); we allow 2^-10.
    """
    if dtype == "float32":
        return 0.0
    if dtype == "float16":
        dim = sum(t.size for t in tensors)
        return norm * 2.0 ** -10 + math.sqrt(dim) * 2.0 ** -25
    qmax = wire.INT_QMAX[dtype]
    total = 0.0
    for t in tensors:
        if t.size:
            half_step = float(np.max(np.abs(t))) / qmax / 2.0
            total += t.size * half_step * half_step
    return math.sqrt(total) * 1.001


def parse_metadata(meta: dict[str, Any], max_examples: int) -> tuple[int, dict[str, float]]:
    """(num_examples, metrics) of an upload's metadata; shared by every upload format."""
    if not isinstance(meta, dict):
        raise Rejection("bad_metadata", f"metadata must be a JSON object, got {type(meta).__name__}")
    n = meta.get("num_examples")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_examples:
        raise Rejection("bad_metadata", f"metadata num_examples must be an int in [1, {max_examples}], got {n!r}")
    metrics = meta.get("metrics", {})
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise Rejection("bad_metadata", f"metadata metrics must be an object of at most {MAX_METRICS} numbers")
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or len(key) > 64 or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (isinstance(value, int) and abs(value) > sys.float_info.max) or not math.isfinite(value):
            shown = value if not isinstance(value, int) or abs(value) < 10 ** 30 else "a huge integer"
            raise Rejection("bad_metadata", f"metric {str(key)[:64]!r} must be a finite number, got {shown!r}")
        clean[key] = float(value)
    return n, clean


def check_norm(update: DecodedUpdate, bound: UploadBound, dim: int) -> None:
    """Refuse an update whose norm exceeds the bound (clip + noise tolerance + the wire's rounding)."""
    limit = bound.tolerance(dim) + quantization_error_bound(update.tensors, update.dtype, update.norm)
    norm = update.norm  # from the decoder's finiteness pass (BLAS dsdot, relative error < 1e-7)
    if abs(norm - limit) <= blas.DSDOT_REL_ERROR * limit:  # too close to call: exact float64 norm
        norm = update.norm = dp.l2_norm(update.tensors)
    if norm > limit:
        raise Rejection("norm_exceeded",
                        f"update L2 norm {norm:.6g} exceeds the round's bound {limit:.6g} "
                        f"(clip {bound.clip:g}, noise stddev {bound.noise_stddev:.4g})")


class Strategy(abc.ABC):
    name = "base"
    mechanism = "none"  # the DP mechanism devices are told about (a DP wrapper names its own)
    releases_sum = False  # whether the aggregate is a sum over devices (what central noise is calibrated to)

    # ------------------------------------------------------------------ selection and the task
    def configure_train(self, rnd: Round, ctx: RoundContext) -> dict[str, Any]:
        """The train task an admitted device receives (server/__init__.py documents its fields)."""
        p = rnd.train
        bound = self.upload_bound(p)
        return {"type": "train", "round_id": rnd.id, "deadline": rnd.deadline,
                "config_hash": ctx.model_config.config_hash(),
                "base_version": rnd.base_version, "model_url": f"/v1/models/{rnd.base_version}",
                "epochs": p.epochs, "batch_size": p.batch_size, "learning_rate": p.learning_rate,
                "dp_mode": self.mechanism, "clip_norm": p.clip_norm, "noise_multiplier": p.noise_multiplier,
                "noise_stddev": bound.noise_stddev if bound is not None else 0.0,
                "upload_url": f"/v1/rounds/{rnd.id}/update", "upload_dtypes": list(p.upload_dtypes),
                "max_upload_bytes": ctx.max_upload_bytes, "max_examples": p.max_examples_per_update,
                "secure_aggregation": self.protocol_task(rnd, bound),
                **({"clip_estimate": p.clip_estimate} if p.clip_estimate is not None else {})}

    def open_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters a new training round is frozen with (config.round_params()); a wrapper fills in
        what only it knows at the round's creation (DP-FTRL's adaptive clip in use and quantile estimate)."""
        return params

    def upload_bound(self, params: TrainParams) -> UploadBound | None:
        """Clipping without noise when the round clips at all."""
        return UploadBound(params.clip_norm, 0.0, params.norm_sigmas) if params.clip_norm > 0 else None

    def protocol_task(self, rnd: Round, bound: UploadBound | None) -> dict[str, Any] | None:
        return None

    def admission_open(self, rnd: Round) -> bool:
        return True

    def admission_refusal(self, rnd: Round, device_id: str) -> tuple[str, float] | None:
        """(retry reason, seconds until the device may come back) when this device may not join the round."""
        return None

    def may_reanswer(self, rnd: Round, device_id: str) -> bool:
        """Whether an admitted device checking in again gets its task again."""
        return True

    def runs_own_deadlines(self, rnd: Round) -> bool:
        return False

    def protocol_summary(self, rnd: Round) -> dict[str, Any] | None:
        return None

    # ------------------------------------------------------------------ uploads
    def decode_upload(self, body: bytes, rnd: Round, ctx: RoundContext) -> DecodedUpdate:
        update = self.decode(body, rnd, ctx)
        bound = self.upload_bound(rnd.train)
        if bound is not None:
            check_norm(update, bound, ctx.dim)
        return update

    def decode(self, body: bytes, rnd: Round, ctx: RoundContext) -> DecodedUpdate:
        """Wire-format delta: framing, checksum, config, shapes, dtype, finiteness, base version, metadata."""
        p = rnd.train
        try:
            payload = wire.decode(body, ctx.model_config, expected_kind="delta", max_bytes=ctx.max_upload_bytes)
        except wire.WireError as exc:
            raise Rejection(exc.reason, str(exc)) from None
        if payload.model_version != rnd.base_version:
            raise Rejection("stale_base_version",
                            f"delta is against model version {payload.model_version}; round {rnd.id} trains "
                            f"version {rnd.base_version}")
        if payload.dtype not in p.upload_dtypes:
            raise Rejection("unsupported_dtype",
                            f"{payload.dtype} uploads are not accepted; use one of {list(p.upload_dtypes)}")
        num_examples, metrics = parse_metadata(payload.metadata, p.max_examples_per_update)
        return DecodedUpdate(
            tensors=payload.tensors, num_examples=num_examples, metrics=metrics, norm=payload.norm,
            dtype=payload.dtype, payload_sha256=bytes(body[-wire.CHECKSUM_BYTES:]).hex(),
        )

    def weight(self, params: TrainParams, num_examples: int) -> float:
        return 1.0

    def new_state(self, dim: int) -> Any:
        return None

    def rebuild(self, rows: list[dict[str, Any]], ctx: RoundContext) -> Any:
        """State equal to having accepted `rows` (in order); for strategies that keep state."""
        return None

    def accept(self, state: Any, update: DecodedUpdate, weight: float) -> None:
        pass

    # ------------------------------------------------------------------ aggregation
    def finalize(self, state: Any, rows: list[dict[str, Any]], rnd: Round, ctx: RoundContext) -> np.ndarray:
        """The round's aggregated delta from its accepted updates."""
        return self.aggregate(state, rows, rnd, ctx).mean()

    @abc.abstractmethod
    def aggregate(self, state: Any, rows: list[dict[str, Any]], rnd: Round, ctx: RoundContext) -> Aggregate:
        """The round's aggregate as total / divisor."""

    def ledger_event(self, params: TrainParams, n_aggregated: int, population: int) -> LedgerEvent | None:
        """What releasing this round's aggregate costs in privacy (None: not a DP release)."""
        return None

    def assumptions(self, params: TrainParams) -> list[str]:
        """What the round's privacy guarantee assumes, as short clauses (models.dp.guarantee_sentence)."""
        return []

    def commit_release(self, round_id: int, device_ids: list[str]) -> Callable[[], None] | None:
        """Inside the round's closing transaction, after `finalize`: persist what releasing the aggregate
        changed (DP-FTRL's noise tree, participations). Returns a cleanup to run once committed."""
        return None


__all__ = ["Aggregate", "DecodedUpdate", "LedgerEvent", "RoundContext", "SecureProtocol", "Strategy", "UploadBound",
           "check_norm", "parse_metadata", "quantization_error_bound"]
