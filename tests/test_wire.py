"""Wire format: round trips for every dtype and one distinct rejection per failure mode."""
from __future__ import annotations

import math
import hashlib
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models import wire
from models.config import ModelConfig, preset

TINY = preset("tiny")


def random_tensors(config: ModelConfig, seed: int = 0, scale: float = 0.1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * scale).astype(np.float32) for _, shape in config.weight_specs()]


def split_blob(blob: bytes) -> tuple[dict, bytes]:
    """(header, payload) of a valid blob, so tests can craft variants and re-frame them."""
    header_len = struct.unpack_from("<I", blob, 6)[0]
    header = json.loads(blob[10 : 10 + header_len])
    return header, blob[10 + header_len : -32]


def reframe(header: dict, payload: bytes) -> bytes:
    """A blob with a correct checksum around an arbitrary (possibly invalid) header and payload."""
    return wire.frame(header, payload)


def with_checksum(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


# --------------------------------------------------------------------------- round trips


def test_float32_round_trip_is_exact_and_keeps_header_fields() -> None:
    tensors = random_tensors(TINY)
    blob = wire.encode(tensors, TINY, kind="delta", model_version=7, metadata={"client": "c1", "n": 12})
    out = wire.decode(blob, TINY, expected_kind="delta")
    assert out.kind == "delta"
    assert out.config_hash == TINY.config_hash()
    assert out.model_version == 7
    assert out.dtype == "float32"
    assert out.names == tuple(name for name, _ in TINY.weight_specs())
    assert out.metadata == {"client": "c1", "n": 12}
    assert len(out.tensors) == 6
    for original, decoded in zip(tensors, out.tensors):
        assert decoded.dtype == np.float32
        assert decoded.shape == original.shape
        np.testing.assert_array_equal(decoded, original)


def test_blob_size_is_framing_plus_payload() -> None:
    blob = wire.encode(random_tensors(TINY), TINY)
    header_len = struct.unpack_from("<I", blob, 6)[0]
    assert blob[:4] == wire.MAGIC
    assert struct.unpack_from("<H", blob, 4)[0] == wire.FORMAT_VERSION
    assert wire.payload_nbytes(TINY, "float32") == TINY.num_parameters() * 4
    assert len(blob) == 10 + header_len + wire.payload_nbytes(TINY, "float32") + 32
    assert (10 + header_len) % 8 == 0  # payload is aligned for np.frombuffer
    assert blob[-32:] == hashlib.sha256(blob[:-32]).digest()


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2), ("int8", 1), ("int16", 2)])
def test_payload_nbytes(dtype: str, itemsize: int) -> None:
    assert wire.payload_nbytes(TINY, dtype) == TINY.num_parameters() * itemsize
    blob = wire.encode(random_tensors(TINY), TINY, dtype=dtype)
    assert wire.peek_header(blob)["payload_bytes"] == TINY.num_parameters() * itemsize


def test_float16_round_trip_within_half_precision() -> None:
    tensors = random_tensors(TINY, scale=3.0)
    out = wire.decode(wire.encode(tensors, TINY, dtype="float16"), TINY)
    assert out.dtype == "float16"
    for original, decoded in zip(tensors, out.tensors):
        assert decoded.dtype == np.float32
        # float16 has an 11-bit significand: relative rounding error <= 2**-11.
        np.testing.assert_allclose(decoded, original, rtol=2.0**-11, atol=2.0**-24)
        np.testing.assert_array_equal(decoded, original.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("dtype, qmax", [("int8", 127), ("int16", 32767)])
def test_int_round_trip_error_bounded_by_half_scale(dtype: str, qmax: int) -> None:
    tensors = random_tensors(TINY, seed=3, scale=0.5)
    blob = wire.encode(tensors, TINY, dtype=dtype)
    header = wire.peek_header(blob)
    out = wire.decode(blob, TINY)
    for original, decoded, entry in zip(tensors, out.tensors, header["tensors"]):
        scale = entry["scale"]
        assert scale == pytest.approx(float(np.max(np.abs(original))) / qmax, rel=1e-12)
        error = np.max(np.abs(decoded - original))
        assert error <= scale / 2 * (1 + 1e-5) + 1e-7
        # The largest magnitude is representable exactly (up to float32 rounding).
        peak = int(np.argmax(np.abs(original)))
        assert decoded.flat[peak] == pytest.approx(original.flat[peak], rel=1e-6)


def test_int8_quantization_values_are_exact() -> None:
    config = TINY
    tensors = [np.zeros(shape, np.float32) for _, shape in config.weight_specs()]
    tensors[3][:4] = [1.27, -0.635, 0.01, 0.0]  # cifg/bias: scale 0.01
    out = wire.decode(wire.encode(tensors, config, dtype="int8"), config)
    header, payload = split_blob(wire.encode(tensors, config, dtype="int8"))
    bias_offset = sum(int(np.prod(s)) for _, s in config.weight_specs()[:3])
    q = np.frombuffer(payload, dtype=np.int8)[bias_offset : bias_offset + 4]
    assert q.tolist() == [127, -64, 1, 0]  # -63.5 rounds to even
    assert header["tensors"][3]["scale"] == pytest.approx(0.01)
    np.testing.assert_allclose(out.tensors[3][:4], [1.27, -0.64, 0.01, 0.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", wire.DTYPES)
def test_zero_tensors_round_trip(dtype: str) -> None:
    zeros = [np.zeros(shape, np.float32) for _, shape in TINY.weight_specs()]
    blob = wire.encode(zeros, TINY, dtype=dtype)
    if dtype in wire.INT_QMAX:
        assert all(entry["scale"] == 0.0 for entry in wire.peek_header(blob)["tensors"])
    out = wire.decode(blob, TINY)
    assert all(t.shape == z.shape and not t.any() for t, z in zip(out.tensors, zeros))


def test_mapping_input_is_reordered_to_config_order() -> None:
    tensors = random_tensors(TINY)
    names = [name for name, _ in TINY.weight_specs()]
    shuffled = {name: tensors[i] for i, name in reversed(list(enumerate(names)))}
    assert wire.encode(shuffled, TINY) == wire.encode(tensors, TINY)


def test_float64_and_noncontiguous_inputs_are_accepted() -> None:
    tensors = [t.astype(np.float64) for t in random_tensors(TINY)]
    tensors[0] = np.asfortranarray(tensors[0])
    out = wire.decode(wire.encode(tensors, TINY), TINY)
    np.testing.assert_array_equal(out.tensors[0], tensors[0].astype(np.float32))


def test_decoded_tensors_are_read_only_and_independent_of_mutable_input() -> None:
    tensors = random_tensors(TINY)
    blob = bytearray(wire.encode(tensors, TINY))
    out = wire.decode(blob, TINY)
    with pytest.raises(ValueError):
        out.tensors[0][0, 0] = 1.0
    blob[-40] ^= 0xFF  # mutate the caller's buffer after decoding
    np.testing.assert_array_equal(out.tensors[-1], tensors[-1])


def test_decode_without_config_and_memoryview_input() -> None:
    tensors = random_tensors(TINY)
    blob = wire.encode(tensors, TINY, model_version=3)
    out = wire.decode(memoryview(blob))
    assert out.model_version == 3
    np.testing.assert_array_equal(out.by_name()["output_bias"], tensors[5])


def test_peek_header() -> None:
    blob = wire.encode(random_tensors(TINY), TINY, kind="delta", model_version=4, dtype="int8", metadata={"k": 1})
    header = wire.peek_header(blob)
    assert header["format_version"] == 1
    assert header["kind"] == "delta"
    assert header["config_hash"] == TINY.config_hash()
    assert header["model_version"] == 4
    assert header["dtype"] == "int8"
    assert header["metadata"] == {"k": 1}
    assert header["payload_bytes"] == TINY.num_parameters()
    assert [(t["name"], tuple(t["shape"])) for t in header["tensors"]] == TINY.weight_specs()
    assert all(t["scale"] > 0 for t in header["tensors"])
    with pytest.raises(wire.ChecksumMismatchError):
        wire.peek_header(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(wire.TooLargeError):
        wire.peek_header(blob, max_bytes=len(blob) - 1)


def test_gboard_size_round_trip_is_fast() -> None:
    config = preset("gboard")
    assert 1_400_000 < config.num_parameters() < 1_450_000
    tensors = random_tensors(config, seed=1)
    start = time.perf_counter()
    blob = wire.encode(tensors, config, kind="delta")
    out = wire.decode(blob, config, expected_kind="delta", max_bytes=8 << 20)
    elapsed = time.perf_counter() - start
    header_len = struct.unpack_from("<I", blob, 6)[0]
    assert len(blob) == 10 + header_len + config.num_parameters() * 4 + 32
    for original, decoded in zip(tensors, out.tensors):
        np.testing.assert_array_equal(decoded, original)
    # float32 decode over immutable bytes is zero-copy: the tensors view the blob.
    assert all(np.shares_memory(t, np.frombuffer(blob, np.uint8)) for t in out.tensors)
    assert elapsed < 5.0  # generous for a loaded 2-core box; a Python loop over elements takes far longer
    q = wire.decode(wire.encode(tensors, config, dtype="int8"), config)
    assert sum(t.size for t in q.tensors) == config.num_parameters()


# --------------------------------------------------------------------------- rejections


@pytest.fixture(scope="module")
def blob() -> bytes:
    return wire.encode(random_tensors(TINY), TINY, kind="delta", model_version=2)


def test_all_error_classes_are_distinct_value_errors() -> None:
    classes = [
        wire.TruncatedError, wire.BadMagicError, wire.UnsupportedFormatVersionError, wire.CorruptHeaderError,
        wire.ChecksumMismatchError, wire.ConfigMismatchError, wire.ShapeMismatchError, wire.NonFiniteError,
        wire.UnsupportedDtypeError, wire.WrongKindError, wire.TooLargeError,
    ]
    reasons = [cls.reason for cls in classes]
    assert reasons == [
        "truncated", "bad_magic", "unsupported_format_version", "corrupt_header", "checksum_mismatch",
        "config_mismatch", "shape_mismatch", "non_finite", "unsupported_dtype", "wrong_kind", "too_large",
    ]
    assert all(issubclass(cls, wire.WireError) and issubclass(cls, ValueError) for cls in classes)


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 9, 10, 11, 50, -33, -32, -31, -1])
def test_truncated(blob: bytes, cut: int) -> None:
    cut_at = cut if cut >= 0 else len(blob) + cut
    header_end = 10 + struct.unpack_from("<I", blob, 6)[0]
    with pytest.raises(wire.TruncatedError) as info:
        wire.decode(blob[:cut_at], TINY)
    assert info.value.reason == "truncated"
    if cut_at >= header_end:  # the message says how long it should have been
        assert str(len(blob)) in str(info.value)


def test_truncated_mid_header_with_bogus_length(blob: bytes) -> None:
    # A header length that points past the end of the data is a cut-off blob, not a crash.
    body = bytearray(blob)
    struct.pack_into("<I", body, 6, 100_000)
    with pytest.raises(wire.TruncatedError):
        wire.decode(bytes(body))


def test_flipped_payload_byte_is_checksum_mismatch(blob: bytes) -> None:
    header_end = 10 + struct.unpack_from("<I", blob, 6)[0]
    for position in (header_end, header_end + 1000, len(blob) - 33, len(blob) - 1):
        damaged = bytearray(blob)
        damaged[position] ^= 0x01
        with pytest.raises(wire.ChecksumMismatchError) as info:
            wire.decode(bytes(damaged), TINY)
        assert info.value.reason == "checksum_mismatch"


def test_flipped_header_byte_is_checksum_mismatch_not_corrupt_header(blob: bytes) -> None:
    damaged = bytearray(blob)
    damaged[12] ^= 0x40  # inside the JSON text: `{"` becomes garbage
    with pytest.raises(wire.ChecksumMismatchError):
        wire.decode(bytes(damaged))


def test_trailing_bytes_are_rejected(blob: bytes) -> None:
    with pytest.raises(wire.ChecksumMismatchError):
        wire.decode(blob + b"\x00" * 8)
    # Even with a checksum recomputed over the extra bytes, the size disagrees with the header.
    body = blob[:-32] + b"\x00" * 8
    with pytest.raises(wire.CorruptHeaderError, match="declares"):
        wire.decode(with_checksum(body))


@pytest.mark.parametrize("magic", [b"FKW2", b"XKW1", b"\x00\x00\x00\x00", b"PK\x03\x04"])
def test_bad_magic(blob: bytes, magic: bytes) -> None:
    with pytest.raises(wire.BadMagicError) as info:
        wire.decode(magic + blob[4:], TINY)
    assert info.value.reason == "bad_magic"


def test_bad_magic_on_short_and_text_input() -> None:
    with pytest.raises(wire.BadMagicError):
        wire.decode(b"{}")
    with pytest.raises(wire.BadMagicError):
        wire.decode(b'{"weights": [1, 2, 3]}' * 10)
    with pytest.raises(wire.TruncatedError):
        wire.decode(b"FK")
    with pytest.raises(wire.TruncatedError):
        wire.decode(b"")


def test_unsupported_format_version(blob: bytes) -> None:
    bumped = bytearray(blob)
    struct.pack_into("<H", bumped, 4, wire.FORMAT_VERSION + 1)
    with pytest.raises(wire.UnsupportedFormatVersionError, match="version 2") as info:
        wire.decode(bytes(bumped), TINY)
    assert info.value.reason == "unsupported_format_version"


def test_header_version_field_must_match_frame(blob: bytes) -> None:
    header, payload = split_blob(blob)
    header["format_version"] = 2
    with pytest.raises(wire.CorruptHeaderError):
        wire.decode(reframe(header, payload))


def test_config_mismatch(blob: bytes) -> None:
    other = dataclass_replace(TINY, seq_len=11)  # same shapes, different semantics
    with pytest.raises(wire.ConfigMismatchError) as info:
        wire.decode(blob, other)
    assert info.value.reason == "config_mismatch"
    assert TINY.config_hash()[:8] in str(info.value) and other.config_hash()[:8] in str(info.value)
    # Without a config there is nothing to mismatch.
    assert wire.decode(blob).config_hash == TINY.config_hash()


def dataclass_replace(config: ModelConfig, **changes) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_shape_mismatch_missing_tensor_message(blob: bytes) -> None:
    header, payload = split_blob(blob)
    dropped = header["tensors"].pop()  # output_bias
    header["payload_bytes"] -= 4 * int(np.prod(dropped["shape"]))
    crafted = reframe(header, payload[: header["payload_bytes"]])
    with pytest.raises(wire.ShapeMismatchError) as info:
        wire.decode(crafted, TINY)
    assert info.value.reason == "shape_mismatch"
    assert str(info.value) == (
        f"delta has 5 tensors, model config {TINY.config_hash()[:8]} expects 6: missing 'output_bias'"
    )


def test_shape_mismatch_wrong_shape_and_order(blob: bytes) -> None:
    header, payload = split_blob(blob)
    header["tensors"][0]["shape"] = [16, 504]  # same size, transposed
    with pytest.raises(wire.ShapeMismatchError, match=r"'embedding' has shape \(16, 504\), expected \(504, 16\)"):
        wire.decode(reframe(header, payload), TINY)
    header, payload = split_blob(blob)
    header["tensors"][1]["name"], header["tensors"][2]["name"] = "cifg/recurrent_kernel", "cifg/kernel"
    with pytest.raises(wire.ShapeMismatchError, match="out of order"):
        wire.decode(reframe(header, payload), TINY)


def test_encode_rejects_wrong_layout() -> None:
    tensors = random_tensors(TINY)
    with pytest.raises(wire.ShapeMismatchError) as info:
        wire.encode(tensors[:5], TINY, kind="delta")
    assert str(info.value) == (
        f"delta has 5 tensors, model config {TINY.config_hash()[:8]} expects 6: missing 'output_bias'"
    )
    with pytest.raises(wire.ShapeMismatchError, match="'cifg/bias' has shape"):
        wire.encode(tensors[:3] + [np.zeros(5, np.float32)] + tensors[4:], TINY)
    with pytest.raises(wire.ShapeMismatchError, match="unexpected 'bogus'"):
        names = [name for name, _ in TINY.weight_specs()]
        wire.encode({**dict(zip(names, tensors)), "bogus": np.zeros(1)}, TINY)
    with pytest.raises(wire.ShapeMismatchError, match="expects 6"):
        wire.encode(tensors + [np.zeros(1)], TINY)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_rejects_non_finite(bad: float) -> None:
    tensors = random_tensors(TINY)
    tensors[4][3, 2] = bad
    with pytest.raises(wire.NonFiniteError, match="cifg/projection"):
        wire.encode(tensors, TINY)


def test_encode_rejects_float32_overflow_and_float16_overflow() -> None:
    tensors = [t.astype(np.float64) for t in random_tensors(TINY)]
    tensors[0][0, 0] = 1e300
    with pytest.raises(wire.NonFiniteError, match="embedding"):
        wire.encode(tensors, TINY)
    tensors = random_tensors(TINY)
    tensors[5][0] = 70_000.0
    with pytest.raises(wire.NonFiniteError, match="float16"):
        wire.encode(tensors, TINY, dtype="float16")
    wire.encode(tensors, TINY, dtype="int16")  # fine: int scales adapt


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_decode_rejects_non_finite_payload(blob: bytes, bad: float) -> None:
    header, payload = split_blob(blob)
    values = np.frombuffer(payload, dtype="<f4").copy()
    values[-1] = bad  # last element of output_bias
    crafted = reframe(header, values.tobytes())
    with pytest.raises(wire.NonFiniteError, match="output_bias") as info:
        wire.decode(crafted, TINY)
    assert info.value.reason == "non_finite"


def test_decode_rejects_non_finite_float16_payload() -> None:
    header, payload = split_blob(wire.encode(random_tensors(TINY), TINY, dtype="float16"))
    values = np.frombuffer(payload, dtype="<f2").copy()
    values[0] = np.inf
    with pytest.raises(wire.NonFiniteError, match="embedding"):
        wire.decode(reframe(header, values.tobytes()), TINY)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_decode_rejects_non_finite_scale(scale: float) -> None:
    header, payload = split_blob(wire.encode(random_tensors(TINY), TINY, dtype="int8"))
    header["tensors"][2]["scale"] = scale
    with pytest.raises(wire.NonFiniteError, match="cifg/recurrent_kernel"):
        wire.decode(reframe(header, payload), TINY)


@pytest.mark.parametrize("scale", [1e300, 1e37])  # not a float32 / product overflows float32
def test_decode_rejects_scale_that_overflows_float32(scale: float) -> None:
    header, payload = split_blob(wire.encode(random_tensors(TINY), TINY, dtype="int16"))
    header["tensors"][1]["scale"] = scale
    with pytest.raises(wire.NonFiniteError, match="cifg/kernel"):
        wire.decode(reframe(header, payload), TINY)


def test_unsupported_dtype(blob: bytes) -> None:
    header, payload = split_blob(blob)
    header["dtype"] = "bfloat16"
    with pytest.raises(wire.UnsupportedDtypeError, match="bfloat16") as info:
        wire.decode(reframe(header, payload), TINY)
    assert info.value.reason == "unsupported_dtype"
    with pytest.raises(wire.UnsupportedDtypeError):
        wire.encode(random_tensors(TINY), TINY, dtype="float64")
    with pytest.raises(wire.UnsupportedDtypeError):
        wire.payload_nbytes(TINY, "uint8")


def test_wrong_kind(blob: bytes) -> None:
    with pytest.raises(wire.WrongKindError, match="expected a weights blob, got a delta blob") as info:
        wire.decode(blob, TINY, expected_kind="weights")
    assert info.value.reason == "wrong_kind"
    assert wire.decode(blob, TINY, expected_kind="delta").kind == "delta"


def test_too_large_is_checked_before_parsing() -> None:
    with pytest.raises(wire.TooLargeError) as info:
        wire.decode(b"garbage" * 100, max_bytes=699)
    assert info.value.reason == "too_large"
    assert "700" in str(info.value) and "699" in str(info.value)


def test_max_bytes_boundary(blob: bytes) -> None:
    assert wire.decode(blob, TINY, max_bytes=len(blob)).kind == "delta"
    with pytest.raises(wire.TooLargeError):
        wire.decode(blob, TINY, max_bytes=len(blob) - 1)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h: h.pop("tensors"), "missing field"),
        (lambda h: h.pop("config_hash"), "missing field"),
        (lambda h: h.__setitem__("payload_bytes", h["payload_bytes"] - 4), "payload_bytes"),
        (lambda h: h.__setitem__("kind", "gradient"), "kind"),
        (lambda h: h.__setitem__("model_version", -1), "model_version"),
        (lambda h: h.__setitem__("model_version", "3"), "model_version"),
        (lambda h: h.__setitem__("metadata", [1]), "metadata"),
        (lambda h: h["tensors"][0].__setitem__("shape", [504, -16]), "shape"),
        (lambda h: h["tensors"][1].__setitem__("name", "embedding"), "twice"),
    ],
)
def test_corrupt_header_fields(blob: bytes, mutate, match: str) -> None:
    header, payload = split_blob(blob)
    mutate(header)
    with pytest.raises(wire.CorruptHeaderError, match=match) as info:
        wire.decode(reframe(header, payload))
    assert info.value.reason == "corrupt_header"


def test_corrupt_header_payload_size_disagrees_with_shapes(blob: bytes) -> None:
    # Header and data agree on payload_bytes, but the shapes need more: corrupt, not truncated.
    header, payload = split_blob(blob)
    header["tensors"][5]["shape"] = [505]
    with pytest.raises(wire.CorruptHeaderError, match="need"):
        wire.decode(reframe(header, payload))


def test_corrupt_header_not_json_and_not_object(blob: bytes) -> None:
    _, payload = split_blob(blob)
    for header_bytes in (b"{not json", b"\xff\xfe", b"[1, 2]"):
        body = struct.pack("<4sHI", wire.MAGIC, 1, len(header_bytes)) + header_bytes + payload
        with pytest.raises(wire.CorruptHeaderError):
            wire.decode(with_checksum(body))


def test_int_blob_needs_scales() -> None:
    header, payload = split_blob(wire.encode(random_tensors(TINY), TINY, dtype="int16"))
    del header["tensors"][0]["scale"]
    with pytest.raises(wire.CorruptHeaderError, match="scale"):
        wire.decode(reframe(header, payload))
    header["tensors"][0]["scale"] = -0.5
    with pytest.raises(wire.CorruptHeaderError, match="negative scale"):
        wire.decode(reframe(header, payload))


def test_encode_argument_errors() -> None:
    tensors = random_tensors(TINY)
    with pytest.raises(ValueError, match="kind"):
        wire.encode(tensors, TINY, kind="gradient")
    with pytest.raises(ValueError, match="model_version"):
        wire.encode(tensors, TINY, model_version=-1)
    with pytest.raises(ValueError, match="metadata"):
        wire.encode(tensors, TINY, metadata={"bad": float("nan")})
    with pytest.raises(ValueError, match="metadata"):
        wire.encode(tensors, TINY, metadata={"big": "x" * (wire.MAX_HEADER_BYTES + 1)})
    with pytest.raises(ValueError, match="expected_kind"):
        wire.decode(wire.encode(tensors, TINY), expected_kind="gradient")
    with pytest.raises(TypeError):
        wire.decode("not bytes")  # type: ignore[arg-type]


def test_wire_and_bundle_never_import_tensorflow() -> None:
    code = "import sys, models.wire, models.bundle; sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_decoded_payload_carries_its_float64_norm(dtype: str) -> None:
    payload = wire.decode(wire.encode(random_tensors(TINY), TINY, dtype=dtype), TINY)
    exact = math.sqrt(math.fsum(float(v) ** 2 for t in payload.tensors for v in t.ravel()))
    assert payload.norm == pytest.approx(exact, rel=1e-7)
