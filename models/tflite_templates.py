"""Where a device finds the TFLite templates of a model config, without TensorFlow.

A template directory holds, for one ModelConfig (models.tflite_export.write_templates):

    tflite_sidecar.json          where each weight lives in the inference template (names the config)
    infer_template.tflite[.gz]   the inference template, weight buffers zeroed
    train_template.tflite[.gz]   optional: train_builtin.tflite with zero weights (train, infer,
                                 get_weights, set_weights; builtin ops, train's batch fixed)

Shipped directories come with the code (models/pretrained/small-tflite for the committed bundle,
gzipped: about 8 KB + 50 KB). For any other config a device with TensorFlow builds the
directory once into its data dir (ensure_templates), so later starts need no TensorFlow.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from models.config import ModelConfig
from models.tflite_weights import SidecarError, check_sidecar

SIDECAR_FILE = "tflite_sidecar.json"
INFER_TEMPLATE_FILE = "infer_template.tflite"
TRAIN_TEMPLATE_FILE = "train_template.tflite"
_MODELS_DIR = Path(__file__).resolve().parent
# Template directories shipped with the code, first match wins. Beside the bundle, not in it:
# a bundle folder holds exactly its four files (models.bundle refuses to overwrite anything else).
SHIPPED_DIRS = (_MODELS_DIR / "pretrained" / "small-tflite",)

_extra_dirs: list[Path] = []  # data-dir caches registered by ModelState (searched by local training too)
_lock = threading.Lock()


@dataclass(frozen=True)
class Templates:
    """One config's templates, read into memory."""

    directory: Path
    sidecar: dict[str, Any]
    infer: bytes
    train: bytes | None

    @property
    def config_hash(self) -> str:
        return str(self.sidecar["config_hash"])


def runtime_available() -> bool:
    """Whether a TFLite interpreter without TensorFlow is installed (models.tflite_predictor's two choices)."""
    return any(_importable(name) for name in ("tflite_runtime", "ai_edge_litert"))


def tensorflow_available() -> bool:
    """Whether TensorFlow is installed (found, not imported: importing it is what a phone avoids)."""
    return _importable("tensorflow")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module blocked with sys.modules[name] = None
        return False


def cache_dir_for(root: str | os.PathLike, config: ModelConfig) -> Path:
    """The directory a device caches this config's templates in, under `root`."""
    return Path(root) / config.config_hash()[:16]


def register_search_dir(path: str | os.PathLike) -> None:
    """Search `path` (a device's template cache root) after the shipped directories."""
    path = Path(path)
    with _lock:
        if path not in _extra_dirs:
            _extra_dirs.append(path)


def search_dirs(config: ModelConfig, extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Shipped directories, then each cache root's directory for this config."""
    with _lock:
        roots = [*map(Path, extra), *_extra_dirs]
    return [*SHIPPED_DIRS, *(cache_dir_for(root, config) for root in roots)]


def read_file(directory: Path, name: str) -> bytes | None:
    """`name` from `directory`, or `name`.gz decompressed; None when neither exists."""
    plain, packed = directory / name, directory / f"{name}.gz"
    if plain.is_file():
        return plain.read_bytes()
    if packed.is_file():
        return gzip.decompress(packed.read_bytes())
    return None


def _sidecar_hash(directory: Path) -> str | None:
    try:
        return str(json.loads((directory / SIDECAR_FILE).read_text(encoding="utf-8")).get("config_hash"))
    except (OSError, ValueError, AttributeError):
        return None


def _has_file(directory: Path, name: str) -> bool:
    return (directory / name).is_file() or (directory / f"{name}.gz").is_file()


def has_templates(config: ModelConfig, extra: Iterable[str | os.PathLike] = (), *, need_train: bool = False) -> bool:
    """Whether find_templates would find them, without reading the models (a status screen asks often)."""
    for directory in search_dirs(config, extra):
        if _sidecar_hash(directory) == config.config_hash() and _has_file(directory, INFER_TEMPLATE_FILE) \
                and (_has_file(directory, TRAIN_TEMPLATE_FILE) or not need_train):
            return True
    return False


def load_templates(directory: str | os.PathLike, config: ModelConfig) -> Templates | None:
    """The templates in `directory` if they are this config's, else None."""
    directory = Path(directory)
    sidecar_path = directory / SIDECAR_FILE
    if not sidecar_path.is_file():
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        check_sidecar(sidecar)
    except (ValueError, KeyError, TypeError, SidecarError):
        return None  # damaged or of another format: as if absent (a cache is rebuilt)
    if sidecar.get("config_hash") != config.config_hash():
        return None
    infer = read_file(directory, INFER_TEMPLATE_FILE)
    if infer is None or len(infer) != sidecar["template_bytes"]:
        return None
    return Templates(directory, sidecar, infer, read_file(directory, TRAIN_TEMPLATE_FILE))


def find_templates(config: ModelConfig, extra: Iterable[str | os.PathLike] = (), *,
                   need_train: bool = False) -> Templates | None:
    """The first directory holding this config's templates (with a train template if `need_train`)."""
    for directory in search_dirs(config, extra):
        found = load_templates(directory, config)
        if found is not None and (found.train is not None or not need_train):
            return found
    return None


def ensure_templates(config: ModelConfig, cache_root: str | os.PathLike, *, build: bool = True) -> Templates | None:
    """This config's templates: shipped or cached, else built with TensorFlow into the cache
    (when `build` and TensorFlow is installed), else None."""
    found = find_templates(config, [cache_root])
    if found is not None or not build or not tensorflow_available():
        return found
    from models.tflite_export import write_templates  # TensorFlow: once per config and device

    target = cache_dir_for(cache_root, config)
    write_templates(config, target)
    return load_templates(target, config)


__all__ = ["INFER_TEMPLATE_FILE", "SHIPPED_DIRS", "SIDECAR_FILE", "TRAIN_TEMPLATE_FILE", "Templates",
           "cache_dir_for", "ensure_templates", "find_templates", "has_templates", "load_templates", "read_file",
           "register_search_dir", "runtime_available", "search_dirs", "tensorflow_available"]
