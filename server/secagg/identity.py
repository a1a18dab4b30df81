"""The device identity registry: each device's Ed25519 identity key, registered once and never replaced.

Devices verify every peer's advertised round keys against the peer's identity key and pin identity keys
they have seen (trust on first use); the server verifies advertise and consistency signatures with it.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from models import secagg_math as sm
from server.errors import Rejection
from server.secagg.store import SecAggStore


class IdentityRegistry:
    def __init__(self, rows: SecAggStore, lock: threading.RLock) -> None:
        self.rows, self.lock = rows, lock
        self._keys: dict[str, bytes] = {}  # registered identity keys (never replaced, so never stale)

    def register(self, device_id: str, public_key_b64: str) -> dict[str, Any]:
        try:
            key = sm.unb64(public_key_b64, 32)
        except sm.SecAggMathError as exc:
            raise Rejection("bad_request", f"public_key: {exc}", status=422) from None
        canonical = sm.b64(key)
        with self.lock:
            row = self.rows.identity(device_id)
            if row is not None:
                if row["public_key"] != canonical:
                    raise Rejection("identity_exists", "this device already registered a different identity key")
                return {"device_id": device_id, "public_key": canonical, "registered_at": row["registered_at"],
                        "created": False}
            now = time.time()
            with self.rows.db.write():
                self.rows.add_identity(device_id, canonical, now)
        return {"device_id": device_id, "public_key": canonical, "registered_at": now, "created": True}

    def get(self, device_id: str) -> dict[str, Any]:
        row = self.rows.identity(device_id)
        if row is None:
            raise Rejection("unknown_identity", f"device {device_id} has no registered identity key")
        return row

    def key(self, device_id: str) -> bytes:
        """The device's identity key (no_identity if it registered none)."""
        key = self._keys.get(device_id)
        if key is None:
            row = self.rows.identity(device_id)
            if row is None:
                raise Rejection("no_identity", "register an identity key first (POST /v1/devices/identity)")
            key = self._keys[device_id] = sm.unb64(row["public_key"], 32)
        return key


__all__ = ["IdentityRegistry"]
