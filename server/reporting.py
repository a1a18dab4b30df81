"""Read-only views for admins, the status page and /metrics: round summaries, versions, server status."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from models import dp
from server.round import Round

if TYPE_CHECKING:
    from server.rounds import RoundManager

SUMMARY_FIELDS = ("id", "kind", "state", "base_version", "candidate_version", "created_at", "deadline", "closed_at",
                  "result_version", "epsilon", "delta", "noise_multiplier", "sampling_prob", "population")


def round_summary(manager: RoundManager, rnd: Round | None) -> dict[str, Any] | None:
    if rnd is None:
        return None
    db = manager.db
    admitted = rnd.n_admitted if rnd.n_admitted is not None else db.count_admitted(rnd.id)
    if rnd.kind == "train":
        accepted = rnd.n_updates if rnd.n_updates is not None else db.count_updates(rnd.id)
    else:
        accepted = rnd.n_reports if rnd.n_reports is not None else db.count_eval_reports(rnd.id)
    p = rnd.params
    out = {k: getattr(rnd, k) for k in SUMMARY_FIELDS}
    out.update(goal=p.goal, min_count=p.min_count, max_admitted=p.max_admitted, admitted=admitted,
               accepted=accepted, dropouts=max(0, admitted - accepted) if rnd.is_over else None,
               outcome=rnd.outcome, params=rnd.params_dict)
    if rnd.protocol != "none":
        out["secure_aggregation"] = manager.strategy(rnd).protocol_summary(rnd)
    if rnd.kind == "train":
        out["mechanism"] = round_mechanism(rnd)
    return out


def round_mechanism(rnd: Round) -> str:
    """The privacy mechanism of a training round's release, as the privacy report names it
    (models.dp.mechanism_label): DP-FTRL, DP-FedAvg with selection q / without sampling, or none."""
    mode = rnd.params_dict.get("dp_mode", "none")
    if mode == "none":
        return "none"
    if mode == "ftrl":
        return dp.mechanism_label("dp-ftrl")
    q = rnd.params_dict.get("selection_q")
    return dp.mechanism_label("dp-fedavg", [1.0 if q is None else float(q)])


class Reporter:
    """Server-wide views; `telemetry_summary` is the randomized-response service's summary."""

    def __init__(self, manager: RoundManager, telemetry_summary: Callable[[], dict[str, Any]]) -> None:
        self.m = manager
        self.telemetry_summary = telemetry_summary

    def round_summary(self, rnd: Round | None) -> dict[str, Any] | None:
        return round_summary(self.m, rnd)

    def list_rounds(self, limit: int = 100, kind: str | None = None) -> list[dict[str, Any]]:
        return [round_summary(self.m, r) for r in self.m.db.list_rounds(limit, kind)]

    def list_versions(self) -> list[dict[str, Any]]:
        models = self.m.models
        g, c = models.global_version(), models.candidate_version()
        out = []
        for m in self.m.db.list_models():
            out.append({k: m[k] for k in ("version", "created_at", "source", "sha256", "size", "parent_version",
                                          "round_id", "candidate_state", "was_global", "note", "info")}
                       | {"is_global": m["version"] == g, "is_candidate": m["version"] == c})
        return out

    def status(self) -> dict[str, Any]:
        db, models = self.m.db, self.m.models
        rounds: dict[str, dict[str, int]] = {}
        for (kind, state), n in db.round_state_counts().items():
            rounds.setdefault(kind, {})[state] = n
        now = time.time()
        return {
            "initialized": models.initialized,
            "config_hash": models.model_config.config_hash() if models.initialized else None,
            "vocab_hash": models.vocab.content_hash() if models.initialized else None,
            "global_version": models.global_version(),
            "candidate_version": models.candidate_version(),
            "training_enabled": models.training_enabled(),
            "devices": {"registered": db.count_devices(),
                        "active_24h": db.count_active_devices(now - 86400),
                        "participations": db.count_participations()},
            "rounds": rounds,
            "current_round": round_summary(self.m, db.active_round("train")),
            "current_eval_round": round_summary(self.m, db.active_round("eval")),
            "privacy": self.m.account.report() if models.initialized else None,
            "telemetry": self.telemetry_summary(),
        }

    def metrics_text(self) -> str:
        """Prometheus exposition: the counters of server/metrics.py plus gauges from the status."""
        gauges: list[tuple[str, str, float, dict[str, str] | None]] = []
        status = self.status()
        devices = status["devices"]
        gauges.append(("fk_devices_registered", "Registered devices.", devices["registered"], None))
        gauges.append(("fk_devices_active_24h", "Devices that took part in the last 24 hours.", devices["active_24h"],
                       None))
        gauges.append(("fk_participations", "Updates accepted, all rounds.", devices["participations"], None))
        gauges.append(("fk_initialized", "1 once the server has a model.", int(status["initialized"]), None))
        gauges.append(("fk_training_enabled", "1 while training rounds run.", int(status["training_enabled"]), None))
        gauges.append(("fk_global_version", "Current global model version.", status["global_version"] or 0, None))
        gauges.append(("fk_candidate_version", "Staged candidate version (0: none).", status["candidate_version"] or 0,
                       None))
        for kind, states in sorted(status["rounds"].items()):
            for state, n in sorted(states.items()):
                gauges.append(("fk_rounds", "Rounds by kind and state.", n, {"kind": kind, "state": state}))
        cur = status["current_round"]
        if cur:
            gauges.append(("fk_current_round_id", "Id of the open training round.", cur["id"], None))
            gauges.append(("fk_current_round_admitted", "Devices admitted to the open training round.",
                           cur["admitted"], None))
            gauges.append(("fk_current_round_accepted", "Updates accepted in the open training round.",
                           cur["accepted"], None))
            gauges.append(("fk_current_round_goal", "Goal of the open training round.", cur["goal"], None))
        privacy = status["privacy"]
        if privacy:
            gauges.append(("fk_epsilon", "Cumulative epsilon of the global model.", privacy["epsilon"], None))
            gauges.append(("fk_dp_delta", "Delta the epsilon is reported at.", privacy["delta"], None))
            gauges.append(("fk_dp_rounds", "Rounds in the privacy ledger.", privacy["dp_rounds"], None))
        return self.m.metrics.render(gauges)


__all__ = ["Reporter", "round_summary", "round_mechanism"]
