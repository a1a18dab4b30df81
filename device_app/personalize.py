"""Personalization: fine-tune the global model on the user's own text into a personal model
that never leaves the device, and measure the gain.

The gain is top-1 (and top-3) recall on the user's most recent held-back messages (see
store.TextStore.split: never trained on by either model), global vs personal. The personal
model is rebuilt after `min_new_messages` new messages, or when a new global model arrives
(it is always built on the current global model).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

Progress = Callable[[float, str], None]

from device_app.model_state import ModelState
from device_app.store import TextStore


@dataclass
class PersonalizationSettings:
    min_new_messages: int = 20  # rebuild after this many new messages
    min_train_messages: int = 10  # below this there is too little to learn from
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.3
    max_train_messages: int = 5_000  # the most recent ones

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
        global_metrics = trainer.evaluate(global_weights, hx, hy)
        personal_metrics = trainer.evaluate(result.weights, hx, hy)
        gain = {
            "global_top1": global_metrics["top1_recall"],
            "personal_top1": personal_metrics["top1_recall"],
            "gain_top1": personal_metrics["top1_recall"] - global_metrics["top1_recall"],
            "global_top3": global_metrics["top3_recall"],
            "personal_top3": personal_metrics["top3_recall"],
            "gain_top3": personal_metrics["top3_recall"] - global_metrics["top3_recall"],
            "heldout_messages": len(split.heldout),
            "heldout_tokens": int(global_metrics["tokens"]),
            "train_messages": len(train),
            "train_examples": int(len(x)),
            "seconds": round(time.perf_counter() - start, 3),
            "created": time.time(),
        }
        if models.global_version != base_version:
            raise RuntimeError("a new global model arrived during personalization; rebuild on it")
        models.install_personal(
            result.weights,
            {"base_version": base_version, "last_message_id": last_id, "gain": gain, "settings": s.to_dict()},
        )
        if progress:
            progress(1.0, "personalized")
        return gain


__all__ = ["PersonalizationSettings", "Personalizer"]
