"""The server recipes in docs/recipes are the sweep runs they name, field for field.

A recipe is a `python -m server --config` file: the training half of a sweep run found in the
simulation, so the real server trains the way the measured run did (the quality issue asks for a
recipe "reproducible on the real server"). This test keeps the two from drifting apart.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from models.lr_schedule import LrSchedule
from server.config import ServerConfig
from tff_sim.config import SimConfig
from tff_sim.sweep import load_sweep, run_fields

ROOT = Path(__file__).resolve().parents[1]
# recipe file -> (sweep file, run name): the measured run each recipe reproduces. The server serves each round's own
# model: a run that also scored the average of its rounds' models (average_decay) stands for the recipe with the
# figure of its last round's model (summary.json final_iterate).
RECIPES = {"federated-from-donors.json": ("docs/sweeps/chitchat-donors.toml",
                                          "nesterov-cosine600-floor0.01-cap1024-clientdecay-all")}


def sweep_run(sweep: str, name: str) -> SimConfig:
    base, runs, _ = load_sweep(ROOT / sweep)
    (run,) = [r for r in runs if r["name"] == name]
    return SimConfig.from_dict(run_fields(base, run))


def test_every_recipe_is_named_and_loads() -> None:
    files = sorted(p.name for p in (ROOT / "docs" / "recipes").glob("*.json"))
    assert files == sorted(RECIPES)
    for name in files:
        ServerConfig.from_file(ROOT / "docs" / "recipes" / name)  # validates, as `python -m server --config` does


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_as_its_sweep_run(recipe: str) -> None:
    server = ServerConfig.from_file(ROOT / "docs" / "recipes" / recipe)
    sim = sweep_run(*RECIPES[recipe])
    assert server.fedavg == sim.fedavg  # client lr, epochs, batch size, server optimizer and its parameters
    schedule = LrSchedule.from_fields(server)  # what server/optimizers.py steps with
    assert schedule == sim.lr_schedule
    rounds = (1, 20, 21, 300, 600, 601)
    assert [schedule.lr_at(r, server.server_lr) for r in rounds] == [sim.server_lr_at(r) for r in rounds]
    assert server.client_lr_decay == sim.client_lr_decay
    assert [server.round_params(r)["learning_rate"] for r in rounds] == [sim.client_lr_at(r) for r in rounds]
    assert server.round_goal == server.min_count == sim.clients_per_round  # every round averages this many
    assert sim.sampling_mode == "uniform"  # a round takes the first devices to check in, no secret Poisson draw
    assert server.max_examples_per_update == sim.max_examples_per_client
    assert not sim.dp and server.dp_mode == "none" and server.clip_norm == 0  # unclipped, like the simulation
    assert server.aggregator == "mean"  # example-weighted for rounds without DP, as tff.learning's FedAvg
