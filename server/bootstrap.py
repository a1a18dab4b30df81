"""Where a deployment's first model comes from: a model bundle, or a preset initialised with numpy.

The server is fixed to one ModelConfig and Vocabulary for its lifetime (devices fetch both from it).

* `--init-bundle DIR` (models.bundle layout): config, vocabulary and weights as trained.
* `--init-preset NAME [--vocab-file vocab.json]`: models.config.preset(NAME) resized to the
  vocabulary, weights drawn with numpy from --seed:
    embedding                    uniform(-0.05, 0.05)          (Keras' Embedding default)
    kernels and the projection   Glorot uniform, limit sqrt(6 / (fan_in + fan_out))
    biases, output_bias          zeros
  Without --vocab-file the vocabulary is synthetic placeholders "w4", "w5", ... (tests, demos).
The Keras initializers (orthogonal recurrent kernel, unit forget bias) are not reproduced: the
first federated or pushed model replaces these weights anyway.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from models.bundle import load_bundle
from models.config import ModelConfig, preset
from models.vocab import Vocabulary


def random_weights(config: ModelConfig, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for name, shape in config.weight_specs():
        if name == "embedding":
            w = rng.uniform(-0.05, 0.05, size=shape)
        elif len(shape) == 2:
            limit = math.sqrt(6.0 / (shape[0] + shape[1]))
            w = rng.uniform(-limit, limit, size=shape)
        else:
            w = np.zeros(shape)
        out.append(w.astype(np.float32))
    return out


def synthetic_vocab(size: int) -> Vocabulary:
    """size tokens in total: the 4 special tokens and placeholder words w4 .. w{size-1}."""
    return Vocabulary([f"w{i}" for i in range(4, size)])


def from_preset(name: str, vocab_file: str | Path | None = None, seed: int = 0):
    """(config, vocab, weights, info) for a preset, sized to the vocabulary if one is given."""
    if vocab_file is not None:
        vocab = Vocabulary.load(vocab_file)
        config = preset(name, vocab_size=len(vocab))
    else:
        config = preset(name)
        vocab = synthetic_vocab(config.vocab_size)
    return config, vocab, random_weights(config, seed), {"init": "preset", "preset": name, "seed": seed}


def from_bundle(path: str | Path):
    bundle = load_bundle(path)
    info = {"init": "bundle", "bundle_model_version": bundle.model_version, "bundle_meta": bundle.meta}
    return bundle.config, bundle.vocab, [np.array(w) for w in bundle.weights], info
