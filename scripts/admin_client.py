"""The server's admin API as the demo and benchmarks use it (bearer token), and a probe of the
server build's secure-aggregation support."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from scripts.errors import DemoError  # a refused admin request stops the demo

ROOT = Path(__file__).resolve().parents[1]


class Admin:
    """A client of the server's /v1/admin endpoints (and model downloads) with the admin token."""

    def __init__(self, url: str, token: str) -> None:
        import httpx

        self.url = url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60.0)

    def get(self, path: str, **kw: Any) -> Any:
        r = self.http.get(path, **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, **kw: Any) -> Any:
        r = self.http.post(path, **kw)
        if r.status_code >= 400:
            raise DemoError(f"POST {path}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def model_bytes(self, version: int) -> bytes:
        r = self.http.get(f"/v1/models/{version}")
        r.raise_for_status()
        return r.content

    def close(self) -> None:
        self.http.close()


def server_supports_secagg() -> tuple[bool, str]:
    """(whether `python -m server` has --secure-aggregation, a line saying so for the terminal)."""
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    if "--secure-aggregation" in text:
        return True, "secure aggregation: on (server flag --secure-aggregation secagg)"
    return False, ("secure aggregation: NOT AVAILABLE in this server build (no --secure-aggregation flag): "
                   "falling back to distributed DP without SecAgg; the server sees each noised update")
