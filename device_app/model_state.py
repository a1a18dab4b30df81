"""The device's models: the server's global model and the user's personal model, on disk in the
device data dir as model bundles, plus the next-word predictor that serves suggestions.

    <data_dir>/model/global/     bundle of the current global model (what the server sent,
                                 or the bundled initial model when the device never synced)
    <data_dir>/model/personal/   bundle of the personal model (global fine-tuned on the user's
                                 own text); its meta records the global version it was built on,
                                 so a new global version makes it stale. Never leaves the device.

Suggestions use the personal model when it exists, was built on the current global model and
the selection rule chose it (models.personal_cache.HeldoutScorer.select, run by personalize.py:
it beat the global model on enough held-back text); otherwise the global model. The served
model is blended with the personal n-gram cache of the user's own messages (typing_cache.py) at
the weight the same rule chose for it, or models.personal_cache.DEFAULT_WEIGHT before one was
chosen; "use personal model" off switches the cache off too (both are learned from the user's
text).

The predictor is built lazily (headless fleet devices that never suggest never build one), on
one of two paths chosen at run time ($FK_SUGGEST_BACKEND: auto, the default, tflite or keras) and
shown in status():

* "tflite": models.tflite_predictor.TFLitePredictor, which imports no TensorFlow. The config's
  inference template comes from models.tflite_templates: shipped beside the committed bundle, or
  built once with TensorFlow into <model_dir>/tflite/<config hash> when TensorFlow is installed,
  so later starts need none. New global or personal weights are written into the template
  (models.tflite_weights.write_weights) and the interpreter reloaded.
* "keras": models.keras_model.NextWordPredictor (one tf.function traced once; swapping weights
  assigns variables, so nothing retraces): where no TFLite interpreter or template is available.
"""
from __future__ import annotations

import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from device_app.local_training import training_backend
from device_app.typing_cache import TypingCache
from models.bundle import Bundle, BundleError, load_bundle, save_bundle
from models.config import ModelConfig
from models.personal_cache import DEFAULT_WEIGHT, blend
from models.pretrained import default_bundle_path
from models.suggest import Suggester
from models.tflite_templates import (Templates, ensure_templates, has_templates, register_search_dir, runtime_available,
                                     tensorflow_available)
from models.vocab import Vocabulary

GLOBAL_DIR = "global"
PERSONAL_DIR = "personal"
TEMPLATES_DIR = "tflite"  # per-config TFLite templates built on this device (models.tflite_templates)
SUGGEST_BACKEND_ENV = "FK_SUGGEST_BACKEND"
SUGGEST_BACKENDS = ("tflite", "keras")
INITIAL_BUNDLE_ENV = "FK_INITIAL_BUNDLE"
_REPO_ROOT = Path(__file__).resolve().parents[1]
# Where a bundled initial model may live, first found wins (see find_initial_bundle).
DEFAULT_INITIAL_BUNDLES = (
    _REPO_ROOT / "device_app" / "assets" / "initial_model",  # shipped with the app, if the build adds one
    default_bundle_path(),  # the committed default: small CIFG trained on the donors' text (models/pretrained.py)
)


def find_initial_bundle(explicit: str | os.PathLike | None | bool = None) -> Path | None:
    """The bundled initial model: `explicit`, else $FK_INITIAL_BUNDLE, else a default location.
    explicit=False: none (a device that only ever uses the server's model, e.g. fleet devices)."""
    if explicit is False:
        return None
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get(INITIAL_BUNDLE_ENV):
        candidates.append(Path(os.environ[INITIAL_BUNDLE_ENV]))
    candidates.extend(DEFAULT_INITIAL_BUNDLES)
    for path in candidates:
        if (path / "meta.json").is_file():
            return path
    return None


@dataclass
class PersonalModel:
    weights: list[np.ndarray]
    base_version: int
    meta: dict[str, Any]

    @property
    def gain(self) -> dict[str, Any]:
        return dict(self.meta.get("gain", {}))

    @property
    def selection(self) -> dict[str, Any]:
        """models.personal_cache.Selection.to_dict() of the personalization that built it ({} if none)."""
        return dict(self.meta.get("selection") or {})


class _CachedLogprobs:
    """An LRU cache of next-word log-probabilities keyed by context ids.

    While the user types a word the context does not change, so each keystroke after the
    first reuses the model call. Cleared whenever the serving weights change.
    """

    def __init__(self, fn: Any, size: int = 64) -> None:
        self.fn = fn
        self.size = size
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self.enabled = size > 0

    def __call__(self, context_ids: Sequence[int]) -> np.ndarray:
        if not self.enabled:
            return self.fn(context_ids)
        key = tuple(int(i) for i in context_ids)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        value = self.fn(context_ids)
        self._cache[key] = value
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return value

    def clear(self) -> None:
        self._cache.clear()


class ModelState:
    """Global + personal model of one device. Thread-safe: suggestions may run while a
    background thread installs a new global or personal model."""

    def __init__(
        self, model_dir: str | os.PathLike, initial_bundle: str | os.PathLike | None | bool = None, cache_size: int = 64,
        messages: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        """messages: the user's stored messages (TextStore.messages), read to build the typing cache."""
        self.model_dir = Path(model_dir)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._bundle: Bundle | None = None
        self._personal: PersonalModel | None = None
        self._predictor: Any = None  # TFLitePredictor or NextWordPredictor, built lazily
        self._predictor_config: ModelConfig | None = None
        self._backend: str | None = None  # the predictor's path: "tflite" | "keras"
        self._serving: str | None = None  # "global" | "personal" weights currently in the predictor
        self._suggester: Suggester | None = None
        self._cache_size = cache_size
        self._cached: _CachedLogprobs | None = None
        self.personal_enabled = True
        self.typing_cache = TypingCache(messages or (lambda: []))
        self._blend_key: tuple[Any, ...] | None = None  # (serving, weight, cache version) the LRU was filled under
        if self.templates_root.is_dir():  # templates built on an earlier run: local training looks here too
            register_search_dir(self.templates_root)
        self._load(initial_bundle)

    # ------------------------------------------------------------------ loading

    @property
    def global_path(self) -> Path:
        return self.model_dir / GLOBAL_DIR

    @property
    def personal_path(self) -> Path:
        return self.model_dir / PERSONAL_DIR

    @property
    def templates_root(self) -> Path:
        return self.model_dir / TEMPLATES_DIR

    def _load(self, initial_bundle: str | os.PathLike | None | bool) -> None:
        bundle = None
        if (self.global_path / "meta.json").is_file():
            try:
                bundle = load_bundle(self.global_path)
            except BundleError:
                bundle = None  # damaged: fall back to the initial bundle or the server
        if bundle is None:
            source = find_initial_bundle(initial_bundle)
            if source is not None:
                bundle = load_bundle(source)
                save_bundle(self.global_path, bundle.config, bundle.vocab, bundle.weights, bundle.model_version,
                            {**bundle.meta, "source": "initial"})
        self._bundle = bundle
        if bundle is not None and (self.personal_path / "meta.json").is_file():
            try:
                p = load_bundle(self.personal_path)
                if p.config == bundle.config and p.vocab == bundle.vocab:
                    self._personal = PersonalModel(list(p.weights), int(p.meta.get("base_version", -1)), dict(p.meta))
            except BundleError:
                self._personal = None

    # ------------------------------------------------------------------ properties

    @property
    def has_model(self) -> bool:
        return self._bundle is not None

    @property
    def bundle(self) -> Bundle | None:
        return self._bundle

    @property
    def config(self) -> ModelConfig | None:
        return self._bundle.config if self._bundle else None

    @property
    def vocab(self) -> Vocabulary | None:
        return self._bundle.vocab if self._bundle else None

    @property
    def global_version(self) -> int | None:
        return self._bundle.model_version if self._bundle else None

    @property
    def global_weights(self) -> list[np.ndarray]:
        if self._bundle is None:
            raise RuntimeError("no global model yet: sync with the server or provide an initial bundle")
        return [np.array(w, dtype=np.float32) for w in self._bundle.weights]

    @property
    def personal(self) -> PersonalModel | None:
        return self._personal

    @property
    def personal_is_current(self) -> bool:
        return self._personal is not None and self._personal.base_version == self.global_version

    @property
    def serving(self) -> str | None:
        """Which model suggestions come from: "personal", "global" or None (no model)."""
        if self._bundle is None:
            return None
        p = self._personal
        if self.personal_enabled and p is not None and self.personal_is_current and p.selection.get("served") == "personal":
            return "personal"
        return "global"

    @property
    def cache_weight(self) -> float:
        """The typing cache's blend weight for the served model: chosen on held-back text when the
        device personalized (for the personal model, or for the global one when that is served),
        DEFAULT_WEIGHT before; 0 with personal suggestions switched off."""
        if not self.personal_enabled:
            return 0.0
        sel = self._personal.selection if self._personal is not None else {}
        if not sel:
            return DEFAULT_WEIGHT
        return float(sel["weight"] if self.serving == "personal" else sel["weight_global"])

    # ------------------------------------------------------------------ installing

    def install_global(
        self,
        config: ModelConfig,
        vocab: Vocabulary,
        weights: Sequence[np.ndarray],
        version: int,
        meta: dict[str, Any] | None = None,
        *,
        persist: bool = True,
    ) -> None:
        """Serve a new global model, saved to the data dir unless `persist` is False (fleet
        devices share one in-memory copy); the personal model becomes stale."""
        if persist:
            save_bundle(self.global_path, config, vocab, list(weights), int(version), dict(meta or {}))
            bundle = load_bundle(self.global_path)
        else:
            if len(vocab) != config.vocab_size:
                raise BundleError("vocab_size_mismatch", f"vocabulary has {len(vocab)} tokens, config {config.vocab_size}")
            bundle = Bundle(config=config, vocab=vocab, weights=list(weights), model_version=int(version), meta=dict(meta or {}))
        with self._lock:
            if self._bundle is None or bundle.config != self._bundle.config or bundle.vocab != self._bundle.vocab:
                self._suggester = None  # new vocabulary or layout: rebuild what depends on it
                if self._personal is not None:
                    self._drop_personal_files()
            self._bundle = bundle
            self._serving = None

    def install_personal(self, weights: Sequence[np.ndarray], meta: dict[str, Any]) -> None:
        if self._bundle is None:
            raise RuntimeError("no global model to personalize")
        base = int(meta.get("base_version", self.global_version))
        meta = {**meta, "kind": "personal", "base_version": base}
        save_bundle(self.personal_path, self._bundle.config, self._bundle.vocab, list(weights), base, meta)
        with self._lock:
            self._personal = PersonalModel([np.asarray(w, np.float32) for w in weights], base, meta)
            self._serving = None

    def _drop_personal_files(self) -> None:
        self._personal = None
        shutil.rmtree(self.personal_path, ignore_errors=True)
        self._serving = None

    def drop_personal(self) -> None:
        """Delete the personal model and the typing cache (forget my data: both were learned from the user's text)."""
        with self._lock:
            self._drop_personal_files()
            self.typing_cache.clear()

    def note_message(self, text: str) -> None:
        """A message the user committed (already stored): the typing cache counts it."""
        self.typing_cache.add_message(text)

    # ------------------------------------------------------------------ suggestions

    def _serving_weights(self, which: str | None) -> Sequence[np.ndarray]:
        assert self._bundle is not None
        return self._personal.weights if which == "personal" and self._personal else self._bundle.weights

    def _templates(self, config: ModelConfig, build: bool) -> Templates | None:
        """The config's TFLite templates (shipped, cached, or built now with TensorFlow when `build`)."""
        templates = ensure_templates(config, self.templates_root, build=build)
        if templates is not None and templates.directory.parent == self.templates_root:
            register_search_dir(self.templates_root)  # local training finds its training template here too
        return templates

    def planned_backend(self) -> str | None:
        """The suggestion path: the predictor's once built, else the one it would be built on."""
        if self._predictor is not None and self._predictor_config == self.config:
            return self._backend
        if self._bundle is None:
            return None
        setting = suggest_backend_setting()
        if setting != "auto":
            return setting
        if not runtime_available():
            return "keras"
        # a missing template is built on the first suggestion where TensorFlow is installed
        found = has_templates(self._bundle.config, [self.templates_root])
        return "tflite" if found or tensorflow_available() else "keras"

    def _build_predictor(self, config: ModelConfig, weights: Sequence[np.ndarray]) -> tuple[Any, str]:
        """(predictor with `weights`, its path) on the path suggest_backend_setting() allows."""
        setting = suggest_backend_setting()
        if setting != "keras" and (setting == "tflite" or runtime_available()):
            templates = self._templates(config, build=True)
            if templates is not None:
                from models.tflite_predictor import TFLitePredictor  # numpy + tflite_runtime

                return TFLitePredictor.from_template_bytes(templates.infer, templates.sidecar, weights=weights), "tflite"
            if setting == "tflite":
                raise RuntimeError(f"no TFLite template for model config {config.config_hash()[:8]} and no "
                                   "TensorFlow to build one")
        from models.keras_model import NextWordPredictor  # TensorFlow: only on the Keras path

        return NextWordPredictor(config, list(weights)), "keras"

    def _ensure_predictor(self) -> None:
        assert self._bundle is not None
        want = self.serving
        if self._predictor is None or self._predictor_config != self._bundle.config:
            self._predictor, self._backend = self._build_predictor(self._bundle.config, self._serving_weights(want))
            self._predictor_config = self._bundle.config
            self._serving = want
            self._blend_key = None
        if self._serving != want:
            self._predictor.set_weights(self._serving_weights(want))
            self._serving = want
            self._blend_key = None  # new weights (perhaps of the same kind): every cached row is stale
        weight = self.cache_weight
        if weight > 0:
            self.typing_cache.ensure(self._bundle.vocab)  # built on first use, from the stored messages
        if self._suggester is None or self._cached is None:
            self._cached = _CachedLogprobs(self._blended_logprobs, self._cache_size)
            self._suggester = Suggester(self._bundle.vocab, self._cached)
        key = (want, weight, self.typing_cache.version if weight > 0 else None)
        if key != self._blend_key:  # other weights, another blend weight or new counts: cached rows are stale
            self._cached.clear()
            self._blend_key = key

    def _blended_logprobs(self, context_ids: Sequence[int]) -> np.ndarray:
        """The served model's next-word log-probabilities, blended with the typing cache."""
        logprobs = self._predictor.next_word_logprobs(context_ids)
        weight = self._blend_key[1] if self._blend_key else 0.0
        if weight <= 0:
            return logprobs
        return blend(logprobs, self.typing_cache.probs(context_ids), weight)

    def suggester(self) -> Suggester | None:
        with self._lock:
            if self._bundle is None:
                return None
            self._ensure_predictor()
            return self._suggester

    def suggest(self, text: str, k: int = 3) -> list[str]:
        """Top-k suggestions for the typed text ([] until a model exists)."""
        with self._lock:
            if self._bundle is None:
                return []
            self._ensure_predictor()
            assert self._suggester is not None
            return self._suggester.suggest(text, k)

    def warm_up(self) -> None:
        """Build and trace the predictor now (first suggestion otherwise pays for it)."""
        self.suggest("")

    def set_cache_enabled(self, enabled: bool) -> None:
        with self._lock:
            if self._cached is not None:
                self._cached.enabled = enabled
                self._cached.clear()
            self._cache_size = self._cache_size if enabled else 0

    def status(self) -> dict[str, Any]:
        p = self._personal
        chosen = bool(p is not None and p.selection)
        return {
            "has_model": self.has_model,
            "global_version": self.global_version,
            "preset": self.config.preset if self.config else None,
            "vocab_size": len(self.vocab) if self.vocab else None,
            "serving": self.serving,
            "personal": None if p is None else {"base_version": p.base_version, "current": self.personal_is_current, **p.gain},
            "cache": {"weight": self.cache_weight, "weight_source": "chosen" if chosen else "default",
                      "built": self.typing_cache.built, "tokens": self.typing_cache.tokens},
            "backends": self.backends(),
        }

    def backends(self) -> dict[str, str | None]:
        """What suggestions and local training run on: "tflite" (no TensorFlow) or "keras"."""
        config = self.config
        return {"suggestions": self.planned_backend(), "training": training_backend(config) if config else None}


def suggest_backend_setting() -> str:
    """$FK_SUGGEST_BACKEND: "tflite", "keras" or "auto" (the default: TFLite where it is available)."""
    value = os.environ.get(SUGGEST_BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in (*SUGGEST_BACKENDS, "auto"):
        raise ValueError(f"${SUGGEST_BACKEND_ENV} must be tflite, keras or auto, not {value!r}")
    return value


__all__ = ["ModelState", "PersonalModel", "find_initial_bundle", "INITIAL_BUNDLE_ENV", "SUGGEST_BACKEND_ENV",
           "suggest_backend_setting"]
