"""The demo's tunable settings (each one a --flag of scripts/demo.py) and the --quick overrides."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any


@dataclasses.dataclass
class Settings:
    """Defaults of the full run (about 10 minutes on 2 cores); QUICK shrinks it to a smoke run."""

    # the starting model: "" = the committed default bundle (models.pretrained.default_bundle_path(): the small
    # CIFG trained centrally on the donors' text only); a path = another models.bundle directory
    init_bundle: str = ""
    # --tff-pretrain only (the earlier flow): TFF pre-training from random weights, pushed as a candidate
    preset: str = "small"  # 440k parameters: a TFF round of 10 clients takes ~2 s here (gboard, 1.4M: ~6 s)
    pretrain_rounds: int = 10
    pretrain_clients: int = 10
    pretrain_examples: int = 64  # per client per round
    pretrain_max_train_clients: int | None = None
    pretrain_final_eval_sentences: int = 1000
    # whose text is used where (docs/donors.md): "federated" = the fleet replays only the federated users (the
    # starting model saw only the donors' text; with --tff-pretrain TFF pre-trains on the donors); "all" = the
    # fleet replays every training user (and TFF pre-trains on all of them)
    population: str = "federated"
    # the fleet and its DP-FTRL rounds (server --dp-mode ftrl, restart rule). Each device takes part in at most
    # one round per ftrl_restart_rounds rounds, so a period needs restart_rounds x round_goal distinct devices
    # (2 x 80 = 160 of 200, ~180 of them eligible at a time). The server's noise check (models/dp_noise_check.py,
    # limit 10x the clip): tree factor 1.0 for a 2-round tree, z C / min_count = 0.0139 per weight, expected
    # noise norm 9.2x the clip at min_count 72, 4.6x after the server lr 0.5 (at K = 3 or 4 the tree factor is
    # 1.29: 11.9x before the lr). Fewer devices per round, or K x 80 > ~180 eligible devices, would not pass/fill.
    # Epsilon (RDP, delta 1e-6, no amplification: 200 devices, each in <= 4 of the 8 rounds): 17.9.
    devices: int = 200
    rounds: int = 8  # DP-FTRL training rounds (each version then goes through an evaluation round)
    round_goal: int = 80
    min_count: int = 72
    over_admit: float = 1.15
    ftrl_restart_rounds: int = 2
    deadline_s: float = 300.0
    epochs: int = 2
    batch_size: int = 16
    learning_rate: float = 0.5
    max_examples_per_update: int = 256
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    # DP-FTRL's server step: sgd (FTRL) or momentum (DP-FTRLM), nothing else. Plain sgd at a small lr: the
    # starting model is already trained, the noise's harm grows with lr^2 and the signal's gain with lr. A numpy
    # replay of one round from it (80 federated users' clipped updates, noise 0.0125 per weight) measured
    # held-out top-1 23.96% -> 24.07% at lr 0.5, 23.53% at lr 1; with momentum 0.9 (steps up to 10x lr) the
    # first demo run's versions lost 0.2-0.4 points each; sgd at lr 0.5 kept top-1 within 0.1 point while the
    # perplexity crept up 72.8 -> 74.0 over 8 rounds (README)
    server_optimizer: str = "sgd"
    server_lr: float = 0.25
    server_momentum: float = 0.9
    allow_noisy_dp: bool = False  # pass --allow-noisy-dp to the server (only --quick does)
    secagg_neighbors: int = 0  # 0: every device masks with every other (SecAgg); k: SecAgg+ graph
    secagg_stage_s: float = 60.0
    # evaluation rounds: every trained version is evaluated by eval_goal devices against the served one
    # (release gating, server --release-gate eval) before it is served
    # (20 devices' held-back text: with 10 a version 0.4 points worse on held-out users was served once)
    eval_goal: int = 20
    eval_min_count: int = 15
    # ... and released only if its loss on that text is not higher either (server --promotion-loss-tolerance):
    # with recall alone, versions whose perplexity the noise had raised were served on a 0.1-point recall tie
    promotion_loss_tolerance: float = 0.0
    workers: int = 4  # fleet threads (with SecAgg at least the round's admissions: devices wait in its stages)
    p_eligible: float = 0.9
    p_dropout: float = 0.05
    step_s: float = 0.3
    max_wait_s: float = 2.0
    promote_timeout_s: float = 180.0
    round_timeout_s: float = 600.0
    # measuring recall on held-out chitchat users (never trained on): 5,000 sentences is exactly the sample
    # models.baselines (and so the bundle's meta quality_heldout, KN 5-gram included) is measured on
    eval_sentences: int = 5000
    seed: int = 0

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


QUICK = dict(
    # the shipped small model, 8 devices, 2 DP-FTRL rounds of 3: a smoke run of the whole default flow.
    # 3 updates per round cannot carry DP noise a model survives: z = 0.05 is already 11x the clip on the
    # mean (the server's check refuses > 10x), so the quick run passes --allow-noisy-dp; its epsilon is
    # huge and said so. Release gating keeps a version the noise spoiled from being served.
    devices=8, rounds=2, round_goal=3, min_count=3, ftrl_restart_rounds=2, deadline_s=60.0,
    epochs=1, clip_norm=0.5, noise_multiplier=0.05, server_optimizer="sgd", allow_noisy_dp=True,
    eval_goal=3, eval_min_count=2, workers=2, step_s=0.2, max_wait_s=1.0,
    promote_timeout_s=60.0, round_timeout_s=180.0, eval_sentences=200, secagg_stage_s=20.0,
    # with --tff-pretrain: the tiny preset, a 2-round TFF run on 40 clients' donors
    preset="tiny", pretrain_rounds=2, pretrain_clients=4, pretrain_examples=32, pretrain_max_train_clients=40,
    pretrain_final_eval_sentences=200,
)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The demo's command line: run switches, then one --flag per Settings field (None: not given)."""
    p = argparse.ArgumentParser(prog="scripts/demo.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the shipped model, 8 devices, 2 rounds (with --tff-pretrain: tiny preset; a few minutes)")
    p.add_argument("--tff-pretrain", action="store_true",
                   help="the earlier flow: an empty server, TFF pre-training from random weights (on the donors "
                        "with --population federated) pushed as a candidate, evaluated and promoted by the fleet")
    p.add_argument("--out", help="run folder (default runs/demo-<time>)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--no-secagg", action="store_true", help="DP-FTRL without secure aggregation")
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
