"""Sybil resistance (issue #18, docs/security.md): registration needs a key by default, an open mode only
when asked for, a per-address rate limit, a device cap, and admin revoke / ban effective at once (also for
a round the device was admitted to, and after a restart). A real server subprocess on loopback.

The rate limiter itself (server/ratelimit.py) is tested first, with a fake clock."""
from __future__ import annotations

import stat
import time

import httpx
import pytest

from server.ratelimit import RateLimiter, retry_after_header
from tests.server_fixtures import *  # noqa: F401,F403
from tests.server_fixtures import ADMIN_TOKEN, Device, ServerProcess, dyadic_delta, encode_delta

NO_ENV_KEY = {"FK_REGISTRATION_KEY": None}  # the server then generates its key into the data dir


# ---------------------------------------------------------------------- the rate limiter (pure)
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_burst_then_rate_per_key() -> None:
    clock = Clock()
    lim = RateLimiter(rate_per_s=0.5, burst=3, clock=clock)
    assert [lim.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = lim.take("a")
    assert wait == pytest.approx(2.0)  # one token at 0.5/s
    assert lim.take("b") == 0.0  # another address has its own bucket
    clock.t += 1.0
    assert lim.take("a") == pytest.approx(1.0)  # a refusal spends nothing: half a token now
    clock.t += 1.0
    assert lim.take("a") == 0.0 and lim.take("a") > 0
    clock.t += 100.0  # refilled to the burst, never beyond
    assert [lim.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0] and lim.take("a") > 0
    assert lim.retry_after_s("a") > 0 and lim.retry_after_s("c") == 0.0


def test_rate_limiter_disabled_bounded_and_header() -> None:
    off = RateLimiter(rate_per_s=0, burst=1)
    assert all(off.take("a") == 0.0 for _ in range(100)) and len(off) == 0
    clock = Clock()
    lim = RateLimiter(rate_per_s=1.0, burst=2, clock=clock, max_keys=10)
    lim.take("throttled"), lim.take("throttled")
    for i in range(50):  # a flood of distinct addresses: the table stays bounded
        lim.take(f"10.0.0.{i}")
    assert len(lim) <= 10
    assert lim.take("throttled") > 0 or len(lim) <= 10  # the emptiest bucket is kept when it can be
    assert retry_after_header(0.2) == "1" and retry_after_header(2.01) == "3"
    with pytest.raises(ValueError):
        RateLimiter(rate_per_s=1.0, burst=0)


# ---------------------------------------------------------------------- helpers
def register(srv: ServerProcess, key: str | None) -> httpx.Response:
    with srv.anon() as c:
        return c.post("/v1/devices/register", json={"registration_key": key} if key is not None else None)


def admin(srv: ServerProcess, path: str, body: dict | None = None) -> httpx.Response:
    return srv.admin_post(path, json=body) if body is not None else srv.admin_post(path)


def reconnect(dev: Device, srv: ServerProcess) -> Device:
    """The same device (token) to the restarted server, which listens on a new port."""
    dev.client.close()
    dev.client = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {dev.token}"}, timeout=60.0)
    return dev


def registration(srv: ServerProcess) -> dict:
    return srv.admin_get("/v1/admin/status")["registration"]


# ---------------------------------------------------------------------- registration key
def test_registration_needs_the_generated_key_by_default(server_factory) -> None:
    srv = server_factory(env=NO_ENV_KEY)
    key_file = srv.data_dir / "registration_key"
    assert key_file.exists() and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert len(key) >= 32
    for sent in (None, "", "wrong"):
        r = register(srv, sent)
        assert (r.status_code, r.json()["error"]) == (403, "registration_refused"), sent
    r = register(srv, key)
    assert r.status_code == 201 and r.json()["device_id"].startswith("d_")
    config = srv.admin_get("/v1/admin/config")
    assert config["open_registration"] is False and config["registration_key"] == "***"
    assert registration(srv)["mode"] == "key" and registration(srv)["devices_in_good_standing"] == 1
    # the same key after a restart (it lives in the data dir)
    srv.restart()
    assert key_file.read_text().strip() == key and register(srv, key).status_code == 201


def test_open_registration_is_explicit_and_reported(server_factory) -> None:
    srv = server_factory("--open-registration", env=NO_ENV_KEY)
    assert register(srv, None).status_code == 201
    assert not (srv.data_dir / "registration_key").exists()
    assert srv.admin_get("/v1/admin/config")["open_registration"] is True
    assert registration(srv)["mode"] == "open"
    assert "registration is OPEN" in srv.log()  # the start-up warning


def test_a_given_key_and_open_mode_exclude_each_other(tmp_path) -> None:
    srv = ServerProcess(tmp_path / "srv", ["--open-registration", "--registration-key", "k"], tmp_path / "srv.log")
    with pytest.raises(RuntimeError, match="open_registration and registration_key exclude each other"):
        srv.start(timeout=30)


# ---------------------------------------------------------------------- rate limit and cap
def test_a_registration_flood_from_one_address_is_throttled(server_factory) -> None:
    srv = server_factory("--registration-burst", "3", "--registration-rate-per-s", "0.5")
    key = srv.registration_key
    assert [register(srv, key).status_code for _ in range(3)] == [201, 201, 201]
    r = register(srv, key)
    assert (r.status_code, r.json()["error"]) == (429, "rate_limited")
    retry_after = int(r.headers["Retry-After"])
    assert 1 <= retry_after <= 2
    r = register(srv, "wrong key")  # wrong keys are throttled too (before the key is even checked)
    assert r.status_code == 429
    # the bucket refills at 0.5/s: registering works again once Retry-After has passed, not before
    t0 = time.monotonic()
    deadline = t0 + retry_after + 10
    while (r := register(srv, key)).status_code == 429:
        assert time.monotonic() < deadline, "still throttled long after Retry-After"
        time.sleep(min(0.2, float(r.headers["Retry-After"])))
    assert r.status_code == 201 and time.monotonic() - t0 >= 0.5
    assert registration(srv)["devices_in_good_standing"] == 4


def test_device_cap_counts_devices_in_good_standing(server_factory) -> None:
    srv = server_factory("--max-devices", "2")
    a, b = srv.device(), srv.device()
    r = register(srv, srv.registration_key)
    assert (r.status_code, r.json()["error"]) == (403, "device_cap_reached")
    assert admin(srv, f"/v1/admin/devices/{a.id}/ban", {"reason": "fake"}).status_code == 200
    c = srv.device()  # a banned device no longer holds a slot
    assert register(srv, srv.registration_key).status_code == 403
    assert admin(srv, f"/v1/admin/devices/{b.id}/revoke").status_code == 200
    assert register(srv, srv.registration_key).status_code == 201
    assert registration(srv).items() >= {"devices_in_good_standing": 2, "banned": 1, "revoked": 1,
                                         "max_devices": 2}.items()
    for d in (a, b, c):
        d.close()


# ---------------------------------------------------------------------- revoke and ban
def test_ban_refuses_the_device_at_once_in_its_round_and_after_a_restart(server_factory) -> None:
    srv = server_factory("--round-goal", "2", "--min-count", "2")
    bad, good = srv.device(), srv.device()
    task = bad.task()  # admitted to the open round
    good_task = good.task()
    assert task["round_id"] == good_task["round_id"]
    r = admin(srv, f"/v1/admin/devices/{bad.id}/ban", {"reason": "sybil"})
    assert r.status_code == 200 and r.json().items() >= {"state": "banned", "previous": "ok", "reason": "sybil"}.items()
    # its upload to the round it was admitted to, its check-ins and downloads: refused with the reason
    body = encode_delta(dyadic_delta(1), task["base_version"])
    r = bad.upload(task["round_id"], body)
    assert (r.status_code, r.json()["error"]) == (403, "banned")
    r = bad.client.post("/v1/checkin", json={"eligibility": {}, "model_version": None})
    assert (r.status_code, r.json()["error"]) == (403, "banned")
    assert bad.client.get("/v1/models/current").status_code == 403
    # the others are untouched
    assert good.upload(good_task["round_id"], encode_delta(dyadic_delta(2), good_task["base_version"])).status_code == 200
    view = srv.admin_get(f"/v1/admin/devices/{bad.id}")
    assert view["state"] == "banned" and view["reason"] == "sybil"
    # durable: after a restart the ban still holds
    srv.restart()
    reconnect(bad, srv)
    r = bad.client.post("/v1/checkin", json={"eligibility": {}, "model_version": None})
    assert (r.status_code, r.json()["error"]) == (403, "banned")
    assert registration(srv)["banned"] == 1
    # a revoke does not weaken a ban; unban leaves the device revoked (its token stays invalid)
    assert admin(srv, f"/v1/admin/devices/{bad.id}/revoke").json()["state"] == "banned"
    assert admin(srv, f"/v1/admin/devices/{bad.id}/unban").json()["state"] == "revoked"
    r = bad.client.post("/v1/checkin", json={"eligibility": {}, "model_version": None})
    assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
    bad.close()
    good.close()


def test_revoke_invalidates_the_token_and_the_device_may_register_again(server_factory) -> None:
    srv = server_factory()
    dev = srv.device()
    assert dev.checkin()["action"] in ("train", "retry", "evaluate")  # the token is cached as valid now
    r = admin(srv, f"/v1/admin/devices/{dev.id}/revoke", {"reason": "lost phone"})
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    r = dev.client.post("/v1/checkin", json={"eligibility": {}, "model_version": None})
    assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
    assert "revoked" in r.json()["detail"]
    again = Device(srv)  # registers anew: a new id and token
    assert again.id != dev.id and again.checkin()["action"] in ("train", "retry", "evaluate")
    srv.restart()
    reconnect(dev, srv)
    reconnect(again, srv)
    r = dev.client.post("/v1/checkin", json={"eligibility": {}, "model_version": None})
    assert r.status_code == 401
    assert srv.admin_get(f"/v1/admin/devices/{dev.id}")["state"] == "revoked"
    # unknown ids; device tokens cannot call these routes
    r = admin(srv, "/v1/admin/devices/d_00000000deadbeef/ban")
    assert (r.status_code, r.json()["error"]) == (404, "unknown_device")
    r = again.client.post(f"/v1/admin/devices/{again.id}/revoke")
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    with srv.anon() as c:
        r = c.post(f"/v1/admin/devices/{again.id}/ban", headers={"Authorization": f"Bearer {ADMIN_TOKEN}x"})
    assert r.status_code == 401
    dev.close()
    again.close()


def test_a_device_client_re_registers_after_a_revoke_and_stops_when_banned(server_factory, tmp_path) -> None:
    from device_app.client import DeviceClient
    from device_app.http_client import ServerError

    srv = server_factory()
    client = DeviceClient(tmp_path / "device", srv.url, initial_bundle=False, secure_aggregation=())
    try:
        first = client.ensure_registered().device_id  # the key from $FK_REGISTRATION_KEY (tests/server_fixtures.py)
        assert admin(srv, f"/v1/admin/devices/{first}/revoke").status_code == 200
        client.sync()  # 401 revoked: the device registers again, once, and carries on
        second = client.state["device_id"]
        assert second != first and client.connection == "online"
        assert admin(srv, f"/v1/admin/devices/{second}/ban", {"reason": "emulator farm"}).status_code == 200
        with pytest.raises(ServerError) as err:
            client.sync()
        assert (err.value.status, err.value.reason) == (403, "banned")
        assert client.connection == "banned" and client.state["device_id"] == second  # no new registration
        assert registration(srv)["devices_in_good_standing"] == 0
    finally:
        client.close()
