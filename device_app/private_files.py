"""Device secrets at rest (issue #18): the data dir is 0700, and the files holding the bearer token
(state.json), the user's text (text.db and its journal) and the settings (the registration key) are
0600, whatever the umask. Other local users can then read none of them.

    private_dir(path)          # mkdir -p, then chmod 0700 (a dir created earlier with 0755 is tightened)
    create_private_file(path)  # exists afterwards with mode 0600 (created so; an older file is chmodded)
    open_private(path, "w")    # a text file opened for writing, created 0600
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import IO

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # not ours to change (e.g. a read-only mount): keep going
        if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
            os.chmod(path, DIR_MODE)
    return path


def create_private_file(path: str | os.PathLike) -> Path:
    """Make sure `path` exists with mode 0600 (created empty if missing); its content is untouched."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def open_private(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> IO:
    """`path` truncated and opened for writing, with mode 0600 from its creation on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # an existing file keeps its old mode through O_CREAT
    return os.fdopen(fd, mode, encoding=None if "b" in mode else encoding)


def tighten(path: str | os.PathLike) -> None:
    """chmod 0600 if the file exists (e.g. SQLite's journal, created beside the database)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_IMODE(os.stat(path).st_mode) != FILE_MODE:
            os.chmod(path, FILE_MODE)


__all__ = ["DIR_MODE", "FILE_MODE", "create_private_file", "open_private", "private_dir", "tighten"]
