"""Activation layers: every mode of the harness, and their materialized Jacobians."""

import numpy as np
import pytest
import tensorflow as tf
from harness import run_layer_test

import tf_jacbp
from tf_jacbp import activations, layers, tolerances

LAYERS = {
    "ReLU": layers.ReLU,
    "ReLU(max_value, slope, threshold)": lambda **kw: layers.ReLU(
        max_value=1.5, negative_slope=0.1, threshold=-0.2, **kw
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
    """Inside ``reference_mode`` the custom gradient is not used: a planted bug shows only outside."""

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
