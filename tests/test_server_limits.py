"""Bounded requests (issue #18 item 1) against a real server subprocess: body limits enforced while reading
(413 too_large), refusals before a large body is read (401, 403 not_admitted), a read timeout for stalled
bodies (408 read_timeout), and the per-device limits on concurrent uploads and long-polls (429)."""
from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.server_fixtures import *  # noqa: F401,F403
from tests.server_fixtures import ServerProcess, dyadic_delta, encode_delta

GB = 1 << 30
CHUNK = b"\0" * (256 << 10)  # one buffer, yielded again and again: the client never holds the body
CONTROL_LIMIT = 64 << 10  # --max-control-body-bytes default
LARGE = (1 << 20) + 4096  # over server.http.helpers.LARGE_BODY (takes an upload slot), under the tiny model's limit


class Counter:
    """A body generator that counts what the client handed to the socket."""

    def __init__(self, total: int, chunk: bytes = CHUNK) -> None:
        self.total, self.chunk, self.sent = total, chunk, 0

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < self.total:
            piece = self.chunk[: self.total - self.sent]
            self.sent += len(piece)
            yield piece


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def read_bytes_in(detail: str) -> int:
    return int(re.search(r"refused after reading (\d+)", detail).group(1))


def start(server_factory, *args: str) -> ServerProcess:
    # --open-registration: these tests register devices freely (registration keys are another test's business)
    srv = server_factory("--open-registration", "--round-goal", "3", "--min-count", "1", *args)
    return srv.wait_warm()


def admitted_device(srv: ServerProcess):
    dev = srv.device()
    task = dev.task()
    assert task["type"] == "train"
    return dev, task


def post_stream(url: str, body: Counter, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(timeout=30.0) as client:
        return client.post(url, content=body, headers=headers or {})


# ---------------------------------------------------------------------- raw sockets (slow senders)
def raw_request(srv: ServerProcess, path: str, token: str, length: int, first: bytes) -> socket.socket:
    """An upload whose headers and first bytes are sent; the rest never comes (until the test says)."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30.0)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n").encode() + first)
    return sock


def raw_response(sock: socket.socket, timeout: float = 20.0) -> tuple[int, dict]:
    """(status, JSON body) of the answer on a raw socket (waits for it)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"connection closed without an answer: {data!r}"
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(rest) < length:
        piece = sock.recv(65536)
        assert piece
        rest += piece
    return int(head.split()[1]), json.loads(rest[:length])


def answered(sock: socket.socket) -> bool:
    """Whether anything came back yet (non-blocking)."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)


# ---------------------------------------------------------------------- (a) unauthenticated 1 GB
def test_unauthenticated_gigabyte_is_refused_while_read(server_factory) -> None:
    srv = start(server_factory)
    srv.device()  # warm the registration path: RSS below measures the refusal only
    before = rss_bytes(srv.proc.pid)
    body = Counter(GB)
    t0 = time.monotonic()
    r = post_stream(srv.url + "/v1/devices/register", body)
    elapsed = time.monotonic() - t0
    grew = rss_bytes(srv.proc.pid) - before
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "too_large"
    assert r.headers["connection"] == "close"
    read = read_bytes_in(r.json()["detail"])
    assert CONTROL_LIMIT < read <= CONTROL_LIMIT + (1 << 20)  # cut at the message crossing the limit
    assert body.sent < 64 << 20, body.sent  # the client was stopped (socket buffers aside), not drained
    assert grew < 20 << 20, f"server RSS grew by {grew / 2**20:.1f} MB"
    assert elapsed < 10
    print(f"\nregister 1 GB: 413 after the server read {read} bytes (client sent {body.sent}); "
          f"RSS +{grew / 2**20:.2f} MB; {elapsed:.2f} s")


def test_declared_oversize_is_refused_before_reading(server_factory) -> None:
    srv = start(server_factory)
    body = Counter(GB)
    r = post_stream(srv.url + "/v1/devices/register", body, {"Content-Length": str(GB)})
    assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
    assert "over this route's limit" in r.json()["detail"]
    # an absurd Content-Length (digits beyond any int the server would parse) is oversize too, not a 500
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n")
        data = sock.recv(65536)
        assert data.split()[1] in (b"400", b"413"), data[:200]  # uvicorn's parser (400) or the limit (413)


# ---------------------------------------------------------------------- (b) control route, uploads without a token
def test_control_route_and_tokenless_uploads(server_factory) -> None:
    srv = start(server_factory)
    dev, task = admitted_device(srv)
    pid = srv.proc.pid
    before = rss_bytes(pid)

    # a JSON control route with a valid token: cut at the control limit
    body = Counter(GB)
    r = post_stream(srv.url + "/v1/checkin", body, {"Authorization": f"Bearer {dev.token}"})
    assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
    assert read_bytes_in(r.json()["detail"]) <= CONTROL_LIMIT + (1 << 20)

    # uploads without a valid token: 401 before a byte of the body is read
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        body = Counter(GB)
        t0 = time.monotonic()
        r = post_stream(srv.url + f"/v1/rounds/{task['round_id']}/update", body, headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
        assert time.monotonic() - t0 < 5 and body.sent < 64 << 20, body.sent

    # the admin routes with large bodies check the admin token first
    body = Counter(GB)
    r = post_stream(srv.url + "/v1/admin/init", body, {"Authorization": f"Bearer {dev.token}"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden", r.text
    assert body.sent < 64 << 20

    # a device not admitted to the round: 403 not_admitted before its body is read
    other = srv.device()
    body = Counter(GB)
    r = post_stream(srv.url + f"/v1/rounds/{task['round_id']}/update", body, {"Authorization": f"Bearer {other.token}"})
    assert r.status_code == 403 and r.json()["error"] == "not_admitted", r.text
    assert body.sent < 64 << 20

    # an admitted device's upload over the model-sized limit: cut while read
    body = Counter(GB)
    r = post_stream(srv.url + f"/v1/rounds/{task['round_id']}/update", body, {"Authorization": f"Bearer {dev.token}"})
    assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
    grew = rss_bytes(pid) - before
    assert grew < 20 << 20, f"server RSS grew by {grew / 2**20:.1f} MB"
    print(f"\ncontrol + upload refusals: RSS +{grew / 2**20:.2f} MB")

    # and the honest upload still goes through
    blob = encode_delta(dyadic_delta(1), task["base_version"])
    r = dev.upload(task["round_id"], blob)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- (c) + (d) slow senders, concurrency
def test_trickler_does_not_block_others_and_times_out(server_factory) -> None:
    idle = 4.0
    srv = start(server_factory, "--upload-slots", "2", "--max-uploads-per-device", "1",
                "--body-idle-timeout-s", str(idle))
    trickler, t_task = admitted_device(srv)
    honest, h_task = admitted_device(srv)
    path = f"/v1/rounds/{t_task['round_id']}/update"

    # the trickler opens an upload (just over 1 MiB declared: a large body, so it takes an upload slot) and stalls
    stalled = raw_request(srv, path, trickler.token, LARGE, b"FKW1")
    t_stall = time.monotonic()
    # (d) its second concurrent upload is refused at once, with a reason (and the first is in flight)
    second = raw_request(srv, path, trickler.token, LARGE, b"FKW1")
    status, body = raw_response(second)
    second.close()
    assert (status, body["error"]) == (429, "too_many_concurrent"), body

    # an honest device's upload (chunked: it needs an upload slot too) completes while the trickler stalls
    blob = encode_delta(dyadic_delta(2), h_task["base_version"])
    r = honest.client.post(f"/v1/rounds/{h_task['round_id']}/update", content=iter([blob[:1000], blob[1000:]]),
                           headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert not answered(stalled) and time.monotonic() - t_stall < idle

    # the trickler is cut after the idle timeout
    status, body = raw_response(stalled)
    waited = time.monotonic() - t_stall
    stalled.close()
    assert (status, body["error"]) == (408, "read_timeout"), body
    assert idle - 0.5 <= waited < idle + 5, waited
    print(f"\ntrickler cut after {waited:.2f} s (idle timeout {idle} s)")

    # its slot is free again: the trickler can now upload for real
    blob = encode_delta(dyadic_delta(3), t_task["base_version"])
    assert trickler.upload(t_task["round_id"], blob).status_code == 200


def test_slow_body_under_min_rate_is_cut(server_factory) -> None:
    # one byte every 0.2 s never idles for 2 s, but averages 5 B/s, under the 1000 B/s minimum
    srv = start(server_factory, "--body-idle-timeout-s", "2", "--body-min-rate", "1000")
    dev, task = admitted_device(srv)
    sock = raw_request(srv, f"/v1/rounds/{task['round_id']}/update", dev.token, 5000, b"F")
    t0 = time.monotonic()
    while not answered(sock):
        assert time.monotonic() - t0 < 15, "no 408"
        sock.sendall(b"\0")
        time.sleep(0.2)  # the trickle's pace (the wait is for the answer above)
    status, body = raw_response(sock)
    sock.close()
    assert (status, body["error"]) == (408, "read_timeout"), body
    assert 2.0 <= time.monotonic() - t0 < 6


def test_long_polls_need_admission_and_are_capped(server_factory) -> None:
    # a SecAgg round: its stage views long-poll (?wait=S) until the stage closes (not before 30 s here)
    srv = start(server_factory, "--secure-aggregation", "secagg", "--clip-norm", "1.0", "--min-count", "3",
                "--secagg-stage-s", "30", "--max-long-polls-per-device", "1")
    dev, task = admitted_device(srv)
    stranger = srv.device()
    view = f"/v1/rounds/{task['round_id']}/secagg/advertise_keys"
    # a device not admitted to the round cannot wait on it (refused at once, not after the wait)
    t0 = time.monotonic()
    r = stranger.client.get(view, params={"wait": 20})
    assert r.status_code == 403 and r.json()["error"] == "not_admitted", r.text
    assert time.monotonic() - t0 < 5
    # the admitted device: one long-poll at a time. Two at once (a raw one and a client's, whichever the
    # server takes first): exactly one waits, the other is refused with a reason and a Retry-After
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    sock.sendall(f"GET {view}?wait=2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {dev.token}\r\n\r\n".encode())
    r = dev.client.get(view, params={"wait": 2})
    status, body = raw_response(sock)
    sock.close()
    answers = sorted([(r.status_code, r.json().get("error")), (status, body.get("error"))], key=str)
    assert answers == [(200, None), (429, "too_many_concurrent")], (r.text, body)
    refused = r if r.status_code == 429 else None
    assert refused is None or refused.headers["retry-after"]
    assert (r.json() if r.status_code == 200 else body)["ready"] is False  # the stage is still open
    # and a plain request (no wait) is never counted
    assert dev.client.get(view).status_code == 200


def test_openapi_declares_the_limits(server_factory) -> None:
    srv = start(server_factory)
    doc = httpx.get(srv.url + "/openapi.json").json()

    def reasons(path: str, method: str, status: str) -> set[str]:
        op = doc["paths"][path][method]["responses"]
        return set(op.get(status, {}).get("content", {}).get("application/json", {}).get("schema", {})
                   .get("properties", {}).get("error", {}).get("enum", []))

    for path in ("/v1/devices/register", "/v1/checkin", "/v1/rounds/{round_id}/update", "/v1/admin/init"):
        assert "too_large" in reasons(path, "post", "413"), path
        assert "read_timeout" in reasons(path, "post", "408"), path
    assert "too_many_concurrent" in reasons("/v1/rounds/{round_id}/update", "post", "429")
    assert "too_many_concurrent" in reasons("/v1/rounds/{round_id}/secagg/advertise_keys", "get", "429")
    assert "413" not in doc["paths"]["/healthz"]["get"]["responses"]


@pytest.mark.parametrize("flag", ["--max-control-body-bytes", "--max-uploads-per-device"])
def test_limit_flags_validate(flag: str) -> None:
    from server.config import ServerConfig
    with pytest.raises(ValueError):
        ServerConfig(**{flag[2:].replace("-", "_"): 0})
