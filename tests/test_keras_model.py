"""models.keras_model: layout, CIFG maths against numpy, prediction, loss, a little training."""
from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from models.config import ModelConfig, preset  # noqa: E402
from models.keras_metrics import keras_metrics_for_eval  # noqa: E402
from models.keras_model import (  # noqa: E402
    NextWordPredictor,
    build_model,
    get_weights,
    masked_loss,
    set_weights,
)
from models.metrics import evaluate_logits  # noqa: E402

TINY = preset("tiny")
MICRO = ModelConfig(vocab_size=11, embedding_dim=3, units=5, seq_len=6, preset="micro")


def _random_weights(config: ModelConfig, seed: int, scale: float = 0.5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=shape) * scale).astype(np.float32) for _, shape in config.weight_specs()]


def _numpy_reference(config: ModelConfig, weights: list[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """CIFG LSTM with projection and tied embeddings, written out step by step.

    Gates [input, candidate, output]; forget = 1 - input; state r is the projected output.
    """
    emb, kernel, rec, bias, proj, out_bias = [w.astype(np.float64) for w in weights]
    h = config.units
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    batch, steps = ids.shape
    c = np.zeros((batch, h))
    r = np.zeros((batch, config.embedding_dim))
    logits = []
    for t in range(steps):
        x = emb[ids[:, t]]
        z = x @ kernel + r @ rec + bias
        i, g, o = sig(z[:, :h]), np.tanh(z[:, h : 2 * h]), sig(z[:, 2 * h :])
        f = 1.0 - i
        c = f * c + i * g
        r = (o * np.tanh(c)) @ proj
        logits.append(r @ emb.T + out_bias)
    return np.stack(logits, axis=1)


def test_gboard_parameter_count_and_forward():
    config = ModelConfig()
    assert config.num_parameters() == 1_422_638  # ~1.42M as in Hard et al. 2018
    model = build_model(config, seed=0)
    assert model.count_params() == config.num_parameters()
    assert sum(int(np.prod(v.shape)) for v in model.trainable_weights) == config.num_parameters()
    logits = model(np.array([[1, 5, 9, 10_003]], dtype=np.int32))
    assert logits.shape == (1, 4, config.vocab_size)
    assert np.all(np.isfinite(logits.numpy()))


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_weight_order_and_shapes(name):
    config = preset(name)
    model = build_model(config)
    specs = config.weight_specs()
    assert [tuple(v.shape) for v in model.trainable_weights] == [s for _, s in specs]
    # Keras variable names follow the contract names (layer/variable).
    names = [v.name.split(":")[0] for v in model.trainable_weights]
    assert names == ["embedding/embeddings", "cifg/kernel", "cifg/recurrent_kernel", "cifg/bias",
                     "cifg/projection", "output/output_bias"]
    assert model.non_trainable_weights == []
    assert model.count_params() == config.num_parameters()


def test_initialisation():
    model = build_model(TINY, seed=3)
    h = TINY.units
    bias = get_weights(model)[3]
    assert np.all(bias[:h] < 0)  # input gate low -> forget gate (1 - input) high
    assert np.all(bias[h:] == 0)
    again = get_weights(build_model(TINY, seed=3))
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(model), again))
    other = get_weights(build_model(TINY, seed=4))
    assert not np.array_equal(get_weights(model)[1], other[1])


def test_cifg_matches_numpy_reference():
    weights = _random_weights(MICRO, seed=0)
    model = build_model(MICRO)
    set_weights(model, weights, MICRO)
    ids = np.array([[1, 4, 7, 2, 0], [1, 10, 10, 5, 3]], dtype=np.int32)
    got = model(ids).numpy()
    want = _numpy_reference(MICRO, weights, ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_rebuild_from_json_gives_identical_outputs():
    model = build_model(TINY, seed=1)
    rebuilt = build_model(ModelConfig.from_json(TINY.to_json()), seed=99)
    set_weights(rebuilt, get_weights(model))
    ids = np.array([[1, 20, 30, 40], [1, 2, 0, 0]], dtype=np.int32)
    np.testing.assert_array_equal(model(ids).numpy(), rebuilt(ids).numpy())


def test_set_weights_validates():
    model = build_model(TINY)
    before = get_weights(model)
    bad = _random_weights(TINY, seed=1)
    bad[4] = bad[4].T  # projection transposed
    with pytest.raises(ValueError, match="cifg/projection"):
        set_weights(model, bad, TINY)
    with pytest.raises(ValueError, match="expected 6"):
        set_weights(model, before[:-1])
    with pytest.raises(ValueError):
        set_weights(model, _random_weights(MICRO, seed=0))  # other config, checked against the model
    with pytest.raises(ValueError):
        set_weights(model, _random_weights(TINY.with_vocab_size(600), seed=0), TINY)
    assert all(np.array_equal(a, b) for a, b in zip(before, get_weights(model)))  # nothing assigned


def test_predictor_matches_model_and_does_not_retrace():
    weights = _random_weights(TINY, seed=2, scale=0.3)
    model = build_model(TINY)
    set_weights(model, weights)
    predictor = NextWordPredictor(TINY, weights)
    for context in ([1], [1, 7, 8], [1, 9, 10, 11, 12, 13, 14]):
        got = predictor.next_word_logprobs(context)
        logits = model(np.array([context], dtype=np.int32)).numpy()[0, -1]
        want = logits - np.log(np.exp(logits.astype(np.float64)).sum())
        assert got.shape == (TINY.vocab_size,)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Longer than seq_len: only the last seq_len ids count.
    long_context = [1] + list(range(4, 4 + 2 * TINY.seq_len))
    np.testing.assert_allclose(
        predictor.next_word_logprobs(long_context),
        predictor.next_word_logprobs(long_context[-TINY.seq_len :]),
        rtol=1e-6,
    )
    # New weights are used without retracing.
    predictor.set_weights(_random_weights(TINY, seed=5))
    changed = predictor.next_word_logprobs([1, 7, 8])
    assert not np.allclose(changed, predictor.next_word_logprobs([1, 7, 9]))
    assert predictor.tracing_count == 1
    with pytest.raises(ValueError):
        predictor.set_weights(_random_weights(MICRO, seed=0))
    with pytest.raises(ValueError):
        predictor.next_word_logprobs([1, TINY.vocab_size])


def test_masked_loss_ignores_padding():
    loss = masked_loss()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 9)).astype(np.float32)
    targets = np.array([[5, 6, 0, 0], [7, 0, 0, 0]], dtype=np.int32)
    lsm = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    want = -(lsm[0, 0, 5] + lsm[0, 1, 6] + lsm[1, 0, 7]) / 3
    assert float(loss(targets, logits)) == pytest.approx(want, rel=1e-5)
    changed = logits.copy()
    changed[:, 2:] += 100.0 * rng.normal(size=changed[:, 2:].shape)  # only padded positions
    assert float(loss(targets, changed)) == pytest.approx(want, rel=1e-5)
    assert float(loss(np.zeros((1, 3), np.int32), logits[:1, :3])) == 0.0  # all pad: no NaN
    assert type(loss).from_config(loss.get_config()).pad_id == 0


def test_tiny_model_learns_repeating_corpus():
    tf.keras.utils.set_random_seed(0)
    period = [10, 11, 12, 13, 14, 15, 2]  # w w w w w w <eos>, repeated: each id fixes the next
    stream = np.array(period * 40, dtype=np.int32)
    n = TINY.seq_len
    windows = np.stack([stream[s : s + n + 1] for s in range(0, len(stream) - n - 1, 3)])
    x, y = windows[:, :-1], windows[:, 1:].copy()
    y[::4, -2:] = 0  # some padding in the targets
    model = build_model(TINY, seed=0)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05), loss=masked_loss(), metrics=keras_metrics_for_eval())
    initial = model.evaluate(x, y, verbose=0, batch_size=len(x), return_dict=True)
    model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    final_metrics = model.evaluate(x, y, verbose=0, batch_size=len(x), return_dict=True)
    assert final_metrics["num_tokens"] == np.count_nonzero(y)
    assert final_metrics["top1_recall"] > 0.9
    initial, final = initial["loss"], final_metrics["loss"]
    assert initial > 5.0  # ~ log(504) at start
    assert final < 0.2 * initial
    assert evaluate_logits(model.predict(x, verbose=0), y)["top1_recall"] > 0.9


def test_dropout_acts_in_training_only_and_keeps_the_layout():
    """Dropout holds no weights (same layout, same bundles) and changes nothing at inference."""
    from models.config import check_dropout

    plain, dropped = build_model(MICRO), build_model(MICRO, dropout=0.5)
    assert [v.shape for v in dropped.trainable_weights] == [v.shape for v in plain.trainable_weights]
    weights = _random_weights(MICRO, 3)
    set_weights(plain, weights, MICRO)
    set_weights(dropped, weights, MICRO)
    ids = np.random.default_rng(0).integers(2, MICRO.vocab_size, size=(4, MICRO.seq_len)).astype(np.int32)
    np.testing.assert_allclose(dropped(ids, training=False).numpy(), plain(ids).numpy(), rtol=1e-6, atol=1e-6)
    trained = dropped(ids, training=True).numpy()
    assert np.max(np.abs(trained - plain(ids).numpy())) > 1e-3
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="dropout"):
            check_dropout(bad)
