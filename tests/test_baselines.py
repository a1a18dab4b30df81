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
           "--max-sentences", "600", "--max-eval-sentences", "300", "--order", "3", "--out", str(out), "--quiet"]
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
    assert "junk_sender" in (out / "report.md").read_text()

    vocab = Vocabulary.load(out / "vocab.json")
    bundle = load_bundle(out / "server_trained")
    assert bundle.vocab == vocab and bundle.config.preset == "tiny"
    ngram = load_model(out / "ngram-3.npz")
    assert isinstance(ngram, NgramModel) and ngram.vocab == vocab
    assert np.isclose(np.exp(ngram.next_word_logprobs([vocab.BOS_ID])).sum(), 1.0)
    assert isinstance(load_model(out / "unigram.npz"), UnigramModel)
