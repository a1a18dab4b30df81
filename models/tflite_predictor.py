"""Next-word prediction through TFLite, without TensorFlow (tflite_runtime, or ai_edge_litert).

A drop-in for models.keras_model.NextWordPredictor where models.suggest.Suggester needs it:
`next_word_logprobs(context_ids) -> [vocab]`. Weights come from a bundle or a list of arrays
(the wire format's order) and are patched into the float32 template exported by
models.tflite_export (see models.tflite_weights), so a device needs no converter.

    predictor = TFLitePredictor.from_template("DIR/infer_template.tflite", "DIR/tflite_sidecar.json",
                                              weights=load_bundle(path).weights)
    Suggester(vocab, predictor.next_word_logprobs).suggest("how are", 3)
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from models.tflite_weights import SidecarError, load_sidecar, sidecar_config, write_weights

BOS_ID = 1  # models.vocab.Vocabulary.BOS_ID; kept here so this module stays TensorFlow-free


def load_interpreter_module() -> Any:
    """tflite_runtime.interpreter, else ai_edge_litert.interpreter (its successor's package name)."""
    try:
        import tflite_runtime.interpreter as module
    except ImportError:
        import ai_edge_litert.interpreter as module  # type: ignore[no-redef]
    return module


def load_interpreter_class() -> Any:
    """tflite_runtime's Interpreter, else ai_edge_litert's."""
    return load_interpreter_module().Interpreter


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits)
    shifted -= np.log(np.sum(np.exp(shifted)))  # in place: one array less per suggestion, the same floats
    return shifted.astype(np.float32, copy=False)


class TFLitePredictor:
    """Runs the `next_word` and `infer` signatures of an inference .tflite (models.tflite_export)."""

    def __init__(self, model: bytes, *, template: bytes | None = None, sidecar: Mapping[str, Any] | None = None,
                 num_threads: int | None = 1) -> None:
        self._template = template
        self._sidecar = sidecar
        self._num_threads = num_threads
        self._lock = threading.Lock()  # suggestions and weight swaps may come from different threads
        self._load(model)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_file(cls, path: str | os.PathLike, num_threads: int | None = 1) -> "TFLitePredictor":
        """A ready .tflite with its weights in it (infer.tflite, infer_drq.tflite)."""
        return cls(Path(path).read_bytes(), num_threads=num_threads)

    @classmethod
    def from_template(cls, template_path: str | os.PathLike, sidecar_path: str | os.PathLike,
                      weights: Sequence[Any] | None = None, bundle: str | os.PathLike | None = None,
                      num_threads: int | None = 1) -> "TFLitePredictor":
        """Template + sidecar, with weights from a list (weight_specs order) or a bundle directory."""
        if (weights is None) == (bundle is None):
            raise ValueError("give exactly one of weights or bundle")
        template = Path(template_path).read_bytes()
        sidecar = load_sidecar(sidecar_path)
        return cls.from_template_bytes(template, sidecar, weights=weights, bundle=bundle, num_threads=num_threads)

    @classmethod
    def from_template_bytes(cls, template: bytes, sidecar: Mapping[str, Any], weights: Sequence[Any] | None = None,
                            bundle: str | os.PathLike | None = None, num_threads: int | None = 1) -> "TFLitePredictor":
        """As from_template, with the template and sidecar already in memory (models.tflite_templates)."""
        if (weights is None) == (bundle is None):
            raise ValueError("give exactly one of weights or bundle")
        if bundle is not None:
            from models.bundle import load_bundle  # numpy only

            loaded = load_bundle(bundle)
            if loaded.config != sidecar_config(sidecar):  # e.g. same shapes but another seq_len
                raise SidecarError(f"bundle {bundle} is model config {loaded.config.config_hash()[:8]}; "
                                   f"the template is {sidecar['config_hash'][:8]}")
            weights = loaded.weights
        return cls(write_weights(template, sidecar, weights), template=template, sidecar=sidecar,
                   num_threads=num_threads)

    def _load(self, model: bytes) -> None:
        interpreter = load_interpreter_class()(model_content=model, num_threads=self._num_threads)
        # The interpreter-wide allocate_tensors applies TFLite's default delegate, XNNPACK, to the
        # nodes whose tensors have static shapes, loop bodies included. A SignatureRunner alone
        # allocates only its own subgraph, without it: next_word then ran on the builtin kernels,
        # about 2x slower for gboard at 20 context words.
        interpreter.allocate_tensors()
        next_word = interpreter.get_signature_runner("next_word")
        ids_shape = next_word.get_input_details()["ids"]["shape"]
        logits_shape = next_word.get_output_details()["logits"]["shape"]
        with self._lock:
            self._model = model  # the interpreter reads model_content in place: keep it alive
            self._interpreter, self._next_word = interpreter, next_word
            self._infer = None  # built by logits(), on its own interpreter
            self.seq_len = int(ids_shape[1])
            self.vocab_size = int(logits_shape[-1])

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Swap in new weights (same config): re-patch the template and reload the interpreter."""
        if self._template is None or self._sidecar is None:
            raise ValueError("set_weights needs a predictor made with from_template")
        self._load(write_weights(self._template, self._sidecar, weights))

    @property
    def model_bytes(self) -> bytes:
        return self._model

    # ----------------------------------------------------------------- prediction

    def window(self, context_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids [1, seq_len] right-padded, length [1]) for the last seq_len ids, as NextWordPredictor."""
        ids = [int(i) for i in context_ids][-self.seq_len :] or [BOS_ID]
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"context ids must be in [0, {self.vocab_size})")
        padded = np.zeros((1, self.seq_len), dtype=np.int32)
        padded[0, : len(ids)] = ids
        return padded, np.array([len(ids)], dtype=np.int32)

    def next_word_logits(self, context_ids: Sequence[int]) -> np.ndarray:
        """Logits [vocab] for the word after `context_ids` (starting with <bos>)."""
        ids, length = self.window(context_ids)
        with self._lock:
            return self._next_word(ids=ids, length=length)["logits"][0]

    def next_word_logprobs(self, context_ids: Sequence[int]) -> np.ndarray:
        """log_softmax over the vocabulary: what models.suggest.Suggester calls."""
        return log_softmax(self.next_word_logits(context_ids))

    def top_k(self, context_ids: Sequence[int], k: int = 3) -> list[int]:
        """The k most likely next ids, best first (no filtering of special tokens: Suggester does that)."""
        logits = self.next_word_logits(context_ids)
        return [int(i) for i in np.argsort(-logits, kind="stable")[:k]]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [b, seq_len, vocab] for a batch of windows [b, seq_len] (the `infer` signature).

        Evaluation only (a keyboard suggests through next_word), so `infer` runs on a second
        interpreter, made on the first call, with the builtin kernels: on XNNPACK's, TFLite 2.14
        failed to run the infer loop again after a change of batch size.
        """
        with self._lock:
            if self._infer is None:
                module = load_interpreter_module()
                evaluator = module.Interpreter(
                    model_content=self._model, num_threads=self._num_threads,
                    experimental_op_resolver_type=module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
                self._infer = evaluator.get_signature_runner("infer")  # the runner keeps its interpreter
            return self._infer(ids=np.asarray(ids, dtype=np.int32))["logits"]


__all__ = ["TFLitePredictor", "load_interpreter_class", "load_interpreter_module", "log_softmax"]
