"""TFLite export (models.tflite_export), weight patching without TF (models.tflite_weights) and
the TF-free predictor (models.tflite_predictor), on the tiny preset."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from models import tflite_export as te
from models.bundle import save_bundle
from models.config import preset
from models.keras_model import NextWordPredictor, build_model, get_weights, masked_loss, set_weights
from models.tflite_predictor import TFLitePredictor
from models.tflite_weights import SidecarError, read_weights, write_weights
from models.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
CONFIG = preset("tiny")


def random_weights(seed: int) -> list[np.ndarray]:
    """Dense non-zero weights: an all-zero output_bias would let the converter drop its ADD."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.3, shape).astype(np.float32) for _, shape in CONFIG.weight_specs()]


@pytest.fixture(scope="module")
def weights() -> list[np.ndarray]:
    return random_weights(0)


@pytest.fixture(scope="module")
def template() -> tuple[bytes, dict]:
    return te.make_template(CONFIG)


@pytest.fixture(scope="module")
def direct(weights) -> bytes:
    return te.export_infer(CONFIG, weights)


@pytest.fixture(scope="module")
def train_model(weights) -> bytes:
    return te.export_train(CONFIG, weights)


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.integers(1, CONFIG.vocab_size, (4, CONFIG.seq_len)).astype(np.int32)
    y = rng.integers(1, CONFIG.vocab_size, (4, CONFIG.seq_len)).astype(np.int32)
    y[:, -3:] = 0  # padding: the masked loss must skip it
    return x, y


def keras_model(weights) -> tf.keras.Model:
    model = build_model(CONFIG)
    set_weights(model, weights, CONFIG)
    return model


def assert_builtin_only(model: bytes, signatures=("infer", "next_word")) -> None:
    """No custom op (Select TF ops are custom 'Flex...' ops) in any subgraph, and loads in tflite_runtime.

    Loading alone proves little: tflite_runtime only fails on a Flex op when that signature runs.
    """
    from tflite_runtime.interpreter import Interpreter

    ops = te.operator_names(model)
    assert "FULLY_CONNECTED" in ops and not any(op.startswith("Flex") or op == "CUSTOM" for op in ops), ops
    assert set(Interpreter(model_content=model).get_signature_list()) == set(signatures)


def test_infer_is_builtin_only_and_matches_keras(direct, weights, batch):
    assert_builtin_only(direct)

    predictor = TFLitePredictor(direct)
    x, _ = batch
    np.testing.assert_allclose(predictor.logits(x), keras_model(weights)(x).numpy(), atol=1e-5, rtol=0)
    keras_predictor = NextWordPredictor(CONFIG, weights)
    for context in ([], [1], [1, 7, 9], list(range(1, 3 * CONFIG.seq_len))):  # empty, short, longer than seq_len
        np.testing.assert_allclose(predictor.next_word_logprobs(context), keras_predictor.next_word_logprobs(context),
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        predictor.next_word_logprobs([1, CONFIG.vocab_size])
    assert predictor.top_k([1, 7, 9], 3) == list(np.argsort(-keras_predictor.next_word_logprobs([1, 7, 9]))[:3])


def test_predictor_gets_the_xnnpack_delegate_and_infer_takes_any_batch(direct, weights, batch):
    """TFLitePredictor's interpreter gets TFLite's default delegate, XNNPACK: without it next_word runs on the
    builtin kernels, about 2x slower for gboard. Python sees the nodes of the first subgraph (infer) only;
    delegated parts show there as DELEGATE nodes. infer (logits) runs on a second interpreter, any batch size."""
    predictor = TFLitePredictor(direct)
    wrapper = predictor._interpreter._interpreter
    assert "DELEGATE" in {wrapper.NodeName(i) for i in range(wrapper.NumNodes())}
    x, _ = batch
    want = keras_model(weights)(np.vstack([x, x[:1]])).numpy()
    for rows in (len(x), 1, len(x) + 1, 2):
        got = predictor.logits(np.vstack([x, x[:1]])[:rows])
        np.testing.assert_allclose(got, want[:rows], atol=1e-5, rtol=0)


def test_patched_template_equals_direct_export(template, direct, weights, batch):
    model_template, sidecar = template
    patched = write_weights(model_template, sidecar, weights)
    assert patched == direct  # byte for byte: same flatbuffer, same weights
    x, _ = batch
    np.testing.assert_array_equal(TFLitePredictor(patched).logits(x), TFLitePredictor(direct).logits(x))
    np.testing.assert_allclose(TFLitePredictor(patched).logits(x), keras_model(weights)(x).numpy(), atol=1e-5, rtol=0)
    for got, want in zip(read_weights(patched, sidecar), weights):
        np.testing.assert_array_equal(got, want)
    # The converter stores dense kernels transposed; the embedding is shared by GATHER and the output layer.
    transforms = {w["name"]: [p["transform"] for p in w["placements"]] for w in sidecar["weights"]}
    assert transforms["cifg/kernel"] == ["transpose"] and "copy" in transforms["embedding"]


def test_patching_again_replaces_weights_and_rejects_bad_input(template, weights):
    model_template, sidecar = template
    other = random_weights(5)
    predictor = TFLitePredictor(write_weights(model_template, sidecar, weights), template=model_template,
                                sidecar=sidecar)
    predictor.set_weights(other)
    np.testing.assert_allclose(predictor.next_word_logprobs([1, 4]), NextWordPredictor(CONFIG, other).next_word_logprobs([1, 4]),
                               atol=1e-5, rtol=0)
    assert write_weights(write_weights(model_template, sidecar, weights), sidecar, other) == \
        write_weights(model_template, sidecar, other)
    with pytest.raises(SidecarError):
        write_weights(model_template, sidecar, weights[:-1])
    with pytest.raises(SidecarError):
        write_weights(model_template, sidecar, [*weights[:-1], np.zeros(3, np.float32)])
    with pytest.raises(SidecarError):
        write_weights(model_template[:-4], sidecar, weights)


def test_train_step_matches_keras_sgd(train_model, weights, batch):
    x, y = batch
    lr = 0.5
    assert {"FlexSave", "FlexRestore"} <= te.operator_names(train_model)  # hence TF's interpreter (Flex linked)
    interpreter = tf.lite.Interpreter(model_content=train_model)
    loss = interpreter.get_signature_runner("train")(x=x, y=y, learning_rate=np.float32(lr))["loss"]
    after = interpreter.get_signature_runner("get_weights")()

    model = keras_model(weights)
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate=lr), loss=masked_loss())
    keras_loss = model.train_on_batch(x, y)
    assert abs(float(loss) - float(keras_loss)) < 1e-5
    for i, (want, before) in enumerate(zip(get_weights(model), weights)):
        assert np.abs(want - before).max() > 1e-4  # the step moved every weight
        np.testing.assert_allclose(after[f"w{i}"], want, atol=1e-5, rtol=0)
    logits = interpreter.get_signature_runner("infer")(ids=x)["logits"]
    np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-5, rtol=0)


def test_builtin_train_model_trains_in_tflite_runtime(weights, batch):
    from tflite_runtime.interpreter import Interpreter

    x, y = batch
    model_bytes = te.export_train_builtin(CONFIG, weights, batch_size=len(x) + 2)
    assert_builtin_only(model_bytes, te.TRAIN_BUILTIN_SIGNATURES)
    interpreter = Interpreter(model_content=model_bytes)
    # Two all-<pad> rows fill the fixed batch: the masked loss ignores them, so the step is Keras' on (x, y).
    pad = np.zeros((2, CONFIG.seq_len), np.int32)
    loss = interpreter.get_signature_runner("train")(x=np.vstack([x, pad]), y=np.vstack([y, pad]),
                                                     learning_rate=np.float32(0.5))["loss"]
    model = keras_model(weights)
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate=0.5), loss=masked_loss())
    assert abs(float(loss) - float(model.train_on_batch(x, y))) < 1e-5
    after = interpreter.get_signature_runner("get_weights")()
    for i, want in enumerate(get_weights(model)):
        np.testing.assert_allclose(after[f"w{i}"], want, atol=1e-5, rtol=0)


def test_save_restore_round_trip(train_model, batch, tmp_path, weights):
    x, y = batch
    interpreter = tf.lite.Interpreter(model_content=train_model)
    run = interpreter.get_signature_runner
    run("set_weights")(**{f"w{i}": w for i, w in enumerate(weights)})
    path = np.array(str(tmp_path / "ckpt"), dtype=np.bytes_)
    run("save")(checkpoint_path=path)
    saved = run("get_weights")()
    run("train")(x=x, y=y, learning_rate=np.float32(1.0))
    assert not np.array_equal(run("get_weights")()["w0"], saved["w0"])
    run("restore")(checkpoint_path=path)
    restored = run("get_weights")()
    for i, w in enumerate(weights):
        np.testing.assert_array_equal(restored[f"w{i}"], saved[f"w{i}"])
        np.testing.assert_array_equal(restored[f"w{i}"], w)


def test_quantized_model_is_smaller_and_close(direct, weights):
    quantized = te.export_infer(CONFIG, weights, quantize=True)
    assert_builtin_only(quantized)
    assert len(quantized) < 0.8 * len(direct)  # tiny: small tensors stay float; small/gboard reach ~0.27x
    got = TFLitePredictor(quantized).next_word_logprobs([1, 7, 9])
    want = NextWordPredictor(CONFIG, weights).next_word_logprobs([1, 7, 9])
    assert np.abs(got - want).max() < 0.1


BLOCKED_TF_SCRIPT = """
import sys
sys.modules["tensorflow"] = None  # any import of tensorflow now raises ImportError
sys.path.insert(0, {root!r})
import numpy as np
from models.tflite_predictor import TFLitePredictor
d = {d!r}
p = TFLitePredictor.from_template(d + "/infer_template.tflite", d + "/tflite_sidecar.json", bundle=d + "/bundle")
np.save(d + "/got.npy", p.next_word_logprobs([1, 7, 9]))
assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m, v in sys.modules.items() if v is not None)
print("ok")
"""


def test_predictor_runs_without_tensorflow(template, weights, tmp_path):
    model_template, sidecar = template
    (tmp_path / "infer_template.tflite").write_bytes(model_template)
    (tmp_path / "tflite_sidecar.json").write_text(json.dumps(sidecar))
    vocab = Vocabulary([f"w{i}" for i in range(CONFIG.vocab_size - 4)])
    save_bundle(tmp_path / "bundle", CONFIG, vocab, weights)
    script = BLOCKED_TF_SCRIPT.format(root=str(ROOT), d=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), NextWordPredictor(CONFIG, weights).next_word_logprobs([1, 7, 9]),
                               atol=1e-5, rtol=0)
    # A bundle of another config with the same weight shapes (another seq_len) is refused.
    save_bundle(tmp_path / "other", dataclasses.replace(CONFIG, seq_len=5), vocab, weights)
    with pytest.raises(SidecarError):
        TFLitePredictor.from_template(tmp_path / "infer_template.tflite", tmp_path / "tflite_sidecar.json",
                                      bundle=tmp_path / "other")
