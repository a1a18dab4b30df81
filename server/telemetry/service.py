"""Randomized-response telemetry (models/rr.py): devices report yes/no facts about a session through
the two-coin survey; the server keeps only counts and shows the de-biased rates.

A device answers each question at most once per period (rr_period_s); a repeat in the same period is
refused (409 already_reported), so one device contributes at most epsilon per question per period.
"""
from __future__ import annotations

import math
import time
from typing import Any

from models import rr
from server.config import ServerConfig
from server.db import Db
from server.errors import Rejection
from server.telemetry.store import TelemetryStore


class Telemetry:
    def __init__(self, db: Db, config: ServerConfig) -> None:
        self.db = db
        self.config = config
        self.rows = TelemetryStore(db)

    @property
    def coins(self) -> rr.Coins:
        return rr.Coins(self.config.rr_p_first, self.config.rr_p_second)

    def public_config(self) -> dict[str, Any]:
        return {"questions": list(self.config.rr_questions), "coins": self.coins.to_dict(),
                "local_epsilon": rr.local_epsilon(self.coins), "period_s": self.config.rr_period_s}

    def _answers(self, body: dict[str, Any]) -> dict[str, bool]:
        """The report's answers, after checking its coins are the server's and its questions known."""
        coins = body.get("coins") or {}
        if not isinstance(coins, dict):
            raise Rejection("bad_request", "coins must be an object {p_first, p_second}", status=422)
        want = self.coins
        try:
            if not (math.isclose(float(coins.get("p_first")), want.p_first)
                    and math.isclose(float(coins.get("p_second")), want.p_second)):
                raise ValueError
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float range
            raise Rejection("coins_mismatch", f"answers must use the server's coins {want.to_dict()}") from None
        answers = body.get("answers")
        if not isinstance(answers, dict) or not answers:
            raise Rejection("bad_request", "answers must be an object {question: bool}", status=422)
        for q, a in answers.items():
            if q not in self.config.rr_questions:
                raise Rejection("bad_request", f"unknown question {q!r}", status=422)
            if not isinstance(a, bool):
                raise Rejection("bad_request", f"answer to {q!r} must be true or false", status=422)
        return answers

    def report(self, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
        answers = self._answers(body)
        want = self.coins
        period = int(time.time() // self.config.rr_period_s)
        with self.db.write():
            for q in answers:
                if self.rows.reported(device_id, q, period):
                    raise Rejection("already_reported", f"{q!r} was already reported in this period")
            for q, a in answers.items():
                self.rows.add(device_id, q, period, want.p_first, want.p_second, a)
            self.rows.forget_before(period - 1)
        return {"status": "accepted", "period": period, "questions": sorted(answers)}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for r in self.rows.counts():
            est = rr.estimate(int(r["yes"]), int(r["n"]), rr.Coins(r["p_first"], r["p_second"]))
            if r["question"] in out:  # an earlier coin setting: keep it beside the current one
                out[r["question"]].setdefault("other_coins", []).append(est)
            else:
                out[r["question"]] = est
        for q in self.config.rr_questions:
            out.setdefault(q, rr.estimate(0, 0, self.coins))
        return {"coins": self.coins.to_dict(), "local_epsilon": rr.local_epsilon(self.coins),
                "period_s": self.config.rr_period_s, "questions": out}


__all__ = ["Telemetry"]
