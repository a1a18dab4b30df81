"""Export the CIFG next-word model to TFLite (needs TensorFlow; the device does not).

    .venv/bin/python -m models.tflite_export --preset small --out DIR
    .venv/bin/python -m models.tflite_export --bundle models/pretrained/small --out DIR

Writes into DIR:
    infer_template.tflite  float32 inference model, weight buffers zeroed (one per ModelConfig)
    tflite_sidecar.json    where each Keras weight lives in the template (models.tflite_weights)
    infer.tflite           the template with this model's weights patched in
    infer_drq.tflite       dynamic-range quantized (int8 weights) inference model
    train.tflite           on-device training model (train / infer / save / restore / get_weights /
                           set_weights), Select TF ops: run it with tf.lite.Interpreter (Flex)
    train_builtin.tflite   the same without save/restore, train's batch fixed (--train-batch):
                           builtin ops only, so tflite_runtime trains it (the device keeps its
                           weights in the wire format anyway: get_weights / set_weights)

With --templates, only what a device needs per config (models.tflite_templates), gzipped:
    tflite_sidecar.json, infer_template.tflite.gz, train_template.tflite.gz (train_builtin with
    zero weights: set_weights puts a model's weights in)
    .venv/bin/python -m models.tflite_export --bundle models/pretrained/small --templates \
        --out models/pretrained/small-tflite

The inference models use TFLite builtin ops only, so tflite_runtime runs them. The Keras
layer runs its LSTM in tf.scan, whose TensorList ops need Select TF ops; here both signatures
loop in a WHILE (a builtin) over static shapes, which needs no TensorList (the training model's
`train` and `infer` unroll the LSTM over the fixed seq_len instead: plain FULLY_CONNECTED and
elementwise ops). Static shapes let XNNPACK run the loops (models.tflite_predictor). Signatures
of the inference models:
    infer(ids [b, seq_len] int32) -> logits [b, seq_len, vocab]        (evaluation)
    next_word(ids [1, seq_len] int32, length [1] int32) -> logits [1, vocab]
        ids right-padded; the logits after ids[:length]. The WHILE loop runs only `length`
        steps, and only one row goes through the vocab matmul.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from models.config import ModelConfig, preset
from models.keras_model import PAD_ID, build_model, get_weights
from models.tflite_weights import SIDECAR_FORMAT, SIDECAR_VERSION, write_weights

INFER_SIGNATURES = ("infer", "next_word")
TRAIN_SIGNATURES = ("train", "infer", "save", "restore", "get_weights", "set_weights")
TRAIN_BUILTIN_SIGNATURES = ("train", "infer", "get_weights", "set_weights")
# Sentinel weights are SENTINEL_BASE + (global element index): half-integers, exact in
# float32 below 2**23, and unlike any constant the converter would create itself.
SENTINEL_BASE = 1000.5
DEVICE_BATCH_SIZE = 16  # device_app's default local batch size


# --------------------------------------------------------------------------- the model, without tf.scan


def unrolled_states(weights: Sequence[Any], ids: tf.Tensor) -> tf.Tensor:
    """Projected LSTM outputs [b, t, E] for ids [b, t] (static t), the CIFGLSTM math step by step."""
    embedding, kernel, recurrent_kernel, bias, projection = weights[:5]
    outputs = []
    c = r = None
    for x in tf.unstack(tf.gather(embedding, ids), axis=1):
        z = tf.matmul(x, kernel) + bias
        if r is not None:  # the zero initial state adds exactly 0: skip it (no FILL op, same floats)
            z = z + tf.matmul(r, recurrent_kernel)
        # split, not slicing: slicing's gradient is StridedSliceGrad (a Select TF op), split's is concat.
        zi, zg, zo = tf.split(z, 3, axis=1)
        i, g, o = tf.sigmoid(zi), tf.tanh(zg), tf.sigmoid(zo)
        c = i * g if c is None else c + i * (g - c)  # (1 - i) * c + i * g, as in CIFGLSTM
        r = tf.matmul(o * tf.tanh(c), projection)
        outputs.append(r)
    return tf.stack(outputs, axis=1)


def looped_states(weights: Sequence[Any], ids: tf.Tensor) -> tf.Tensor:
    """unrolled_states' outputs [b, t, E] from a WHILE loop over the t steps: each weight appears in
    one loop body instead of t unrolled copies. XNNPACK (models.tflite_predictor applies it) packs a
    copy of a weight for every node that uses it: with the unrolled `infer` in the model, gboard's
    interpreter took about 40 MiB more memory on XNNPACK (11 MiB with this loop), for a signature
    the keyboard never calls.

    The input half of the gates is one matmul over all steps; step 0 runs before the loop from the
    zero state, as in unrolled_states (an earlier version started from tf.zeros of the dynamic
    batch, a FILL op, with ONE_HOT in the body: XNNPACK then took nothing in the whole model). The
    outputs gather in a static [b, t, E] tensor, r_t added at row t through a one-hot mask (r * 1 and
    x + 0 are exact), since a TensorList would need Select TF ops.
    """
    embedding, kernel, recurrent_kernel, bias, projection = weights[:5]
    steps = ids.shape[1]
    x_gates = tf.matmul(tf.gather(embedding, ids), kernel) + bias  # [b, t, 3H]

    def cell(z: tf.Tensor, c: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        zi, zg, zo = tf.split(z, 3, axis=-1)
        i, g, o = tf.sigmoid(zi), tf.tanh(zg), tf.sigmoid(zo)
        c = i * g if c is None else c + i * (g - c)
        return c, tf.matmul(o * tf.tanh(c), projection)

    hot = tf.one_hot(tf.range(steps), steps)  # [t, t]: row t places a step's output at position t
    c, r = cell(x_gates[:, 0], None)

    def step(t: tf.Tensor, c: tf.Tensor, r: tf.Tensor, states: tf.Tensor) -> tuple[tf.Tensor, ...]:
        c, r = cell(tf.gather(x_gates, t, axis=1) + tf.matmul(r, recurrent_kernel), c)
        return t + 1, c, r, states + r[:, None, :] * tf.gather(hot, t)[None, :, None]

    start = (tf.constant(1), c, r, r[:, None, :] * hot[0][None, :, None])
    _, _, _, states = tf.while_loop(lambda t, c, r, states: t < steps, step, start)
    return states


def looped_state(weights: Sequence[Any], ids: tf.Tensor, length: tf.Tensor, units: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(c, r) [1, H], [1, E] after ids[:length] (ids [t]), one CIFG step per WHILE iteration.

    As in CIFGLSTM, the input half of the gates is one matmul before the loop, here over all t
    positions (the padding rows are computed and never read); the loop starts from the zero state
    and always adds the recurrent term (x + 0 and 0 + i * (g - 0) are exact, so these are
    unrolled_states' floats too).

    Every tensor has a static shape, which is what lets TFLite's XNNPACK delegate take the
    matmuls and gate ops (of the loop body too): it leaves dynamic-shaped tensors to the builtin
    kernels, and slicing the [length] real rows made x_gates, a loop variable, dynamic. Static,
    gboard's next_word ran about 2x faster at 20 context ids (0.95 -> 0.46 ms); one id stays at
    0.15 ms, the matmul over all t rows taking back what XNNPACK saves there.
    """
    embedding, kernel, recurrent_kernel, bias, projection = weights[:5]
    x_gates = tf.matmul(tf.gather(embedding, ids), kernel) + bias  # [t, 3H]: one matmul, rows past length unused

    def step(t: tf.Tensor, c: tf.Tensor, r: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        z = tf.reshape(tf.gather(x_gates, t), [1, -1]) + tf.matmul(r, recurrent_kernel)
        zi, zg, zo = tf.split(z, 3, axis=1)
        i, g, o = tf.sigmoid(zi), tf.tanh(zg), tf.sigmoid(zo)
        c = c + i * (g - c)
        return t + 1, c, tf.matmul(o * tf.tanh(c), projection)

    start = (tf.constant(0), tf.zeros([1, units]), tf.zeros([1, embedding.shape[-1]]))
    _, c, r = tf.while_loop(lambda t, c, r: t < length, step, start)
    return c, r


def tied_logits(weights: Sequence[Any], states: tf.Tensor) -> tf.Tensor:
    """states [..., E] -> logits [..., V] through the tied embedding, as TiedOutput."""
    embedding, output_bias = weights[0], weights[5]
    flat = tf.reshape(states, [-1, states.shape[-1]])
    logits = tf.matmul(flat, embedding, transpose_b=True) + output_bias
    return tf.reshape(logits, tf.concat([tf.shape(states)[:-1], tf.shape(embedding)[:1]], 0))


def masked_mean_ce(y: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """models.keras_model.MaskedSparseCrossEntropy: mean cross-entropy over non-pad targets.

    -sum(one_hot * log_softmax) instead of the fused sparse op, which is a Select TF op: this
    picks the same log-probability exactly (the other terms are 0) and converts to builtins.
    """
    ce = -tf.reduce_sum(tf.one_hot(y, tf.shape(logits)[-1]) * tf.nn.log_softmax(logits), axis=-1)
    mask = tf.cast(tf.not_equal(y, PAD_ID), ce.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(ce * mask), tf.reduce_sum(mask))


def _variables(config: ModelConfig, weights: Sequence[np.ndarray]) -> list[tf.Variable]:
    return [tf.Variable(np.asarray(w, np.float32), name=name.replace("/", "_"))
            for (name, _), w in zip(config.weight_specs(), weights)]


class InferModule(tf.Module):
    """The inference signatures; variables are frozen into constants by the converter."""

    def __init__(self, config: ModelConfig, weights: Sequence[np.ndarray]) -> None:
        super().__init__()
        self.config = config
        self.w = _variables(config, weights)
        t = config.seq_len
        self.infer = tf.function(self._infer, input_signature=[tf.TensorSpec([None, t], tf.int32, name="ids")])
        self.next_word = tf.function(self._next_word, input_signature=[
            tf.TensorSpec([1, t], tf.int32, name="ids"), tf.TensorSpec([1], tf.int32, name="length")])

    def _infer(self, ids: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"logits": tied_logits(self.w, looped_states(self.w, ids))}

    def _next_word(self, ids: tf.Tensor, length: tf.Tensor) -> dict[str, tf.Tensor]:
        # A WHILE loop over the first `length` ids only: a keyboard's context is usually a few
        # words, and unrolling all seq_len steps made gboard's suggestion 3-6x slower for those.
        _, r = looped_state(self.w, ids[0], length[0], self.config.units)
        return {"logits": tied_logits(self.w, r)}


class TrainModule(InferModule):
    """On-device training signatures (TF's on-device training guide): train, infer, get_weights,
    set_weights and, with checkpoints=True, save and restore. Weights stay resource variables,
    updated in place.

    With a fixed batch_size every shape in `train` is static, so its gradient needs no
    BroadcastGradientArgs (a Select TF op) and, without save/restore (tf.raw_ops.Save/Restore are
    Select TF ops too), the whole model runs on builtins in tflite_runtime. Pad a short last batch
    with all-<pad> rows: the masked loss ignores them, so the step is the same.
    """

    def __init__(self, config: ModelConfig, weights: Sequence[np.ndarray], batch_size: int | None = None,
                 checkpoints: bool = True) -> None:
        super().__init__(config, weights)
        t = config.seq_len
        self.names = [f"w{i}" for i in range(len(self.w))]
        self.train = tf.function(self._train, input_signature=[
            tf.TensorSpec([batch_size, t], tf.int32, name="x"), tf.TensorSpec([batch_size, t], tf.int32, name="y"),
            tf.TensorSpec([], tf.float32, name="learning_rate")])
        if checkpoints:
            path = tf.TensorSpec([], tf.string, name="checkpoint_path")
            self.save = tf.function(self._save, input_signature=[path])
            self.restore = tf.function(self._restore, input_signature=[path])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(self._set_weights, input_signature=[
            tf.TensorSpec(shape, tf.float32, name=n) for n, (_, shape) in zip(self.names, config.weight_specs())])

    def _infer(self, ids: tf.Tensor) -> dict[str, tf.Tensor]:
        # The training model keeps the unrolled infer, as its `train` (its template is unchanged).
        return {"logits": tied_logits(self.w, unrolled_states(self.w, ids))}

    def _train(self, x: tf.Tensor, y: tf.Tensor, learning_rate: tf.Tensor) -> dict[str, tf.Tensor]:
        """One plain SGD step (Keras SGD without momentum: w -= lr * grad) on the masked loss."""
        with tf.GradientTape() as tape:
            loss = masked_mean_ce(y, tied_logits(self.w, unrolled_states(self.w, x)))
        for variable, grad in zip(self.w, tape.gradient(loss, self.w)):
            variable.assign_sub(learning_rate * tf.convert_to_tensor(grad))
        return {"loss": loss}

    def _save(self, checkpoint_path: tf.Tensor) -> dict[str, tf.Tensor]:
        tf.raw_ops.Save(filename=checkpoint_path, tensor_names=self.names, data=[v.read_value() for v in self.w])
        return {"checkpoint_path": checkpoint_path}

    def _restore(self, checkpoint_path: tf.Tensor) -> dict[str, tf.Tensor]:
        restored = {}
        for name, variable in zip(self.names, self.w):
            value = tf.raw_ops.Restore(file_pattern=checkpoint_path, tensor_name=name, dt=tf.float32)
            variable.assign(value)
            restored[name] = value
        return restored

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {name: v.read_value() for name, v in zip(self.names, self.w)}

    def _set_weights(self, *weights: tf.Tensor) -> dict[str, tf.Tensor]:
        for variable, value in zip(self.w, weights):
            variable.assign(value)
        return {name: v.read_value() for name, v in zip(self.names, self.w)}


# --------------------------------------------------------------------------- conversion


def _convert(module: tf.Module, signatures: Sequence[str], *, select_ops: bool = False,
             resource_variables: bool = False, quantize: bool = False) -> bytes:
    """SavedModel round trip: the converter keeps every signature's name, inputs and outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures={name: getattr(module, name).get_concrete_function()
                                                     for name in signatures})
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(signatures))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if select_ops:
            converter.target_spec.supported_ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
        # Trainable models keep their weights as variables (VAR_HANDLE/ASSIGN_VARIABLE builtins)
        # instead of freezing them into constants.
        converter.experimental_enable_resource_variables = select_ops or resource_variables
        if quantize:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no dataset: dynamic-range int8 weights
        return bytes(converter.convert())


def export_infer(config: ModelConfig, weights: Sequence[np.ndarray], quantize: bool = False) -> bytes:
    """A builtin-ops-only inference model with `weights` baked in."""
    return _convert(InferModule(config, weights), INFER_SIGNATURES, quantize=quantize)


def export_train(config: ModelConfig, weights: Sequence[np.ndarray], batch_size: int | None = None) -> bytes:
    """The on-device training model with save/restore (Select TF ops: needs the Flex delegate)."""
    return _convert(TrainModule(config, weights, batch_size), TRAIN_SIGNATURES, select_ops=True)


def export_train_builtin(config: ModelConfig, weights: Sequence[np.ndarray], batch_size: int) -> bytes:
    """The training model without save/restore, fixed batch: builtin ops only (tflite_runtime trains it)."""
    module = TrainModule(config, weights, batch_size, checkpoints=False)
    return _convert(module, TRAIN_BUILTIN_SIGNATURES, resource_variables=True)


# --------------------------------------------------------------------------- template + sidecar


def sentinel_weights(config: ModelConfig) -> list[np.ndarray]:
    """Every element a distinct value SENTINEL_BASE + its index over all weights, in spec order."""
    total = config.num_parameters()
    if SENTINEL_BASE + total >= 2**23:
        raise ValueError(f"{total} parameters: too many for exact float32 sentinels")
    flat = (SENTINEL_BASE + np.arange(total, dtype=np.float64)).astype(np.float32)
    out, start = [], 0
    for _, shape in config.weight_specs():
        n = int(np.prod(shape))
        out.append(flat[start : start + n].reshape(shape))
        start += n
    return out


def float_buffers(model: bytes) -> list[tuple[int, tuple[int, ...]]]:
    """(byte offset, shape) of every float32 constant tensor's buffer in a .tflite flatbuffer."""
    from tensorflow.lite.python import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    found: dict[int, tuple[int, ...]] = {}
    for s in range(root.SubgraphsLength()):
        graph = root.Subgraphs(s)
        for j in range(graph.TensorsLength()):
            tensor = graph.Tensors(j)
            buffer = root.Buffers(tensor.Buffer())
            if tensor.Type() != schema.TensorType.FLOAT32 or buffer.DataLength() == 0:
                continue
            start = buffer._tab.Vector(buffer._tab.Offset(4))  # the data vector's position in the file
            found[start] = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
    return sorted(found.items())


def operator_names(model: bytes) -> set[str]:
    """Every operator a .tflite uses, over all subgraphs (signatures): builtin names, or the custom
    code (Select TF ops appear as 'Flex...')."""
    from tensorflow.lite.python import schema_py_generated as schema

    builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    root = schema.Model.GetRootAs(model, 0)
    names = set()
    for i in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(i)
        op = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # the schema keeps both fields
        names.add(code.CustomCode().decode() if op == schema.BuiltinOperator.CUSTOM else builtin[op])
    return names


def _transform_of(local: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """Which stored layout of a weight of `shape` gives these element indices, if any."""
    n = int(np.prod(shape))
    if local.size != n:
        return None
    index = np.arange(n).reshape(shape)
    if np.array_equal(local, index.ravel()):
        return "copy"
    if len(shape) == 2 and np.array_equal(local, index.T.ravel()):
        return "transpose"
    return None


def locate_weights(model: bytes, config: ModelConfig) -> list[list[dict[str, Any]]]:
    """Placements of each weight in a model exported with sentinel_weights(config).

    Raises if a buffer mixes sentinels with other values or holds a layout this module
    cannot patch (the converter folded or split a weight): the template would be wrong.
    """
    specs = config.weight_specs()
    sizes = [int(np.prod(shape)) for _, shape in specs]
    starts = np.cumsum([0, *sizes])
    placements: list[list[dict[str, Any]]] = [[] for _ in specs]
    for offset, shape in float_buffers(model):
        count = int(np.prod(shape))
        values = np.frombuffer(model, dtype="<f4", count=count, offset=offset).astype(np.float64)
        index = values - SENTINEL_BASE
        is_sentinel = (index >= 0) & (index < starts[-1]) & (index == np.round(index))
        if not is_sentinel.any():
            continue
        if not is_sentinel.all():
            raise ValueError(f"buffer at {offset} {shape} mixes weights with other values (a folded constant)")
        index = index.astype(np.int64)
        t = int(np.searchsorted(starts, index[0], side="right") - 1)
        transform = _transform_of(index - starts[t], specs[t][1])
        if transform is None:
            raise ValueError(f"buffer at {offset} {shape} holds weight {specs[t][0]!r} in a layout "
                             "models.tflite_weights cannot patch")
        placements[t].append({"offset": offset, "shape": list(shape), "dtype": "float32", "transform": transform})
    missing = [name for (name, _), p in zip(specs, placements) if not p]
    if missing:
        raise ValueError(f"weights {missing} were not found in the exported model")
    return placements


def make_template(config: ModelConfig) -> tuple[bytes, dict[str, Any]]:
    """(template .tflite with weight buffers zeroed, sidecar) for a config."""
    sentinel = export_infer(config, sentinel_weights(config))
    placements = locate_weights(sentinel, config)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "template_bytes": len(sentinel),
        "signatures": {"infer": ["ids"], "next_word": ["ids", "length"]},
        "weights": [{"name": name, "shape": list(shape), "placements": p}
                    for (name, shape), p in zip(config.weight_specs(), placements)],
    }
    # Zeroed weights: the template compresses to a few KB for download, and leaks no values.
    template = write_weights(sentinel, sidecar, [np.zeros(shape, np.float32) for _, shape in config.weight_specs()])
    return template, sidecar


# --------------------------------------------------------------------------- CLI


def export_all(config: ModelConfig, weights: Sequence[np.ndarray], out: str | os.PathLike,
               train_batch: int = DEVICE_BATCH_SIZE) -> dict[str, int]:
    """Write every artifact (see the module docstring) into `out`; returns file sizes in bytes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    template, sidecar = make_template(config)
    files = {
        "infer_template.tflite": template,
        "tflite_sidecar.json": (json.dumps(sidecar, indent=1) + "\n").encode("utf-8"),
        "infer.tflite": write_weights(template, sidecar, weights),
        "infer_drq.tflite": export_infer(config, weights, quantize=True),
        "train.tflite": export_train(config, weights),
        "train_builtin.tflite": export_train_builtin(config, weights, train_batch),
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    return {name: len(data) for name, data in files.items()}


def write_templates(config: ModelConfig, out: str | os.PathLike, train_batch: int = DEVICE_BATCH_SIZE,
                    compress: bool = False) -> dict[str, int]:
    """The per-config templates a device needs (models.tflite_templates) into `out`, replacing it whole:
    written into a sibling first and renamed, so a reader never sees half a directory."""
    out = Path(out)
    template, sidecar = make_template(config)
    zeros = [np.zeros(shape, np.float32) for _, shape in config.weight_specs()]
    files = {
        "tflite_sidecar.json": (json.dumps(sidecar, indent=1) + "\n").encode("utf-8"),
        "infer_template.tflite": template,
        "train_template.tflite": export_train_builtin(config, zeros, train_batch),
    }
    if compress:  # mtime=0: the same model gives the same bytes (committed files stay stable)
        for name in ("infer_template.tflite", "train_template.tflite"):
            files[f"{name}.gz"] = gzip.compress(files.pop(name), 9, mtime=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process wrote the same templates meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.is_dir():
            raise
    return {name: len(data) for name, data in files.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a models.config preset, freshly initialised (seed --seed)")
    source.add_argument("--bundle", help="a model bundle directory (models.bundle)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-batch", type=int, default=DEVICE_BATCH_SIZE, help="train_builtin.tflite's fixed batch")
    ap.add_argument("--templates", action="store_true",
                    help="only the device templates (sidecar, inference and training templates), gzipped")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.bundle:
        from models.bundle import load_bundle

        bundle = load_bundle(args.bundle)
        config, weights = bundle.config, bundle.weights
    else:
        config = preset(args.preset)
        weights = get_weights(build_model(config, seed=args.seed))
    if args.templates:
        written = write_templates(config, args.out, args.train_batch, compress=True)
    else:
        written = export_all(config, weights, args.out, args.train_batch)
    for name, size in written.items():
        print(f"{Path(args.out) / name}: {size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
