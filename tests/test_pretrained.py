"""The committed default model (models/pretrained/small): small, from the donors only, its quality true."""
from __future__ import annotations

from pathlib import Path

import pytest

from models import pretrained
from models.bundle import load_bundle

BUNDLE = pretrained.default_bundle_path()
MAX_BYTES = 4 << 20  # "a few MB" in the repo


def test_the_default_bundle_is_small_and_records_its_provenance():
    size = sum(p.stat().st_size for p in BUNDLE.iterdir())
    assert size <= MAX_BYTES, f"{BUNDLE} is {size / 2**20:.1f} MiB"
    b = load_bundle(BUNDLE)
    assert b.config.preset == "small"
    meta = b.meta
    assert meta["source"] == "models.pretrained" and meta["command"] == pretrained.COMMAND
    assert meta["data"]["dataset"] == "chitchat" and meta["data"]["population"] == "donors"
    q = meta["quality_heldout"]
    assert {"server-trained", "ngram-5", "unigram"} <= set(q)
    # a trained model: far above the frequency-only floor, near the n-gram built from the same text
    assert q["server-trained"]["top1_recall"] > q["unigram"]["top1_recall"] + 0.05
    assert (BUNDLE.parent / f"{BUNDLE.name}-report.md").is_file()


def test_the_default_bundle_was_trained_on_todays_donors_only():
    """The donor list it records is the split models.data makes now (seeded): no federated or held-out user."""
    from models.data import load_dataset
    from models.data.donors import donor_split_report

    ds = load_dataset("chitchat", seed=0)
    recorded = load_bundle(BUNDLE).meta["data"]["donor_split"]
    now = donor_split_report(ds)
    assert recorded["donor_ids_sha256"] == now["donor_ids_sha256"]
    assert recorded["donors"] == len(ds.donor_ids) and not set(ds.donor_ids) & set(ds.heldout_ids)


@pytest.mark.slow
def test_the_recorded_heldout_quality_is_what_the_model_scores():
    """Re-score the weights on the baselines' held-out sample: the metadata's number is measured, not typed."""
    from models.baselines import DEFAULT_MAX_EVAL_SENTENCES
    from models.central import evaluate_keras, sample_sentences, token_lists
    from models.data import load_dataset

    b = load_bundle(BUNDLE)
    ds = load_dataset("chitchat", seed=0)
    heldout = token_lists(t for cid in ds.heldout_ids for t in [*ds.clients[cid].train, *ds.clients[cid].test])
    sample = sample_sentences(heldout, DEFAULT_MAX_EVAL_SENTENCES, 1)
    m = evaluate_keras(b.config, b.weights, sample, b.vocab)
    assert m["top1_recall"] == pytest.approx(b.meta["quality_heldout"]["server-trained"]["top1_recall"], abs=1e-4)


def test_devices_start_from_it_when_nothing_else_is_given(monkeypatch):
    from device_app.model_state import INITIAL_BUNDLE_ENV, find_initial_bundle

    monkeypatch.delenv(INITIAL_BUNDLE_ENV, raising=False)
    found = find_initial_bundle()
    assets = Path(__file__).resolve().parents[1] / "device_app" / "assets" / "initial_model"
    assert found == (assets if (assets / "meta.json").is_file() else BUNDLE)
    assert find_initial_bundle(False) is None
