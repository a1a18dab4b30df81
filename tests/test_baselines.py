"""Baselines on a real slice of chitchat: n-gram and server-trained beat the unigram floor; the CLI writes its files."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.bundle import load_bundle
from models.config import preset
from models.data import load_dataset
from models.ngram import NgramModel, UnigramModel, load_model
from models.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slice_150():
    """150 training clients of chitchat (seeded subset), tokenized, with a 500-word vocabulary."""
    from models.central import token_lists

    ds = load_dataset("chitchat", seed=0).subset(n_clients=150, n_heldout=10)
    train = token_lists(ds.all_train_sentences())
    test = token_lists(ds.all_test_sentences())
    return ds, train, test, Vocabulary.build(train, size=500)


def test_ngram_and_central_beat_unigram(slice_150) -> None:
    from models.central import evaluate_keras, keras_metric_sums, train_central
    from models.examples import make_examples
    from models.keras_model import build_model, set_weights
    from models.metrics import metric_sums

    ds, train, test, vocab = slice_150
    unigram = UnigramModel.train(train, vocab).evaluate(test)
    ngram = NgramModel.train(train, vocab, order=5).evaluate(test)
    assert ngram["tokens"] == unigram["tokens"] > 10_000
    assert ngram["top1_recall"] > unigram["top1_recall"] + 0.05
    assert ngram["perplexity"] < unigram["perplexity"]

    # One quick epoch of the tiny model (lr 1e-2: few steps) already clears the frequency floor.
    config = preset("tiny", vocab_size=len(vocab))
    weights, history = train_central(ds, vocab, config, epochs=1, batch_size=64, lr=1e-2, max_sentences=10_000,
                                     seed=0, verbose=0, sentences=train)
    assert history["sentences"] == 10_000 and len(history["loss"]) == 1
    central = evaluate_keras(config, weights, test, vocab, batch_size=128)
    assert central["tokens"] == unigram["tokens"]
    assert central["top1_recall"] > unigram["top1_recall"] + 0.01, (central, unigram)

    # The in-graph sums are models.metrics' sums of the same logits.
    x, y = make_examples(test[:200], vocab, config.seq_len)
    model = build_model(config)
    set_weights(model, weights, config)
    want = metric_sums(model(x).numpy(), y)
    got = keras_metric_sums(config, weights, test[:200], vocab, batch_size=37)
    assert {k: got[k] for k in ("tokens", "oov_tokens", "top1_hits", "top3_hits")} == \
        {k: want[k] for k in ("tokens", "oov_tokens", "top1_hits", "top3_hits")}
    assert got["loss_sum"] == pytest.approx(want["loss_sum"], rel=1e-5)


def test_cli_writes_results_and_models(tmp_path: Path) -> None:
    out = tmp_path / "baselines"
    cmd = [sys.executable, "-m", "models.baselines", "--preset", "tiny", "--clients", "40", "--heldout-clients", "8",
           "--max-sentences", "600", "--max-eval-sentences", "300", "--order", "3", "--epochs", "3",
           "--out", str(out), "--quiet"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "chitchat" and results["config"]["preset"] == "tiny"
    rows = results["rows"]
    assert [(r["model"], r["split"]) for r in rows] == [
        (m, s) for m in ("unigram", "ngram-3", "server-trained") for s in ("test", "heldout")
    ]
    for r in rows:
        assert 0 <= r["top1_recall"] <= r["top3_recall"] <= 1 and r["perplexity"] > 1 and r["tokens"] > 0
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    central = results["server_trained"]
    assert central["validation_sentences"] > 0 and 1 <= central["best_epoch"] <= central["epochs"] <= 3
    assert len(central["val_loss"]) == central["epochs"] and central["stopped"]
    assert all(r["epochs"] == central["best_epoch"] for r in rows if r["model"] == "server-trained")
    assert (out / "checkpoint" / "state.json").exists()
    assert "junk_sender" in (out / "report.md").read_text()

    vocab = Vocabulary.load(out / "vocab.json")
    bundle = load_bundle(out / "server_trained")
    assert bundle.vocab == vocab and bundle.config.preset == "tiny"
    ngram = load_model(out / "ngram-3.npz")
    assert isinstance(ngram, NgramModel) and ngram.vocab == vocab
    assert np.isclose(np.exp(ngram.next_word_logprobs([vocab.BOS_ID])).sum(), 1.0)
    assert isinstance(load_model(out / "unigram.npz"), UnigramModel)


def test_early_stopping_rule() -> None:
    from models.central import early_stopping

    assert early_stopping([], 2) == early_stopping([], 2).__class__(0, False, "")
    falling = early_stopping([3.0, 2.0, 1.5], patience=2)
    assert (falling.best_epoch, falling.stop) == (3, False)
    plateau = early_stopping([3.0, 2.0, 2.0005, 2.1], patience=2, min_delta=1e-3)
    assert (plateau.best_epoch, plateau.stop) == (2, True) and "2 epoch" in plateau.reason
    assert not early_stopping([3.0, 2.0, 2.1], patience=2).stop  # one bad epoch is not enough
    assert not early_stopping([3.0, 2.0, 2.1, 2.2], patience=0).stop  # patience 0: never stops early
    diverged = early_stopping([3.0, float("nan")], patience=5)
    assert diverged.stop and diverged.best_epoch == 1


def test_validation_split_is_seeded_disjoint_and_capped() -> None:
    from models.central import split_validation

    sentences = [[f"w{i}"] for i in range(1000)]
    train, val = split_validation(sentences, 0.05, None, seed=0)
    assert len(val) == 50 and len(train) == 950 and not {s[0] for s in train} & {s[0] for s in val}
    assert split_validation(sentences, 0.05, None, seed=0) == (train, val)
    assert split_validation(sentences, 0.05, None, seed=1)[1] != val
    assert len(split_validation(sentences, 0.5, 20, seed=0)[1]) == 20
    assert split_validation(sentences, 0.0, None, seed=0) == (sentences, [])


def test_converged_training_keeps_the_best_epoch_and_resumes_exactly(slice_150, tmp_path: Path) -> None:
    """Three epochs in one go equal two epochs, a stop, and a resumed third (model, optimizer and order)."""
    from models.central import split_validation, train_central

    ds, train, _, vocab = slice_150
    fit, val = split_validation(train[:3000], 0.1, None, seed=0)
    config = preset("tiny", vocab_size=len(vocab))
    kw = dict(batch_size=64, lr=1e-2, seed=0, verbose=0, sentences=fit, validation=val, patience=5)
    whole, h_whole = train_central(ds, vocab, config, epochs=3, checkpoint_dir=tmp_path / "whole", **kw)
    assert len(h_whole["val_loss"]) == 3 and h_whole["stopped"] == "reached 3 epoch(s)"
    assert h_whole["best_epoch"] == int(np.argmin(h_whole["val_loss"])) + 1

    train_central(ds, vocab, config, epochs=2, checkpoint_dir=tmp_path / "parts", **kw)
    resumed, h_parts = train_central(ds, vocab, config, epochs=3, checkpoint_dir=tmp_path / "parts", **kw)
    assert h_parts["resumed_from_epoch"] == 2 and len(h_parts["loss"]) == 3
    np.testing.assert_allclose(h_parts["val_loss"], h_whole["val_loss"], rtol=1e-5)
    for a, b in zip(resumed, whole):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(SystemExit):  # another run's checkpoint is refused, not silently mixed in
        train_central(ds, vocab, config, epochs=3, checkpoint_dir=tmp_path / "parts", **{**kw, "lr": 5e-3})
