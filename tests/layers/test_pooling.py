"""MaxPooling2D, AveragePooling2D and Flatten: every mode of the harness, their materialized
Jacobians against autodiff and against the backward pass, ties, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_jacbp import tolerances
from tf_jacbp.layers.flatten import Flatten
from tf_jacbp.layers.pool_windows import transpose_index, window_maps
from tf_jacbp.layers.pooling import AveragePooling2D, MaxPooling2D, _Pooling
from tf_jacbp.testing import check_layer as run_layer_test

POOLS = [
    (MaxPooling2D, (6, 4, 2), {}),
    (MaxPooling2D, (7, 6, 2), {"pool_size": 3, "strides": 2, "padding": "same"}),
    (MaxPooling2D, (5, 7, 1), {"pool_size": (2, 3), "strides": (1, 2)}),
    (MaxPooling2D, (7, 8, 2), {"pool_size": (2, 3)}),  # tiled, a row and two columns left over
    (AveragePooling2D, (7, 6, 2), {"pool_size": 3, "strides": 2, "padding": "same"}),
    (AveragePooling2D, (5, 7, 3), {"pool_size": (2, 3)}),
    (AveragePooling2D, (5, 5, 1), {"pool_size": 2, "strides": 1, "padding": "same"}),
]


@pytest.mark.parametrize("cls, input_shape, kwargs", POOLS)
def test_pooling_every_mode(cls, input_shape, kwargs, tmp_path):
    run_layer_test(lambda dtype: cls(dtype=dtype, **kwargs), input_shape, tmp_dir=tmp_path)


def test_flatten_every_mode(tmp_path):
    run_layer_test(lambda dtype: Flatten(dtype=dtype), (3, 4, 2), tmp_dir=tmp_path)


def _built(cls, input_shape, **kwargs):
    layer = cls(dtype="float64", **kwargs)
    layer.build((None, *input_shape))
    return layer


@pytest.mark.parametrize("cls, input_shape, kwargs", POOLS)
def test_jacobian_equals_autodiff_and_its_transpose_is_the_backward(cls, input_shape, kwargs):
    layer = _built(cls, input_shape, **kwargs)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(1, *input_shape)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reshape(layer.reference(x), [-1])
    expected = tf.reshape(tape.jacobian(y, x), [y.shape[0], -1])
    jacobian = layer.jacobian(x[0])
    rtol = tolerances.rtol("float64")
    assert tolerances.relative_error(jacobian, expected) <= rtol
    delta = tf.constant(rng.normal(size=y.shape))
    dx, params = layer.backward(
        tf.reshape(delta, [1, *layer.compute_output_shape((1, *input_shape))[1:]]),
        x,
        layer.forward(x),
    )
    assert params == []
    materialized = tf.linalg.matvec(jacobian, delta, transpose_a=True)
    assert tolerances.relative_error(tf.reshape(dx, [-1]), materialized) <= rtol


def test_average_pooling_same_divides_by_the_inputs_inside_each_window():
    """A 3 x 3 window at the corner of a "same" pooling covers 4 inputs: weights 1/4."""
    layer = _built(AveragePooling2D, (4, 4, 1), pool_size=3, strides=1, padding="same")
    jacobian = np.asarray(layer.jacobian(np.ones((4, 4, 1))))
    np.testing.assert_allclose(jacobian.sum(axis=1), 1.0)
    np.testing.assert_array_equal(jacobian[0, [0, 1, 4, 5]], 0.25)
    np.testing.assert_array_equal(jacobian[5].reshape(4, 4)[:3, :3], 1 / 9)


@pytest.mark.parametrize("traced", [False, True])  # op by op, and compiled with XLA in a graph
@pytest.mark.parametrize(
    "kwargs", [{}, {"pool_size": 3, "strides": 1, "padding": "same"}, {"pool_size": (2, 3)}]
)
def test_max_pooling_ties_go_to_the_first_maximum_like_tensorflow(kwargs, traced):
    """Inputs of zeros and ones tie everywhere; the selection matches TensorFlow's gradient."""
    input_shape = (6, 6, 2)
    layer = _built(MaxPooling2D, input_shape, **kwargs)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.integers(0, 2, size=(3, *input_shape)).astype("float64"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer.reference(x)
    delta = tf.constant(rng.normal(size=y.shape))
    expected = tape.gradient(y, x, output_gradients=delta)
    backward = tf.function(layer.backward) if traced else layer.backward
    dx, _ = backward(delta, x, y)
    np.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize("route", ["eager", "traced", "layer"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # tiled
        {"pool_size": 2, "strides": 1},
        {"pool_size": 3, "strides": 2, "padding": "same"},  # windows reaching into the padding
        {"pool_size": 2, "padding": "same"},
    ],
)
def test_max_pooling_window_without_a_maximum_sends_its_gradient_where_tensorflow_does(
    kwargs, route
):
    """Windows of all ``-inf`` or NaN (``tf.nn.max_pool2d`` returns the lowest finite value,
    equal to none of them): the gradient still reaches one input, the first inside the window,
    exactly as TensorFlow's ``MaxPoolGrad`` sends it (it used to be dropped)."""
    input_shape = (5, 5, 2)
    layer = _built(MaxPooling2D, input_shape, **kwargs)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, *input_shape))
    x[0] = -np.inf  # every window
    x[1, :3, :3, 0] = -np.inf  # some windows
    x[2, ::2, :, 1] = np.nan  # rows of NaN: windows of NaN alone with stride 1
    x[2, 1::2, :, 1] = -np.inf
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer.reference(x)
    delta = tf.constant(rng.normal(size=y.shape))
    expected = tape.gradient(y, x, output_gradients=delta)
    if route == "layer":  # the Jacobian route as training uses it
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        dx = tape.gradient(y, x, output_gradients=delta)
    else:
        backward = tf.function(layer.backward) if route == "traced" else layer.backward
        dx, _ = backward(delta, x, y)
    np.testing.assert_array_equal(dx, expected)
    assert np.count_nonzero(np.asarray(dx)[0]) == np.count_nonzero(np.asarray(delta)[0])


def test_flatten_jacobian_is_the_identity_and_the_order_is_row_major():
    layer = Flatten(dtype="float64")
    x = np.arange(24.0).reshape(1, 2, 3, 4)
    np.testing.assert_array_equal(layer(x), np.arange(24.0)[None])
    np.testing.assert_array_equal(layer.jacobian(x[0]), np.eye(24))


def test_transpose_index_is_the_transpose_of_the_gather():
    index = np.array([[0, 1, 4], [1, 2, 4], [2, 3, 0]])  # 4 inputs; 4 means "no input"
    inverse = transpose_index(index, 4)
    matrix = np.zeros((index.size, 4))
    for slot, n in enumerate(index.reshape(-1)):
        if n < 4:
            matrix[slot, n] = 1
    v = np.arange(1.0, index.size + 1)
    np.testing.assert_array_equal(np.append(v, 0)[inverse].sum(axis=1), matrix.T @ v)


@pytest.mark.parametrize("cls", [MaxPooling2D, AveragePooling2D])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pool_size": 0}, "pool_size=0"),
        ({"pool_size": (2, -1)}, r"pool_size=\(2, -1\)"),
        ({"strides": 0}, "strides=0"),
        ({"strides": -1}, "strides=-1"),
        ({"padding": "full"}, "padding='full'"),
        ({"data_format": "channels_first"}, "data_format='channels_first'"),
    ],
)
def test_bad_pooling_arguments_name_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [MaxPooling2D, AveragePooling2D])
def test_pool_larger_than_a_valid_input_and_bad_ranks(cls):
    with pytest.raises(ValueError, match=r"pool_size \(3, 3\).*padding='same'"):
        keras.Sequential([keras.Input((2, 5, 1)), cls(3)])
    with pytest.raises(ValueError, match=r"\(batch, height, width, channels\)"):
        keras.Sequential([keras.Input((8,)), cls(2)])


def test_flatten_channels_first_is_an_error():
    with pytest.raises(ValueError, match="data_format='channels_first'"):
        Flatten(data_format="channels_first")


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [
        ((28, 28, 6), {}),
        ((7, 9, 3), {}),
        ((9, 8, 2), {"pool_size": (3, 2)}),
        ((6, 6, 1), {"pool_size": 3}),
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_tiled_max_pooling_backward_equals_the_gather_route(input_shape, kwargs, ties):
    """Windows that tile the input (``strides == pool_size``, "valid") take the reshape route;
    it selects exactly what the general route's gathers select, op by op and compiled."""
    layer = _built(MaxPooling2D, input_shape, **kwargs)
    assert window_maps(*input_shape[:2], layer.pool_size, layer.strides, "valid").tiled
    rng = np.random.default_rng(2)
    values = (
        rng.integers(0, 3, size=(3, *input_shape)) if ties else rng.normal(size=(3, *input_shape))
    )
    x = tf.constant(values.astype("float64"))
    y = layer.forward(x)
    dy = tf.constant(rng.normal(size=y.shape))
    general = _Pooling.input_gradient(layer, dy, x, y)
    np.testing.assert_array_equal(layer.input_gradient(dy, x, y), general)
    np.testing.assert_array_equal(tf.function(layer.backward)(dy, x, y)[0], general)
