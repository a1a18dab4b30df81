"""Model bundle: one directory with everything needed to run or serve a model (numpy only).

    config.json   ModelConfig.to_json()
    vocab.json    Vocabulary.save()
    weights.fkw   wire format, kind "weights", float32
    meta.json     bundle_format_version, model_version, config_hash, vocab_hash, created, meta

meta.json pins the config and vocabulary hashes, so a bundle whose files were mixed from
different trainings (a new vocab.json next to old weights) is refused on load instead of
silently predicting the wrong words.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from models import wire
from models.config import ModelConfig
from models.vocab import Vocabulary

BUNDLE_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "weights.fkw"
META_FILE = "meta.json"
BUNDLE_FILES = (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, META_FILE)
_META_FIELDS = ("bundle_format_version", "model_version", "config_hash", "vocab_hash", "created", "meta")


class BundleError(ValueError):
    """A bundle cannot be saved or loaded; `.reason` is a stable machine-readable tag.

    Reasons: not_a_bundle, missing_file, bad_config, bad_vocab, bad_meta, config_hash_mismatch,
    vocab_hash_mismatch, vocab_size_mismatch, bad_weights, model_version_mismatch.
    For bad_weights, the WireError is the __cause__ (its .reason says what was wrong).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing lists of arrays is ambiguous
class Bundle:
    """A loaded bundle. `weights` are read-only float32 arrays in config.weight_specs() order."""

    config: ModelConfig
    vocab: Vocabulary
    weights: list[np.ndarray]
    model_version: int
    meta: dict[str, Any]
    created: str = ""  # ISO-8601 UTC time the bundle was written


# --------------------------------------------------------------------------- save


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or directory so a rename that follows is not reordered before its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _replaceable(path: Path) -> bool:
    """Only an empty directory or an earlier bundle may be replaced, never arbitrary user data."""
    if not path.is_dir():
        return False
    entries = {p.name for p in path.iterdir()}
    return not entries or (META_FILE in entries and entries <= set(BUNDLE_FILES))


def save_bundle(
    path: str | os.PathLike,
    config: ModelConfig,
    vocab: Vocabulary,
    weights: Sequence[np.ndarray] | Mapping[str, np.ndarray],
    model_version: int = 0,
    meta: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Write a bundle into a temporary sibling directory, then rename it into place.

    Readers never see a half-written bundle. Replacing an existing bundle swaps directories
    with two renames (POSIX cannot atomically replace a non-empty directory), so for an
    instant `path` may be absent; publish new model versions to new paths if that matters.
    Raises BundleError if vocab and config disagree, WireError if weights do not fit config.
    """
    path = Path(path)
    if len(vocab) != config.vocab_size:
        raise BundleError(
            "vocab_size_mismatch",
            f"vocabulary has {len(vocab)} tokens but model config {config.config_hash()[:8]} "
            f"has vocab_size {config.vocab_size}; use preset(..., vocab_size=len(vocab))",
        )
    meta = dict(meta or {})
    blob = wire.encode(weights, config, kind="weights", model_version=model_version, dtype="float32")
    meta_doc = {
        "bundle_format_version": BUNDLE_FORMAT_VERSION,
        "model_version": int(model_version),
        "config_hash": config.config_hash(),
        "vocab_hash": vocab.content_hash(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "meta": meta,
    }
    try:
        meta_bytes = _json_bytes(meta_doc)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bundle meta must be JSON-serialisable without NaN/Inf: {exc}") from exc
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists")
        if not _replaceable(path):
            raise BundleError("not_a_bundle", f"refusing to replace {path}: it is not a model bundle or an empty directory")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        _write_durably(tmp / CONFIG_FILE, (config.to_json() + "\n").encode("utf-8"))
        vocab.save(tmp / VOCAB_FILE)
        fsync_path(tmp / VOCAB_FILE)
        _write_durably(tmp / WEIGHTS_FILE, blob)
        _write_durably(tmp / META_FILE, meta_bytes)  # last: its presence marks a complete bundle
        fsync_path(tmp)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)
    return path


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the previous bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- load


def _read_json(file: Path, reason: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(reason, f"{file}: not valid JSON ({exc})") from exc


def _load_meta(file: Path) -> dict[str, Any]:
    doc = _read_json(file, "bad_meta")
    if not isinstance(doc, dict):
        raise BundleError("bad_meta", f"{file}: must be a JSON object")
    if doc.get("bundle_format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            "bad_meta",
            f"{file}: bundle_format_version {doc.get('bundle_format_version')!r} is not supported "
            f"(this reader: {BUNDLE_FORMAT_VERSION})",
        )
    missing = [f for f in _META_FIELDS if f not in doc]
    if missing:
        raise BundleError("bad_meta", f"{file}: missing field(s) {', '.join(missing)}")
    if not isinstance(doc["meta"], dict) or isinstance(doc["model_version"], bool) or not isinstance(doc["model_version"], int):
        raise BundleError("bad_meta", f"{file}: model_version must be an int and meta an object")
    return doc


def _load_config(file: Path) -> ModelConfig:
    data = _read_json(file, "bad_config")
    try:
        if not isinstance(data, dict):
            raise ValueError("must be a JSON object")
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise BundleError("bad_config", f"{file}: invalid model config ({exc})") from exc


def _load_vocab(file: Path) -> Vocabulary:
    try:
        return Vocabulary.load(file)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # VocabularyError is a ValueError
        raise BundleError("bad_vocab", f"{file}: invalid vocabulary ({exc})") from exc


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load and cross-check a bundle; raises BundleError with a specific .reason on any inconsistency."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError("not_a_bundle", f"{path} is not a directory")
    missing = [name for name in BUNDLE_FILES if not (path / name).is_file()]
    if missing:
        raise BundleError("missing_file", f"{path} is not a complete bundle: missing {', '.join(missing)}")

    meta = _load_meta(path / META_FILE)
    config = _load_config(path / CONFIG_FILE)
    if meta["config_hash"] != config.config_hash():
        raise BundleError(
            "config_hash_mismatch",
            f"{path}: config.json hashes to {config.config_hash()[:8]} but meta.json records "
            f"{str(meta['config_hash'])[:8]}; the files come from different models",
        )
    vocab = _load_vocab(path / VOCAB_FILE)
    if meta["vocab_hash"] != vocab.content_hash():
        raise BundleError(
            "vocab_hash_mismatch",
            f"{path}: vocab.json hashes to {vocab.content_hash()} but meta.json records {meta['vocab_hash']}; "
            "the weights were trained with a different vocabulary",
        )
    if len(vocab) != config.vocab_size:
        raise BundleError(
            "vocab_size_mismatch",
            f"{path}: vocabulary has {len(vocab)} tokens but config vocab_size is {config.vocab_size}",
        )
    try:
        payload = wire.decode((path / WEIGHTS_FILE).read_bytes(), config, expected_kind="weights")
    except wire.WireError as exc:
        raise BundleError("bad_weights", f"{path / WEIGHTS_FILE}: {exc} [{exc.reason}]") from exc
    if payload.model_version != meta["model_version"]:
        raise BundleError(
            "model_version_mismatch",
            f"{path}: weights.fkw is model version {payload.model_version} but meta.json says {meta['model_version']}",
        )
    return Bundle(
        config=config,
        vocab=vocab,
        weights=payload.tensors,
        model_version=payload.model_version,
        meta=meta["meta"],
        created=str(meta["created"]),
    )


__all__ = ["Bundle", "BundleError", "save_bundle", "load_bundle", "BUNDLE_FILES", "BUNDLE_FORMAT_VERSION"]
