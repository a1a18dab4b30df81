"""The device's link to its server: the ServerAPI (built on first use from the settings),
registration, one re-registration when the server forgot the token, and the connection status the
user sees ("no server", "unknown", "online", "offline", "untrusted server", "banned": the server refuses
this device for good, docs/security.md)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from device_app.device_state import DeviceState
from device_app.http_client import Offline, ServerAPI, ServerError, UntrustedServer
from device_app.settings import ClientSettings

log = logging.getLogger("device_app.client")


class ServerConnection:
    def __init__(self, settings: ClientSettings, state: DeviceState, lock: threading.RLock, *,
                 api: ServerAPI | None = None, transport: Any = None, on_request: Callable[[Any], None] | None = None,
                 http_client: Any = None) -> None:
        self.settings = settings
        self.state = state
        self._lock = lock
        self._api = api
        self._transport = transport
        self._on_request = on_request
        self._http_client = http_client  # an httpx.Client shared by fleet devices
        self.status = "no server" if not settings.server_url else "unknown"
        self.last_error: str | None = None

    @property
    def api(self) -> ServerAPI | None:
        """None when no server is configured."""
        with self._lock:
            if self._api is None and self.settings.server_url:
                injected = self._transport is not None or self._http_client is not None
                self._api = ServerAPI(
                    self.settings.server_url,
                    token=self.state.data.get("token"),
                    device_id=self.state.data.get("device_id"),
                    registration_key=self.settings.registration_key,  # None: $FK_REGISTRATION_KEY
                    transport=self._transport,
                    on_request=self._on_request,
                    client=self._http_client,
                    # an injected transport / shared client was built with its own verification
                    ca_file=None if injected else self.settings.ca_file,
                    pin_sha256=None if injected else self.settings.pin_sha256,
                )
            return self._api

    def reset(self) -> None:
        """Drop the API (the server or its verification changed): the next use builds a new one."""
        if self._api is not None:
            self._api.close()
        self._api = None

    def online(self) -> None:
        self.status = "online"
        self.last_error = None

    def offline(self, exc: Exception) -> None:
        if isinstance(exc, UntrustedServer):  # not a dead network: someone else answered
            self.status = "untrusted server"
            log.warning("%s", exc)
        else:
            self.status = "offline"
            log.info("server unreachable: %s", exc)
        self.last_error = str(exc)

    def ensure_registered(self) -> ServerAPI:
        api = self.api
        if api is None:
            raise Offline("no server configured")
        if not api.token:
            device_id, token = api.register()
            with self._lock:
                self.state.data.update(device_id=device_id, token=token, registered_at=time.time())
                self.state.save()
            self.online()
        return api

    def call(self, fn: Callable[[ServerAPI], Any]) -> Any:
        """Run fn(api), re-registering once if the server forgot this device's token."""
        api = self.ensure_registered()
        try:
            result = fn(api)
        except ServerError as exc:
            if exc.reason == "banned":
                self.status, self.last_error = "banned", str(exc)
            if exc.reason != "unauthorized":  # revoked (or forgotten): register again, once
                raise
            with self._lock:
                for key in ("device_id", "token"):
                    self.state.data.pop(key, None)
                api.token = None
            api = self.ensure_registered()
            result = fn(api)
        self.online()
        return result
