"""Personalization: fine-tune the global model on the user's own text into a personal model
that never leaves the device, choose what to serve, and measure the gain.

Everything is measured on the user's most recent held-back messages (store.TextStore.split:
never trained on by either model, nor counted in the cache the choice is made with): top-1 and
top-3 recall of the global model, the global model + the personal typing cache, the fine-tuned
model, and what is served. The choice is models.personal_cache's selection rule (the one the
benchmark uses): the fine-tuned model is served only if it beats the global model (alone and with
the cache) on at least `min_heldout_tokens` held-back words, and the cache weight is chosen on the held-back text with a
cache of the training messages. Below `min_heldout_tokens` the report says there is not enough
text yet and shows no percentage. The personal model is rebuilt after `min_new_messages` new
messages, or when a new global model arrives (it is always built on the current global model).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

Progress = Callable[[float, str], None]

from device_app.model_state import ModelState
from device_app.store import TextStore
from models.personal_cache import MIN_GAIN_TOKENS, MIN_WEIGHT_TOKENS, HeldoutScorer, Selection, cache_from_windows

SCORE_BATCH = 32  # held-back windows per log-probability batch: [32, T, V] floats at a time, not all of them


@dataclass
class PersonalizationSettings:
    min_new_messages: int = 20  # rebuild after this many new messages
    min_train_messages: int = 10  # below this there is too little to learn from
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.3
    max_train_messages: int = 5_000  # the most recent ones
    min_heldout_tokens: int = MIN_GAIN_TOKENS  # held-back words before a gain is shown / fine-tuning served
    min_weight_tokens: int = MIN_WEIGHT_TOKENS  # held-back words before the cache weight is chosen on them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Personalizer:
    def __init__(self, settings: PersonalizationSettings | None = None) -> None:
        self.settings = settings or PersonalizationSettings()

    def due(self, store: TextStore, models: ModelState) -> bool:
        """Enough new text since the last personal model, or the personal model is stale."""
        if not models.has_model:
            return False
        split = store.split()
        if len(split.train) < self.settings.min_train_messages or not split.heldout:
            return False
        personal = models.personal
        if personal is None or not models.personal_is_current:
            return True
        last_id = int(personal.meta.get("last_message_id", 0))
        return store.count_since(last_id) >= self.settings.min_new_messages

    def run(
        self,
        store: TextStore,
        models: ModelState,
        *,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Fine-tune, evaluate global vs personal on held-back text, install the personal model.

        Returns the gain report (also stored in the personal model's meta)."""
        from device_app.local_training import examples_for, trainer_for  # TensorFlow only when training

        if not models.has_model:
            raise RuntimeError("no global model to personalize")
        s = self.settings
        config, vocab = models.config, models.vocab
        assert config is not None and vocab is not None
        last_id = store.last_id()
        split = store.split()
        train = split.train[-s.max_train_messages :]
        if len(train) < max(1, s.min_train_messages) or not split.heldout:
            raise ValueError(f"not enough text to personalize ({len(train)} messages to train on, {len(split.heldout)} held back)")
        x, y = examples_for(train, vocab, config.seq_len)
        hx, hy = examples_for(split.heldout, vocab, config.seq_len)
        if len(x) == 0 or len(hx) == 0:
            raise ValueError("the stored text has no words to train or evaluate on")
        base_version = models.global_version
        global_weights = models.global_weights
        trainer = trainer_for(config)
        start = time.perf_counter()
        result = trainer.train(
            global_weights, x, y, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=seed,
            progress=(lambda f, msg: progress(0.9 * f, f"personalizing: {msg}")) if progress else None,
            should_stop=should_stop,
        )
        if progress:
            progress(0.92, "personalizing: measuring the gain")
        scorer = HeldoutScorer(cache_from_windows(x, y, len(vocab)))
        for b in range(0, len(hx), SCORE_BATCH):
            bx, by = hx[b : b + SCORE_BATCH], hy[b : b + SCORE_BATCH]
            scorer.add(bx, by, trainer.logprobs(global_weights, bx), trainer.logprobs(result.weights, bx))
        selection = scorer.select(s.min_heldout_tokens, s.min_weight_tokens)
        gain = gain_report(selection)
        gain.update({
            "heldout_messages": len(split.heldout),
            "train_messages": len(train),
            "train_examples": int(len(x)),
            "seconds": round(time.perf_counter() - start, 3),
            "created": time.time(),
        })
        if models.global_version != base_version:
            raise RuntimeError("a new global model arrived during personalization; rebuild on it")
        # Installed even when not served: it records the measurement, and `due` counts new text from it.
        models.install_personal(
            result.weights,
            {"base_version": base_version, "last_message_id": last_id, "gain": gain,
             "selection": selection.to_dict(), "settings": s.to_dict()},
        )
        if progress:
            progress(1.0, "personalized")
        return gain


def gain_report(selection: Selection) -> dict[str, Any]:
    """The status screen's numbers: top-1/top-3 of global, +cache, +fine-tuning and served on the held-back
    text, what is served and why. `enough_text` False: the numbers are too noisy to show as a gain."""
    m = selection.metrics
    out: dict[str, Any] = {
        "served": selection.served, "reason": selection.reason, "cache_weight": selection.weight,
        "cache_weight_global": selection.weight_global, "enough_text": selection.enough_text,
        "heldout_tokens": selection.heldout_tokens, "min_heldout_tokens": selection.min_tokens,
    }
    for k in ("top1", "top3"):
        out[f"global_{k}"] = m["global"][k]
        out[f"cache_{k}"] = m["cache"][k]
        out[f"finetune_{k}"] = m["finetune"][k]
        out[f"personal_{k}"] = m["finetune"][k]  # the fine-tuned model alone (its earlier name)
        out[f"served_{k}"] = m["served"][k]
        out[f"gain_{k}"] = m["served"][k] - m["global"][k]  # what the user gets over the global model alone
    return out


def describe_gain(gain: dict[str, Any] | None) -> list[str]:
    """Lines for the status screen: global vs +cache vs +fine-tuning vs served top-1 on the held-back
    text, or "not enough text yet" below the minimum (a percentage there would be noise)."""
    if not gain:
        return ["not measured yet"]
    if "served_top1" not in gain:  # a report from before the selection rule
        return [f"{gain['global_top1']:.1%} -> {gain['personal_top1']:.1%} ({gain['gain_top1'] * 100:+.1f} pts)"]
    if not gain.get("enough_text"):
        return ["not enough text yet", f"({gain['heldout_tokens']} of {gain['min_heldout_tokens']} held-back words)"]
    return [f"global {gain['global_top1']:.1%}", f"+cache {gain['cache_top1']:.1%}",
            f"+fine-tuning {gain['finetune_top1']:.1%}",
            f"served {gain['served_top1']:.1%} ({gain['gain_top1'] * 100:+.1f} pts)"]


def describe_serving(model_status: dict[str, Any]) -> str:
    """ "personal + cache 0.3", "global + cache 0.1 (default)", "global": what suggestions come from."""
    serving = model_status.get("serving")
    if serving is None:
        return "-"
    cache = model_status.get("cache") or {}
    if not cache.get("weight"):
        return str(serving)
    return f"{serving} + cache {cache['weight']:g}" + (" (default)" if cache.get("weight_source") == "default" else "")


__all__ = ["PersonalizationSettings", "Personalizer", "describe_gain", "describe_serving", "gain_report"]
