"""models.metrics (numpy) on hand-made logits, and models.keras_metrics against it."""
from __future__ import annotations

import math

import numpy as np
import pytest

from models import metrics as M

V = 8  # ids 0..3 special, 4..7 words
NEG = -5.0


def _row(**scores: float) -> np.ndarray:
    """Logits for one position: NEG everywhere except the given ids (keys like i5=2.0)."""
    row = np.full(V, NEG, dtype=np.float32)
    for key, value in scores.items():
        row[int(key[1:])] = value
    return row


def test_topk_recall_exact_values_pad_and_oov():
    logits = np.stack(
        [
            _row(i5=3.0, i6=2.0, i7=1.0),  # target 5: rank 0
            _row(i5=3.0, i6=2.0, i7=1.0),  # target 7: rank 2
            _row(i3=9.0, i1=8.0, i0=7.0, i4=1.0),  # target 4: specials masked, so rank 0
            _row(i3=9.0, i5=1.0),  # target 3 (<oov>): highest logit but always a miss
            _row(i5=3.0),  # target 0 (pad): not counted at all
        ]
    )[None]  # [1, 5, V]
    targets = np.array([[5, 7, 4, 3, 0]])
    assert M.topk_recall(logits, targets, 1) == pytest.approx(2 / 4)
    assert M.topk_recall(logits, targets, 3) == pytest.approx(3 / 4)
    assert M.topk_recall(logits, targets, V) == pytest.approx(3 / 4)  # OOV never a hit


def test_topk_recall_ties_go_to_lower_id():
    logits = np.zeros((1, 2, V), dtype=np.float32)  # all tie; with 0,1,3 masked the order is 2,4,5,6,7
    assert M.topk_recall(logits, np.array([[2, 2]]), 1) == 1.0
    assert M.topk_recall(logits, np.array([[4, 5]]), 1) == 0.0
    assert M.topk_recall(logits, np.array([[4, 5]]), 2) == 0.5
    assert M.topk_recall(logits, np.array([[4, 5]]), 3) == 1.0
    assert M.topk_recall(logits, np.array([[6, 6]]), 3) == 0.0
    assert M.topk_recall(logits, np.array([[6, 6]]), 4) == 1.0


def test_topk_recall_all_pad_and_bad_input():
    assert M.topk_recall(np.zeros((2, 3, V)), np.zeros((2, 3), dtype=int), 1) == 0.0
    with pytest.raises(ValueError):
        M.topk_recall(np.zeros((2, 3, V)), np.zeros((2, 4), dtype=int), 1)
    with pytest.raises(ValueError):
        M.topk_recall(np.zeros((1, 1, V)), np.array([[V]]), 1)


def test_evaluate_logits_values():
    logits = np.stack([_row(i5=3.0), _row(i6=2.0), _row(i4=1.0), _row(i5=0.5)])[None]
    targets = np.array([[5, 4, 3, 0]])
    out = M.evaluate_logits(logits, targets)
    rows = logits[0].astype(np.float64)
    lsm = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    expected_loss = -(lsm[0, 5] + lsm[1, 4] + lsm[2, 3]) / 3
    assert out["tokens"] == 3
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-6)
    assert out["oov_rate"] == pytest.approx(1 / 3)
    assert out["top1_recall"] == pytest.approx(1 / 3)
    # target 4 in row 1: 6 first, then the NEG tie broken by id: 2 (<eos>), 4 -> rank 2
    assert out["top3_recall"] == pytest.approx(2 / 3)
    assert out["top1_recall_in_vocab"] == pytest.approx(1 / 2)
    assert out["top3_recall_in_vocab"] == pytest.approx(2 / 2)


def test_batched_sums_merge_exactly():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5, 50)).astype(np.float32)
    targets = rng.integers(0, 50, size=(6, 5))
    targets[targets % 7 == 0] = 0
    targets[0, :2] = M.OOV_ID
    whole = M.evaluate_logits(logits, targets)
    parts = [M.metric_sums(logits[i : i + 2], targets[i : i + 2]) for i in range(0, 6, 2)]
    merged = M.finalize_metric_sums(M.merge_metric_sums(parts))
    assert merged == pytest.approx(whole)
    assert M.merge_metric_sums(*parts) == M.merge_metric_sums(parts)
    assert whole["top1_recall"] == pytest.approx(M.topk_recall(logits, targets, 1))
    assert whole["top3_recall"] == pytest.approx(M.topk_recall(logits, targets, 3))


def test_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 9, 30)).astype(np.float32)
    logits[..., 10] = logits[..., 11]  # ties across ids
    targets = rng.integers(0, 30, size=(4, 9))
    whole = M.evaluate_logits(logits, targets)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 30 * 5)  # 5 rows per chunk
    assert M.evaluate_logits(logits, targets) == pytest.approx(whole)


def test_no_tokens():
    out = M.evaluate_logits(np.zeros((1, 2, V)), np.zeros((1, 2), dtype=int))
    assert out["tokens"] == 0 and out["top1_recall"] == 0.0
    assert math.isnan(out["loss"]) and math.isnan(out["perplexity"])


def test_keras_metrics_agree_with_numpy():
    tf = pytest.importorskip("tensorflow")
    from models.keras_metrics import (
        MaskedMeanCrossEntropy,
        MaskedTokenCount,
        MaskedTopKRecall,
        keras_metrics_for_eval,
    )

    rng = np.random.default_rng(2)
    vocab = 40
    # Rounded logits make ties common, so the tie rule is exercised too.
    logits = np.round(rng.normal(size=(5, 7, vocab)), 1).astype(np.float32)
    targets = rng.integers(0, vocab, size=(5, 7)).astype(np.int32)
    targets[:, -2:] = 0
    targets[1, :3] = M.OOV_ID
    logits[1, :3, M.OOV_ID] = 10.0  # OOV on top: still a miss
    logits[2, 0, 1] = 10.0  # <bos> on top: masked
    expected = M.evaluate_logits(logits, targets)

    ms = keras_metrics_for_eval(include_token_loss=True)
    assert [m.name for m in ms] == ["top1_recall", "top3_recall", "num_tokens", "token_loss"]
    for half in (slice(0, 2), slice(2, 5)):  # state accumulates across batches
        for m in ms:
            m.update_state(tf.constant(targets[half]), tf.constant(logits[half]))
    top1, top3, count, loss = (float(m.result()) for m in ms)
    assert top1 == pytest.approx(expected["top1_recall"], abs=1e-6)
    assert top3 == pytest.approx(expected["top3_recall"], abs=1e-6)
    assert count == expected["tokens"]
    assert loss == pytest.approx(expected["loss"], rel=1e-5)

    # TFF rebuilds metrics from get_config to finalize aggregated state.
    for m in ms:
        clone = type(m).from_config(m.get_config())
        assert clone.get_config() == m.get_config()
        for v, value in zip(clone.variables, m.variables):
            v.assign(value)
        assert float(clone.result()) == pytest.approx(float(m.result()))
    # Per-example sample weights [b] weight every token of the row.
    weighted = MaskedTokenCount()
    weighted.update_state(tf.constant(targets), tf.constant(logits), sample_weight=tf.constant([1.0, 0, 0, 0, 2.0]))
    assert float(weighted.result()) == np.count_nonzero(targets[0]) + 2 * np.count_nonzero(targets[4])
    k5 = MaskedTopKRecall(5)
    assert k5.name == "top5_recall" and MaskedTokenCount().name == "num_tokens"
    assert isinstance(MaskedMeanCrossEntropy().get_config()["pad_id"], int)


def test_metrics_module_is_numpy_only():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(M.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert "tensorflow" not in imported and "keras" not in imported
