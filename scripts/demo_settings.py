"""The demo's tunable settings (each one a --flag of scripts/demo.py) and the --quick overrides."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any


@dataclasses.dataclass
class Settings:
    """Defaults of the full run (about 10 minutes on 2 cores); QUICK shrinks it to a smoke run."""

    preset: str = "small"  # 440k parameters: a TFF round of 10 clients takes ~2 s here (gboard, 1.4M: ~6 s)
    # TFF pre-training: short on purpose, so the federated rounds have something left to improve
    pretrain_rounds: int = 10
    pretrain_clients: int = 10
    pretrain_examples: int = 64  # per client per round
    pretrain_max_train_clients: int | None = None
    pretrain_final_eval_sentences: int = 1000
    # whose text is used where (docs/donors.md): "all" = TFF pre-trains on all training users and the
    # fleet replays them too (today); "federated" = TFF pre-trains on the donors only (vocabulary too)
    # and the fleet replays only the federated users, as in a deployment
    population: str = "all"
    # the fleet and its rounds
    # 80 updates per round: DP noise on the mean is z * C * sqrt(goal / min_count) / goal = 0.013 per
    # weight, which the model absorbs (at 50 per round, 0.021, the noise made it diverge after 5 rounds
    # with server momentum). No secret cohort draw (secure aggregation would need --selection-max-cohort): the
    # server accounts q = 1 (no amplification) at delta 1e-6, epsilon ~17.9 (RDP) after 8 rounds
    devices: int = 200
    rounds: int = 8  # secure DP training rounds after the promotion
    round_goal: int = 80
    min_count: int = 72
    over_admit: float = 1.15
    deadline_s: float = 300.0
    epochs: int = 2
    batch_size: int = 16
    learning_rate: float = 0.5
    max_examples_per_update: int = 256
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    server_optimizer: str = "momentum"  # DP-FedAvg with server momentum (Gboard: Nesterov 0.9)
    server_momentum: float = 0.9
    nesterov: bool = True
    secagg_neighbors: int = 0  # 0: every device masks with every other (SecAgg); k: SecAgg+ graph
    secagg_stage_s: float = 60.0
    eval_goal: int = 10
    eval_min_count: int = 5
    workers: int = 4  # fleet threads (with SecAgg at least the round's admissions: devices wait in its stages)
    p_eligible: float = 0.9
    p_dropout: float = 0.05
    step_s: float = 0.3
    max_wait_s: float = 2.0
    promote_timeout_s: float = 180.0
    round_timeout_s: float = 600.0
    # measuring recall (held-out chitchat users, never trained on)
    eval_sentences: int = 2000
    seed: int = 0

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


QUICK = dict(
    preset="tiny", pretrain_rounds=2, pretrain_clients=4, pretrain_examples=32, pretrain_max_train_clients=40,
    pretrain_final_eval_sentences=200, devices=8, rounds=2, round_goal=4, min_count=3, deadline_s=60.0,
    epochs=1, clip_norm=0.5, eval_goal=3, eval_min_count=2, workers=2, step_s=0.2, max_wait_s=1.0,
    promote_timeout_s=60.0, round_timeout_s=180.0, eval_sentences=200, secagg_stage_s=20.0,
    # 4 devices per round: z = 1 would be noise of ~0.15 per weight per round (z * C * 0.29) and wipe the
    # tiny model out; the quick run checks the machinery, the default run shows DP at a workable scale
    noise_multiplier=0.1, server_optimizer="sgd",
)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The demo's command line: run switches, then one --flag per Settings field (None: not given)."""
    p = argparse.ArgumentParser(prog="scripts/demo.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 8 devices, 2 rounds per stage (a few minutes)")
    p.add_argument("--out", help="run folder (default runs/demo-<time>)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--no-secagg", action="store_true", help="distributed DP without secure aggregation")
    p.add_argument("--app", action="store_true", help="open the Kivy keyboard at the end (needs a display)")
    p.add_argument("--serve", action="store_true", help="keep the server up at the end until Ctrl-C")
    p.add_argument("--stop-after", choices=("server", "pretrain", "promotion", "rounds"),
                   help="stop after this stage (for tests)")
    tuning = p.add_argument_group("tuning (defaults in Settings; --quick changes several)")
    for f in dataclasses.fields(Settings):
        if f.name == "pretrain_max_train_clients":
            typ: Any = lambda v: None if v in ("", "none", "0") else int(v)  # noqa: E731
        elif isinstance(f.default, bool):
            typ = lambda v: v.lower() in ("1", "true", "yes", "on")  # noqa: E731
        else:
            typ = type(f.default)
        tuning.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, type=typ,
                            metavar=type(f.default).__name__.upper() if f.default is not None else "N")
    return p
