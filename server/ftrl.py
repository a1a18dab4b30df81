"""DP-FTRL's durable state on the server (dp_mode ftrl): the noise tree between rounds, and which devices
took part in which released round, from which admission enforces the participation rule.

* Leaves. The tree counts released rounds (closed DP-FTRL rounds), 1-based. One training round is open
  at a time, so the open round, if it closes, is leaf `leaves + 1`; an abandoned round releases nothing
  and is no leaf.
* Tree. models/dp_ftrl.py's TreeNoiseState after the last leaf, in ftrl/tree-<leaf>-<nonce>.npz, written
  with the store's temp + fsync + rename *before* the round's closing transaction points meta
  "ftrl_tree" at it (`commit`). Node noise is a pure function of (seed, draw index), so a round
  aggregated again after a crash (the old record still in place) draws the same noise: one round never
  releases two different noisy sums. The seed is the first DP-FTRL round's secret seed (rounds.seed,
  never served), kept in the state file. Restarts follow models.dp_ftrl.noise_for_round.
* Participation. ftrl_participation(device_id, leaf, round_id): one row per device aggregated in a
  released round, written in the same transaction. `refusal` turns away a device whose next round
  would break TrainParams.ftrl (reason "participation_limit", with the seconds until it may come back).
* Parameters. The tree's noise multiplier, clip and rule are fixed for a data dir: `recover` refuses
  to start with others (the accounting assumes one z and one rule throughout).
* Adaptive clipping (--ftrl-adaptive-clip; TFF's tree_adaptive, models.dp_ftrl.advance). Each round's task
  carries the clip in use and the quantile estimate; a device reports in its update's metrics whether its
  delta's norm before clipping was <= the estimate ("below_clip_estimate": 1 or 0; the server sees each
  clipped update anyway, so secure aggregation is refused with it). The estimate moves every round by the
  count of such devices plus the count tree's noise; the clip in use (and the value tree's node noise,
  z_v * clip) changes only when the trees restart. Values (z_v) and count (stddev sigma) together are one
  z-mechanism (z_v^-2 + (2 sigma)^-2 = z^-2), which is what the ledger accounts. The state file keeps the
  clip, the estimate and the count tree; `current` tells a new round its clip and estimate.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from typing import Any, Callable

import numpy as np

from models import dp_ftrl
from server.config import ServerConfig
from server.db import Db
from server.round import Round, TrainParams, parse_params
from server.store import Store

log = logging.getLogger("server.ftrl")

SCHEMA = """
CREATE TABLE IF NOT EXISTS ftrl_participation (
    device_id TEXT NOT NULL,
    leaf      INTEGER NOT NULL,   -- the released DP-FTRL round (1-based leaf of the noise tree)
    round_id  INTEGER NOT NULL,
    PRIMARY KEY (device_id, leaf)
);
"""
META = "ftrl_tree"
DIR = "ftrl"
REFUSAL = "participation_limit"


def initial_clip(p: TrainParams) -> float:
    """The configured clip: the clip of every round, or with adaptive clipping the first tree's."""
    return float(p.ftrl_initial_clip if p.ftrl_adaptive_clip and p.ftrl_initial_clip is not None else p.clip_norm)


def tree_params(p: TrainParams) -> dict[str, Any]:
    """What one tree (and its accounting) is built from; fixed for a data dir."""
    out = {"noise_multiplier": float(p.noise_multiplier), "clip_norm": initial_clip(p), "rule": p.ftrl_rule,
           "restart_rounds": p.ftrl_restart_rounds, "min_separation": p.ftrl_min_separation,
           "max_participations": p.ftrl_max_participations, "efficient": bool(p.ftrl_efficient)}
    if p.ftrl_adaptive_clip:  # older data dirs (fixed clip) keep their recorded parameters
        out["adaptive"] = {"target_quantile": float(p.ftrl_target_quantile), "learning_rate": float(p.ftrl_clip_lr),
                           "count_stddev": float(p.ftrl_clip_count_stddev)}
    return out


def ftrl_params(p: TrainParams, count_denominator: float = 1.0) -> dp_ftrl.FtrlParams:
    """models.dp_ftrl's parameters of the server's tree (the mean's division is the strategy's, not the tree's)."""
    adaptive = dp_ftrl.AdaptiveClip(float(p.ftrl_target_quantile), float(p.ftrl_clip_lr),
                                    float(p.ftrl_clip_count_stddev)) if p.ftrl_adaptive_clip else None
    return dp_ftrl.FtrlParams(float(p.noise_multiplier), max(1.0, float(count_denominator)), initial_clip(p),
                              restart_period=p.ftrl.restart_period, efficient=bool(p.ftrl_efficient), adaptive=adaptive)


@dataclasses.dataclass(frozen=True)
class Pending:
    """A round's next tree state, durable but not yet pointed at."""

    rel: str
    leaf: int
    params: dict[str, Any]
    old: str | None


class FtrlTreeStore:
    """server/strategy/dp.py's FtrlTree: built once by the round manager, reached by FtrlDP."""

    def __init__(self, config: ServerConfig, db: Db, store: Store) -> None:
        self.config, self.db, self.store = config, db, store
        db.install_schema(SCHEMA)

    # ------------------------------------------------------------------ the tree
    def record(self) -> dict[str, Any] | None:
        return self.db.get_meta(META)

    def leaves(self) -> int:
        """Released DP-FTRL rounds so far (the leaves of all trees)."""
        rec = self.record()
        return int(rec["leaves"]) if rec else 0

    def load(self) -> dp_ftrl.FtrlState | None:
        rec = self.record()
        if rec is None:
            return None
        with np.load(self.store.path(rec["file"])) as data:
            return dp_ftrl.state_from_arrays({k: data[k] for k in data.files})

    def current(self, p: TrainParams) -> tuple[float, float | None]:
        """(the clip in use, the quantile estimate) a new round is given: the tree's, else the configured clip."""
        state = self.load()
        if state is None:
            return initial_clip(p), (initial_clip(p) if p.ftrl_adaptive_clip else None)
        return float(state.clip), state.estimate

    def noise(self, rnd: Round, dim: int, below: float = 0.0, count: int = 1) -> tuple[np.ndarray, Pending]:
        """The residual noise of the round's leaf (models.dp_ftrl.release_noise) and the pending next state;
        `below` and `count` feed adaptive clipping (below_count of the round's updates, their number)."""
        p = rnd.train
        params = tree_params(p)
        rec = self.record()
        state = self.load()
        if rec is not None and rec["params"] != params:
            raise RuntimeError(f"round {rnd.id}'s DP-FTRL parameters {params} differ from the tree's {rec['params']}")
        fp = ftrl_params(p, count)
        if state is None:
            state = dp_ftrl.init(fp, dim, int(rnd.seed))
        elif state.tree.dim != dim:
            raise RuntimeError(f"the DP-FTRL tree has dimension {state.tree.dim}, the model {dim}")
        if (state.estimate is not None) != p.ftrl_adaptive_clip:
            raise RuntimeError("the DP-FTRL tree's clipping (fixed or adaptive) differs from the round's")
        residual, state, _ = dp_ftrl.release_noise(state, fp, below, max(1, count))
        leaf = state.rounds_done
        arrays = dp_ftrl.state_to_arrays(dataclasses.replace(state, momentum=np.zeros(0, np.float32)))
        rel = f"{DIR}/tree-{leaf:06d}-{secrets.token_hex(4)}.npz"
        self.store.write_atomic(rel, lambda f: np.savez(f, **arrays))
        return residual, Pending(rel, leaf, params, rec["file"] if rec else None)

    def commit(self, pending: Pending, round_id: int, device_ids: list[str]) -> Callable[[], None]:
        """Inside the round's closing transaction: the tree advances, the participations are recorded."""
        self.db.set_meta(META, {"file": pending.rel, "leaves": pending.leaf, "params": pending.params,
                                "round_id": round_id})
        self.db.executemany("INSERT OR IGNORE INTO ftrl_participation(device_id, leaf, round_id) VALUES (?, ?, ?)",
                            [(d, pending.leaf, round_id) for d in device_ids])
        return lambda: self.store.delete(pending.old)

    # ------------------------------------------------------------------ the participation rule
    def participations(self, device_id: str) -> list[int]:
        rows = self.db.all("SELECT leaf FROM ftrl_participation WHERE device_id = ? ORDER BY leaf", (device_id,))
        return [int(r["leaf"]) for r in rows]

    def rounds_to_wait(self, params: TrainParams, device_id: str) -> float:
        """Released rounds before `device_id` may take part again (0: now; inf: never)."""
        leaves = self.participations(device_id)
        if not leaves:
            return 0
        rule, last, leaf = params.ftrl, leaves[-1], self.leaves() + 1
        if rule.rule == "restart":
            k = rule.restart_rounds
            return max(0, ((last - 1) // k + 1) * k + 1 - leaf)
        if len(leaves) >= rule.max_participations:
            return math.inf
        return max(0, last + rule.min_separation + 1 - leaf)

    def refusal(self, rnd: Round, device_id: str) -> tuple[str, float] | None:
        wait = self.rounds_to_wait(rnd.train, device_id)
        return (REFUSAL, wait * self.round_seconds(rnd)) if wait > 0 else None

    def round_seconds(self, rnd: Round) -> float:
        """A released round's typical length: the median of the last few, else the deadline."""
        rows = self.db.all("SELECT closed_at - created_at AS s FROM rounds WHERE kind = 'train' AND state = 'closed'"
                           " ORDER BY id DESC LIMIT 5")
        spans = sorted(float(r["s"]) for r in rows if r["s"] is not None and r["s"] > 0)
        return spans[len(spans) // 2] if spans else float(rnd.params.deadline_s)

    # ------------------------------------------------------------------ the round worker's Background
    def tick(self, now: float) -> None:
        pass

    def recover(self) -> None:
        """At start: refuse other tree parameters than the tree's; delete tree files nothing points at."""
        rec = self.record()
        if rec is not None and self.config.dp_mode == "ftrl":
            params = tree_params(parse_params("train", self.config.round_params()))  # type: ignore[arg-type]
            if params != rec["params"]:
                raise ValueError(f"invalid server config: this data dir's DP-FTRL tree has {rec['params']}; the config "
                                 f"asks for {params}. DP-FTRL's parameters are fixed for a data dir (its accounting "
                                 "assumes one noise multiplier and one participation rule)")
        live = rec["file"] if rec else None
        root = self.store.path(DIR)
        if root.is_dir():
            for path in root.iterdir():
                rel = f"{DIR}/{path.name}"
                if path.is_file() and rel != live:
                    path.unlink(missing_ok=True)
                    log.info("removed unreferenced DP-FTRL tree file %s", rel)


__all__ = ["FtrlTreeStore", "Pending", "REFUSAL", "SCHEMA", "tree_params", "ftrl_params", "initial_clip"]
