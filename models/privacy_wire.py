"""A small binary frame for the privacy protocols' uploads (masked vectors, Paillier ciphertexts).

Layout (little-endian), the same shape as models.wire but with its own magic per kind:

    magic      4 bytes   b"FKSA" (secure-aggregation masked vector) | b"FKPL" (Paillier ciphertexts)
    version    u16       1
    header_len u32
    header     UTF-8 JSON object, space-padded so the payload starts 8-byte aligned
    payload    raw bytes (described by the header)
    checksum   32 bytes  SHA-256 of everything before it

Errors raise FrameError with a machine-readable `.reason` (the server's rejection reasons:
too_large, bad_magic, truncated, unsupported_format_version, corrupt_header, checksum_mismatch).
numpy-free and dependency-free: server and device both use it.
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Mapping, Union

VERSION = 1
CHECKSUM_BYTES = 32
MAX_HEADER_BYTES = 1 << 16
_PREFIX = struct.Struct("<4sHI")
_ALIGN = 8

BytesLike = Union[bytes, bytearray, memoryview]


class FrameError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def frame(magic: bytes, header: Mapping[str, Any], payload: BytesLike) -> bytes:
    """prefix + JSON header + payload + SHA-256."""
    if len(magic) != 4:
        raise ValueError("magic must be 4 bytes")
    hb = json.dumps(dict(header), sort_keys=True, separators=(",", ":")).encode("utf-8")
    unaligned = (_PREFIX.size + len(hb)) % _ALIGN
    hb += b" " * ((_ALIGN - unaligned) % _ALIGN)
    h = hashlib.sha256()
    prefix = _PREFIX.pack(magic, VERSION, len(hb))
    h.update(prefix)
    h.update(hb)
    h.update(payload)
    return b"".join((prefix, hb, bytes(payload), h.digest()))


def unframe(magic: bytes, data: BytesLike, max_bytes: int | None = None) -> tuple[dict[str, Any], memoryview, str]:
    """Check framing and checksum; returns (header, payload view, sha256 hex of the body)."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    size = len(view)
    if max_bytes is not None and size > max_bytes:
        raise FrameError("too_large", f"upload is {size} bytes, the limit is {max_bytes}")
    if size < _PREFIX.size + CHECKSUM_BYTES:
        raise FrameError("truncated", f"upload is only {size} bytes")
    got_magic, version, header_len = _PREFIX.unpack_from(view)
    if got_magic != magic:
        raise FrameError("bad_magic", f"expected {magic!r}, got {bytes(got_magic)!r}")
    if version != VERSION:
        raise FrameError("unsupported_format_version", f"frame version {version} (this reader: {VERSION})")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len + CHECKSUM_BYTES > size:
        raise FrameError("truncated", f"header of {header_len} bytes does not fit in {size} bytes")
    digest = hashlib.sha256(view[: size - CHECKSUM_BYTES]).digest()
    if digest != bytes(view[size - CHECKSUM_BYTES:]):
        raise FrameError("checksum_mismatch", "SHA-256 checksum mismatch: damaged in transit")
    end = _PREFIX.size + header_len
    try:
        header = json.loads(bytes(view[_PREFIX.size:end]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 / JSON, integers over 4,300 digits, deep nesting
        raise FrameError("corrupt_header", f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("corrupt_header", "header must be a JSON object")
    return header, view[end: size - CHECKSUM_BYTES], digest.hex()


__all__ = ["FrameError", "frame", "unframe", "CHECKSUM_BYTES"]
