"""The Paillier key holder's signing key, pinned on disk (issue #18).

A Paillier round's task carries the key holder's public key signed with the key holder's Ed25519
signing key (device_app/secagg.py PaillierHook checks the signature). Which signing key to trust is
either shipped (`trusted_keyholder_keys`) or learnt on first use and then pinned here, in
<data dir>/keyholder_pin.json (0600), per server origin (scheme, host, port of the configured server,
never a URL the server supplies): a server that later hands out a task signed by another key, or
names another key holder URL, is refused with `untrusted_keyholder` — also after a restart.

    hook = PinnedPaillierHook(data_dir / "keyholder_pin.json")
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence

from device_app.jsonfile import read_json, write_json_atomic
from device_app.secagg import PaillierHook, SecAggError, default_hooks
from device_app.transport import origin_of

PIN_FILE = "keyholder_pin.json"


def origin_key(base_url: str) -> str:
    scheme, host, port = origin_of(base_url)
    return f"{scheme}://{host}:{port}"


class KeyholderPins:
    """server origin -> the key holder's signing key (base64) first trusted for it; persisted."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        data = read_json(self.path, {}) if self.path else {}
        self.keys: dict[str, str] = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def check(self, origin: str, verify_key: str) -> None:
        """Pin `verify_key` for `origin` on first use; raise SecAggError untrusted_keyholder if another is pinned."""
        with self._lock:
            pinned = self.keys.get(origin)
            if pinned is None:
                self.keys[origin] = verify_key
                if self.path:
                    write_json_atomic(self.path, self.keys)
            elif pinned != verify_key:
                raise SecAggError("untrusted_keyholder", f"the key holder's signing key for {origin} changed since it "
                                                         "was pinned (a key holder the device does not know)")


class PinnedPaillierHook(PaillierHook):
    """PaillierHook whose trust-on-first-use pin of the key holder's signing key is kept on disk, per
    configured server origin (not per key-holder URL, which the server supplies)."""

    def __init__(self, pin_path: str | os.PathLike | None, trusted_keyholder_keys: Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(trusted_keyholder_keys, **kwargs)
        self.pins = KeyholderPins(pin_path)
        self._origin = threading.local()

    def _key(self, params: dict[str, Any]):  # noqa: ANN202 - models.paillier's PublicKey
        # the signature (and the shipped keys, when given) first: only a verified key is ever pinned
        origin = getattr(self._origin, "value", None)
        # PaillierHook's own (in-memory) pin is keyed by the URL it is given: the server origin, not the
        # key holder URL the server names
        key = super()._key({**params, "keyholder_url": origin or params.get("keyholder_url")})
        if not self.trusted and origin is not None:
            self.pins.check(origin, str(params["public_key"].get("verify_key", "")))
        return key

    def trusted_key(self, base_url: str, params: dict[str, Any]):  # noqa: ANN201 - models.paillier's PublicKey
        """The task's Paillier public key if its signature verifies and its signing key is the one pinned
        (or shipped) for the server at `base_url`; SecAggError otherwise."""
        self._origin.value = origin_key(base_url)
        try:
            return self._key(params)
        finally:
            self._origin.value = None

    def submit(self, api: Any, task: Any, tensors: Any, metadata: dict[str, Any]) -> dict[str, Any]:
        self._origin.value = origin_key(api.base_url)
        try:
            return super().submit(api, task, tensors, metadata)
        finally:
            self._origin.value = None


def device_hooks(data_dir: str | os.PathLike) -> list:
    """A DeviceClient's default hooks: secagg.default_hooks with the Paillier pin kept on disk."""
    hooks = [h for h in default_hooks(data_dir) if not isinstance(h, PaillierHook)]
    return [*hooks, PinnedPaillierHook(Path(data_dir) / PIN_FILE)]


__all__ = ["KeyholderPins", "PinnedPaillierHook", "PIN_FILE", "device_hooks", "origin_key"]
