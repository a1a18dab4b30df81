"""Blobs on disk: model versions, accepted updates, server optimizer state.

Every file is written to a temporary name, fsynced, renamed into place and its directory
fsynced *before* the database row that points at it commits. A crash can therefore leave
an unreferenced file behind (removed by `collect_garbage` at the next start) but never a
row pointing at a missing or half-written file.

Layout under the data dir:

    models/v000001.fkw        wire format, kind "weights", float32, header model_version = version
    updates/r000012/<device>-<nonce>.npy
                              one accepted delta as a flat float32 .npy (the decoded wire payload
                              in config.weight_specs() order); memory-mappable for robust aggregators
    optimizer/v000001.npz     server optimizer state after producing that version
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from models.bundle import fsync_path

TMP_SUFFIX = ".tmp"




class Store:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        for sub in ("models", "updates", "optimizer"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> Path:
        return self.root / rel

    # ------------------------------------------------------------------ generic
    def write_atomic(self, rel: str, write: Callable[[io.BufferedWriter], None], size: int | None = None) -> None:
        """Write through `write(f)` to a temp file, fsync, rename to `rel`, fsync the directory.
        `size`, when known, reserves the file's blocks up front (one extent instead of block-by-block
        delayed allocation while writing)."""
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                if size:
                    with contextlib.suppress(OSError, AttributeError):  # not every filesystem / OS has it
                        os.posix_fallocate(f.fileno(), 0, size)
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(final.parent)

    def write_unsynced(self, rel: str, write: Callable[[io.BufferedWriter], None]) -> None:
        """Write through a temp file and rename (never seen half-written), without fsync: for files a
        crash may lose."""
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.write_atomic(rel, lambda f: f.write(data))

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def delete(self, rel: str | None) -> None:
        if rel:
            (self.root / rel).unlink(missing_ok=True)

    # ------------------------------------------------------------------ models
    @staticmethod
    def model_rel(version: int) -> str:
        return f"models/v{version:06d}.fkw"

    def write_model(self, version: int, blob: bytes) -> tuple[str, str, int]:
        """Store a wire blob; returns (relative path, sha256 hex, size)."""
        rel = self.model_rel(version)
        self.write_bytes(rel, blob)
        return rel, hashlib.sha256(blob).hexdigest(), len(blob)

    # ------------------------------------------------------------------ updates
    @staticmethod
    def update_dir_rel(round_id: int) -> str:
        return f"updates/r{round_id:06d}"

    def write_update(self, round_id: int, device_id: str, tensors: Sequence[np.ndarray]) -> str:
        """Store one delta as a flat little-endian float32 .npy without concatenating it in memory."""
        total = int(sum(t.size for t in tensors))
        rel = f"{self.update_dir_rel(round_id)}/{device_id}-{secrets.token_hex(6)}.npy"
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (total,)})

        def write(f: io.BufferedWriter) -> None:
            f.write(header.getbuffer())
            for t in tensors:
                arr = np.ascontiguousarray(t, dtype="<f4")
                f.write(memoryview(arr).cast("B"))

        self.write_atomic(rel, write, size=len(header.getbuffer()) + 4 * total)
        return rel

    def open_update(self, rel: str) -> np.ndarray:
        """A read-only memory map of a stored delta (flat float32)."""
        return np.load(self.root / rel, mmap_mode="r")

    def delete_round_updates(self, round_id: int, rels: Iterable[str | None]) -> None:
        for rel in rels:
            self.delete(rel)
        d = self.root / self.update_dir_rel(round_id)
        try:
            d.rmdir()
        except OSError:
            pass

    # ------------------------------------------------------------------ optimizer state
    @staticmethod
    def opt_rel(version: int) -> str:
        return f"optimizer/v{version:06d}.npz"

    def write_opt_state(self, version: int, state: dict[str, np.ndarray]) -> str:
        rel = self.opt_rel(version)
        self.write_atomic(rel, lambda f: np.savez(f, **state))
        return rel

    def read_opt_state(self, rel: str) -> dict[str, np.ndarray]:
        with np.load(self.root / rel) as data:
            return {k: data[k] for k in data.files}

    def read_opt_steps(self, rel: str) -> int:
        """The server steps counted in an optimizer state file (0 without a count), reading only that entry."""
        with np.load(self.root / rel) as data:
            return int(data["round"]) if "round" in data.files else 0

    # ------------------------------------------------------------------ recovery
    def collect_garbage(self, live: set[str], min_age_s: float = 0.0) -> list[str]:
        """Delete temp files and any blob no database row references; returns what was removed. Files and
        folders modified within the last `min_age_s` stay (another server process may be writing them)."""
        removed = []
        cutoff = time.time() - min_age_s

        def old(p: Path) -> bool:
            try:
                return min_age_s <= 0 or p.stat().st_mtime < cutoff
            except FileNotFoundError:
                return False

        for sub in ("models", "updates", "optimizer"):
            for p in sorted((self.root / sub).rglob("*")):
                if not p.is_file():
                    continue
                rel = p.relative_to(self.root).as_posix()
                if (p.name.endswith(TMP_SUFFIX) or rel not in live) and old(p):
                    p.unlink(missing_ok=True)
                    removed.append(rel)
        for d in sorted((self.root / "updates").iterdir()):
            if d.is_dir() and not any(d.iterdir()) and old(d):
                try:
                    d.rmdir()
                except OSError:  # a file appeared meanwhile
                    pass
        return removed
