"""Malformed headers and metadata (issue #18 item 5): every one is a 4xx with a reason, never a 500.

Wire headers are JSON: Python's json refuses integers over 4,300 digits with a ValueError that is no
JSONDecodeError, nests arrays until RecursionError, and math.isfinite(10**400) overflows; a message that
str()s such an int fails again. Each must end as the wire's own reason (models/wire.py), on the decoder
and through the live upload route; JSON control bodies likewise end as 422 bad_request.
"""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from models import wire
from tests.server_fixtures import *  # noqa: F401,F403
from tests.server_fixtures import TINY, ServerProcess

HUGE = "9" * 5000  # digits: over Python's 4,300-digit int() limit
DEEP = "[" * 100_000 + "]" * 100_000  # nests past the recursion limit


def blob_with(mutate, dtype: str = "float32", base_version: int = 1) -> bytes:
    """A delta blob whose header JSON text went through `mutate(text) -> text` (checksum recomputed)."""
    tensors = [np.full(shape, 1e-3, np.float32) for _, shape in TINY.weight_specs()]
    good = wire.encode(tensors, TINY, kind="delta", model_version=base_version, dtype=dtype,
                       metadata={"num_examples": 5, "metrics": {"loss": "LOSS"}})
    _, _, header_len = struct.unpack_from("<4sHI", good)
    header_text = good[10:10 + header_len].decode().rstrip()
    payload = good[10 + header_len:-32]
    header = mutate(header_text).encode()
    header += b" " * ((8 - (10 + len(header)) % 8) % 8)
    body = struct.pack("<4sHI", wire.MAGIC, 1, len(header)) + header + payload
    return body + hashlib.sha256(body).digest()


def sub(field_json: str, replacement: str):
    def mutate(text: str) -> str:
        assert field_json in text, (field_json, text[:300])
        return text.replace(field_json, replacement, 1)
    return mutate


CASES = {
    # name: (mutation of the header text, dtype, expected reason)
    "model_version_huge_int": (sub('"model_version":1', f'"model_version":{HUGE}'), "float32", "corrupt_header"),
    "format_version_huge_int": (sub('"format_version":1', f'"format_version":{HUGE}'), "float32", "corrupt_header"),
    "payload_bytes_4300_digits": (lambda t: t.replace('"payload_bytes":', f'"payload_bytes":{"9" * 4300},"x":', 1),
                                  "float32", "truncated"),
    "shape_huge_ints": (lambda t: t.replace('"shape":[', '"shape":[' + ",".join(["9" * 4000] * 3) + ",", 1),
                        "float32", "corrupt_header"),
    "scale_huge_int": (lambda t: t.replace('"scale":', '"scale":' + "9" * 4000 + ",\"s\":", 1), "int8", "non_finite"),
    "metric_huge_int": (sub('"loss":"LOSS"', '"loss":' + "9" * 400), "float32", "bad_metadata"),
    "metadata_deeply_nested": (sub('"loss":"LOSS"', f'"loss":{DEEP}'), "float32", "corrupt_header"),
    "metadata_list": (lambda t: t.replace('"metadata":{', '"metadata":[{', 1).replace('"LOSS"}}', '"LOSS"}}]', 1),
                      "float32", "corrupt_header"),
    "metadata_number": (lambda t: t.replace('"metadata":{"metrics":{"loss":"LOSS"},"num_examples":5}',
                                            '"metadata":5', 1), "float32", "corrupt_header"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_decoder_gives_a_reason(name: str) -> None:
    mutate, dtype, reason = CASES[name]
    with pytest.raises(wire.WireError) as info:
        wire.decode(blob_with(mutate, dtype), TINY, expected_kind="delta")
    assert info.value.reason == reason, info.value
    assert len(str(info.value)) < 2000  # no 5,000-digit echo either


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("malformed")
    s = ServerProcess(root / "srv", ["--init-preset", "tiny", "--open-registration", "--round-goal", "3",
                                     "--min-count", "1"], root / "srv.log").start()
    yield s
    s.stop()


def test_upload_route_answers_each_with_its_reason(srv: ServerProcess) -> None:
    dev = srv.device()
    task = dev.task()
    for name, (mutate, dtype, reason) in sorted(CASES.items()):
        r = dev.upload(task["round_id"], blob_with(mutate, dtype, task["base_version"]))
        assert r.status_code == 400 and r.json()["error"] == reason, (name, r.status_code, r.text[:300])
    # nothing of it stuck: the honest upload is accepted
    good = blob_with(lambda t: t.replace('"LOSS"', "0.5"), base_version=task["base_version"])
    r = dev.upload(task["round_id"], good)
    assert r.status_code == 200, r.text
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("path, text", [
    ("/v1/checkin", '{"eligibility": {}, "model_version": ' + HUGE + "}"),
    ("/v1/checkin", '{"eligibility": ' + DEEP[:20_000] + "}"),
    ("/v1/rounds/1/secagg/advertise_keys", '{"c_pk": ' + HUGE + "}"),
    ("/v1/rounds/1/secagg/advertise_keys", DEEP[:30_000]),
    ("/v1/telemetry/rr", '{"answers": ' + DEEP[:30_000] + "}"),
])
def test_json_bodies_with_huge_ints_or_deep_nesting_are_422(srv: ServerProcess, path: str, text: str) -> None:
    dev = srv.device()
    r = dev.client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "bad_request", (r.status_code, r.text[:300])


def test_malformed_authorization_headers_are_401(srv: ServerProcess) -> None:
    import httpx
    for value in (b"Bearer \xff\xfe\xfd", b"Bearer", b"Basic abc", b"Bearer " + b"9" * 5000):
        r = httpx.get(srv.url + "/v1/model/info", headers=[(b"Authorization", value)])
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", (value[:20], r.text)


# The privacy frames (models/privacy_wire.py, SecAgg and Paillier uploads) and the metadata every upload
# format shares (server/strategy/base.py parse_metadata)
def test_privacy_frame_huge_int_is_a_frame_error() -> None:
    from models import privacy_wire
    good = privacy_wire.frame(b"FKSA", {"n": "N"}, b"")
    _, _, header_len = struct.unpack_from("<4sHI", good)
    header = good[10:10 + header_len].replace(b'"N"', HUGE.encode())
    body = struct.pack("<4sHI", b"FKSA", 1, len(header)) + header
    with pytest.raises(privacy_wire.FrameError):
        privacy_wire.unframe(b"FKSA", body + hashlib.sha256(body).digest())


@pytest.mark.parametrize("meta", [[1], 5, "x", {"num_examples": 3, "metrics": {"loss": 10 ** 400}}])
def test_parse_metadata_refuses_non_objects(meta) -> None:
    from server.errors import Rejection
    from server.strategy import parse_metadata
    with pytest.raises(Rejection) as info:
        parse_metadata(meta, 100)
    assert info.value.reason == "bad_metadata"
