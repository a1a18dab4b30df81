"""Personal suggestions on the device (issue #13 item 3): the typing cache of the user's own messages,
blended with the served model, chosen on held-back text by the one selection rule.

The done-when check: a device whose user typed ~40 messages containing "see you at the gym" (mixed
with other text) suggests "gym" for "see you at the ", where the global model alone does not. The
global model is the tiny preset trained for a few seconds on a small corpus in which "see you at
the" is followed by other places and "gym" is a known word used elsewhere.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from device_app.client import ClientSettings, DeviceClient
from device_app.local_training import examples_for, trainer_for
from device_app.personalize import PersonalizationSettings, describe_gain
from device_app.testing import SAMPLE_MESSAGES, vocab_for
from models.bundle import save_bundle
from models.config import preset
from models.keras_model import build_model, get_weights
from models.personal_cache import DEFAULT_WEIGHT, MIN_GAIN_TOKENS

PLACES = ("party", "station", "cafe", "office", "park", "beach", "game", "airport")
OPENERS = ("", "ok ", "sure ", "great ", "alright ", "cool ")
ENDINGS = ("", " tomorrow", " tonight", " later", " at six", " then")
OTHER = ("the gym was busy today", "i joined a gym last year", "is the gym open on sunday?",
         "my brother works out at a gym", "how was your day?", "i am so tired today", "what are you doing tonight?",
         "thanks for dinner", "can you call me later?", "the weather is nice today", "did you see the game?",
         "i will be late", "where are you now?", "let's get lunch tomorrow", "that sounds great")


def _corpus(rng: random.Random) -> list[str]:
    sentences = [f"{o}see you at the {p}{e}" for o in OPENERS for p in PLACES for e in ENDINGS[:3]]
    sentences += [*OTHER, *SAMPLE_MESSAGES] * 6
    rng.shuffle(sentences)
    return sentences


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset trained briefly (a few seconds) on _corpus: a global model that has never seen
    "see you at the gym"."""
    corpus = _corpus(random.Random(0))
    vocab = vocab_for(corpus, size=preset("tiny").vocab_size - 4)
    config = preset("tiny", vocab_size=len(vocab))
    x, y = examples_for(corpus, vocab, config.seq_len)
    trained = trainer_for(config).train(get_weights(build_model(config, seed=0)), x, y, epochs=15, batch_size=16,
                                        lr=1.0, seed=0)
    return save_bundle(tmp_path_factory.mktemp("personal") / "bundle", config, vocab, trained.weights, 1,
                       {"source": "tests/test_device_personal.py"})


def _user_messages(rng: random.Random) -> list[str]:
    gym = [f"{rng.choice(OPENERS)}see you at the gym{rng.choice(ENDINGS)}" for _ in range(40)]
    other = [rng.choice(OTHER) for _ in range(40)]
    mixed = [m for pair in zip(gym, other) for m in pair]
    return mixed


def test_a_user_who_meets_at_the_gym_gets_gym(tmp_path: Path, bundle_dir: Path) -> None:
    settings = ClientSettings(personalization=PersonalizationSettings(min_train_messages=10))
    c = DeviceClient(tmp_path / "device", initial_bundle=bundle_dir, settings=settings, seed=0)
    try:
        assert "gym" in c.models.vocab.tokens
        c.set_use_personal(False)  # the global model alone
        assert c.suggest("see you at the ")[0] != "gym"
        c.set_use_personal(True)
        messages = _user_messages(random.Random(1))
        for m in messages[:60]:
            c.commit(m)
        # Before any weight is chosen for this user: the documented default, and the cache is already there.
        assert c.models.cache_weight == DEFAULT_WEIGHT
        assert "gym" in c.suggest("see you at the ")
        built = c.models.typing_cache.tokens
        assert built > 0
        for m in messages[60:]:  # committed messages are counted as they come
            c.commit(m)
        c.suggest("see you at the ")
        assert c.models.typing_cache.tokens > built

        gain = c.personalize()
        assert gain is not None and gain["cache_weight"] > 0
        assert c.suggest("see you at the ")[0] == "gym"
        assert c.suggest("see you at the g")[0] == "gym"
        # 16 held-back messages are too few words for a gain to mean anything: the status says so,
        # and the fine-tuned model is not served on such evidence.
        assert not gain["enough_text"] and gain["heldout_tokens"] < MIN_GAIN_TOKENS
        assert gain["served"] == "global" and c.models.serving == "global"
        assert describe_gain(c.status()["personal_gain"])[0] == "not enough text yet"
        cache_status = c.status()["model"]["cache"]
        assert cache_status["weight_source"] == "chosen" and cache_status["weight"] == gain["cache_weight"]

        # Forget my data: the counts go with the text.
        c.forget_data()
        assert not c.models.typing_cache.built
        assert c.suggest("see you at the ")[0] != "gym"
        assert c.models.typing_cache.tokens == 0
    finally:
        c.close()


def test_the_cache_is_rebuilt_from_the_store_at_start_up(tmp_path: Path, bundle_dir: Path) -> None:
    with DeviceClient(tmp_path / "device", initial_bundle=bundle_dir) as c:
        for m in _user_messages(random.Random(2)):
            c.commit(m)
        before = c.suggest("see you at the ")
        tokens = c.models.typing_cache.tokens
    with DeviceClient(tmp_path / "device", initial_bundle=bundle_dir) as again:  # nothing of the cache on disk
        assert not again.models.typing_cache.built
        assert again.suggest("see you at the ") == before and again.models.typing_cache.tokens == tokens
    assert not any("cache" in p.name for p in (tmp_path / "device").rglob("*"))


def test_batched_logprobs_match_the_predictor(bundle_dir: Path, tmp_path: Path) -> None:
    """LocalTrainer.logprobs (what personalization scores held-back text with) is the served model's distribution."""
    from models.bundle import load_bundle
    from models.keras_model import NextWordPredictor

    b = load_bundle(bundle_dir)
    x, _ = examples_for(["see you at the gym tomorrow"], b.vocab, b.config.seq_len)
    lp = trainer_for(b.config).logprobs(b.weights, x)
    predictor = NextWordPredictor(b.config)
    predictor.set_weights(b.weights)
    np.testing.assert_allclose(lp[0, 4], predictor.next_word_logprobs(x[0, :5].tolist()), atol=1e-4)
    assert np.exp(lp[0, 0]).sum() == pytest.approx(1.0, abs=1e-4)


def test_a_new_global_model_is_served_at_once_with_the_cache(tmp_path: Path, bundle_dir: Path) -> None:
    """Cached suggestion rows never outlive the weights or the counts they were computed with."""
    from device_app.model_state import ModelState
    from models.bundle import load_bundle

    b = load_bundle(bundle_dir)
    typed = ["see you at the gym"] * 5
    state = ModelState(tmp_path / "a", initial_bundle=bundle_dir, messages=lambda: list(typed))

    def rows(s: ModelState) -> np.ndarray:
        suggester = s.suggester()
        return np.asarray(suggester.next_word_logprobs(suggester.context_ids("see you at the ")))

    first = rows(state)
    assert state.serving == "global" and state.cache_weight == DEFAULT_WEIGHT
    state.install_global(b.config, b.vocab, [np.asarray(w) * 0.5 for w in b.weights], 2)  # still "global"
    again = rows(state)
    fresh = ModelState(tmp_path / "b", initial_bundle=tmp_path / "a" / "global", messages=lambda: list(typed))
    np.testing.assert_allclose(again, rows(fresh), atol=1e-6)  # the new weights, not a cached row
    assert not np.allclose(first, again)
    typed.append("see you at the gym tomorrow")
    state.note_message(typed[-1])
    assert not np.allclose(again, rows(state))  # new counts, new rows
