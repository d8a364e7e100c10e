"""Dense: every mode and comparison of the harness, the paper's 3 x 15 example, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_jacbp import layers, tolerances
from tf_jacbp.testing import check_layer as run_layer_test


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"activation": "relu"},
        {"activation": "tanh", "use_bias": False},
        {"activation": "softmax"},
        {"activation": "sigmoid", "kernel_regularizer": "l2"},
        {"activation": "gelu"},  # D needs z, not only a
    ],
)
def test_dense_every_mode(kwargs, tmp_path):
    run_layer_test(lambda dtype: layers.Dense(4, dtype=dtype, **kwargs), (5,), tmp_dir=tmp_path)


def test_paper_example_one_layer_jacobian_is_3_by_15():
    """Section 3.1: 4 features, 3 classes: ``J_{W,b} z = [I_3 (x) a^T | I_3]`` is 3 x 15."""
    layer = layers.Dense(3, dtype="float64")
    layer.build((None, 4))
    a = np.array([1.0, 2.0, 3.0, 4.0])
    expected = np.zeros((3, 15))
    for j in range(3):
        expected[j, 4 * j : 4 * j + 4] = a  # row j: a^T in the block of column j of W
        expected[j, 12 + j] = 1.0  # the bias
    np.testing.assert_array_equal(layer.parameter_jacobian(a), expected)


def test_parameter_jacobian_equals_autodiff_in_theta_order():
    """Columns are ``[Vec(W) (column-major); b]``: compare with ``tape.jacobian`` of stock ops."""
    layer = layers.Dense(3, dtype="float64")
    layer.build((None, 4))
    a = tf.constant(np.random.default_rng(2).normal(size=4))
    kernel, bias = tf.identity(layer.kernel), tf.identity(layer.bias)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([kernel, bias])
        z = tf.linalg.matvec(kernel, a, transpose_a=True) + bias
    jw = tape.jacobian(z, kernel).numpy()  # (3, 4, 3): dz_j / dW[i, k]
    jw = jw.transpose(0, 2, 1).reshape(3, 12)  # column-major Vec: index k * 4 + i
    expected = np.concatenate([jw, tape.jacobian(z, bias).numpy()], axis=1)
    np.testing.assert_array_equal(layer.parameter_jacobian(a), expected)


def test_kronecker_identity_materialized_transpose_equals_fast_backward():
    """``[I (x) a^T | I]^T delta = [Vec(a delta^T); delta]``: the theorem, checked."""
    rng = np.random.default_rng(3)
    layer = layers.Dense(5, dtype="float64")
    layer.build((None, 7))
    a, delta = rng.normal(size=(1, 7)), rng.normal(size=(1, 5))
    materialized = tf.linalg.matvec(layer.parameter_jacobian(a[0]), delta[0], transpose_a=True)
    _, (dw, db) = layer.backward(tf.constant(delta), tf.constant(a), None, *layer.read_parameters())
    fast = np.concatenate([np.asarray(dw).reshape(-1, order="F"), np.asarray(db)])
    assert tolerances.relative_error(materialized, fast) <= tolerances.rtol("float64")


def test_input_jacobian_is_d_times_w_transpose():
    layer = layers.Dense(3, activation="tanh", dtype="float64")
    layer.build((None, 4))
    a = tf.constant(np.random.default_rng(4).normal(size=(2, 4)))
    with tf.GradientTape() as tape:
        tape.watch(a)
        y = layer.reference(a, *layer.read_parameters())
        y = tf.math.tanh(y)
    expected = tape.batch_jacobian(y, a)
    err = tolerances.relative_error(layer.input_jacobian(a), expected)
    assert err <= tolerances.rtol("float64")


@pytest.mark.parametrize(
    "units, match", [(0, "units=0"), (-3, "units=-3"), (2.5, "units=2.5"), (None, "units=None")]
)
def test_bad_units_name_the_argument(units, match):
    with pytest.raises(ValueError, match=match):
        layers.Dense(units)


def test_rank_4_input_asks_for_flatten():
    with pytest.raises(ValueError, match="Flatten"):
        keras.Sequential([keras.Input((28, 28, 1)), layers.Dense(10)])


def test_changed_feature_count_after_build_is_an_error():
    layer = layers.Dense(2)
    layer(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 4"):
        layer(np.zeros((1, 5), "float32"))
