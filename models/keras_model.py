"""The Gboard next-word model (Hard et al. 2018) in tf.keras: CIFG LSTM, projection, tied embeddings.

Layout (must match ModelConfig.weight_specs(), which the wire format and the server rely on):
    embedding (V, E) -> CIFG LSTM with H units whose cell output is projected to E
    -> logits = projected_output @ embedding^T + output_bias.

CIFG = coupled input and forget gates (f = 1 - i), no peepholes. Per step, with r the
projected recurrent state (size E) and c the cell state (size H):
    z = x @ kernel + r_prev @ recurrent_kernel + bias      # (3H,) = [input, candidate, output]
    i = sigmoid(z_i); f = 1 - i; g = tanh(z_g); o = sigmoid(z_o)
    c = f * c_prev + i * g
    r = (o * tanh(c)) @ projection                          # the output and the next state
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from models.config import ModelConfig, check_dropout

PAD_ID = 0
BOS_ID = 1

# Keras' unit_forget_bias sets the forget bias to 1; with f = 1 - sigmoid(z_i) the same
# starting point (f = sigmoid(1) ~ 0.73, remember by default) is an input-gate bias of -1.
INPUT_GATE_BIAS_INIT = -1.0


def _initializer(kind: str, seed: int | None, offset: int, dim: int = 1) -> tf.keras.initializers.Initializer:
    # Distinct seeds per tensor: Keras initializers with the same seed give identical values.
    s = None if seed is None else int(seed) + offset
    if kind == "glorot":
        return tf.keras.initializers.GlorotUniform(seed=s)
    if kind == "orthogonal":
        return tf.keras.initializers.Orthogonal(seed=s)
    if kind == "embedding":
        # Unit-norm-ish rows. With tied embeddings the logits are r . e; Keras' default
        # uniform(+-0.05) makes the net grow the projection until the recurrent state saturates
        # and training stalls at the unigram loss (seen on a toy corpus with Adam and SGD).
        return tf.keras.initializers.RandomNormal(stddev=dim**-0.5, seed=s)
    raise ValueError(kind)


class CIFGLSTM(tf.keras.layers.Layer):
    """A CIFG LSTM with output projection over a whole sequence: [b, t, E] -> [b, t, E].

    The input half of the gate pre-activations is one big matmul over all time steps
    (cheaper than per step on CPU); only the recurrent part runs in the tf.scan loop.
    The zero initial state is created per call, so the layer holds no state between batches.
    """

    def __init__(self, units: int, projection_dim: int, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = int(units)
        self.projection_dim = int(projection_dim)
        self.seed = seed

    def build(self, input_shape: tf.TensorShape) -> None:
        in_dim = int(input_shape[-1])
        h, e = self.units, self.projection_dim
        # Creation order is the weight order in model.trainable_weights: keep it = weight_specs().
        self.kernel = self.add_weight(
            name="kernel", shape=(in_dim, 3 * h), initializer=_initializer("glorot", self.seed, 1)
        )
        self.recurrent_kernel = self.add_weight(
            name="recurrent_kernel", shape=(e, 3 * h), initializer=_initializer("orthogonal", self.seed, 2)
        )
        bias_init = np.zeros(3 * h, dtype=np.float32)
        bias_init[:h] = INPUT_GATE_BIAS_INIT
        self.bias = self.add_weight(
            name="bias", shape=(3 * h,), initializer=tf.keras.initializers.Constant(bias_init)
        )
        self.projection = self.add_weight(
            name="projection", shape=(h, e), initializer=_initializer("glorot", self.seed, 3)
        )
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        h = self.units
        batch = tf.shape(inputs)[0]
        # [b, t, E] -> time-major [t, b, 3H] input pre-activations, bias folded in.
        x_gates = tf.einsum("bte,eg->tbg", inputs, self.kernel) + self.bias
        c0 = tf.zeros(tf.stack([batch, h]), dtype=inputs.dtype)
        r0 = tf.zeros(tf.stack([batch, self.projection_dim]), dtype=inputs.dtype)
        recurrent_kernel, projection = self.recurrent_kernel, self.projection

        def step(state: tuple[tf.Tensor, tf.Tensor], xg: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            c_prev, r_prev = state
            z = xg + tf.matmul(r_prev, recurrent_kernel)
            i = tf.sigmoid(z[:, :h])
            g = tf.tanh(z[:, h : 2 * h])
            o = tf.sigmoid(z[:, 2 * h :])
            c = c_prev + i * (g - c_prev)  # = (1 - i) * c_prev + i * g: the coupled gates
            r = tf.matmul(o * tf.tanh(c), projection)
            return c, r

        _, rs = tf.scan(step, x_gates, initializer=(c0, r0))
        return tf.transpose(rs, [1, 0, 2])

    def compute_output_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        return tf.TensorShape(input_shape)[:-1].concatenate([self.projection_dim])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units, "projection_dim": self.projection_dim, "seed": self.seed}


class TiedOutput(tf.keras.layers.Layer):
    """logits = x @ embedding^T + output_bias, reading the embedding matrix of an Embedding layer.

    Only output_bias belongs to this layer: the embedding layer is kept out of Keras'
    tracking so the shared matrix is listed once, under the embedding layer, first.
    """

    def __init__(self, embedding_layer: tf.keras.layers.Embedding, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # object.__setattr__ bypasses Keras' auto-tracking of sub-layers (see class docstring).
        object.__setattr__(self, "_tied_embedding", embedding_layer)

    def build(self, input_shape: tf.TensorShape) -> None:
        vocab_size = int(self._tied_embedding.input_dim)
        self.output_bias = self.add_weight(name="output_bias", shape=(vocab_size,), initializer="zeros")
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        # A flat matmul, not einsum: einsum's gradient here materialised [b, t, V, E]-sized
        # intermediates (10 GB and 8 s a step for the gboard preset vs 0.7 GB and 0.3 s).
        embeddings = self._tied_embedding.embeddings
        flat = tf.reshape(inputs, [-1, tf.shape(inputs)[-1]])
        logits = tf.matmul(flat, embeddings, transpose_b=True) + self.output_bias
        return tf.reshape(logits, tf.concat([tf.shape(inputs)[:-1], tf.shape(embeddings)[:1]], 0))

    def compute_output_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        return tf.TensorShape(input_shape)[:-1].concatenate([self._tied_embedding.input_dim])


def build_model(config: ModelConfig, seed: int | None = None, dropout: float = 0.0) -> tf.keras.Model:
    """The uncompiled model: int32 ids [batch, time] -> logits [batch, time, vocab].

    Depends on nothing but `config` (and `seed`), so it can be rebuilt from config JSON
    and created inside a TFF model_fn. `dropout` > 0 drops that share of the LSTM's inputs
    (the embedded words) and of its projected outputs while training (`training=True`) only
    (Zaremba et al. 2014's non-recurrent dropout): it holds no weights, so the layout, the wire
    format and every bundle are the same with and without it.
    """
    ids = tf.keras.Input(shape=(None,), dtype=tf.int32, name="ids")
    embedding = tf.keras.layers.Embedding(
        config.vocab_size,
        config.embedding_dim,
        embeddings_initializer=_initializer("embedding", seed, 0, dim=config.embedding_dim),
        name="embedding",
    )
    cifg = CIFGLSTM(config.units, config.embedding_dim, seed=seed, name="cifg")
    output = TiedOutput(embedding, name="output")
    rate = check_dropout(dropout)
    hidden = embedding(ids)
    if rate > 0:
        hidden = tf.keras.layers.Dropout(rate, name="input_dropout")(hidden)
    hidden = cifg(hidden)
    if rate > 0:
        hidden = tf.keras.layers.Dropout(rate, name="output_dropout")(hidden)
    logits = output(hidden)
    model = tf.keras.Model(inputs=ids, outputs=logits, name=f"cifg_{config.preset}")
    _check_layout(model, config)
    return model


def _check_layout(model: tf.keras.Model, config: ModelConfig) -> None:
    specs = config.weight_specs()
    got = [tuple(v.shape) for v in model.trainable_weights]
    want = [shape for _, shape in specs]
    if got != want or model.non_trainable_weights:
        raise AssertionError(f"model weight layout {got} does not match config.weight_specs() {want}")


def _validated(specs: Sequence[tuple[str, tuple[int, ...]]], weights: Sequence[Any]) -> list[np.ndarray]:
    arrays = [np.asarray(w, dtype=np.float32) for w in weights]
    if len(arrays) != len(specs):
        raise ValueError(f"expected {len(specs)} weight tensors, got {len(arrays)}")
    for (name, shape), array in zip(specs, arrays):
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"weight {name!r}: expected shape {tuple(shape)}, got {array.shape}")
    return arrays


def _specs_of(model: tf.keras.Model) -> list[tuple[str, tuple[int, ...]]]:
    return [(v.name, tuple(v.shape)) for v in model.trainable_weights]


def get_weights(model: tf.keras.Model) -> list[np.ndarray]:
    """Trainable weights as float32 arrays, in config.weight_specs() order."""
    return [np.asarray(v.numpy(), dtype=np.float32) for v in model.trainable_weights]


def set_weights(model: tf.keras.Model, weights: Sequence[Any], config: ModelConfig | None = None) -> None:
    """Assign weights in config.weight_specs() order, validating count and shapes first.

    Shapes are checked against `config` when given, else against the model's own variables;
    nothing is assigned unless every tensor matches.
    """
    specs = config.weight_specs() if config is not None else _specs_of(model)
    arrays = _validated(specs, weights)
    if config is not None:
        _validated(_specs_of(model), arrays)  # the model must also be of this config
    for variable, array in zip(model.trainable_weights, arrays):
        variable.assign(array)


class MaskedSparseCrossEntropy(tf.keras.losses.Loss):
    """Softmax cross-entropy from logits, mean over the targets that are not padding.

    `call` already returns the masked mean (a scalar), so Keras' default
    sum-over-batch-size reduction divides by 1 and leaves it unchanged; this is what makes
    the mean over real tokens rather than over all (padded) positions.
    """

    def __init__(self, pad_id: int = PAD_ID, name: str = "masked_sparse_ce", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.pad_id = int(pad_id)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        logits = tf.cast(y_pred, tf.float32)
        targets = tf.cast(y_true, tf.int32)
        if targets.shape.rank is not None and targets.shape.rank == logits.shape.rank:
            targets = tf.squeeze(targets, axis=-1)  # Keras may hand [b, t, 1] targets
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        mask = tf.cast(tf.not_equal(targets, self.pad_id), ce.dtype)
        return tf.math.divide_no_nan(tf.reduce_sum(ce * mask), tf.reduce_sum(mask))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pad_id": self.pad_id}


def masked_loss(pad_id: int = PAD_ID) -> tf.keras.losses.Loss:
    """A fresh masked loss for model.compile and tff.learning.models.from_keras_model."""
    return MaskedSparseCrossEntropy(pad_id=pad_id)


class NextWordPredictor:
    """Next-word log-probabilities for one context, with a single traced tf.function."""

    def __init__(self, config: ModelConfig, weights: Sequence[Any] | None = None) -> None:
        self.config = config
        self.model = build_model(config)
        if weights is not None:
            self.set_weights(weights)
        embedding = self.model.get_layer("embedding")
        cifg = self.model.get_layer("cifg")
        output = self.model.get_layer("output")

        # Fixed signature: any context length reuses one graph. Only the last position
        # goes through the (V x E) output layer, the expensive part for a 10k vocabulary.
        @tf.function(input_signature=[tf.TensorSpec([1, None], tf.int32)])
        def logprobs(ids: tf.Tensor) -> tf.Tensor:
            states = cifg(embedding(ids))
            return tf.nn.log_softmax(output(states[:, -1, :])[0])

        self._logprobs = logprobs

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Swap in new weights (same config); assigns variables, so nothing retraces."""
        set_weights(self.model, weights, self.config)

    def next_word_logprobs(self, context_ids: Sequence[int]) -> np.ndarray:
        """log_softmax over the vocabulary after `context_ids` (starting with <bos>).

        Only the last config.seq_len ids are used, the window the model was trained on.
        """
        ids = [int(i) for i in context_ids][-self.config.seq_len :] or [BOS_ID]
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"context ids must be in [0, {self.config.vocab_size})")
        return self._logprobs(tf.constant([ids], dtype=tf.int32)).numpy()

    @property
    def tracing_count(self) -> int:
        """How many times the prediction function has been traced (stays 1)."""
        return int(self._logprobs.experimental_get_tracing_count())
