"""Activation layers: every mode of the harness, and their materialized Jacobians."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import tf_jacbp
from tf_jacbp import activations, layers, tolerances
from tf_jacbp.testing import check_layer as run_layer_test

LAYERS = {
    "ReLU": layers.ReLU,
    "ReLU(max_value, slope, threshold)": lambda **kw: layers.ReLU(
        max_value=1.5, negative_slope=0.1, threshold=0.2, **kw
    ),
    "Sigmoid": layers.Sigmoid,
    "Tanh": layers.Tanh,
    "LeakyReLU": layers.LeakyReLU,
    "ELU": lambda **kw: layers.ELU(alpha=0.7, **kw),
    "Softplus": layers.Softplus,
    "GELU": layers.GELU,
    "GELU(approximate)": lambda **kw: layers.GELU(approximate=True, **kw),
    "Swish": layers.Swish,
    "Softmax": layers.Softmax,
    "Activation('elu')": lambda **kw: layers.Activation("elu", **kw),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_activation_every_mode(name, tmp_path):
    run_layer_test(lambda dtype: LAYERS[name](dtype=dtype), (6,), tmp_dir=tmp_path)


@pytest.mark.parametrize("name", list(activations._ACTIVATIONS))
def test_jacobian_matrix_equals_autodiff_of_reference(name):
    """``J_z f(z)``, materialized, equals ``tape.batch_jacobian`` of the stock-op route."""
    fn = activations.get(name)
    z = tf.constant(np.random.default_rng(1).normal(size=(4, 5)), tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(z)
        a = fn.reference(z)
    expected = tape.batch_jacobian(a, z)
    err = tolerances.relative_error(fn.jacobian(z), expected)
    assert err <= tolerances.rtol("float64")


def test_relu_jacobian_is_a_zero_one_diagonal():
    """Section 3.4: ``J_z ReLU(z) = diag(1[z > 0])``."""
    z = tf.constant([-2.0, 0.5, -0.1, 3.0])
    np.testing.assert_array_equal(layers.ReLU().jacobian(z), np.diag([0.0, 1.0, 0.0, 1.0]))


def test_softmax_jacobian_is_diag_minus_outer_product():
    z = tf.constant([0.3, -1.0, 2.0], tf.float64)
    s = tf.nn.softmax(z).numpy()
    np.testing.assert_allclose(layers.Softmax().jacobian(z), np.diag(s) - np.outer(s, s))


def test_reference_mode_switches_route():
    """Inside ``reference_mode`` the custom gradient is not used: a planted bug shows only
    outside."""

    class Doubled(activations.Tanh):
        def backward(self, dy, z, a):
            return 2 * self.derivative(z, a) * dy, []

    layer = layers.Activation(Doubled())
    z = tf.constant([[0.1, -0.4]])

    def grad():
        with tf.GradientTape() as tape:
            tape.watch(z)
            y = tf.reduce_sum(layer(z))
        return tape.gradient(y, z).numpy()

    with tf_jacbp.reference_mode():
        ref = grad()
    np.testing.assert_allclose(grad(), 2 * ref, rtol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: layers.Activation("relux"), "activation='relux'"),
        (lambda: layers.Dense(3, activation="sigmod"), "activation='sigmod'"),
        (lambda: layers.Softmax(axis=1), "axis=1"),
        (lambda: layers.LeakyReLU(negative_slope=-1), "negative_slope=-1"),
    ],
)
def test_bad_activation_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_plain_relu_backward_reads_d_from_the_output_alone():
    """``(J_z f)^T delta = [z > 0] delta`` from ``a = max(z, 0)`` only (``z`` unused), equal to
    the derivative times ``delta``; with arguments, ReLU's backward uses ``z``."""
    z = tf.constant([[-1.5, 0.0, 0.3, 2.0], [1e-30, -1e-30, 5.0, -0.2]], tf.float64)
    dy = tf.constant(np.random.default_rng(0).normal(size=(2, 4)))
    relu = activations.ReLU()
    dz, _ = relu.backward(dy, None, relu.forward(z))
    np.testing.assert_array_equal(dz, relu.derivative(z, relu.forward(z)) * dy)
    leaky = activations.ReLU(negative_slope=0.1)
    dz, _ = leaky.backward(dy, z, leaky.forward(z))
    np.testing.assert_allclose(dz, leaky.derivative(z, leaky.forward(z)) * dy)


# --- ReLU: Keras' semantics (threshold, negative_slope, max_value) in float64, ties included ---

SLOPES = st.integers(0, 32).map(lambda k: k / 16)  # exact in float32, as Keras' leaky_relu uses
THRESHOLDS = st.one_of(st.just(0.0), st.integers(0, 32).map(lambda k: k / 8))
MAX_VALUES = st.one_of(st.none(), st.just(6.0), st.integers(0, 48).map(lambda k: k / 8))


def _ties(threshold, max_value):
    """Inputs at and next to every kink: ``0``, ``t``, ``M``, ``6``, one ulp either side."""
    points = [0.0, threshold, 6.0] + ([max_value] if max_value is not None else [])
    return [v for p in points for v in (np.nextafter(p, -np.inf), p, np.nextafter(p, np.inf))]


def _value_and_derivative(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    return np.asarray(y), np.asarray(tape.gradient(y, x))


@given(
    max_value=MAX_VALUES,
    negative_slope=SLOPES,
    threshold=THRESHOLDS,
    others=st.lists(st.floats(-10, 10), min_size=1, max_size=8),
)
def test_relu_equals_keras_relu_in_float64_at_and_around_the_kinks(
    max_value, negative_slope, threshold, others
):
    """Values and derivatives equal ``keras.layers.ReLU``'s exactly: ``f(t) = 0`` (Keras'
    ``x > t``), and at each kink the derivative autodiff gives for Keras' ops."""
    kwargs = {"max_value": max_value, "negative_slope": negative_slope, "threshold": threshold}
    x = tf.constant(_ties(threshold, max_value) + others, tf.float64)
    stock, stock_derivative = _value_and_derivative(keras.layers.ReLU(**kwargs, dtype="float64"), x)
    ours = layers.ReLU(**kwargs, dtype="float64")
    value, derivative = _value_and_derivative(ours, x)
    np.testing.assert_array_equal(value, stock)
    np.testing.assert_array_equal(derivative, stock_derivative)
    with tf_jacbp.reference_mode():
        np.testing.assert_array_equal(_value_and_derivative(ours, x)[1], stock_derivative)
    np.testing.assert_array_equal(ours.activation.derivative(x, value), stock_derivative)


def test_relu_with_a_threshold_is_zero_at_the_threshold():
    y = layers.ReLU(threshold=1.0, dtype="float64")(tf.constant([0.5, 1.0, 1.5], tf.float64))
    np.testing.assert_array_equal(y, [0.0, 0.0, 1.5])


@pytest.mark.parametrize("name", ["max_value", "negative_slope", "threshold"])
@pytest.mark.parametrize("value", [-1.0, "1", True, float("nan"), float("inf"), None, [1.0]])
def test_bad_relu_arguments_name_the_argument(name, value):
    """Keras raises for None (except ``max_value``) and negative values; tf_jacbp also for
    non-numbers, booleans, NaN and infinity, always a ValueError naming the argument."""
    if name == "max_value" and value is None:
        assert layers.ReLU(max_value=None).activation.max_value is None
        return
    with pytest.raises(ValueError, match=f"ReLU: {name} must be a finite number >= 0.*{name}="):
        layers.ReLU(**{name: value})
    if value is None or (isinstance(value, float) and value < 0):
        with pytest.raises(ValueError, match=name):
            keras.layers.ReLU(**{name: value})


def test_leaky_relu_slope_none_is_an_error():
    with pytest.raises(ValueError, match="negative_slope=None"):
        layers.LeakyReLU(negative_slope=None)
