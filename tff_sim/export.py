"""The final global model as a models/ bundle (wire-format weights + config + vocabulary + meta)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from models.bundle import Bundle, load_bundle, save_bundle
from models.config import ModelConfig
from models.vocab import Vocabulary

MODEL_DIR = "model"


def export_model(out: Path, config: ModelConfig, vocab: Vocabulary, weights: Sequence[np.ndarray],
                 rounds: int, meta: dict[str, Any] | None = None) -> Path:
    """Write <out>/model; model_version = the number of rounds trained."""
    return save_bundle(Path(out) / MODEL_DIR, config, vocab, [np.asarray(w, np.float32) for w in weights],
                       model_version=int(rounds), meta={"source": "tff_sim", **(meta or {})})


def load_model(path: Path) -> Bundle:
    return load_bundle(path)
