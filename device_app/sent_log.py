"""sent.jsonl: a line for everything that left the device (or was meant to): sizes, hashes, norms,
statuses; never content. The user can read it; tests check it against the wire."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any


class SentLog:
    def __init__(self, path: Path, lock: threading.RLock) -> None:
        self.path = path
        self._lock = lock

    def append(self, entry: dict[str, Any]) -> None:
        entry = {"ts": time.time(), **entry}
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True, default=float) + "\n")

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
