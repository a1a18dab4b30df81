"""Prometheus text exposition (format 0.0.4) without a client library.

Counters and summaries live in memory (they reset on restart, as Prometheus expects of counters);
gauges are read from the database when /metrics is scraped. Only counts: never update content.
"""
from __future__ import annotations

import math
import threading
from typing import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HELP = {
    "fk_checkins_total": ("counter", "Device check-ins by answer (train, evaluate, retry) and reason."),
    "fk_uploads_total": ("counter", "Update uploads by result: accepted, repeat (idempotent retry) or a rejection reason."),
    "fk_eval_reports_total": ("counter", "Evaluation reports by result."),
    "fk_registrations_total": ("counter", "Devices registered since start."),
    "fk_auth_failures_total": ("counter", "Requests refused for missing or invalid credentials."),
    "fk_rounds_finished_total": ("counter", "Rounds finished since start, by kind and final state."),
    "fk_upload_seconds": ("summary", "Time to validate, store and accumulate one accepted upload."),
    "fk_aggregation_seconds": ("summary", "Time to aggregate a round and store the new model version."),
    "fk_model_downloads_total": ("counter", "Model downloads by answer (200 or 304)."),
}


def _labels(labels: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((labels or {}).items()))


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _fmt_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {}

    def inc(self, name: str, labels: dict[str, str] | None = None, value: float = 1.0) -> None:
        key = _labels(labels)
        with self._lock:
            series = self._values.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            series = self._values.setdefault(name, {})
            series[(("__part", "count"),)] = series.get((("__part", "count"),), 0.0) + 1
            series[(("__part", "sum"),)] = series.get((("__part", "sum"),), 0.0) + seconds

    def get(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_labels(labels), 0.0)

    def render(self, gauges: Iterable[tuple[str, str, float, dict[str, str] | None]] = ()) -> str:
        """Counters/summaries plus gauges given as (name, help, value, labels)."""
        lines: list[str] = []
        with self._lock:
            snapshot = {name: dict(series) for name, series in self._values.items()}
        for name in sorted(set(snapshot) | set(HELP)):
            kind, text = HELP.get(name, ("untyped", name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            series = snapshot.get(name, {})
            if kind == "summary":
                lines.append(f"{name}_count {_fmt_value(series.get((('__part', 'count'),), 0.0))}")
                lines.append(f"{name}_sum {_fmt_value(series.get((('__part', 'sum'),), 0.0))}")
                continue
            for key in sorted(series):
                lines.append(f"{name}{_fmt_labels(key)} {_fmt_value(series[key])}")
        seen: set[str] = set()
        for name, text, value, labels in gauges:
            if name not in seen:
                lines.append(f"# HELP {name} {text}")
                lines.append(f"# TYPE {name} gauge")
                seen.add(name)
            lines.append(f"{name}{_fmt_labels(_labels(labels))} {_fmt_value(value)}")
        return "\n".join(lines) + "\n"
