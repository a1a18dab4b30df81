"""Randomized-response telemetry on the device (models/rr.py; server side in server/telemetry/).

The device notes yes/no facts about the current session ("a suggestion was accepted", "the personal
model served suggestions"); at most once per the server's period it answers each of the server's
questions with randomized response and starts a new session. The true facts never leave the device:
only the randomized answers, each epsilon-locally-DP (ln 3 with fair coins). A device refuses coin
biases that would give a larger epsilon than its own limit (default ln 3), whatever the server asks.
"""
from __future__ import annotations

import math
import random
import threading
import time
from typing import Any

from models import rr

DEFAULT_MAX_EPSILON = math.log(3.0)


class SessionFacts:
    """What happened in this session (kept in memory, never sent as such)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.facts: dict[str, bool] = {}
        self.started = time.time()

    def note(self, question: str, value: bool = True) -> None:
        with self._lock:
            self.facts[question] = self.facts.get(question, False) or bool(value)

    def take(self) -> dict[str, bool]:
        """The session's facts; a new session starts."""
        with self._lock:
            out, self.facts, self.started = dict(self.facts), {}, time.time()
        return out


class TelemetryReporter:
    def __init__(self, max_epsilon: float = DEFAULT_MAX_EPSILON, rng: random.Random | None = None) -> None:
        self.max_epsilon = max_epsilon
        self.rng = rng or random.SystemRandom()
        self.last: dict[str, Any] | None = None

    def report(self, api: Any, facts: dict[str, bool]) -> dict[str, Any] | None:
        """Send randomized answers for the server's questions; None if refused (already reported, or the
        server's coins are less private than this device allows)."""
        from device_app.http_client import ServerError

        config = api.get_json("/v1/telemetry/config")
        coins = rr.Coins(float(config["coins"]["p_first"]), float(config["coins"]["p_second"]))
        if rr.local_epsilon(coins) > self.max_epsilon + 1e-9:
            self.last = {"status": "refused", "reason": "coins_too_revealing", "local_epsilon": rr.local_epsilon(coins)}
            return None
        answers = {q: rr.respond(bool(facts.get(q, False)), coins, self.rng) for q in config["questions"]}
        try:
            answer = api.post_json("/v1/telemetry/rr", {"coins": coins.to_dict(), "answers": answers})
        except ServerError as exc:
            if exc.reason == "already_reported":
                self.last = {"status": "already_reported"}
                return None
            raise
        self.last = {"status": "sent", "local_epsilon": rr.local_epsilon(coins), "questions": sorted(answers),
                     "period_s": config.get("period_s")}
        return {**answer, "period_s": config.get("period_s"), "sent": answers}


__all__ = ["SessionFacts", "TelemetryReporter", "DEFAULT_MAX_EPSILON"]
