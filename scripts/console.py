"""The demo's terminal output: time-stamped lines, stage banners, percent and perplexity cells."""
from __future__ import annotations

import threading
import time

_print_lock = threading.Lock()  # child-output pump threads print too
T0 = time.monotonic()  # the run's start: every line shows the seconds since


def say(msg: str = "", *, prefix: str = "") -> None:
    with _print_lock:
        stamp = f"{time.monotonic() - T0:6.1f}s"
        for line in (msg.splitlines() or [""]):
            print(f"{stamp} {prefix}{line}" if line else "", flush=True)


def stage(n: int, total: int, title: str) -> None:
    say()
    say(f"== {n}/{total} {title} ==")


def pct(x: float | None) -> str:
    return "  n/a " if x is None else f"{100 * x:5.2f}%"


def ppl(metrics: dict[str, float] | None) -> str:
    p = (metrics or {}).get("perplexity")
    return "   n/a" if p is None else f"{p:8.1f}"
