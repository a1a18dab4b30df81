"""The privacy ledger of the global model and the privacy report (/v1/admin/privacy, /v1/model/info's
"privacy" that devices show their users, and /status's "privacy").

Every closed round whose strategy released a DP aggregate adds its ledger event to a models.dp.PrivacyLedger;
the ledger is rebuilt from the rounds table when needed, so the database is the only record. A DP-FedAvg
round (central, distributed, local) is one Poisson-subsampled Gaussian with the round's noise multiplier and
  q = the round's selection_q   when the server drew its cohort in secret (server/strategy/dp.py), else
  q = 1                         every device assumed in every round: no amplification by sampling.
Rounds closed before selection existed recorded q = aggregated / registered, an amplification the server
never enforced: the ledger re-accounts them at q = 1. A capped selection (selection_max_cohort) is accounted
at sensitivity 2C (noise multiplier z / 2). The report also carries, for mechanisms with device noise, what
one device's upload reveals on its own (server/strategy/dp.py device_view_epsilon).

DP-FTRL rounds (dp_mode ftrl) are no Gaussian-mechanism events: they are the leaves of one noise tree per
restart period, accounted by models.dp.ftrl_epsilon under the participation rule admission enforces
(server/ftrl.py).

Every epsilon is at delta = dp_delta (1e-6 unless set), and every report says in one sentence
(models.dp.guarantee_sentence, field "guarantee") which mechanism, epsilon at which delta, which accountant,
what it covers and what it assumes; "mechanism" names it (DP-FTRL / DP-FedAvg with selection q = ... /
DP-FedAvg without sampling (no amplification) / none).
"""
from __future__ import annotations

import json
import threading
from typing import Any, Callable

from models import dp
from server.config import ServerConfig
from server.db import Db
from server.ftrl import META as FTRL_META
from server.round import FtrlRule, TrainParams, parse_params
from server.strategy import LedgerEvent, Strategy, device_view_epsilon
from server.strategy.dp import DPStrategy, ftrl_assumptions, selection_clauses

GAUSSIAN_ROUNDS_SQL = (
    "SELECT noise_multiplier, sampling_prob, params FROM rounds WHERE state = 'closed' AND kind = 'train'"
    " AND noise_multiplier IS NOT NULL AND COALESCE(json_extract(params, '$.dp_mode'), '') != 'ftrl' ORDER BY id")


def accounted_round(noise_multiplier: float, sampling_prob: float, params: dict[str, Any]) -> tuple[float, float]:
    """(noise multiplier / sensitivity, q) the accountant composes for one closed DP-FedAvg round: its q only
    when the round drew its cohort (selection_q in its frozen params), else 1."""
    if params.get("selection_q") is None:
        return float(noise_multiplier), 1.0
    sensitivity = 2.0 if params.get("selection_max_cohort") is not None else 1.0
    return float(noise_multiplier) / sensitivity, float(sampling_prob)


class PrivacyAccount:
    def __init__(self, config: ServerConfig, db: Db, lock: threading.RLock,
                 strategy_for: Callable[[TrainParams], Strategy]) -> None:
        self.config, self.db, self.lock = config, db, lock
        self._strategy_for = strategy_for
        self._ledger: dp.PrivacyLedger | None = None
        self._device_view: tuple[Any, dict[str, Any]] | None = None
        self._ftrl_eps: dict[tuple, float] = {}

    def gaussian_rounds(self) -> list[tuple[float, float]]:
        """(noise multiplier / sensitivity, q) of every released DP-FedAvg round, as accounted."""
        return [accounted_round(r["noise_multiplier"], r["sampling_prob"], json.loads(r["params"] or "{}"))
                for r in self.db.all(GAUSSIAN_ROUNDS_SQL)]

    def ledger(self) -> dp.PrivacyLedger:
        """The ledger of the database's released rounds. Kept in memory and composed incrementally: rounds
        another server process closed (--cluster) are added when seen; a ledger that disagrees is rebuilt."""
        rounds = self.gaussian_rounds()
        ledger = self._ledger
        if ledger is None or ledger.rounds != rounds[:len(ledger.rounds)]:
            ledger = dp.PrivacyLedger(self.config.accountant)
        ledger.extend(rounds[len(ledger.rounds):])
        self._ledger = ledger
        return ledger

    def record(self, event: LedgerEvent | None, population: int) -> dict[str, Any]:
        """(Caller holds the lock, just before the round's closing transaction.) Add the round's event to
        the ledger; the round-row fields that record it (empty for a non-DP round). If the transaction
        fails, call `forget`."""
        if event is None:
            return {}
        delta = self.config.dp_delta
        if event.ftrl is not None:  # this round is the next leaf of the tree
            eps = self.ftrl_epsilon(event.noise_multiplier, len(self.db.dp_rounds(ftrl=True)) + 1, delta, event.ftrl)
            return {"noise_multiplier": event.noise_multiplier, "sampling_prob": event.sampling_prob,
                    "population": population, "delta": delta, "epsilon": eps}
        ledger = self.ledger()
        ledger.add(event.accounted_multiplier, event.sampling_prob)
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
        """The privacy report: epsilon at delta of the global model, the mechanism, and the guarantee in words."""
        rounds = self.gaussian_rounds()
        population = self.db.count_devices()
        delta = self.config.dp_delta
        name = accountant or self.config.accountant
        with self.lock:
            if name == self.config.accountant:
                eps = self.ledger().epsilon(delta)
            else:
                eps = dp.epsilon_for_rounds(rounds, delta, name) if rounds else 0.0
        params = parse_params("train", self.config.round_params())
        strategy = self._strategy_for(params)
        q_now = 1.0 if params.selection_q is None else float(params.selection_q)
        report = {"dp_mode": strategy.mechanism, "accountant": name, "epsilon": eps, "delta": delta,
                  "population": population, "dp_rounds": len(rounds),
                  "noise_multiplier": self.config.noise_multiplier, "clip_norm": self.config.clip_norm,
                  "secure_aggregation": self.config.secure_aggregation, "selection_q": params.selection_q}
        report.update(self._fedavg_guarantee(strategy, params, rounds, eps, delta, name))
        if strategy.mechanism != "ftrl":
            report["sampling_prob"] = q_now
        report.update(self._device_view_epsilon(strategy, params, delta))
        ftrl_rounds = self.db.dp_rounds(ftrl=True)
        if strategy.mechanism == "ftrl" or ftrl_rounds:
            report = self._ftrl_report(report, ftrl_rounds, params, name)
        return report

    def _fedavg_guarantee(self, strategy: Strategy, params: TrainParams, rounds: list[tuple[float, float]],
                          eps: float, delta: float, accountant: str) -> dict[str, Any]:
        """mechanism, amplification and guarantee of the DP-FedAvg (or no-DP) part of the report."""
        qs = [q for _, q in rounds]
        if isinstance(strategy, DPStrategy) and strategy.mechanism != "ftrl" and not qs:
            qs = [1.0 if params.selection_q is None else float(params.selection_q)]
        if not rounds and not (isinstance(strategy, DPStrategy) and strategy.mechanism != "ftrl"):
            return {"mechanism": "none", "amplification": "none",
                    "guarantee": dp.guarantee_sentence("none", None, delta, accountant)}
        trust = strategy.trust_clause(params) if isinstance(strategy, DPStrategy) else ""
        sampled = sorted({q for q in qs if q < 1.0})
        amplification = ("none (q = 1: every device assumed in every round)" if not sampled else
                         "Poisson selection q = " + ", ".join(f"{q:.3g}" for q in sampled)
                         + (" in some rounds, none in others" if len(sampled) < len(set(qs)) else ""))
        assumptions = ([trust] if trust else []) + selection_clauses(qs, params.selection_max_cohort)
        return {"mechanism": dp.mechanism_label("dp-fedavg", qs), "amplification": amplification,
                "guarantee": dp.guarantee_sentence("dp-fedavg", eps, delta, accountant, "device", len(rounds),
                                                   sampling_probs=qs, assumptions=assumptions)}

    def _ftrl_report(self, report: dict[str, Any], rounds: list[tuple[float, float]], params: TrainParams,
                     accountant: str) -> dict[str, Any]:
        rule = self.ftrl_rule(params)
        z = rounds[-1][0] if rounds else float(params.noise_multiplier)
        delta = self.config.dp_delta
        eps = self.ftrl_epsilon(z, len(rounds), delta, rule, accountant)
        out = dict(report, mechanism="DP-FTRL", amplification="none", epsilon=eps,
                   delta=delta, dp_rounds=len(rounds), noise_multiplier=z, participation_rule=rule.rule,
                   **{f"ftrl_{k}": v for k, v in rule.epsilon_args().items()},
                   guarantee=dp.guarantee_sentence("dp-ftrl", eps, delta, accountant, "device", len(rounds),
                                                   assumptions=ftrl_assumptions(rule, params.secure_aggregation)))
        out.pop("sampling_prob", None)
        if report["dp_rounds"]:  # Gaussian-mechanism rounds too (the data dir changed dp_mode)
            out.update(gaussian_dp_rounds=report["dp_rounds"], gaussian_epsilon=report["epsilon"],
                       gaussian_delta=report["delta"], gaussian_mechanism=report["mechanism"],
                       gaussian_guarantee=report["guarantee"],
                       composition_note="both kinds of rounds together are at most "
                       "(epsilon + gaussian_epsilon, delta + gaussian_delta)-DP (basic composition)")
        return out

    def _device_view_epsilon(self, strategy: Strategy, params: TrainParams, delta: float) -> dict[str, Any]:
        key = (strategy.mechanism, params.noise_multiplier, params.clip_norm, params.min_count, delta)
        if self._device_view is None or self._device_view[0] != key:  # dp_accounting takes a while
            self._device_view = (key, device_view_epsilon(strategy, params, delta))
        return self._device_view[1]


__all__ = ["PrivacyAccount"]
