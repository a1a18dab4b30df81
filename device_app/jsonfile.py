"""Small JSON files of the data dir (settings, state, pending metadata), replaced atomically so a crash
never leaves half a file, and private (0600: state.json holds the bearer token, settings.json the
registration key)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from device_app.private_files import open_private


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open_private(tmp) as f:
        f.write(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path, default: Any) -> Any:
    """The file's value, or `default` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return default
