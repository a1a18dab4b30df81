"""Canary exposure (tff_sim/canary.py): the metric on hand-made examples, and a small seeded run where
FedAvg without DP exposes the canary and DP-FedAvg does not."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tff_sim.canary import CanaryConfig, rank_and_exposure


def test_rank_and_exposure_definitions() -> None:
    scores = np.arange(1024, dtype=float)  # log-perplexities of 1024 candidates, canary among them
    assert rank_and_exposure(0.0, scores) == (1, 10.0)  # the model's top guess: exposure log2 |R|
    assert rank_and_exposure(1023.0, scores) == (1024, 0.0)  # the least likely candidate
    rank, exposure = rank_and_exposure(31.0, scores)
    assert rank == 32 and exposure == pytest.approx(10 - 5)
    # ties do not push the canary down; non-finite scores count as least likely
    assert rank_and_exposure(5.0, [5.0, 5.0, 7.0, 1.0])[0] == 2
    assert rank_and_exposure(float("nan"), [1.0, 2.0, float("nan"), 3.0])[0] == 4
    assert rank_and_exposure(2.0, [1.0, 2.0, float("nan"), 3.0]) == (2, math.log2(4) - 1)


def test_trie_scoring_matches_direct_scoring() -> None:
    """All 10^L candidates scored through the trie equal the sum of per-token log-probabilities."""
    import tensorflow as tf

    from models.config import preset
    from models.keras_model import build_model
    from tff_sim.canary import trie_log_perplexities

    config = preset("tiny")
    model = build_model(config, seed=3)
    prefix, alphabet = [10, 11], [20 + i for i in range(10)]
    scores = trie_log_perplexities(model, prefix, alphabet, 3)
    assert scores.shape == (1000,)
    for idx in (0, 7, 123, 999):
        digits = [idx // 100, (idx // 10) % 10, idx % 10]
        seq = [1, *prefix, *[alphabet[d] for d in digits]]
        lp = tf.nn.log_softmax(model(tf.constant([seq[:-1]]), training=False), axis=-1).numpy()[0]
        want = -sum(lp[len(prefix) + j, alphabet[d]] for j, d in enumerate(digits))
        assert scores[idx] == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_small_run_dp_lowers_exposure(tmp_path) -> None:
    from tff_sim.canary import run

    cfg = CanaryConfig(preset="tiny", clients=10, clients_per_round=10, rounds=15, copies=30, seed=0,
                       output=str(tmp_path / "canary"))
    report = run(cfg, log=lambda msg: None)
    res = report["results"]
    for name in ("no_dp", "dp", "untrained"):
        assert 1 <= res[name]["rank"] <= 10_000
        assert res[name]["exposure"] == pytest.approx(math.log2(10_000) - math.log2(res[name]["rank"]))
    assert res["dp"]["epsilon"] > 0 and math.isfinite(res["dp"]["epsilon"])
    # seeded: memorized without DP (a few bits above chance), not with DP
    assert res["no_dp"]["exposure"] > 4.0 and res["no_dp"]["exposure"] > res["dp"]["exposure"] + 1.0, res
    saved = json.loads((tmp_path / "canary" / "canary.json").read_text())
    assert saved["canary"].startswith("my pin number is") and saved["results"]["dp"]["rank"] == res["dp"]["rank"]
    assert "| FedAvg, no DP |" in (tmp_path / "canary" / "canary.md").read_text()


def test_epoch_cohorts_take_each_user_at_most_once_per_epoch() -> None:
    from tff_sim.canary import epoch_cohorts

    cohorts = epoch_cohorts(23, 5, 13, seed=3)  # 4 rounds an epoch; 3 users sit each epoch out
    assert len(cohorts) == 13 and all(len(c) == 5 for c in cohorts)
    for e in range(0, 12, 4):
        epoch = np.concatenate(cohorts[e:e + 4])
        assert len(set(epoch.tolist())) == 20  # no user twice in an epoch
    assert epoch_cohorts(23, 5, 13, seed=3)[7].tolist() == cohorts[7].tolist()  # seeded
    with pytest.raises(ValueError):
        epoch_cohorts(4, 5, 1, seed=0)


def test_small_run_dp_ftrl_lowers_exposure(tmp_path) -> None:
    from tff_sim.canary import run

    # 10 users in rounds of 5: 2 rounds an epoch, the canary's user in 10 of the 20 rounds
    cfg = CanaryConfig(preset="tiny", clients=10, clients_per_round=5, rounds=20, copies=30, seed=0,
                       mechanism="dp-ftrl", output=str(tmp_path / "canary"))
    report = run(cfg, log=lambda msg: None)
    res = report["results"]
    assert report["canary_user_rounds"] == 10
    assert res["dp"]["mechanism"] == "dp-ftrl" and res["dp"]["rounds_per_epoch"] == 2
    from models.dp import ftrl_epsilon

    assert res["dp"]["epsilon"] == pytest.approx(ftrl_epsilon(1.0, 20, 1e-6, "restart", rounds_per_epoch=2))
    assert res["no_dp"]["exposure"] > 4.0 and res["no_dp"]["exposure"] > res["dp"]["exposure"] + 1.0, res
    assert "| DP-FTRL, z = 1 |" in (tmp_path / "canary" / "canary.md").read_text()
