"""state.json: what the device keeps about its server (registration, model ETag, counters, the last
round and outcome, schedule times). It belongs to one server URL: another URL starts it afresh.
It holds the bearer token: written 0600 (jsonfile.write_json_atomic), an older file tightened at load."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from device_app.jsonfile import read_json, write_json_atomic
from device_app.private_files import tighten


class DeviceState:
    """`data` is the plain dict (the fleet reads and sets schedule times in it directly)."""

    def __init__(self, path: Path, server_url: str | None, lock: threading.RLock) -> None:
        self.path = path
        self.lock = lock
        tighten(path)  # the bearer token: 0600, also for a file written before files were private
        self.data: dict[str, Any] = read_json(path, {})
        if self.data.get("server_url") != server_url:
            # Another server: its registration, ETag and counters do not apply.
            self.reset(server_url)

    def reset(self, server_url: str | None) -> None:
        self.data = {"server_url": server_url}

    def save(self) -> None:
        with self.lock:
            write_json_atomic(self.path, self.data)

    def record_contribution(self, last_round: dict[str, Any]) -> None:
        """An update the server accepted: count it and remember its round."""
        with self.lock:
            self.data["contributions"] = int(self.data.get("contributions", 0)) + 1
            self.data["last_round"] = last_round
            self.save()

    def count(self, key: str) -> None:
        """One more of `key` (evaluations, ...), saved."""
        with self.lock:
            self.data[key] = int(self.data.get(key, 0)) + 1
            self.save()
