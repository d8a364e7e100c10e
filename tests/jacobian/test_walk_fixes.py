"""Bugs of Algorithm 1's utilities found by red-teaming them against stock Keras (issue 21)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_jacbp import jacobian, layers, losses, tolerances

F64 = "float64"


def _mlp(dtype=F64, activation="tanh"):
    return keras.Sequential(
        [
            keras.Input((4,)),
            layers.Dense(5, activation=activation, dtype=dtype),
            layers.Dense(3, dtype=dtype),
        ]
    )


def _data(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)), rng.normal(size=(n, 3))


def _fresh_norms(model, x, y, loss):
    """Norms from the per-example gradients of a freshly traced computation (no cache)."""
    rows = jacobian.per_example_gradients(model, x, y, loss=loss)
    return np.sqrt(np.sum(np.square(rows), axis=1))


def test_norms_follow_compile_with_another_loss():
    model = _mlp()
    x, y = _data()
    model.compile(loss=losses.MeanSquaredError(dtype=F64))
    first = jacobian.per_example_gradient_norms(model, x, y)
    model.compile(loss=losses.MeanSquaredError(dtype=F64, reduction="sum"))
    model.compile(loss=keras.losses.MeanAbsoluteError(dtype=F64))
    after = jacobian.per_example_gradient_norms(model, x, y)
    want = _fresh_norms(model, x, y, keras.losses.MeanAbsoluteError(dtype=F64))
    np.testing.assert_allclose(after, want, rtol=1e-12)
    assert not np.allclose(after, first)


def test_norms_follow_an_activation_set_after_the_first_call():
    model = _mlp()
    x, y = _data()
    loss = losses.MeanSquaredError(dtype=F64)
    first = jacobian.per_example_gradient_norms(model, x, y, loss=loss)
    model.layers[0].activation = "sigmoid"
    after = jacobian.per_example_gradient_norms(model, x, y, loss=loss)
    np.testing.assert_allclose(after, _fresh_norms(model, x, y, loss), rtol=1e-12)
    assert not np.allclose(after, first)


@pytest.fixture
def mixed_model():
    """Keras' recommended mixed-precision layout: float16 compute, a float32 output layer."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential(
            [
                keras.Input((4,)),
                layers.Dense(5, activation="tanh"),
                layers.Dense(3, dtype="float32"),
            ]
        )
    finally:
        keras.config.set_dtype_policy("float32")
    twin = keras.Sequential(
        [keras.Input((4,)), layers.Dense(5, activation="tanh"), layers.Dense(3)]
    )
    twin.set_weights(model.get_weights())
    return model, twin


def test_mixed_precision_per_example_gradients_norms_and_jacobian(mixed_model):
    model, twin = mixed_model
    x, _ = _data()
    x = x.astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2])
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    rtol = tolerances.rtol("float16")
    for f in (
        lambda m: jacobian.per_example_gradients(m, x, y, loss=loss),
        lambda m: jacobian.per_example_gradient_norms(m, x, y, loss=loss),
        lambda m: jacobian.parameter_jacobian(m, x[:2]),
    ):
        got, want = f(model), f(twin)
        assert got.dtype == tf.float32
        err = tolerances.relative_error(got, want, "float16")
        assert err <= rtol, err


def test_a_masked_functional_model_is_refused_naming_the_mask():
    ids = keras.Input((6,), dtype="int32")
    pooled = layers.GlobalAveragePooling1D()(layers.Embedding(10, 4, mask_zero=True)(ids))
    model = keras.Model(ids, layers.Dense(3)(pooled))
    x, y = np.array([[1, 2, 0, 0, 0, 0], [3, 4, 5, 0, 0, 0]]), np.array([0, 1])
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(
        ValueError, match=r"per_example_gradients: layer 'embedding.*makes a Keras mask"
    ):
        jacobian.per_example_gradients(model, x, y, loss=loss)


def test_mixed_precision_dp_step_without_noise_is_the_clipped_mean(mixed_model):
    """DP-SGD on the same layout (it crashed with a dtype mismatch): without noise and with a
    clip no sample reaches, one step equals plain SGD on the float32 twin."""
    from tf_jacbp import privacy

    model, twin = mixed_model
    x, _ = _data(8)
    x, y = x.astype("float32"), np.arange(8) % 3
    private = privacy.make_private(model, l2_norm_clip=1e6, noise_multiplier=0.0, seed=0)
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    private.compile(keras.optimizers.SGD(0.1), loss)
    twin.compile(keras.optimizers.SGD(0.1), loss)
    private.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    twin.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(private.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-3)
