"""Device secrets at rest and in flight (issue #18, docs/security.md): the data dir 0700, state.json (the
token), settings.json (the registration key), text.db and its journal 0600 whatever the umask; the token
only to the configured server's origin; the Paillier key holder's signing key pinned on disk."""
from __future__ import annotations

import contextlib
import http.server
import os
import secrets
import stat
import threading
from pathlib import Path
from typing import Iterator

import pytest

from device_app.client import DeviceClient
from device_app.http_client import ServerAPI
from device_app.keyholder_pin import PIN_FILE, PinnedPaillierHook
from device_app.secagg import SecAggError
from device_app.transport import TransportPolicyError, same_origin
from models import paillier_pack as pp
from models import secagg_math as sm
from tests.server_fixtures import *  # noqa: F401,F403
from tests.server_fixtures import ServerProcess


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------------- file modes
def test_data_dir_token_and_text_are_private_whatever_the_umask(server_factory, tmp_path: Path) -> None:
    srv: ServerProcess = server_factory()
    data = tmp_path / "device"
    with umask(0o022):  # the usual umask: files would be 0644, directories 0755
        client = DeviceClient(data, srv.url, initial_bundle=False, secure_aggregation=())
        try:
            client.ensure_registered()
            client.commit("see you tomorrow")
            assert client.state["token"]
            assert mode(data) == 0o700
            for name in ("state.json", "settings.json", "text.db"):
                assert mode(data / name) == 0o600, name
            assert "token" in (data / "state.json").read_text()
            # SQLite's rollback journal, while a write transaction holds it, has the database's mode
            conn = client.store.conn
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO messages(ts, text) VALUES (0, 'x')")
            journal = Path(f"{data / 'text.db'}-journal")
            assert journal.exists() and mode(journal) == 0o600
            conn.execute("ROLLBACK")
            # forget my data: the recreated database is private too
            client.store.forget()
            assert mode(data / "text.db") == 0o600
        finally:
            client.close()


def test_files_from_before_are_tightened(tmp_path: Path) -> None:
    data = tmp_path / "old-device"
    with umask(0o022):
        data.mkdir(mode=0o755)
        (data / "state.json").write_text('{"server_url": null, "token": "t"}')
        (data / "text.db").touch()
        assert mode(data) == 0o755 and mode(data / "state.json") == 0o644
        client = DeviceClient(data, initial_bundle=False, secure_aggregation=())
        try:
            assert mode(data) == 0o700
            assert mode(data / "state.json") == 0o600 and mode(data / "text.db") == 0o600
        finally:
            client.close()


# ---------------------------------------------------------------------- the token's origin
class Recorder(http.server.ThreadingHTTPServer):
    """Another origin on loopback that records the headers of every request it gets."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.got = threading.Event()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                recorder.seen.append({k.lower(): v for k, v in self.headers.items()})
                recorder.got.set()
                body = b"not a model"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def test_the_token_goes_only_to_the_configured_origin(server_factory) -> None:
    srv: ServerProcess = server_factory()
    other = Recorder()
    api = ServerAPI(srv.url)
    try:
        api.register()
        assert api.token
        # the configured origin, by an absolute URL as a task names it: with the token (else 401)
        assert api.download_model(url=srv.url + "/v1/models/current").status == 200
        # another origin on the same host (another port): the request goes out, without the token
        down = api.download_model(url=other.url + "/v1/models/current")
        assert other.got.is_set() and down.status == 200
        assert "authorization" not in other.seen[-1]
        with pytest.raises(ValueError):  # the recorder's answer is no JSON: after the request went out
            api.upload_update(1, b"delta", url=other.url + "/v1/rounds/1/update")
        assert len(other.seen) == 2 and "authorization" not in other.seen[-1]
        # another host name for the same machine is another origin too
        port = srv.url.rsplit(":", 1)[1]
        assert not same_origin(srv.url, f"http://localhost:{port}/v1/models/current")
    finally:
        api.close()
        other.close()


def test_no_plain_http_for_an_https_server_and_origins_compare_exactly() -> None:
    other = Recorder()
    api = ServerAPI("https://127.0.0.1:1", token="secret-token")
    try:
        with pytest.raises(TransportPolicyError, match="downgrade"):
            api.download_model(url=other.url + "/v1/models/current")
        assert other.seen == []  # refused before any connection
    finally:
        api.close()
        other.close()
    assert same_origin("https://fk.example", "https://FK.example:443/v1/x")
    assert not same_origin("https://fk.example", "http://fk.example:443/v1/x")
    assert not same_origin("https://fk.example:8443", "https://fk.example/v1/x")
    assert not same_origin("https://fk.example", "https://fk.example.evil.test/v1/x")


# ---------------------------------------------------------------------- the key holder's key, pinned
def signed_key(signing_key: bytes) -> dict:
    n = secrets.randbits(1024) | (1 << 1023) | 1  # a well-formed modulus is all the signature check needs
    key = pp.PublicKey(n=n)
    return {"public_key": {**key.to_dict(), "signature": sm.b64(sm.sign(signing_key, key.signed_message())),
                           "verify_key": sm.b64(sm.ed25519_public(signing_key))},
            "keyholder_url": "http://127.0.0.1:9/keyholder"}


def test_keyholder_key_is_pinned_on_disk_and_a_changed_key_is_refused(tmp_path: Path) -> None:
    holder, impostor = sm.ed25519_keypair()[0], sm.ed25519_keypair()[0]
    server = "https://fk.example:8443"
    pin_path = tmp_path / "device" / PIN_FILE
    pin_path.parent.mkdir()
    hook = PinnedPaillierHook(pin_path, min_key_bits=1024)
    assert hook.trusted_key(server, signed_key(holder)).key_bits == 1024  # first use: pinned
    assert pin_path.exists() and mode(pin_path) == 0o600
    with pytest.raises(SecAggError) as err:
        hook.trusted_key(server, signed_key(impostor))
    assert err.value.reason == "untrusted_keyholder"
    # a restart (a new hook on the same data dir) keeps the pin, whatever key holder URL the server names
    again = PinnedPaillierHook(pin_path, min_key_bits=1024)
    assert again.trusted_key(server, signed_key(holder))
    moved = signed_key(impostor) | {"keyholder_url": "https://elsewhere.example/keyholder"}
    with pytest.raises(SecAggError) as err:
        again.trusted_key(server, moved)
    assert err.value.reason == "untrusted_keyholder"
    # another server has its own key holder; a bad signature is refused before anything is pinned
    assert again.trusted_key("https://other.example", signed_key(impostor))
    forged = signed_key(holder)
    forged["public_key"]["verify_key"] = sm.b64(sm.ed25519_public(impostor))
    fresh = PinnedPaillierHook(tmp_path / "fresh.json", min_key_bits=1024)
    with pytest.raises(SecAggError) as err:
        fresh.trusted_key(server, forged)
    assert err.value.reason == "bad_signature" and not (tmp_path / "fresh.json").exists()
    # shipped keys: only those are trusted, nothing is pinned
    shipped = PinnedPaillierHook(tmp_path / "shipped.json", [sm.b64(sm.ed25519_public(holder))], min_key_bits=1024)
    assert shipped.trusted_key(server, signed_key(holder))
    with pytest.raises(SecAggError):
        shipped.trusted_key(server, signed_key(impostor))


def test_a_device_client_uses_the_pinned_hook(tmp_path: Path) -> None:
    client = DeviceClient(tmp_path / "d", initial_bundle=False)
    try:
        hooks = [h for h in client.secure_aggregation if isinstance(h, PinnedPaillierHook)]
        assert len(hooks) == 1 and hooks[0].pins.path == tmp_path / "d" / PIN_FILE
    finally:
        client.close()
