"""What the device reports or fetches besides rounds: randomized-response telemetry about the
session (device_app/telemetry.py) and the population privacy report (epsilon) the server keeps."""
from __future__ import annotations

import threading
import time
from typing import Any

from models import dp
from device_app.connection import ServerConnection
from device_app.device_state import DeviceState
from device_app.http_client import Offline, ServerError
from device_app.sent_log import SentLog
from device_app.telemetry import SessionFacts, TelemetryReporter


def describe_privacy(privacy: dict[str, Any] | None) -> tuple[str, str]:
    """(short line, one-sentence guarantee) of the server's privacy report, for the privacy screen.

    The sentence is the server's (models.dp.guarantee_sentence, field "guarantee"); a report without one
    (an older server) gets no claim beyond its numbers."""
    if not privacy or privacy.get("epsilon") is None:
        return "unknown", "The server has not reported a privacy guarantee yet."
    eps, delta = float(privacy["epsilon"]), privacy.get("delta")
    accountant = dp.ACCOUNTANT_NAMES.get(privacy.get("accountant", ""), privacy.get("accountant") or "?")
    mechanism = privacy.get("mechanism") or privacy.get("dp_mode") or "?"
    at = f" at delta {float(delta):.3g}" if delta is not None else ""
    line = f"{dp.format_epsilon(eps)}{at} ({accountant}; {mechanism})"
    if privacy.get("guarantee"):
        return line, str(privacy["guarantee"])
    if privacy.get("dp_mode") == "none":
        return line, dp.guarantee_sentence("none", None, float(delta or dp.DEFAULT_DELTA), privacy.get("accountant", "rdp"))
    return line, "The server did not say what this epsilon assumes: treat it as no guarantee."


class Reports:
    def __init__(self, link: ServerConnection, state: DeviceState, sent_log: SentLog, net_lock: threading.Lock) -> None:
        self.link = link
        self.state = state
        self.sent_log = sent_log
        self._net_lock = net_lock
        self.session_facts = SessionFacts()  # yes/no facts of this session, reported by randomized response
        self.telemetry = TelemetryReporter()

    def refresh_privacy(self) -> dict[str, Any] | None:
        """The population epsilon the server reports (the last one known when the server cannot answer)."""
        try:
            report = self.link.call(lambda api: api.privacy())
        except (Offline, ServerError) as exc:
            if isinstance(exc, Offline):
                self.link.offline(exc)
            return self.state.data.get("privacy")
        with self.state.lock:
            self.state.data["privacy"] = report
            self.state.save()
        return report

    def telemetry_due(self) -> bool:
        return time.time() >= float(self.state.data.get("next_telemetry_at", 0.0)) and bool(self.session_facts.facts)

    def report_telemetry(self) -> dict[str, Any] | None:
        """Answer the server's yes/no questions about this session by randomized response; the session's
        facts are then forgotten. None offline or when refused."""
        facts = self.session_facts.take()
        try:
            with self._net_lock:
                answer = self.link.call(lambda api: self.telemetry.report(api, facts))
        except (Offline, ServerError) as exc:
            if isinstance(exc, Offline):
                self.link.offline(exc)
            return None
        with self.state.lock:
            period = float((answer or {}).get("period_s") or 3600.0)
            self.state.data["next_telemetry_at"] = time.time() + period
            self.state.save()
        if answer is not None:
            self.sent_log.append({"type": "telemetry", "status": "accepted", "answers": answer["sent"],
                                  "local_epsilon": self.telemetry.last.get("local_epsilon")})
        return answer
