"""Binary wire format for model weights and deltas exchanged by server and devices (numpy only).

Layout (little-endian throughout):

    magic      4 bytes   b"FKW1"   identifies the file family
    version    u16       FORMAT_VERSION; readers refuse versions they do not know
    header_len u32       length of the header that follows
    header     UTF-8 JSON object (space-padded so the payload starts 8-byte aligned)
    payload    the tensors, in config.weight_specs() order, C order, packed back to back
    checksum   32 bytes  SHA-256 of everything before it

Header fields: format_version, kind ("weights" | "delta"), config_hash, model_version,
dtype ("float32" | "float16" | "int8" | "int16"), tensors [{name, shape, scale}],
payload_bytes, metadata (small JSON object). `scale` is present for int dtypes only:
a symmetric per-tensor scale, value = q * scale.

Every decode failure raises a subclass of WireError whose `.reason` names it, so the
server can answer a device with a machine-readable rejection.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from typing import Any, Mapping, Sequence, Union

import numpy as np

from models import blas
from models.config import ModelConfig

MAGIC = b"FKW1"
FORMAT_VERSION = 1
KINDS = ("weights", "delta")
DTYPES = ("float32", "float16", "int8", "int16")
INT_QMAX = {"int8": 127, "int16": 32767}  # symmetric: -qmax..qmax, the most negative code is unused
MAX_HEADER_BYTES = 1 << 20  # headers are a few hundred bytes; anything near this is garbage or abuse
CHECKSUM_BYTES = 32
PAYLOAD_ALIGNMENT = 8

_PREFIX = struct.Struct("<4sHI")  # magic, format version, header length
_NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1"), "int16": np.dtype("<i2")}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT64_MAX = float(np.finfo(np.float64).max)
_REQUIRED_FIELDS = ("format_version", "kind", "config_hash", "model_version", "dtype", "tensors", "payload_bytes")

BytesLike = Union[bytes, bytearray, memoryview]
TensorsArg = Union[Sequence[Any], Mapping[str, Any]]


# --------------------------------------------------------------------------- errors


class WireError(ValueError):
    """A blob was rejected; `.reason` is a stable machine-readable tag."""

    reason = "wire_error"


class TruncatedError(WireError):
    reason = "truncated"


class BadMagicError(WireError):
    reason = "bad_magic"


class UnsupportedFormatVersionError(WireError):
    reason = "unsupported_format_version"


class CorruptHeaderError(WireError):
    reason = "corrupt_header"


class ChecksumMismatchError(WireError):
    reason = "checksum_mismatch"


class ConfigMismatchError(WireError):
    reason = "config_mismatch"


class ShapeMismatchError(WireError):
    reason = "shape_mismatch"


class NonFiniteError(WireError):
    reason = "non_finite"


class UnsupportedDtypeError(WireError):
    reason = "unsupported_dtype"


class WrongKindError(WireError):
    reason = "wrong_kind"


class TooLargeError(WireError):
    reason = "too_large"


class BadMetadataError(WireError):
    """The header's metadata holds a number no JSON reader can keep (an integer beyond float64)."""

    reason = "bad_metadata"


# --------------------------------------------------------------------------- payload


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing lists of arrays is ambiguous
class WirePayload:
    """A decoded blob. `tensors` are read-only float32 arrays in `names` order; `norm` is their
    global L2 norm (float64 accumulation, relative error < models.blas.DSDOT_REL_ERROR), a by-product
    of the finiteness check."""

    kind: str
    config_hash: str
    model_version: int
    dtype: str
    names: tuple[str, ...]
    tensors: list[np.ndarray]
    metadata: dict[str, Any]
    norm: float = 0.0

    def by_name(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.tensors))


# --------------------------------------------------------------------------- helpers


def _short(config_hash: str) -> str:
    return config_hash[:8]


def _check_dtype(dtype: str) -> np.dtype:
    if dtype not in _NUMPY_DTYPES:
        raise UnsupportedDtypeError(f"unsupported wire dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return _NUMPY_DTYPES[dtype]


def _num_elements(shape: Sequence[int]) -> int:
    return math.prod(shape)  # Python ints: no overflow on hostile shapes


def payload_nbytes(config: ModelConfig, dtype: str) -> int:
    """Size in bytes of the payload of a blob for `config` in `dtype`."""
    itemsize = _check_dtype(dtype).itemsize
    return sum(_num_elements(shape) for _, shape in config.weight_specs()) * itemsize


def describe_layout_mismatch(
    what: str, got: Sequence[tuple[str, tuple[int, ...]]], config: ModelConfig
) -> str | None:
    """A human sentence saying how `got` differs from config.weight_specs(), or None if it matches."""
    expected = [(name, tuple(shape)) for name, shape in config.weight_specs()]
    got = [(name, tuple(shape)) for name, shape in got]
    if got == expected:
        return None
    head = f"{what} has {len(got)} tensors, model config {_short(config.config_hash())} expects {len(expected)}"
    got_names = [n for n, _ in got]
    exp_names = [n for n, _ in expected]
    problems = []
    missing = [n for n in exp_names if n not in got_names]
    extra = [n for n in got_names if n not in exp_names]
    if missing:
        problems.append("missing " + ", ".join(repr(n) for n in missing))
    if extra:
        problems.append("unexpected " + ", ".join(repr(n) for n in extra))
    if not missing and not extra and got_names != exp_names:
        problems.append(f"tensors out of order: got {got_names}, expected {exp_names}")
    exp_shapes = dict(expected)
    for name, shape in got:
        if name in exp_shapes and exp_shapes[name] != shape:
            problems.append(f"{name!r} has shape {shape}, expected {exp_shapes[name]}")
    if len(got) == len(expected):
        head = f"{what} does not match model config {_short(config.config_hash())}"
    return head + ": " + "; ".join(problems)


def _as_named_arrays(tensors: TensorsArg, config: ModelConfig, kind: str) -> list[tuple[str, np.ndarray]]:
    """Pair the caller's tensors with spec names (a sequence is positional, a mapping by name)."""
    specs = config.weight_specs()
    if isinstance(tensors, Mapping):
        names = list(tensors.keys())
        if sorted(names) == sorted(n for n, _ in specs):
            # A mapping's order carries no meaning: put it in the config's order.
            names = [n for n, _ in specs]
        arrays = [np.asarray(tensors[n]) for n in names]
    else:
        arrays = [np.asarray(t) for t in tensors]
        names = [n for n, _ in specs[: len(arrays)]]
        names += [f"<extra tensor {i}>" for i in range(len(names), len(arrays))]
    pairs = list(zip(names, arrays))
    mismatch = describe_layout_mismatch(kind, [(n, a.shape) for n, a in pairs], config)
    if mismatch:
        raise ShapeMismatchError(mismatch)
    for name, array in pairs:
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; expected real numbers")
    return pairs


def _quantize(x: np.ndarray, qmax: int, np_dtype: np.dtype) -> tuple[np.ndarray, float]:
    """Symmetric per-tensor quantization: scale = max|x| / qmax, round to nearest."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0:
        return np.zeros(x.shape, dtype=np_dtype), 0.0  # all-zero tensor: scale 0, avoids 0/0
    scale = peak / qmax
    q = np.rint(x.astype(np.float64) / scale)
    np.clip(q, -qmax, qmax, out=q)  # float rounding can nudge the peak a hair past qmax
    return q.astype(np_dtype), scale


def _pad_header(header_bytes: bytes) -> bytes:
    """Pad with JSON-legal trailing spaces so the payload is aligned for np.frombuffer."""
    unaligned = (_PREFIX.size + len(header_bytes)) % PAYLOAD_ALIGNMENT
    return header_bytes + b" " * ((PAYLOAD_ALIGNMENT - unaligned) % PAYLOAD_ALIGNMENT)


def frame(header: Mapping[str, Any], payload: BytesLike, *, format_version: int = FORMAT_VERSION) -> bytes:
    """Assemble prefix + header + payload + checksum. Does no validation (tests use it to craft blobs)."""
    header_bytes = _pad_header(json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    body = _PREFIX.pack(MAGIC, format_version, len(header_bytes)) + header_bytes + bytes(payload)
    return body + hashlib.sha256(body).digest()


# --------------------------------------------------------------------------- encode


def encode(
    tensors: TensorsArg,
    config: ModelConfig,
    *,
    kind: str = "weights",
    model_version: int = 0,
    dtype: str = "float32",
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """Serialise tensors laid out as config.weight_specs() (a list in that order, or a name->array mapping)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(model_version, bool) or not isinstance(model_version, (int, np.integer)) or model_version < 0:
        raise ValueError(f"model_version must be a non-negative int, got {model_version!r}")
    np_dtype = _check_dtype(dtype)
    metadata = dict(metadata or {})
    pairs = _as_named_arrays(tensors, config, kind)

    chunks: list[bytes] = []
    entries: list[dict[str, Any]] = []
    for name, array in pairs:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
            x = array.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise NonFiniteError(f"{kind} tensor {name!r} contains NaN or Inf (or values beyond float32 range)")
        entry: dict[str, Any] = {"name": name, "shape": list(x.shape)}
        if dtype in INT_QMAX:
            q, scale = _quantize(x, INT_QMAX[dtype], np_dtype)
            entry["scale"] = scale
            chunks.append(q.tobytes())
        else:
            if dtype == "float16" and x.size and float(np.max(np.abs(x))) > _FLOAT16_MAX:
                raise NonFiniteError(
                    f"{kind} tensor {name!r} has values up to {float(np.max(np.abs(x))):.6g}, beyond float16's "
                    f"max {_FLOAT16_MAX:g}; send it as float32 or int16"
                )
            chunks.append(np.ascontiguousarray(x, dtype=np_dtype).tobytes())
        entries.append(entry)

    payload = b"".join(chunks)
    header = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config_hash": config.config_hash(),
        "model_version": int(model_version),
        "dtype": dtype,
        "tensors": entries,
        "payload_bytes": len(payload),
        "metadata": metadata,
    }
    try:
        json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable without NaN/Inf: {exc}") from exc
    blob = frame(header, payload)
    header_len = _PREFIX.unpack_from(blob)[2]
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(f"header is {header_len} bytes (metadata too big); the limit is {MAX_HEADER_BYTES}")
    return blob


# --------------------------------------------------------------------------- decode


def _as_memoryview(data: BytesLike) -> memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes-like data, got {type(data).__name__}")
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _num(value: Any) -> str:
    """A header number for a message: str() refuses ints over 4,300 digits (and a product of a hostile
    header's dimensions can be far longer), so those are described by their size."""
    if _is_int(value) and value.bit_length() > 256:
        return f"<{value.bit_length()}-bit integer>"
    return repr(value)


def _check_metadata(metadata: dict[str, Any]) -> None:
    """Every number in the metadata must fit a float64 (consumers take them as floats); iterative, so a
    deeply nested value cannot exhaust the stack."""
    stack: list[Any] = [metadata]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif _is_int(value) and abs(value) > _FLOAT64_MAX:
            raise BadMetadataError(f"header metadata holds a {value.bit_length()}-bit integer, beyond float64")


def _validate_header(header: Any, prefix_version: int) -> None:
    """Types and internal consistency of the header; raises CorruptHeaderError / UnsupportedDtypeError /
    BadMetadataError."""
    if not isinstance(header, dict):
        raise CorruptHeaderError(f"header must be a JSON object, got {type(header).__name__}")
    missing = [f for f in _REQUIRED_FIELDS if f not in header]
    if missing:
        raise CorruptHeaderError(f"header is missing field(s): {', '.join(missing)}")
    if header["format_version"] != prefix_version:
        raise CorruptHeaderError(
            f"header says format_version {header['format_version']!r} but the frame says {prefix_version}"
        )
    if header["kind"] not in KINDS:
        raise CorruptHeaderError(f"header kind {header['kind']!r} is not one of {KINDS}")
    if not isinstance(header["config_hash"], str):
        raise CorruptHeaderError("header config_hash must be a string")
    if not _is_int(header["model_version"]) or header["model_version"] < 0:
        raise CorruptHeaderError(f"header model_version must be a non-negative int, got {header['model_version']!r}")
    if not isinstance(header.get("metadata", {}), dict):
        raise CorruptHeaderError("header metadata must be a JSON object")
    _check_metadata(header.get("metadata", {}))
    if not isinstance(header["dtype"], str):
        raise CorruptHeaderError(f"header dtype must be a string, got {header['dtype']!r}")
    np_dtype = _check_dtype(header["dtype"])
    quantized = header["dtype"] in INT_QMAX
    tensors = header["tensors"]
    if not isinstance(tensors, list):
        raise CorruptHeaderError("header tensors must be a list")
    seen: set[str] = set()
    elements = 0
    for i, entry in enumerate(tensors):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise CorruptHeaderError(f"header tensor #{i} must be an object with a string name")
        name, shape = entry["name"], entry.get("shape")
        if name in seen:
            raise CorruptHeaderError(f"header lists tensor {name!r} twice")
        seen.add(name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CorruptHeaderError(f"tensor {name!r} shape must be a list of non-negative ints")
        if quantized:
            scale = entry.get("scale")
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise CorruptHeaderError(f"{header['dtype']} tensor {name!r} needs a numeric scale, got {scale!r}")
            if abs(scale) > _FLOAT32_MAX or not math.isfinite(scale):  # abs first: a huge int has no float
                raise NonFiniteError(f"tensor {name!r} has non-finite scale {_num(scale)} (as float32)")
            if scale < 0:
                raise CorruptHeaderError(f"tensor {name!r} has negative scale {scale!r}")
        elements += _num_elements(shape)
    declared = header["payload_bytes"]
    expected = elements * np_dtype.itemsize
    if not _is_int(declared) or declared != expected:
        raise CorruptHeaderError(
            f"header declares payload_bytes={_num(declared)} but its {len(tensors)} {header['dtype']} tensors "
            f"({_num(elements)} values) need {_num(expected)} bytes"
        )


def _parse_frame(data: BytesLike, max_bytes: int | None) -> tuple[dict[str, Any], memoryview]:
    """Check size, framing, checksum and header; return (header, payload view). Copies nothing."""
    view = _as_memoryview(data)
    size = len(view)
    if max_bytes is not None and size > max_bytes:
        raise TooLargeError(f"blob is {size} bytes, over the limit of {max_bytes}")
    head = bytes(view[: len(MAGIC)])
    if head != MAGIC[: len(head)]:
        raise BadMagicError(f"not a wire blob: starts with {head!r}, expected {MAGIC!r}")
    if size < _PREFIX.size + CHECKSUM_BYTES:
        raise TruncatedError(f"blob is only {size} bytes; even an empty one needs {_PREFIX.size + CHECKSUM_BYTES}")
    _, version, header_len = _PREFIX.unpack_from(view)
    # Version before checksum: a future version may checksum differently.
    if version != FORMAT_VERSION:
        raise UnsupportedFormatVersionError(f"wire format version {version} is not supported (this reader: {FORMAT_VERSION})")
    if header_len > MAX_HEADER_BYTES:
        raise CorruptHeaderError(f"header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    header_end = _PREFIX.size + header_len
    if size < header_end + CHECKSUM_BYTES:
        raise TruncatedError(f"blob is {size} bytes but its header alone ends at byte {header_end} (+32 checksum)")

    # Parse the header before checking the checksum only to tell a cut-off blob (truncated)
    # from a damaged one (checksum_mismatch); header errors are raised after the checksum,
    # so bit rot in the header is reported as bit rot.
    header: Any = None
    header_error: Exception | None = None
    try:
        header = json.loads(bytes(view[_PREFIX.size : header_end]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, an int over 4,300 digits, too deep
        header_error = exc
    declared = header.get("payload_bytes") if isinstance(header, dict) else None
    if _is_int(declared) and declared >= 0:
        expected_size = header_end + declared + CHECKSUM_BYTES
        if size < expected_size:
            raise TruncatedError(f"blob is {size} bytes but its header declares {_num(expected_size)}; "
                                 "it was cut off")

    body = view[: size - CHECKSUM_BYTES]
    if hashlib.sha256(body).digest() != bytes(view[size - CHECKSUM_BYTES :]):
        raise ChecksumMismatchError(f"SHA-256 checksum mismatch over {size - CHECKSUM_BYTES} bytes: blob damaged in transit")

    if header_error is not None:
        raise CorruptHeaderError(f"header is not valid UTF-8 JSON: {header_error}")
    _validate_header(header, version)
    if size != header_end + header["payload_bytes"] + CHECKSUM_BYTES:
        raise CorruptHeaderError(
            f"blob is {size} bytes but its header declares "
            f"{_num(header_end + header['payload_bytes'] + CHECKSUM_BYTES)}"
        )
    return header, view[header_end : header_end + header["payload_bytes"]]


def peek_header(data: BytesLike, *, max_bytes: int | None = None) -> dict[str, Any]:
    """Validate framing, checksum and header; return the header dict without decoding tensors."""
    header, _ = _parse_frame(data, max_bytes)
    return header


def _materialise(header: dict[str, Any], payload: memoryview) -> tuple[list[np.ndarray], float]:
    """Turn the payload into read-only float32 arrays with whole-payload numpy ops (no per-element
    Python); returns them with their global L2 norm."""
    dtype = header["dtype"]
    raw = np.frombuffer(payload, dtype=_NUMPY_DTYPES[dtype])
    if dtype == "float32":
        # Zero copy over immutable bytes; copy a mutable buffer so later writes to it cannot change our tensors.
        flat = raw.astype(np.float32, copy=not payload.readonly)
    else:
        flat = raw.astype(np.float32)  # the one conversion copy a non-float32 payload needs
    tensors: list[np.ndarray] = []
    offset = 0
    for entry in header["tensors"]:
        count = _num_elements(entry["shape"])
        tensor = flat[offset : offset + count].reshape(entry["shape"])
        if dtype in INT_QMAX:
            with np.errstate(over="ignore"):  # an overflowing product is reported below as non_finite
                tensor *= np.float32(entry["scale"])  # in place on our own copy
        tensors.append(tensor)
        offset += count
    flat.flags.writeable = False  # views inherit read-only; consistent across dtypes
    for tensor in tensors:
        tensor.flags.writeable = False
    sum_sq = blas.sum_of_squares(flat)  # finite exactly when every value is (see models.blas)
    if not math.isfinite(sum_sq):
        bad = [e["name"] for e, t in zip(header["tensors"], tensors) if not np.isfinite(t).all()]
        raise NonFiniteError(f"{header['kind']} tensor(s) {', '.join(map(repr, bad))} contain NaN or Inf")
    return tensors, math.sqrt(sum_sq)


def decode(
    data: BytesLike,
    config: ModelConfig | None = None,
    *,
    expected_kind: str | None = None,
    max_bytes: int | None = None,
) -> WirePayload:
    """Validate and decode a blob. With `config`, also check its hash and the tensor layout.

    Returned tensors are read-only float32 arrays (for a float32 blob in `bytes`, views into
    it); use np.array(t) for a writable copy.
    """
    if expected_kind is not None and expected_kind not in KINDS:
        raise ValueError(f"expected_kind must be one of {KINDS} or None, got {expected_kind!r}")
    header, payload = _parse_frame(data, max_bytes)
    kind = header["kind"]
    if expected_kind is not None and kind != expected_kind:
        raise WrongKindError(f"expected a {expected_kind} blob, got a {kind} blob")
    if config is not None:
        want = config.config_hash()
        if header["config_hash"] != want:
            raise ConfigMismatchError(
                f"{kind} was made for model config {_short(header['config_hash'])}, this model is {_short(want)}"
            )
        got = [(e["name"], tuple(e["shape"])) for e in header["tensors"]]
        mismatch = describe_layout_mismatch(kind, got, config)
        if mismatch:
            raise ShapeMismatchError(mismatch)
    tensors, norm = _materialise(header, payload)
    return WirePayload(
        kind=kind,
        config_hash=header["config_hash"],
        model_version=header["model_version"],
        dtype=header["dtype"],
        names=tuple(e["name"] for e in header["tensors"]),
        tensors=tensors,
        metadata=dict(header.get("metadata", {})),
        norm=norm,
    )


__all__ = [
    "MAGIC", "FORMAT_VERSION", "KINDS", "DTYPES", "INT_QMAX", "MAX_HEADER_BYTES",
    "WireError", "TruncatedError", "BadMagicError", "UnsupportedFormatVersionError", "CorruptHeaderError",
    "ChecksumMismatchError", "ConfigMismatchError", "ShapeMismatchError", "NonFiniteError",
    "UnsupportedDtypeError", "WrongKindError", "TooLargeError", "BadMetadataError",
    "WirePayload", "encode", "decode", "peek_header", "payload_nbytes", "frame", "describe_layout_mismatch",
]
