"""Transport security: the server over HTTPS (given or self-signed certificate), devices verifying it
with a CA file or a pinned fingerprint, refusing a wrong pin before sending anything, and refusing
plain http:// to another machine before any connection attempt (server/tls.py, device_app/transport.py).
"""
from __future__ import annotations

import http.server
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from device_app import transport
from device_app.client import ClientSettings, DeviceClient
from device_app.eligibility import EligibilitySettings
from device_app.fleet import FleetConfig, run_fleet
from device_app.http_client import Offline, ServerAPI, UntrustedServer
from device_app.testing import SAMPLE_MESSAGES, vocab_for
from device_app.tls_transport import CertificatePinMismatch, PinnedTransport
from device_app.transport import TransportPolicyError
from models.config import preset
from models.data.types import ClientData, FederatedDataset
from server import tls
from server.config import ServerConfig
from tests.server_fixtures import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
OTHER_HOST_HTTP = "http://192.0.2.10:8080"  # TEST-NET-1: never a real host, and not loopback


# ---------------------------------------------------------------------- unit: policy and fingerprints

def test_fingerprint_normalisation() -> None:
    hexdigest = "da7c1089ca15199442763b909da8fb21fa1d47d420fd99a368850a55aa7bd1a1"
    assert transport.normalize_fingerprint(hexdigest) == hexdigest
    assert transport.normalize_fingerprint(hexdigest.upper()) == hexdigest
    assert transport.normalize_fingerprint(tls.format_fingerprint(hexdigest)) == hexdigest  # AA:BB:.. as printed
    assert transport.normalize_fingerprint(" " + " ".join(hexdigest[i:i + 4] for i in range(0, 64, 4))) == hexdigest
    for bad in ("", hexdigest[:-2], hexdigest + "00", "zz" * 32, "sha1:" + hexdigest[:40]):
        with pytest.raises(TransportPolicyError, match="SHA-256 fingerprint"):
            transport.normalize_fingerprint(bad)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://127.8.9.10/", "http://localhost:1",
                                 "http://LOCALHOST.:1", "http://[::1]:8080", "http://[::ffff:127.0.0.1]:80",
                                 "https://example.com", "https://192.0.2.10:8443", "https://[2001:db8::1]"])
def test_url_policy_allows_loopback_http_and_any_https(url: str) -> None:
    assert transport.check_server_url(url) == url


@pytest.mark.parametrize("url", [OTHER_HOST_HTTP, "http://example.com", "http://127.0.0.1.evil.example",
                                 "http://localhost.evil.example", "http://[::2]:80", "http://0.0.0.0:8080",
                                 "http://10.0.0.1"])
def test_url_policy_refuses_plain_http_to_other_hosts(url: str) -> None:
    with pytest.raises(TransportPolicyError) as err:
        transport.check_server_url(url)
    assert "https://" in str(err.value) and "--ca-file" in str(err.value) and "--pin-sha256" in str(err.value)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1", "127.0.0.1:8080", "https://", ""])
def test_url_policy_refuses_malformed_urls(url: str) -> None:
    with pytest.raises(TransportPolicyError, match="want https://"):
        transport.check_server_url(url)


def test_settings_checks(tmp_path: Path) -> None:
    pin = "ab" * 32
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    assert transport.check_settings("https://h:1", ca, None) == (str(ca.resolve()), None)
    assert transport.check_settings("https://h:1", None, pin.upper()) == (None, pin)
    with pytest.raises(TransportPolicyError, match="either"):
        transport.check_settings("https://h:1", ca, pin)
    with pytest.raises(TransportPolicyError, match="does not exist"):
        transport.check_settings("https://h:1", tmp_path / "missing.pem", None)
    with pytest.raises(TransportPolicyError, match="needs an https://"):  # it would verify nothing
        transport.check_settings("http://127.0.0.1:1", None, pin)
    transport.check_request_url("https://h:1", "https://h:1/v1/x")
    with pytest.raises(TransportPolicyError, match="downgrade"):
        transport.check_request_url("https://127.0.0.1:1", "http://127.0.0.1:1/v1/rounds/1/update")


def test_self_signed_certificate_files(tmp_path: Path) -> None:
    cert_path, key_path, created = tls.ensure_self_signed(tmp_path, "10.1.2.3")
    assert created and cert_path == tmp_path / tls.CERT_NAME and key_path == tmp_path / tls.KEY_NAME
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = tls.load_certificate(cert_path)
    assert set(tls.san_hosts(cert)) >= {"10.1.2.3", "localhost", "127.0.0.1", "::1"}
    # the fingerprint is the SHA-256 of the DER certificate, as any TLS client sees it
    der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    assert tls.fingerprint_sha256(cert) == transport.fingerprint_of_der(der)
    tls.check_pair(cert_path, key_path)
    again = tls.ensure_self_signed(tmp_path, "10.1.2.3")
    assert again == (cert_path, key_path, False)
    assert tls.fingerprint_sha256(tls.load_certificate(cert_path)) == tls.fingerprint_sha256(cert)


def test_server_config_tls_validation(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    tls.create_self_signed(cert, key, ["127.0.0.1"])
    ServerConfig(data_dir=str(tmp_path), tls_cert=str(cert), tls_key=str(key))
    with pytest.raises(ValueError, match="go together"):
        ServerConfig(data_dir=str(tmp_path), tls_cert=str(cert))
    with pytest.raises(ValueError, match="does not exist"):
        ServerConfig(data_dir=str(tmp_path), tls_cert=str(cert), tls_key=str(tmp_path / "nope.pem"))
    with pytest.raises(ValueError, match="exclude"):
        ServerConfig(data_dir=str(tmp_path), tls_cert=str(cert), tls_key=str(key), tls_self_signed=True)


# ---------------------------------------------------------------------- unit: the pinned transport

class _CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def tiny_https(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An in-process HTTPS server (HTTP/1.0: a new handshake per request) counting the requests it got;
    `swap()` makes it present another certificate from then on."""
    a = tls.create_self_signed(tmp_path / "a.pem", tmp_path / "a.key", ["127.0.0.1"])
    b = tls.create_self_signed(tmp_path / "b.pem", tmp_path / "b.key", ["127.0.0.1"])
    handler = type("Handler", (_CountingHandler,), {"requests": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "a.pem", tmp_path / "a.key")
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"https://127.0.0.1:{srv.server_address[1]}", "requests": handler.requests,
           "a": tls.fingerprint_sha256(a), "b": tls.fingerprint_sha256(b),
           "swap": lambda: ctx.load_cert_chain(tmp_path / "b.pem", tmp_path / "b.key")}
    srv.shutdown()
    srv.server_close()


def test_pinned_transport_sends_nothing_to_a_mismatching_server(tiny_https: dict[str, Any]) -> None:
    with httpx.Client(transport=PinnedTransport(tiny_https["b"])) as client, \
            pytest.raises(CertificatePinMismatch) as err:
        client.get(tiny_https["url"] + "/secret?token=t")
    assert tiny_https["a"] in str(err.value) and tiny_https["b"] in str(err.value)
    assert err.value.expected == tiny_https["b"] and err.value.presented == tiny_https["a"]
    assert tiny_https["requests"] == []  # only a handshake reached the server, no HTTP request


def test_pinned_transport_notices_a_changed_certificate(tiny_https: dict[str, Any]) -> None:
    with httpx.Client(transport=PinnedTransport(tls.format_fingerprint(tiny_https["a"]))) as client:
        assert client.get(tiny_https["url"] + "/one").text == "ok"
        tiny_https["swap"]()
        with pytest.raises(CertificatePinMismatch) as err:
            client.get(tiny_https["url"] + "/two")
    assert err.value.presented == tiny_https["b"]
    assert tiny_https["requests"] == ["/one"]


# ---------------------------------------------------------------------- (d) http:// to another machine

@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record (and block) every name lookup and socket connect."""
    attempts: list[Any] = []

    def lookup(*args: Any, **kw: Any) -> Any:
        attempts.append(("getaddrinfo", args))
        raise OSError("blocked by the test")

    def connect(self: socket.socket, address: Any) -> None:
        attempts.append(("connect", address))
        raise OSError("blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return attempts


def test_plain_http_to_another_host_is_refused_without_connecting(tmp_path: Path, no_network: list[Any]) -> None:
    with pytest.raises(TransportPolicyError, match="refusing plain http:// to 192.0.2.10"):
        DeviceClient(tmp_path / "d", OTHER_HOST_HTTP, initial_bundle=False)
    with pytest.raises(TransportPolicyError, match="use https|Use https"):
        ServerAPI(OTHER_HOST_HTTP)
    with pytest.raises(TransportPolicyError, match="refusing plain http://"):
        run_fleet(FleetConfig(server_url=OTHER_HOST_HTTP, n_devices=1, data_dir=str(tmp_path / "fleet")),
                  dataset=_dataset(1))
    assert not (tmp_path / "fleet").exists()
    # a device on a loopback server cannot be switched to it either, and keeps its server
    client = DeviceClient(tmp_path / "d2", "http://127.0.0.1:9", initial_bundle=False)
    try:
        with pytest.raises(TransportPolicyError):
            client.set_server_url("http://example.com:8080")
        assert client.settings.server_url == "http://127.0.0.1:9"
    finally:
        client.close()
    assert no_network == []


def test_cli_refuses_plain_http_to_another_host(tmp_path: Path) -> None:
    for extra in ([], ["--fleet", "2"]):
        proc = subprocess.run([sys.executable, "-m", "device_app", "--headless", "--data-dir", str(tmp_path / "d"),
                               "--server", OTHER_HOST_HTTP, "--once", *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "refusing plain http:// to 192.0.2.10" in proc.stderr and "--pin-sha256" in proc.stderr
    assert not (tmp_path / "d").exists()  # refused before the device's data dir was even created


# ---------------------------------------------------------------------- settings persistence

def test_ca_file_and_pin_persist_with_the_server_url(tmp_path: Path) -> None:
    pin = "cd" * 32
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    c = DeviceClient(tmp_path / "d", "https://127.0.0.1:1", pin_sha256=tls.format_fingerprint(pin),
                     initial_bundle=False)
    c.close()
    saved = json.loads((tmp_path / "d" / "settings.json").read_text())
    assert saved["server_url"] == "https://127.0.0.1:1" and saved["pin_sha256"] == pin and saved["ca_file"] is None
    c = DeviceClient(tmp_path / "d", initial_bundle=False)  # the app / a later headless run: no flags
    assert c.settings.pin_sha256 == pin and c.status()["pin_sha256"] == pin
    c.set_server_url("https://127.0.0.1:1")  # the app's field submitted again: same server, same pin
    assert c.settings.pin_sha256 == pin
    c.set_server_url("https://127.0.0.1:1", ca_file=str(ca))  # same server, verified another way
    assert (c.settings.ca_file, c.settings.pin_sha256) == (str(ca.resolve()), None)
    c.close()
    # another server: the old server's CA file / pin do not vouch for it
    c = DeviceClient(tmp_path / "d", "https://127.0.0.2:1", initial_bundle=False)
    assert c.settings.ca_file is None and c.settings.pin_sha256 is None
    c.close()


# ---------------------------------------------------------------------- real servers over TLS

def _dataset(n: int) -> FederatedDataset:
    clients = {}
    for i in range(n):
        msgs = [f"{m} {i}" for m in SAMPLE_MESSAGES[i % 3:]] * 3
        clients[f"user{i}"] = ClientData(f"user{i}", train=msgs[:-3], test=msgs[-3:])
    return FederatedDataset("tls-test", clients, train_ids=sorted(clients), heldout_ids=[])


def _settings() -> ClientSettings:
    return ClientSettings(eligibility=EligibilitySettings(idle_after_s=0.0, use_battery_sensor=False),
                          auto_personalize=False)


def _registered(srv: ServerProcess) -> int:
    return int(srv.admin_get("/v1/admin/status")["devices"]["registered"])


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A self-signed HTTPS server whose rounds close at one update (tiny preset)."""
    root = tmp_path_factory.mktemp("tls")
    vocab_for(SAMPLE_MESSAGES, size=preset("tiny").vocab_size - 4).save(root / "vocab.json")
    srv = ServerProcess(root / "srv", ["--init-preset", "tiny", "--vocab-file", str(root / "vocab.json"),
                                       "--tls-self-signed", "--round-goal", "1", "--min-count", "1",
                                       "--retry-min-s", "1"], root / "srv.log").start()
    yield srv
    srv.stop()


def _run_one_round(srv: ServerProcess, data_dir: Path, **tls_kw: str) -> DeviceClient:
    client = DeviceClient(data_dir, srv.url, settings=_settings(), initial_bundle=False, seed=0, **tls_kw)
    for m in SAMPLE_MESSAGES:
        client.commit(m, typed_now=False)
    outcome = client.participate_once()
    assert outcome.status == "uploaded", (outcome, client.last_error)
    r = srv.wait_round(outcome.round_id)
    assert r["state"] == "closed" and r["accepted"] == 1, r
    return client


def test_device_runs_a_round_verifying_with_the_ca_file(tls_server: ServerProcess, tmp_path: Path) -> None:
    assert tls_server.url.startswith("https://")
    client = _run_one_round(tls_server, tmp_path / "dev", ca_file=str(tls_server.ca_file))
    try:
        assert client.connection == "online" and client.state["device_id"].startswith("d_")
        assert client.sync() is True  # the round's new global version, also over TLS
    finally:
        client.close()


def test_device_runs_a_round_with_the_pinned_fingerprint(tls_server: ServerProcess, tmp_path: Path) -> None:
    pin = tls.format_fingerprint(tls.fingerprint_sha256(tls.load_certificate(tls_server.ca_file)))  # AA:BB:..
    assert pin in tls_server.log()  # the server printed it for the operator
    _run_one_round(tls_server, tmp_path / "dev", pin_sha256=pin).close()
    # A later start from the data dir alone (the app, a headless run) keeps the pin and still connects
    # (without it, the system CAs would refuse the self-signed certificate).
    again = DeviceClient(tmp_path / "dev", initial_bundle=False)
    try:
        assert again.settings.pin_sha256 == transport.normalize_fingerprint(pin) and again.settings.ca_file is None
        assert again.api.model_info()["global_version"] >= 2
    finally:
        again.close()


def test_device_with_a_wrong_pin_sends_nothing(tls_server: ServerProcess, tmp_path: Path) -> None:
    actual = tls.fingerprint_sha256(tls.load_certificate(tls_server.ca_file))
    wrong = "0f" * 32
    before = _registered(tls_server)
    client = DeviceClient(tmp_path / "dev", tls_server.url, settings=_settings(), initial_bundle=False,
                          pin_sha256=wrong)
    try:
        for m in SAMPLE_MESSAGES:
            client.commit(m, typed_now=False)
        outcome = client.participate_once()
        assert outcome.status == "offline", outcome
        assert "pin mismatch" in outcome.detail and wrong in outcome.detail and actual in outcome.detail
        assert client.connection == "untrusted server" and actual in (client.last_error or "")
        with pytest.raises(UntrustedServer, match="pin mismatch"):
            client.ensure_registered()
        assert client.sync() is False and "token" not in client.state
    finally:
        client.close()
    assert _registered(tls_server) == before  # the server never saw its registration


@pytest.mark.slow
def test_headless_cli_with_a_pin_keeps_it_for_later_runs(tls_server: ServerProcess, tmp_path: Path) -> None:
    """python -m device_app --headless --server https://.. --pin-sha256 FP --once, then the same device
    started with no server flags: the saved URL and pin carry its second round."""
    fingerprint = tls.fingerprint_sha256(tls.load_certificate(tls_server.ca_file))
    typed = tmp_path / "typed.txt"
    typed.write_text("\n".join(SAMPLE_MESSAGES) + "\n")
    base = [sys.executable, "-m", "device_app", "--headless", "--data-dir", str(tmp_path / "device")]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FK_INITIAL_BUNDLE": ""}
    reports = []
    for extra in (["--server", tls_server.url, "--pin-sha256", tls.format_fingerprint(fingerprint),
                   "--type-file", str(typed)], []):
        proc = subprocess.run([*base, *extra, "--once"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append(json.loads(proc.stdout[proc.stdout.index("{"):]))
    for n, report in enumerate(reports, start=1):
        assert any(item.startswith("uploaded round") for item in report["done"]), report
        assert report["status"]["connection"] == "online" and report["status"]["contributions"] == n
        assert report["status"]["pin_sha256"] == fingerprint and report["status"]["server_url"] == tls_server.url


def test_fleet_completes_a_round_over_tls_with_a_ca_file(tls_server: ServerProcess, tmp_path: Path) -> None:
    config = FleetConfig(server_url=tls_server.url, ca_file=str(tls_server.ca_file), n_devices=3, rounds=1,
                         duration_s=150, p_eligible=1.0, p_dropout=0.0, initial_messages=5, step_s=0.1,
                         max_wait_s=0.5, workers=2, seed=2)
    summary = run_fleet(config, dataset=_dataset(3)).summary()
    assert not summary["errors"], summary["errors"]
    assert summary["rounds_advanced"] >= 1 and summary["uploads"] >= 1, summary
    assert "offline" not in summary["outcomes"], summary["outcomes"]


def test_fleet_cli_passes_the_tls_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--ca-file / --pin-sha256 reach FleetConfig (normalised); the run itself is the test above."""
    import device_app.fleet as fleet_mod
    from device_app.__main__ import build_parser, run_fleet_cli

    seen: list[FleetConfig] = []

    def fake_run_fleet(config: FleetConfig, **kw: Any) -> fleet_mod.FleetReport:
        seen.append(config)
        return fleet_mod.FleetReport(config=config.to_dict())

    monkeypatch.setattr(fleet_mod, "run_fleet", fake_run_fleet)
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    args = build_parser().parse_args(["--headless", "--fleet", "2", "--server", "https://127.0.0.1:1",
                                      "--ca-file", str(ca)])
    assert run_fleet_cli(args) == 0 and seen[-1].ca_file == str(ca.resolve()) and seen[-1].pin_sha256 is None
    args = build_parser().parse_args(["--headless", "--fleet", "2", "--server", "https://127.0.0.1:1",
                                      "--pin-sha256", "AB:" * 31 + "AB"])
    assert run_fleet_cli(args) == 0 and seen[-1].pin_sha256 == "ab" * 32 and seen[-1].ca_file is None


def test_self_signed_certificate_is_reused_after_a_restart(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "srv", ["--tls-self-signed"], tmp_path / "srv.log").start()
    try:
        cert, key = tmp_path / "srv" / tls.CERT_NAME, tmp_path / "srv" / tls.KEY_NAME
        assert srv.url.startswith("https://") and srv.ca_file == cert
        with srv.anon() as client:  # verifying with the certificate as CA file, hostname 127.0.0.1
            assert client.get("/healthz").status_code == 200
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        first = transport.fingerprint_of_der(transport.fetch_certificate("127.0.0.1", srv.port))
        assert first == tls.fingerprint_sha256(tls.load_certificate(cert))
        with pytest.raises(httpx.ConnectError):  # not trusted without the CA file or pin
            httpx.get(srv.url + "/healthz", timeout=10.0)
        srv.restart()
        assert transport.fingerprint_of_der(transport.fetch_certificate("127.0.0.1", srv.port)) == first
        log = srv.log()  # both starts printed the certificate's path and fingerprint; only the first created it
        assert log.count("created a self-signed certificate") == 1
        assert log.count(f"--pin-sha256 {first}") == 2 and log.count(f"--ca-file {cert.resolve()}") == 2
    finally:
        srv.stop()


def test_server_with_a_given_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "given.pem", tmp_path / "given.key"
    fingerprint = tls.fingerprint_sha256(tls.create_self_signed(cert, key, ["127.0.0.1"]))
    srv = ServerProcess(tmp_path / "srv", ["--init-preset", "tiny", "--tls-cert", str(cert), "--tls-key", str(key)],
                        tmp_path / "srv.log").start()
    try:
        assert srv.url.startswith("https://") and fingerprint in srv.log()
        assert not (tmp_path / "srv" / tls.CERT_NAME).exists()  # no self-signed pair besides it
        api = ServerAPI(srv.url, ca_file=str(cert))
        try:
            device_id, _ = api.register()
            assert device_id.startswith("d_") and api.model_info()["global_version"] == 1
        finally:
            api.close()
        # CA-file verification checks the hostname: the certificate names 127.0.0.1, not localhost
        other_name = ServerAPI(srv.url.replace("127.0.0.1", "localhost"), ca_file=str(cert))
        try:
            with pytest.raises(Offline, match="Hostname mismatch"):
                other_name.model_info()
        finally:
            other_name.close()
    finally:
        srv.stop()
    # a key that does not belong to the certificate: a clear refusal, not a traceback
    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other.key"
    tls.create_self_signed(other_cert, other_key, ["127.0.0.1"])
    proc = subprocess.run([sys.executable, "-m", "server", "--data-dir", str(tmp_path / "srv2"), "--port", "0",
                           "--tls-cert", str(cert), "--tls-key", str(other_key)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 2 and "cannot serve HTTPS" in proc.stderr, proc.stderr[-2000:]
