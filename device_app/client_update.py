"""The client update of one federated training round, free of HTTP and files:

    examples = local_examples(messages, vocab, config.seq_len, task.max_examples, rng)
    output = train_round(task, examples, base, config, rng=rng)   # train -> delta -> clip/noise

`output.delta` is what leaves the device (in the clear, masked by SecAgg or encrypted by Paillier:
device_app/uploads.py decides); `output.metadata()` travels with it. Training runs on the trainer
device_app/local_training.trainer_for picks at run time (Keras, or the TFLite `train` signature where
TensorFlow is absent): TensorFlow is imported only when the Keras trainer is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from device_app.local_training import TrainingCancelled, compute_delta, examples_for, privatize, trainer_for
from models import dp_ftrl
from models.config import ModelConfig
from models.fedavg import FedAvgHyperparams
from models.vocab import Vocabulary

Progress = Callable[[float, str], None]
Examples = tuple[np.ndarray, np.ndarray]  # (x, y) next-word windows


def client_hyperparams(task: Any) -> FedAvgHyperparams:
    """The task's client hyperparameters (http_client.Task read them with models.fedavg.hyperparams_from_task)."""
    return FedAvgHyperparams(client_lr=task.learning_rate, client_epochs=task.epochs, batch_size=task.batch_size)


@dataclass
class ClientOutput:
    """One device's contribution to a round."""

    delta: list[np.ndarray]  # trained - base, clipped and noised
    config: ModelConfig  # the model the delta is for (the wire format names it)
    num_examples: int  # training windows (what FedAvg weights by)
    metrics: dict[str, float]  # finite training-loss numbers and the training time
    privacy: dict[str, Any]  # the privatization summary: norms before/after clipping, clip bound, noise
    training: dict[str, Any] = field(default_factory=dict)  # steps, epochs, losses, seconds (the sent log's)

    def metadata(self) -> dict[str, Any]:
        """What travels with the delta (wire metadata, SecAgg/Paillier input metadata)."""
        return {"num_examples": self.num_examples, "metrics": self.metrics}


def local_examples(messages: Iterable[str], vocab: Vocabulary, seq_len: int, max_examples: int | None,
                   rng: np.random.Generator) -> Examples:
    """The device's messages as training windows; when capped, `max_examples` of them drawn uniformly
    without replacement, a fresh draw each round.

    Why not the newest: the simulation that measured the recipes (tff_sim/client_data.py round_epochs) draws
    a fresh random subset per round, so a heavy user's rounds together cover most of their text (15 visits
    of 1,024 reach 97% of the federated users' text); the newest 1,024 every round would train on the same
    windows each time and leave the rest unseen."""
    x, y = examples_for(messages, vocab, seq_len)
    if max_examples and len(x) > max_examples:
        keep = np.sort(rng.choice(len(x), size=max_examples, replace=False))
        x, y = x[keep], y[keep]
    return x, y


def adaptive_clip_bit(task: Any, norm_before_clip: float) -> dict[str, float]:
    """DP-FTRL's adaptive clipping (server/ftrl.py): when the task carries the round's quantile estimate, the
    one bit the server counts, whether this delta's norm before clipping was <= it; else nothing."""
    raw = getattr(task, "raw", None) or {}
    estimate = raw.get("clip_estimate")
    if estimate is None:
        return {}
    return {dp_ftrl.BELOW_ESTIMATE_METRIC: 1.0 if norm_before_clip <= float(estimate) else 0.0}


def train_round(task: Any, examples: Examples, base: Sequence[np.ndarray], config: ModelConfig, *,
                rng: np.random.Generator, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None) -> ClientOutput:
    """SGD from the round's base weights with the task's hyperparameters, then the delta, clipped to the
    task's L2 bound and noised with its stddev. Raises TrainingCancelled when should_stop() turns true
    between batches."""
    hp = client_hyperparams(task)
    x, y = examples
    # Draw order (training seed, then noise) is part of a seeded device's reproducibility.
    result = trainer_for(config).train(base, x, y, epochs=hp.client_epochs, batch_size=hp.batch_size, lr=hp.client_lr,
                                       seed=int(rng.integers(2**31)), progress=progress, should_stop=should_stop)
    private = privatize(compute_delta(result.weights, base), task.clip_norm, task.noise_stddev, rng)
    metrics = {"loss_first_epoch": result.loss_first_epoch, "loss_last_epoch": result.loss_last_epoch,
               "train_seconds": result.seconds, **adaptive_clip_bit(task, private.norm_before_clip)}
    return ClientOutput(delta=private.delta, config=config, num_examples=int(result.num_examples),
                        metrics={k: float(v) for k, v in metrics.items() if np.isfinite(v)},
                        privacy=private.summary(), training=result.summary())


__all__ = ["ClientOutput", "Examples", "TrainingCancelled", "adaptive_clip_bit", "client_hyperparams", "local_examples",
           "train_round"]
