"""The activations and the Table 1 loss map follow the one Jacobian contract (tf_jacbp.contract):
``vjp_input`` with a stacked-vectors axis ``V``, ``backward`` and ``jacobian_rows`` derived, and
the materialized ``D = J_z f(z)`` of whole samples (``jacobian_at_positions``)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from map_cases import ACTIVATION_NAMES as NAMES
from map_cases import ACTIVATIONS as ALL
from map_cases import activation_points

from tf_jacbp import activations, tolerances
from tf_jacbp.contract import DERIVED, JacobianMap
from tf_jacbp.losses import binary, categorical
from tf_jacbp.losses.base import Table1Map

RTOL64 = tolerances.rtol("float64")


def _points(shape, seed=0):
    """``shape`` float64 values: the kinks and their neighbours first, then normal draws."""
    return tf.constant(activation_points(shape, seed))


def _autodiff_products(fn, z, m):
    """``(J_z f)^T m[v]`` for each ``v`` by autodiff of the stock-op ``reference``."""
    out = []
    for v in range(m.shape[0]):
        with tf.GradientTape() as tape:
            tape.watch(z)
            a = fn.reference(z)
        out.append(tape.gradient(a, z, output_gradients=m[v]))
    return tf.stack(out)


@pytest.mark.parametrize("name", list(ALL))
def test_activation_is_a_contract_map_without_derived_overrides(name):
    fn = ALL[name]()
    assert isinstance(fn, JacobianMap)
    for cls in type(fn).__mro__:
        if cls is JacobianMap:
            break
        assert not set(DERIVED) & set(vars(cls)), f"{cls.__name__} defines a derived method"


@pytest.mark.parametrize("v", [1, 3])
@pytest.mark.parametrize("shape", [(4, 9), (2, 3, 7)])
@pytest.mark.parametrize("name", list(ALL))
def test_activation_vjp_input_equals_autodiff_for_any_v(name, shape, v):
    """``vjp_input(m, z, a)``, ``m`` ``(V, batch, ...)``, equals autodiff of Keras' stock ops
    for each of the ``V`` vectors to 1e-12 in float64, at and around every kink; the derived
    ``backward`` is its ``V = 1`` case and ``jacobian_rows`` its rows."""
    fn = ALL[name]()
    z = _points(shape)
    a = fn.forward(z)
    m = tf.constant(np.random.default_rng(2).normal(size=(v, *shape)))
    out = fn.vjp_input(m, z, a)
    assert tuple(out.shape) == (v, *shape)
    assert tolerances.relative_error(out, _autodiff_products(fn, z, m)) <= RTOL64
    dz, grads = fn.backward(m[0], z, a)
    assert grads == []
    np.testing.assert_array_equal(dz, out[0])
    rows, blocks = fn.jacobian_rows(tf.experimental.numpy.moveaxis(m, 0, 1), z, a)
    assert blocks == []
    np.testing.assert_array_equal(rows, tf.experimental.numpy.moveaxis(out, 0, 1))


def test_plain_relu_reads_its_diagonal_from_the_output_alone():
    """``(J_z relu)^T m = [z > 0] m = sign(a) m``: ``z`` is not read (a layer may fuse it)."""
    relu = activations.ReLU()
    z = _points((2, 8))
    m = tf.constant(np.random.default_rng(3).normal(size=(3, 2, 8)))
    out = relu.vjp_input(m, None, relu.forward(z))
    np.testing.assert_array_equal(out, relu.derivative(z, relu.forward(z)) * m)


@pytest.mark.parametrize("name", NAMES)
def test_jacobian_at_positions_is_the_block_matrix_of_a_sample(name):
    """``D = J_z f(z)`` for ``z`` ``(batch, P, m)``: ``(batch, P m, P m)``, equal to autodiff's
    Jacobian of each flattened sample; elementwise exactly ``diag(f'(z))``, softmax one block
    ``diag(s_p) - s_p s_p^T`` per position and exactly zero between positions."""
    fn = activations.get(name)
    z = _points((2, 3, 4))
    d = fn.jacobian_at_positions(z)
    assert tuple(d.shape) == (2, 12, 12)
    with tf.GradientTape() as tape:
        tape.watch(z)
        a = tf.reshape(fn.reference(z), [2, 12])
    expected = tape.batch_jacobian(a, z)
    assert tolerances.relative_error(d, tf.reshape(expected, [2, 12, 12])) <= RTOL64
    if isinstance(fn, activations.Softmax):
        blocks = tf.reshape(d, [2, 3, 4, 3, 4])
        for p in range(3):
            np.testing.assert_array_equal(blocks[:, p, :, p, :], fn.jacobian(z[:, p]))
            for q in {0, 1, 2} - {p}:
                np.testing.assert_array_equal(blocks[:, p, :, q, :], 0.0)
    else:
        derivative = tf.reshape(fn.derivative(z, fn.forward(z)), [2, 12]).numpy()
        np.testing.assert_array_equal(d, [np.diag(row) for row in derivative])
    # Any rank past the batch axis: positions row-major, the last axis the softmax's.
    image = tf.reshape(z, [2, 3, 1, 4])
    np.testing.assert_array_equal(fn.jacobian_at_positions(image), d)
    # Rank 2: one position, the materialized Jacobian of each row.
    np.testing.assert_array_equal(fn.jacobian_at_positions(z[:, 0]), fn.jacobian(z[:, 0]))


def test_materialized_diagonal_stays_zero_off_the_diagonal_where_f_prime_is_infinite():
    """``exp(800)`` overflows to ``inf``: the diagonal holds it, the rest stays exactly 0 (a
    product with the identity would give ``0 * inf = NaN``)."""
    d = activations.get("exponential").jacobian_at_positions(tf.constant([[[800.0, 0.0]]]))
    np.testing.assert_array_equal(d, [[[np.inf, 0.0], [0.0, 1.0]]])


@pytest.mark.parametrize("z_shape", [(4,), (2, None, 3)])
def test_jacobian_at_positions_refuses_what_is_not_a_batch_of_known_size(z_shape):
    fn = activations.get("softmax")

    @tf.function(input_signature=[tf.TensorSpec(z_shape, tf.float64)])
    def d(z):
        return fn.jacobian_at_positions(z)

    with pytest.raises(ValueError, match=r"jacobian_at_positions: z must be a batch"):
        d.get_concrete_function()


LOSS_MAPS = {
    "softmax cross entropy": (
        categorical._softmax_cross_entropy,
        categorical._softmax_cross_entropy_grad,
        categorical._reference_softmax_cross_entropy,
        False,
    ),
    "probability cross entropy": (
        categorical._probability_cross_entropy,
        categorical._probability_cross_entropy_grad,
        categorical._reference_probability_cross_entropy,
        True,
    ),
    "sigmoid cross entropy": (
        binary._sigmoid_cross_entropy,
        binary._sigmoid_cross_entropy_grad,
        binary._reference_sigmoid_cross_entropy,
        False,
    ),
}


@pytest.mark.parametrize("v", [1, 3])
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)])
@pytest.mark.parametrize("name", list(LOSS_MAPS))
def test_table1_map_vjp_input_scales_each_positions_gradient(name, shape, v):
    """The fused loss map: ``vjp_input(m, z, l, y) = m[..., None] * grad_z l``, ``m``
    ``(V, *l.shape)`` -> ``(V, *z.shape)``, equal to autodiff of the stock-op reference for each
    of the ``V`` vectors; the labels are a constant (no parameter products)."""
    value, gradient, reference, probabilities = LOSS_MAPS[name]
    table1 = Table1Map(value, gradient, reference)
    rng = np.random.default_rng(4)
    z = tf.constant(rng.normal(size=shape))
    if probabilities:
        z = tf.nn.softmax(z)
    y = tf.constant(rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]))
    loss = table1.forward(z, y)
    assert tolerances.relative_error(loss, table1.reference(z, y)) <= RTOL64
    m = tf.constant(rng.normal(size=(v, *shape[:-1])))
    out = table1.vjp_input(m, z, loss, y)
    assert tuple(out.shape) == (v, *shape)
    expected = []
    for i in range(v):
        with tf.GradientTape() as tape:
            tape.watch(z)
            stock = table1.reference(z, y)
        expected.append(tape.gradient(stock, z, output_gradients=m[i]))
    assert tolerances.relative_error(out, tf.stack(expected)) <= RTOL64
    dz, grads = table1.backward(m[0], z, loss, y)
    assert grads == []
    np.testing.assert_array_equal(dz, out[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0.2, "negative_slope": 0.1, "max_value": 1.5},
        {"threshold": 0.3},
        {"threshold": 0.3, "negative_slope": 0.3},
        {"max_value": 1.1},
        {"max_value": 1.1, "negative_slope": 0.5},
    ],
)
def test_relu_with_a_threshold_float32_cannot_hold_equals_keras_in_float64(kwargs):
    """Keras compares ``z > t`` and clips at ``M`` with ``t`` and ``M`` cast through float32, and
    takes its negative part ``s relu(t - z)`` with the exact ``t``: between ``t`` and ``t_32``
    (3e-9 apart for ``t = 0.2``) value, derivative and the Jacobian route's product all equal
    stock Keras' (the derivative used to compare with the exact ``t`` and ``M``)."""
    fn = activations.ReLU(**kwargs)
    points = []
    for p in {kwargs.get("threshold", 0.0), kwargs.get("max_value", 0.0), 0.0}:
        p32 = float(np.float32(p))
        points += [np.nextafter(p, -1), p, np.nextafter(p, 2), p + 1e-9, p - 1e-9, p32]
        points += [np.nextafter(p32, -1), np.nextafter(p32, 2)]
    z = tf.constant(points, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(z)
        stock = keras.activations.relu(z, **kwargs)
    expected = tape.gradient(stock, z)
    np.testing.assert_array_equal(fn.forward(z), stock)
    np.testing.assert_array_equal(fn.derivative(z, fn.forward(z)), expected)
    m = tf.ones([1, len(points)], tf.float64)
    np.testing.assert_array_equal(fn.vjp_input(m, z, fn.forward(z))[0], expected)
