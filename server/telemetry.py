"""Randomized-response telemetry (models/rr.py): devices report yes/no facts about a session through
the two-coin survey; the server keeps only counts and shows the de-biased rates.

    GET  /v1/telemetry/config   device   {questions, coins: {p_first, p_second}, local_epsilon, period_s}
    POST /v1/telemetry/rr       device   {coins: {p_first, p_second}, answers: {question: bool}}
                                         -> {"status": "accepted", period, questions}
    GET  /v1/admin/telemetry    admin    per question: reports, yes, yes_rate, rate (de-biased), stderr,
                                         95% CI, local epsilon per answer, coins

A device answers each question at most once per period (rr_period_s); a repeat in the same period is
refused (409 already_reported), so one device contributes at most epsilon per question per period.
The table holds (question, coins, yes count, report count) and which (device, question, period)
already reported: never an individual answer.
"""
from __future__ import annotations

import math
import time
from typing import Any

from models import rr
from server.errors import Rejection

SCHEMA = """
CREATE TABLE IF NOT EXISTS rr_counts (
    question TEXT NOT NULL, p_first REAL NOT NULL, p_second REAL NOT NULL,
    yes INTEGER NOT NULL DEFAULT 0, n INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (question, p_first, p_second)
);
CREATE TABLE IF NOT EXISTS rr_reported (
    device_id TEXT NOT NULL, question TEXT NOT NULL, period INTEGER NOT NULL,
    PRIMARY KEY (device_id, question, period)
);
"""


class Telemetry:
    def __init__(self, db, config) -> None:
        self.db = db
        self.config = config
        from server.secagg import install_schema

        install_schema(db, SCHEMA)

    @property
    def coins(self) -> rr.Coins:
        return rr.Coins(self.config.rr_p_first, self.config.rr_p_second)

    def public_config(self) -> dict[str, Any]:
        return {"questions": list(self.config.rr_questions), "coins": self.coins.to_dict(),
                "local_epsilon": rr.local_epsilon(self.coins), "period_s": self.config.rr_period_s}

    def report(self, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
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
        period = int(time.time() // self.config.rr_period_s)
        with self.db.write() as conn:
            for q in answers:
                if self.db.one("SELECT 1 AS x FROM rr_reported WHERE device_id = ? AND question = ? AND period = ?",
                               (device_id, q, period)) is not None:
                    raise Rejection("already_reported", f"{q!r} was already reported in this period")
            for q, a in answers.items():
                conn.execute("INSERT INTO rr_reported(device_id, question, period) VALUES (?, ?, ?)",
                             (device_id, q, period))
                conn.execute("INSERT INTO rr_counts(question, p_first, p_second, yes, n) VALUES (?, ?, ?, ?, 1)"
                             " ON CONFLICT(question, p_first, p_second) DO UPDATE SET yes = yes + excluded.yes,"
                             " n = n + 1", (q, want.p_first, want.p_second, int(a)))
            conn.execute("DELETE FROM rr_reported WHERE period < ?", (period - 1,))
        return {"status": "accepted", "period": period, "questions": sorted(answers)}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for r in self.db.all("SELECT * FROM rr_counts ORDER BY question, n DESC"):
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
