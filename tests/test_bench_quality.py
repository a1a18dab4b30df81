"""bench_quality's cross-vocabulary ratio: top-1 of bundles with different vocabularies over one set of targets."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quality  # noqa: E402
from models.central import evaluate_keras  # noqa: E402
from models.config import preset  # noqa: E402
from models.keras_model import build_model, get_weights  # noqa: E402
from models.vocab import Vocabulary  # noqa: E402

SENTENCES = [["i", "dont", "like", "it"], ["see", "you", "later", "today"], ["i", "like", "you"]] * 3


def _scored(vocab: Vocabulary) -> dict:
    config = preset("tiny", vocab_size=len(vocab))
    return evaluate_keras(config, get_weights(build_model(config, seed=0)), SENTENCES, vocab)


def test_vocabularies_that_differ_score_the_same_targets_and_oov_counts_as_a_miss() -> None:
    full = Vocabulary.build(SENTENCES, size=20)
    small = Vocabulary.build([["i", "like"]], size=20)  # lacks most words: their targets are misses
    a, b = _scored(full), _scored(small)
    assert a["tokens"] == b["tokens"] > 0
    assert b["oov_rate"] > a["oov_rate"] == 0
    assert b["top1_recall"] <= 1 - b["oov_rate"]  # the words a vocabulary lacks are misses, not dropped
    assert bench_quality.same_targets({"tokens": a["tokens"]}, {"tokens": b["tokens"]})


def test_rows_over_different_sentences_get_no_ratio() -> None:
    assert not bench_quality.same_targets({"tokens": 10}, {"tokens": 11})
    assert not bench_quality.same_targets(None, {"tokens": 11})
    assert np.isclose(bench_quality.ratio(0.25, 0.5), 0.5)
