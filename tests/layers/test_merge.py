"""Add: the residual sum, whose Jacobian with respect to each input is the identity."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_jacbp
from tf_jacbp import layers
from tf_jacbp.testing import check_layer as run_layer_test


def residual_block(dtype: str, n: int = 4) -> keras.Model:
    """``x -> Add([Dense(tanh)(x), x, Dense(1)(x)])``: a skip, and a third input broadcast."""
    x = keras.Input((n,), dtype="float64" if dtype == "float64" else "float32")
    h = layers.Dense(n, activation="tanh", dtype=dtype)(x)
    p = layers.Dense(1, dtype=dtype)(x)
    return keras.Model(x, layers.Add(dtype=dtype)([h, x, p]))


def test_residual_block_passes_the_harness(tmp_path):
    run_layer_test(residual_block, (4,), tmp_dir=str(tmp_path))


def test_conv_residual_block_passes_the_harness(tmp_path):
    def block(dtype):
        x = keras.Input((5, 4, 2), dtype="float64" if dtype == "float64" else "float32")
        h = layers.Conv2D(2, 3, padding="same", activation="relu", dtype=dtype)(x)
        return keras.Model(x, layers.Add(dtype=dtype)([h, x]))

    run_layer_test(block, (5, 4, 2), tmp_dir=str(tmp_path))


def test_matches_keras_add_including_broadcasting():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=s).astype("float32") for s in [(2, 3, 4), (2, 1, 4), (2, 3, 1)]]
    np.testing.assert_allclose(layers.Add()(xs), keras.layers.Add()(xs), rtol=1e-6)


def test_jacobians_are_identities_and_broadcast_matrices():
    """``J_{x_k} y`` equals ``tape.jacobian`` of the reference route, exactly (0/1 entries)."""
    xs = [tf.constant(np.random.default_rng(1).normal(size=s)) for s in [(2, 3), (1, 3), (2, 1)]]
    add = layers.Add(dtype="float64")
    ours = add.jacobian(xs)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xs)
        with tf_jacbp.reference_mode():
            y = add(xs)
    for k, x in enumerate(xs):
        expected = tf.reshape(tape.jacobian(y, x), [6, -1])
        np.testing.assert_array_equal(ours[k], expected)
    np.testing.assert_array_equal(ours[0], np.eye(6))
    assert list(add.jacobian_factors(xs)) == ["J_x1 = I", "J_x2 = I", "J_x3 = I"]


def test_backward_sums_delta_over_broadcast_axes():
    add = layers.Add(dtype="float64")
    xs = [tf.zeros((2, 3, 4), "float64"), tf.zeros((2, 1, 4), "float64")]
    dy = tf.constant(np.arange(24.0).reshape(2, 3, 4))
    dxs, grads = add.backward(dy, xs, add.forward(xs))
    np.testing.assert_array_equal(dxs[0], dy)
    np.testing.assert_array_equal(dxs[1], tf.reduce_sum(dy, axis=1, keepdims=True))
    assert grads == []


@pytest.mark.parametrize(
    "inputs, match",
    [
        (lambda: keras.Input((3,)), "list of tensors"),
        (lambda: [keras.Input((3,))], "at least 2 inputs"),
        (lambda: [keras.Input((3,)), keras.Input((1, 3))], "different ranks"),
        (lambda: [keras.Input((3,)), keras.Input((2,))], "cannot be added"),
    ],
    ids=["single tensor", "one input", "ranks", "shapes"],
)
def test_bad_inputs_are_clear_errors(inputs, match):
    with pytest.raises(ValueError, match=match):
        layers.Add()(inputs())
