"""The privacy ledger of the global model and the privacy report (/v1/admin/privacy, model info, status).

Every closed round whose strategy released a DP aggregate adds its ledger event (noise multiplier z,
sampling probability q) to a models.dp.PrivacyLedger; the ledger is rebuilt from the rounds table when
needed, so the database is the only record. The report also carries, for mechanisms with device noise,
what one device's upload reveals on its own (server/strategy/dp.py device_view_epsilon).

DP-FTRL rounds (dp_mode ftrl) are no Gaussian-mechanism events: they are the leaves of one noise tree per
restart period, accounted by models.dp.ftrl_epsilon under the participation rule admission enforces
(server/ftrl.py), at delta 1e-6 unless dp_delta is set. The report then names the mechanism "DP-FTRL" and
says in one sentence what the guarantee covers and assumes (round.FtrlRule.describe).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from models import dp
from server.config import ServerConfig
from server.db import Db
from server.ftrl import META as FTRL_META
from server.round import FtrlRule, TrainParams, parse_params
from server.strategy import LedgerEvent, Strategy, device_view_epsilon


class PrivacyAccount:
    def __init__(self, config: ServerConfig, db: Db, lock: threading.RLock,
                 strategy_for: Callable[[TrainParams], Strategy]) -> None:
        self.config, self.db, self.lock = config, db, lock
        self._strategy_for = strategy_for
        self._ledger: dp.PrivacyLedger | None = None
        self._device_view: tuple[Any, dict[str, Any]] | None = None
        self._ftrl_eps: dict[tuple, float] = {}

    def ledger(self) -> dp.PrivacyLedger:
        if self._ledger is None:
            ledger = dp.PrivacyLedger(self.config.accountant)
            ledger.extend(self.db.dp_rounds())
            self._ledger = ledger
        return self._ledger

    def record(self, event: LedgerEvent | None, population: int) -> dict[str, Any]:
        """(Caller holds the lock, just before the round's closing transaction.) Add the round's event to
        the ledger; the round-row fields that record it (empty for a non-DP round). If the transaction
        fails, call `forget`."""
        if event is None:
            return {}
        if event.ftrl is not None:  # this round is the next leaf of the tree
            delta = self.config.dp_delta or dp.FTRL_DEFAULT_DELTA
            eps = self.ftrl_epsilon(event.noise_multiplier, len(self.db.dp_rounds(ftrl=True)) + 1, delta, event.ftrl)
            return {"noise_multiplier": event.noise_multiplier, "sampling_prob": event.sampling_prob,
                    "population": population, "delta": delta, "epsilon": eps}
        delta = self.config.dp_delta or dp.default_delta(population)
        ledger = self.ledger()
        ledger.add(event.noise_multiplier, event.sampling_prob)
        return {"noise_multiplier": event.noise_multiplier, "sampling_prob": event.sampling_prob,
                "population": population, "delta": delta, "epsilon": ledger.epsilon(delta)}

    def ftrl_epsilon(self, z: float, rounds: int, delta: float, rule: FtrlRule, accountant: str | None = None) -> float:
        """models.dp.ftrl_epsilon of `rounds` DP-FTRL rounds under `rule` (memoised: reports ask often)."""
        name = accountant or self.config.accountant
        key = (z, rounds, delta, rule, name)
        if key not in self._ftrl_eps:
            self._ftrl_eps[key] = dp.ftrl_epsilon(z, rounds, delta, rule.rule, name, **rule.epsilon_args())
        return self._ftrl_eps[key]

    def ftrl_rule(self, params: TrainParams) -> FtrlRule:
        """The rule of the data dir's tree (server/ftrl.py), else the configured one."""
        rec = self.db.get_meta(FTRL_META)
        if rec is None:
            return params.ftrl
        p = rec["params"]
        return FtrlRule(p["rule"], p["restart_rounds"], p["min_separation"], p["max_participations"])

    def forget(self) -> None:
        """Drop the in-memory ledger (rebuilt from the database on next use)."""
        self._ledger = None

    def report(self, accountant: str | None = None) -> dict[str, Any]:
        rounds = self.db.dp_rounds()
        population = self.db.count_devices()
        delta = self.config.dp_delta or dp.default_delta(population)
        name = accountant or self.config.accountant
        with self.lock:
            if name == self.config.accountant:
                eps = self.ledger().epsilon(delta)
            else:
                eps = dp.epsilon_for_rounds(rounds, delta, name) if rounds else 0.0
        params = parse_params("train", self.config.round_params())
        strategy = self._strategy_for(params)
        report = {"dp_mode": strategy.mechanism, "accountant": name, "epsilon": eps, "delta": delta,
                  "population": population, "dp_rounds": len(rounds),
                  "noise_multiplier": self.config.noise_multiplier, "clip_norm": self.config.clip_norm,
                  "secure_aggregation": self.config.secure_aggregation}
        report.update(self._device_view_epsilon(strategy, params, delta))
        ftrl_rounds = self.db.dp_rounds(ftrl=True)
        if strategy.mechanism == "ftrl" or ftrl_rounds:
            report = self._ftrl_report(report, ftrl_rounds, params, name)
        return report

    def _ftrl_report(self, report: dict[str, Any], rounds: list[tuple[float, float]], params: TrainParams,
                     accountant: str) -> dict[str, Any]:
        rule = self.ftrl_rule(params)
        z = rounds[-1][0] if rounds else float(params.noise_multiplier)
        delta = self.config.dp_delta or dp.FTRL_DEFAULT_DELTA
        out = dict(report, mechanism="DP-FTRL", epsilon=self.ftrl_epsilon(z, len(rounds), delta, rule, accountant),
                   delta=delta, dp_rounds=len(rounds), noise_multiplier=z, participation_rule=rule.rule,
                   **{f"ftrl_{k}": v for k, v in rule.epsilon_args().items()}, guarantee=rule.describe())
        if report["dp_rounds"]:  # Gaussian-mechanism rounds too (the data dir changed dp_mode)
            out.update(gaussian_dp_rounds=report["dp_rounds"], gaussian_epsilon=report["epsilon"],
                       gaussian_delta=report["delta"], composition_note="both kinds of rounds together are at most "
                       "(epsilon + gaussian_epsilon, delta + gaussian_delta)-DP (basic composition)")
        return out

    def _device_view_epsilon(self, strategy: Strategy, params: TrainParams, delta: float) -> dict[str, Any]:
        key = (strategy.mechanism, params.noise_multiplier, params.clip_norm, params.min_count, delta)
        if self._device_view is None or self._device_view[0] != key:  # dp_accounting takes a while
            self._device_view = (key, device_view_epsilon(strategy, params, delta))
        return self._device_view[1]


__all__ = ["PrivacyAccount"]
