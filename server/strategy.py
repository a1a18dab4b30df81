"""Aggregation strategies: how one round turns uploads into one aggregated delta.

The round state machine (server/rounds.py) owns admission, deadlines, durability and versions;
a strategy owns only the upload's meaning and the math, in the spirit of Flower's Strategy:

    decode_upload(body, round, ctx) -> DecodedUpdate   validate + decode one upload (raises Rejection)
    new_state(dim)                                      per-round in-memory state (may be None)
    accept(state, update, weight)                       fold one accepted update in (called under the round lock)
    finalize(state, rows, ctx) -> flat float64 delta    the round's aggregate

Strategies here: StreamingMean (uniform for DP rounds, example-weighted otherwise, optional central
noise on the sum) and Robust (coordinate-wise trimmed mean / median over the stored updates).
Secure aggregation plugs in as another strategy: its decode_upload takes masked integer vectors and
its finalize unmasks the modular sum; nothing in rounds.py has to change.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from models import blas, dp, wire
from models.config import ModelConfig
from server.aggregation import MeanAccumulator, coordinate_median, trimmed_mean
from server.errors import Rejection

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
    secure_sum: Callable[[int], np.ndarray] | None = None  # round id -> float64 sum a privacy protocol released


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


def _parse_metadata(meta: dict[str, Any], max_examples: int) -> tuple[int, dict[str, float]]:
    n = meta.get("num_examples")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_examples:
        raise Rejection("bad_metadata", f"metadata num_examples must be an int in [1, {max_examples}], got {n!r}")
    metrics = meta.get("metrics", {})
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise Rejection("bad_metadata", f"metadata metrics must be an object of at most {MAX_METRICS} numbers")
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or len(key) > 64 or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise Rejection("bad_metadata", f"metric {key!r} must be a finite number, got {value!r}")
        clean[key] = float(value)
    return n, clean


class Strategy(abc.ABC):
    name = "base"

    def decode_upload(self, body: bytes, rnd: dict[str, Any], ctx: RoundContext) -> DecodedUpdate:
        """Wire-format delta: framing, checksum, config, shapes, dtype, finiteness, base version, norm."""
        params = rnd["params"]
        try:
            payload = wire.decode(body, ctx.model_config, expected_kind="delta", max_bytes=ctx.max_upload_bytes)
        except wire.WireError as exc:
            raise Rejection(exc.reason, str(exc)) from None
        if payload.model_version != rnd["base_version"]:
            raise Rejection("stale_base_version",
                            f"delta is against model version {payload.model_version}; round {rnd['id']} trains "
                            f"version {rnd['base_version']}")
        if payload.dtype not in params["upload_dtypes"]:
            raise Rejection("unsupported_dtype",
                            f"{payload.dtype} uploads are not accepted; use one of {params['upload_dtypes']}")
        num_examples, metrics = _parse_metadata(payload.metadata, params["max_examples_per_update"])
        norm = payload.norm  # from the decoder's finiteness pass (BLAS dsdot, relative error < 1e-7)
        clip = params["clip_norm"]
        if clip > 0:
            stddev = dp.device_noise_stddev(params["dp_mode"], params["noise_multiplier"], clip, params["min_count"])
            bound = dp.norm_tolerance(clip, stddev, ctx.dim, params["norm_sigmas"])
            bound += quantization_error_bound(payload.tensors, payload.dtype, norm)
            if abs(norm - bound) <= blas.DSDOT_REL_ERROR * bound:  # too close to call: exact float64 norm
                norm = dp.l2_norm(payload.tensors)
            if norm > bound:
                raise Rejection("norm_exceeded",
                                f"update L2 norm {norm:.6g} exceeds the round's bound {bound:.6g} "
                                f"(clip {clip:g}, noise stddev {stddev:.4g})")
        return DecodedUpdate(
            tensors=payload.tensors, num_examples=num_examples, metrics=metrics, norm=norm,
            dtype=payload.dtype, payload_sha256=bytes(body[-wire.CHECKSUM_BYTES:]).hex(),
        )

    def weight(self, rnd: dict[str, Any], update_num_examples: int) -> float:
        return 1.0

    def new_state(self, dim: int) -> Any:
        return None

    def rebuild(self, rows: list[dict[str, Any]], ctx: RoundContext) -> Any:
        """State equal to having accepted `rows` (in order); for strategies that keep state."""
        return None

    def accept(self, state: Any, update: DecodedUpdate, weight: float) -> None:
        pass

    @abc.abstractmethod
    def finalize(self, state: Any, rows: list[dict[str, Any]], rnd: dict[str, Any], ctx: RoundContext) -> np.ndarray:
        """The round's aggregated delta from its accepted updates."""


class StreamingMean(Strategy):
    """Mean of the accepted deltas, accumulated as they arrive.

    Uniform weights for DP rounds (each device's sensitivity is clip_norm regardless of its data),
    example-weighted otherwise. Central DP adds N(0, (z * clip)^2) to the sum before dividing, drawn
    from a generator seeded by the round's secret random seed (kept in the database, never served), so
    a re-run after a crash draws the same noise instead of releasing a second noisy sum.
    """

    name = "mean"

    def weight(self, rnd: dict[str, Any], num_examples: int) -> float:
        return 1.0 if rnd["params"]["dp_mode"] != "none" else float(num_examples)

    def new_state(self, dim: int) -> MeanAccumulator:
        return MeanAccumulator(dim)

    def accept(self, state: MeanAccumulator, update: DecodedUpdate, weight: float) -> None:
        state.add(update.tensors, weight)

    def rebuild(self, rows: list[dict[str, Any]], ctx: RoundContext) -> MeanAccumulator:
        """Replay stored updates in acceptance order (bit-identical to the live sum)."""
        acc = MeanAccumulator(ctx.dim)
        for row in rows:
            acc.add(ctx.open_update(row["file"]), row["weight"])
        return acc

    def finalize(self, state, rows, rnd, ctx) -> np.ndarray:
        if state is None or state.count != len(rows):
            state = self.rebuild(rows, ctx)
        params = rnd["params"]
        noise = dp.central_noise_stddev(params["dp_mode"], params["noise_multiplier"], params["clip_norm"])
        if noise > 0:
            rng = np.random.default_rng([int(rnd["seed"]), int(rnd["id"])])
            total = state.sum + rng.standard_normal(ctx.dim) * noise
            return total / state.total_weight
        return state.mean()


class Robust(Strategy):
    """Coordinate-wise trimmed mean or median over the memory-mapped stored updates (uniform weights)."""

    def __init__(self, method: str, trim_fraction: float = 0.1) -> None:
        if method not in ("trimmed_mean", "median"):
            raise ValueError(f"unknown robust method {method!r}")
        self.name = method
        self.trim_fraction = trim_fraction

    def finalize(self, state, rows, rnd, ctx) -> np.ndarray:
        updates = [ctx.open_update(row["file"]) for row in rows]
        if self.name == "median":
            return coordinate_median(updates)
        return trimmed_mean(updates, rnd["params"]["trim_fraction"])


class SecureSum(StreamingMean):
    """Secure aggregation (SecAgg or Paillier, server/privacy.py): the server never holds individual
    updates, only the sum the protocol releases; the mean is uniform (sum / contributors), plus central
    noise in dp_mode central. Uploads arrive through the protocol's own endpoints, not decode_upload."""

    def __init__(self, protocol: str) -> None:
        self.name = f"mean+{protocol}"

    def weight(self, rnd: dict[str, Any], num_examples: int) -> float:
        return 1.0

    def decode_upload(self, body, rnd, ctx) -> DecodedUpdate:
        raise Rejection("wrong_protocol", f"round {rnd['id']} uses secure aggregation "
                                          f"({rnd['params'].get('secure_aggregation')}): upload through its endpoints")

    def new_state(self, dim: int) -> None:
        return None

    def finalize(self, state, rows, rnd, ctx) -> np.ndarray:
        if ctx.secure_sum is None:
            raise RuntimeError("no secure-aggregation service")
        total = np.asarray(ctx.secure_sum(int(rnd["id"])), dtype=np.float64)
        params = rnd["params"]
        noise = dp.central_noise_stddev(params["dp_mode"], params["noise_multiplier"], params["clip_norm"])
        if noise > 0:
            rng = np.random.default_rng([int(rnd["seed"]), int(rnd["id"])])
            total = total + rng.standard_normal(ctx.dim) * noise
        return total / max(1, len(rows))


def strategy_for(params: dict[str, Any]) -> Strategy:
    protocol = params.get("secure_aggregation", "none") or "none"
    if protocol != "none":
        return SecureSum(protocol)
    name = params["aggregator"]
    if name == "mean":
        return StreamingMean()
    return Robust(name, params.get("trim_fraction", 0.1))


__all__ = ["DecodedUpdate", "RoundContext", "Strategy", "StreamingMean", "Robust", "SecureSum", "strategy_for",
           "quantization_error_bound"]
