"""Checkpoints of a run: the whole TFF learning-algorithm state plus the metrics history.

The state (global model, server optimizer slots, DP aggregator state with its noise seed,
...) is flattened with tf.nest and stored leaf by leaf in one .npz, together with a JSON
header (round, config hash, history). Restoring packs the leaves back into the structure
of process.initialize(), so a resumed run continues from exactly the same state; since
every round's clients, batches and (seeded) DP noise derive from (seed, round), it then
ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def _leaf_array(leaf: Any) -> np.ndarray:
    if isinstance(leaf, str):
        return np.asarray(leaf.encode("utf-8"))
    return np.asarray(leaf)


def save(path: str | os.PathLike, state: Any, header: dict[str, Any]) -> Path:
    """Atomically write state + header to path/checkpoint.npz."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    leaves = tf.nest.flatten(state)
    arrays = {f"leaf_{i:05d}": _leaf_array(leaf) for i, leaf in enumerate(leaves)}
    doc = {"format_version": FORMAT_VERSION, "num_leaves": len(leaves), **header}
    arrays["__header__"] = np.frombuffer(json.dumps(doc, allow_nan=True).encode("utf-8"), dtype=np.uint8)
    target = path / CHECKPOINT_FILE
    tmp = path / (CHECKPOINT_FILE + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def exists(path: str | os.PathLike) -> bool:
    return (Path(path) / CHECKPOINT_FILE).is_file()


def remove(path: str | os.PathLike) -> None:
    (Path(path) / CHECKPOINT_FILE).unlink(missing_ok=True)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    with np.load(Path(path) / CHECKPOINT_FILE) as data:
        return json.loads(bytes(data["__header__"]).decode("utf-8"))


def load(path: str | os.PathLike, template: Any) -> tuple[Any, dict[str, Any]]:
    """(state shaped like `template`, header). Raises CheckpointError if the structure differs."""
    with np.load(Path(path) / CHECKPOINT_FILE) as data:
        header = json.loads(bytes(data["__header__"]).decode("utf-8"))
        if header.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"unsupported checkpoint format {header.get('format_version')!r}")
        template_leaves = tf.nest.flatten(template)
        if header["num_leaves"] != len(template_leaves):
            raise CheckpointError(
                f"checkpoint has {header['num_leaves']} state tensors, this process {len(template_leaves)}: "
                "it was written by a different configuration"
            )
        leaves = [_restore_leaf(data[f"leaf_{i:05d}"], t, i) for i, t in enumerate(template_leaves)]
    return tf.nest.pack_sequence_as(template, leaves), header


def _restore_leaf(saved: np.ndarray, template: Any, index: int) -> Any:
    if isinstance(template, np.ndarray):
        if saved.shape != template.shape:
            raise CheckpointError(f"state tensor {index}: shape {saved.shape} != {template.shape}")
        return saved.astype(template.dtype, copy=False)
    if isinstance(template, np.generic):
        return type(template)(saved)
    if isinstance(template, bytes):
        return bytes(saved)
    if isinstance(template, str):
        return bytes(saved).decode("utf-8")
    if isinstance(template, bool):
        return bool(saved)
    if isinstance(template, int):
        return int(saved)
    if isinstance(template, float):
        return float(saved)
    return saved
