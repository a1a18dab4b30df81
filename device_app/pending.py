"""pending/: a finished wire update waiting for the network (round-<id>.fkw, the bytes as they will be
sent, and round-<id>.json, its sent-log entry with the round's deadline and upload URL)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from device_app.jsonfile import read_json, write_json_atomic


class PendingUploads:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def save(self, rid: int, blob: bytes, entry: dict[str, Any]) -> None:
        self.dir.mkdir(exist_ok=True)
        (self.dir / f"round-{rid}.fkw").write_bytes(blob)
        write_json_atomic(self.dir / f"round-{rid}.json", entry)

    def rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("round-*.json"))

    def load(self, rid: int) -> tuple[dict[str, Any], bytes | None]:
        """(the entry, the bytes; None when they are gone)."""
        entry = read_json(self.dir / f"round-{rid}.json", {})
        blob_path = self.dir / f"round-{rid}.fkw"
        return entry, (blob_path.read_bytes() if blob_path.exists() else None)

    def drop(self, rid: int) -> None:
        for suffix in (".fkw", ".json"):
            try:
                (self.dir / f"round-{rid}{suffix}").unlink()
            except FileNotFoundError:
                pass

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
