"""Evaluation rounds, the pure part: the evaluate task, report validation, the summary and the decision.

A staged candidate (pushed by an admin, or, with release gating, a version a training round produced) is
sent to a fraction of devices, which report recall and loss of the candidate and of the round's baseline
(the served version); it is promoted / released only if it is not worse (promotion_tolerance, and
optionally promotion_loss_tolerance). The durable side (rows, versions) is in server/round_close.py.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable

from server.errors import Rejection
from server.round import EvalParams, Round

MAX_EVAL_METRICS = 32


def _finite(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def in_sample(device_id: str, candidate: int, fraction: float) -> bool:
    """Whether a device evaluates this candidate (deterministic per device and candidate)."""
    if fraction >= 1.0:
        return True
    h = hashlib.sha256(f"{device_id}:{candidate}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < fraction


def evaluate_task(rnd: Round, config_hash: str) -> dict[str, Any]:
    return {"type": "evaluate", "round_id": rnd.id, "deadline": rnd.deadline, "config_hash": config_hash,
            "candidate_version": rnd.candidate_version, "baseline_version": rnd.base_version,
            "model_urls": {str(rnd.candidate_version): f"/v1/models/{rnd.candidate_version}",
                           str(rnd.base_version): f"/v1/models/{rnd.base_version}"},
            "report_url": f"/v1/rounds/{rnd.id}/eval"}


def report_sha(results: list[dict[str, Any]]) -> str:
    canonical = json.dumps(sorted(results, key=lambda r: r.get("model_version", 0)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate_results(rnd: Round, results: list[dict[str, Any]], max_examples: int) -> None:
    """Refuse (bad_report) anything but one well-formed result per compared version."""
    want = {rnd.candidate_version, rnd.base_version}
    got = [r.get("model_version") for r in results]
    if sorted(got) != sorted(want) or len(got) != len(want):
        raise Rejection("bad_report", f"report must cover exactly model versions {sorted(want)}, got {got}")
    for r in results:
        n = r.get("num_examples")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_examples:
            raise Rejection("bad_report", f"num_examples must be an int in [1, {max_examples}]")
        if not _finite(r.get("recall")) or not 0.0 <= r["recall"] <= 1.0:
            raise Rejection("bad_report", f"recall must be a number in [0, 1], got {r.get('recall')!r}")
        if not _finite(r.get("loss")) or r["loss"] < 0:
            raise Rejection("bad_report", f"loss must be a finite number >= 0, got {r.get('loss')!r}")
        metrics = r.get("metrics") or {}
        if not isinstance(metrics, dict) or len(metrics) > MAX_EVAL_METRICS \
                or not all(isinstance(k, str) and _finite(v) for k, v in metrics.items()):
            raise Rejection("bad_report", "metrics must be an object of finite numbers")


def summarize(reports: Iterable[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Example-weighted recall and loss per model version over the round's reports."""
    sums: dict[int, dict[str, float]] = {}
    for row in reports:
        for r in row["report"]["results"]:
            s = sums.setdefault(int(r["model_version"]), {"examples": 0.0, "recall": 0.0, "loss": 0.0, "devices": 0})
            n = float(r["num_examples"])
            s["examples"] += n
            s["recall"] += n * float(r["recall"])
            s["loss"] += n * float(r["loss"])
            s["devices"] += 1
    return {v: {"recall": s["recall"] / s["examples"], "loss": s["loss"] / s["examples"],
                "examples": int(s["examples"]), "devices": int(s["devices"])} for v, s in sums.items()}


def promote(cand: dict[str, float], base: dict[str, float], params: EvalParams) -> bool:
    return shortfall(cand, base, params) is None


def shortfall(cand: dict[str, float], base: dict[str, float], params: EvalParams) -> str | None:
    """Why the candidate regresses beyond the tolerances against the baseline (the served version), or None.

    E.g. "recall 0.081 vs served 0.112 on 14 devices, tolerance 0.005": what a held-back version's row records.
    """
    devices = f"on {cand.get('devices', 0)} devices"
    if cand["recall"] < base["recall"] - params.promotion_tolerance:
        return (f"recall {cand['recall']:.3f} vs served {base['recall']:.3f} {devices}, "
                f"tolerance {params.promotion_tolerance:g}")
    tol = params.promotion_loss_tolerance
    if tol is not None and cand["loss"] > base["loss"] + tol:
        return f"loss {cand['loss']:.3f} vs served {base['loss']:.3f} {devices}, loss tolerance {tol:g}"
    return None


__all__ = ["evaluate_task", "in_sample", "promote", "report_sha", "shortfall", "summarize", "validate_results"]
