"""bench_personal's replay of one held-out user: the deployable variants and the oracle ceilings."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_personal  # noqa: E402
from device_app.local_training import trainer_for  # noqa: E402
from device_app.personalize import PersonalizationSettings  # noqa: E402
from models.bundle import Bundle  # noqa: E402
from models.config import preset  # noqa: E402
from models.keras_model import build_model, get_weights  # noqa: E402
from models.vocab import Vocabulary  # noqa: E402

# A user who repeats themselves: their own cache should win on their future messages.
MESSAGES = [m for _ in range(12) for m in ("see you at the gym", "i dont like mondays", "lunch at noon ok")]


def test_oracles_bound_the_deployable_variants_from_above() -> None:
    vocab = Vocabulary.build([m.split() for m in MESSAGES], size=30)
    config = preset("tiny", vocab_size=len(vocab))
    model = build_model(config, seed=0)
    bundle = Bundle(config=config, vocab=vocab, weights=get_weights(model), model_version=1, meta={})
    row = bench_personal.replay_user(MESSAGES, 0.7, bundle, model, trainer_for(config), PersonalizationSettings(),
                                     seed=1, oracle=True)
    assert row is not None
    for v in ("cache", "finetune", "both"):
        assert row["both-oracle_top1"] >= row[f"{v}_top1"] - 1e-12
    assert row["both-oracle_top1"] >= row["cache-oracle_top1"] >= max(row["global_top1"], row["cache_top1"]) - 1e-12
    # an untrained global model knows nothing; the repeated messages' cache predicts most words
    assert row["cache-oracle_top1"] > row["global_top1"] + 0.3
    summary = bench_personal.summarize([{"user": "u", **row}], (*bench_personal.VARIANTS, *bench_personal.ORACLE_VARIANTS))
    assert summary["cache-oracle"]["median_gain_points"] >= summary["cache"]["median_gain_points"] - 1e-9


def test_best_top1_takes_the_first_of_a_tie() -> None:
    a, b, c = {"top1_recall": 0.2, "i": 0}, {"top1_recall": 0.3, "i": 1}, {"top1_recall": 0.3, "i": 2}
    assert bench_personal.best_top1([a, b, c])["i"] == 1
