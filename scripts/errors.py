"""The demo's failure type: a stage could not go on; the demo prints the message and exits 1."""
from __future__ import annotations


class DemoError(RuntimeError):
    pass
