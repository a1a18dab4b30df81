"""Model configuration as JSON data, presets, and the weight layout (numpy only, no TF).

The weight layout (names, shapes, order) is the contract between the Keras model,
the wire format, the server and the device: all of them derive it from here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

NUM_SPECIAL_TOKENS = 4  # <pad>, <bos>, <eos>, <oov>; see models.vocab


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the CIFG next-word model (Hard et al. 2018).

    vocab_size counts every id the model can emit, special tokens included.
    The LSTM output is projected to embedding_dim so the output layer can reuse
    the input embedding (tied embeddings).
    """

    vocab_size: int = 10_000 + NUM_SPECIAL_TOKENS
    embedding_dim: int = 96
    units: int = 670
    seq_len: int = 20
    preset: str = "gboard"

    def __post_init__(self) -> None:
        for field in ("vocab_size", "embedding_dim", "units", "seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.vocab_size <= NUM_SPECIAL_TOKENS:
            raise ValueError(f"vocab_size must exceed {NUM_SPECIAL_TOKENS} special tokens")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def config_hash(self) -> str:
        """Stable hash of everything that changes the weight layout or semantics."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def weight_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every trainable tensor, in the order the Keras model holds them."""
        v, e, h = self.vocab_size, self.embedding_dim, self.units
        return [
            ("embedding", (v, e)),
            ("cifg/kernel", (e, 3 * h)),  # input -> [coupled input/forget gate, candidate, output gate]
            ("cifg/recurrent_kernel", (e, 3 * h)),  # projected state -> gates
            ("cifg/bias", (3 * h,)),
            ("cifg/projection", (h, e)),  # cell output -> embedding space
            ("output_bias", (v,)),
        ]

    def num_parameters(self) -> int:
        return int(sum(np.prod(shape) for _, shape in self.weight_specs()))

    def with_vocab_size(self, vocab_size: int) -> "ModelConfig":
        return dataclasses.replace(self, vocab_size=vocab_size)


PRESETS: dict[str, ModelConfig] = {
    "gboard": ModelConfig(),
    "small": ModelConfig(vocab_size=5_000 + NUM_SPECIAL_TOKENS, embedding_dim=64, units=256, preset="small"),
    "tiny": ModelConfig(vocab_size=500 + NUM_SPECIAL_TOKENS, embedding_dim=16, units=32, seq_len=10, preset="tiny"),
}


def check_dropout(rate: float) -> float:
    """A training dropout rate in [0, 1): anything else is refused (1 would zero every activation)."""
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {rate!r}")
    return rate


def preset(name: str, vocab_size: int | None = None) -> ModelConfig:
    """A preset config, optionally resized to an actual vocabulary."""
    try:
        config = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}") from None
    return config.with_vocab_size(vocab_size) if vocab_size is not None else config


def zeros_like_specs(config: ModelConfig, dtype: Any = np.float32) -> list[np.ndarray]:
    return [np.zeros(shape, dtype=dtype) for _, shape in config.weight_specs()]
