"""Windowed pooling (1-D and 2-D), global pooling and Flatten: every mode of the harness, values
and gradients equal to the stock Keras layers (hypothesis), materialized Jacobians against
autodiff and against the backward pass, ties, -inf, masks, images of any size, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tf_jacbp import tolerances
from tf_jacbp.layers.flatten import Flatten
from tf_jacbp.layers.global_pooling import (
    GlobalAveragePooling1D,
    GlobalAveragePooling2D,
    GlobalMaxPooling1D,
    GlobalMaxPooling2D,
)
from tf_jacbp.layers.pool_windows import transpose_index, window_maps
from tf_jacbp.layers.pooling import AveragePooling2D, MaxPooling2D, _Pooling
from tf_jacbp.layers.pooling_nd import (
    AveragePooling1D,
    AveragePooling3D,
    MaxPooling1D,
    MaxPooling3D,
)
from tf_jacbp.testing import check_layer as run_layer_test

POOLS = [
    (MaxPooling2D, (6, 4, 2), {}),
    (MaxPooling2D, (7, 6, 2), {"pool_size": 3, "strides": 2, "padding": "same"}),
    (MaxPooling2D, (5, 7, 1), {"pool_size": (2, 3), "strides": (1, 2)}),
    (MaxPooling2D, (7, 8, 2), {"pool_size": (2, 3)}),  # tiled, a row and two columns left over
    (AveragePooling2D, (7, 6, 2), {"pool_size": 3, "strides": 2, "padding": "same"}),
    (AveragePooling2D, (5, 7, 3), {"pool_size": (2, 3)}),
    (AveragePooling2D, (5, 5, 1), {"pool_size": 2, "strides": 1, "padding": "same"}),
    (MaxPooling1D, (9, 2), {"pool_size": 3, "strides": 2, "padding": "same"}),
    (MaxPooling1D, (7, 2), {}),  # tiled, one step left over
    (AveragePooling1D, (8, 3), {"pool_size": 3, "strides": 2}),
    (AveragePooling1D, (5, 1), {"pool_size": 2, "strides": 1, "padding": "same"}),
]
# The harness runs every mode (about 5-10 s each): one configuration per route of each class.
EVERY_MODE = [POOLS[i] for i in (1, 3, 4, 7, 9)]
GLOBALS = [
    (GlobalAveragePooling2D, (4, 5, 3), {}),
    (GlobalMaxPooling2D, (4, 5, 3), {"keepdims": True}),
    (GlobalAveragePooling1D, (6, 2), {"keepdims": True}),
    (GlobalMaxPooling1D, (6, 2), {}),
]
RTOL64 = tolerances.rtol("float64")


@pytest.mark.parametrize("cls, input_shape, kwargs", EVERY_MODE + GLOBALS)
def test_pooling_every_mode(cls, input_shape, kwargs, tmp_path):
    run_layer_test(lambda dtype: cls(dtype=dtype, **kwargs), input_shape, tmp_dir=tmp_path)


def test_flatten_every_mode(tmp_path):
    run_layer_test(lambda dtype: Flatten(dtype=dtype), (3, 4, 2), tmp_dir=tmp_path)


def _built(cls, input_shape, **kwargs):
    layer = cls(dtype="float64", **kwargs)
    layer.build((None, *input_shape))
    return layer


@pytest.mark.parametrize("cls, input_shape, kwargs", POOLS + GLOBALS)
def test_jacobian_equals_autodiff_and_its_transpose_is_the_backward(cls, input_shape, kwargs):
    layer = _built(cls, input_shape, **kwargs)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(1, *input_shape)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reshape(layer.reference(x), [-1])
    expected = tf.reshape(tape.jacobian(y, x), [y.shape[0], -1])
    jacobian = layer.input_jacobian(x[0])
    rtol = RTOL64
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
    jacobian = np.asarray(layer.input_jacobian(np.ones((4, 4, 1))))
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
    np.testing.assert_array_equal(layer.input_jacobian(x[0]), np.eye(24))


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
    m = tf.stack([dy, -2 * dy])  # V = 2 stacked vectors per sample
    general = _Pooling.input_gradient(layer, m, x, y)
    np.testing.assert_array_equal(layer.input_gradient(m, x, y), general)
    np.testing.assert_array_equal(tf.function(layer.vjp_input)(m, x, y), general)
    np.testing.assert_array_equal(tf.function(layer.backward)(dy, x, y)[0], general[0])


# --- Agreement with the stock Keras layers (hypothesis-drawn arguments and shapes) ------------


def _values_and_gradients(layer, x, delta, traced=False, **call_kwargs):
    """``layer(x)`` and ``J^T delta`` through the tape, eagerly or in a ``tf.function``."""

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, **call_kwargs)
        return y, tape.gradient(y, x, output_gradients=delta(y) if callable(delta) else delta)

    return tf.function(run)(x) if traced else run(x)


def _assert_equal_to_stock(ours, stock, x, traced=False, **call_kwargs):
    rng = np.random.default_rng(0)
    y_stock = stock(x, **call_kwargs)
    delta = tf.constant(rng.normal(size=y_stock.shape))
    y, dx = _values_and_gradients(ours, x, delta, traced, **call_kwargs)
    y_ref, dx_ref = _values_and_gradients(stock, x, delta, **call_kwargs)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    np.testing.assert_array_equal(np.isnan(dx), np.isnan(dx_ref))
    finite = lambda t: np.nan_to_num(np.asarray(t), nan=0.0, posinf=0.0, neginf=0.0)  # noqa: E731
    assert tolerances.relative_error(finite(y), finite(y_ref)) <= RTOL64
    assert tolerances.relative_error(finite(dx), finite(dx_ref)) <= RTOL64


@settings(max_examples=12, deadline=None)
@given(
    rank=st.sampled_from([1, 2]),
    kind=st.sampled_from(["Max", "Average"]),
    pool=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    strides=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))),
    padding=st.sampled_from(["valid", "same"]),
    size=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    channels=st.integers(1, 3),
    ties=st.booleans(),
    traced=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_windowed_pooling_equals_the_stock_layer(
    rank, kind, pool, strides, padding, size, channels, ties, traced, seed
):
    """Values and input gradients of ``{Max,Average}Pooling{1,2}D`` equal Keras' in float64 (ties
    go where ``MaxPoolGrad`` sends them), eagerly and traced (the XLA-compiled backward)."""
    pool, size = pool[:rank], size[:rank]
    strides = None if strides is None else strides[:rank]
    assume(padding == "same" or all(n >= k for n, k in zip(size, pool, strict=True)))
    as_args = (lambda t: t[0]) if rank == 1 else (lambda t: t)
    kwargs = {"pool_size": as_args(pool), "padding": padding}
    if strides is not None:
        kwargs["strides"] = as_args(strides)
    name = f"{kind}Pooling{rank}D"
    ours = globals()[name](dtype="float64", **kwargs)
    stock = getattr(keras.layers, name)(dtype="float64", **kwargs)
    rng = np.random.default_rng(seed)
    shape = (2, *size, channels)
    x = rng.integers(0, 3, size=shape) if ties else rng.normal(size=shape)
    _assert_equal_to_stock(ours, stock, tf.constant(x, tf.float64), traced)


@settings(max_examples=12, deadline=None)
@given(
    rank=st.sampled_from([1, 2]),
    kind=st.sampled_from(["Max", "Average"]),
    keepdims=st.booleans(),
    size=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    channels=st.integers(1, 4),
    inputs=st.sampled_from(["normal", "ties", "-inf"]),
    traced=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_global_pooling_equals_the_stock_layer(
    rank, kind, keepdims, size, channels, inputs, traced, seed
):
    """``Global{Max,Average}Pooling{1,2}D`` equal Keras' in float64: values, gradients, ties
    (shared equally among the tied maxima, as ``tf.reduce_max``'s gradient), channels of -inf."""
    name = f"Global{kind}Pooling{rank}D"
    ours = globals()[name](dtype="float64", keepdims=keepdims)
    stock = getattr(keras.layers, name)(dtype="float64", keepdims=keepdims)
    rng = np.random.default_rng(seed)
    shape = (3, *size[:rank], channels)
    x = (
        rng.integers(0, 2, size=shape).astype(float)
        if inputs != "normal"
        else rng.normal(size=shape)
    )
    if inputs == "-inf":
        x[0, ..., 0] = -np.inf
    _assert_equal_to_stock(ours, stock, tf.constant(x), traced)


def test_global_max_pooling_shares_ties_equally_and_propagates_nan_like_stock():
    """A channel with three tied maxima sends a third of ``delta`` to each; a channel with a NaN
    has a NaN maximum and NaN gradients, exactly as the stock layer."""
    x = np.array([[[2.0, 1.0], [2.0, np.nan], [0.0, 3.0], [2.0, 0.0]]])
    layer = GlobalMaxPooling1D(dtype="float64")
    jacobian = np.asarray(layer.input_jacobian(x[0]))  # (C, N C), columns (n, c) row-major
    np.testing.assert_array_equal(jacobian[0, 0::2], [1 / 3, 1 / 3, 0, 1 / 3])
    assert np.isnan(jacobian[1, 1::2]).all()  # channel 1's entries are 0/0
    # Row c is J^T e_c: the NaN channel's 0/0 entries times 0 spill NaN into row 0, exactly as
    # stock's gradient for the upstream e_0.
    stock = keras.layers.GlobalMaxPooling1D(dtype="float64")
    probe = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(probe)
        y = stock(probe)
    e_0 = tape.gradient(y, probe, output_gradients=tf.constant([[1.0, 0.0]], tf.float64))
    np.testing.assert_array_equal(jacobian[0], np.reshape(e_0, [-1]))
    _assert_equal_to_stock(layer, keras.layers.GlobalMaxPooling1D(dtype="float64"), tf.constant(x))


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_masked_global_average_pooling_1d_equals_the_stock_layer(keepdims, traced):
    """With ``mask=`` the mean runs over the kept steps, and masked steps get no gradient; a
    sample with every step masked gives NaN values and zero gradients, as stock."""
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(3, 6, 2)))
    mask = tf.constant(rng.integers(0, 2, size=(3, 6)).astype(bool) | (np.arange(6) == 0))
    mask = tf.tensor_scatter_nd_update(mask, [[2]], tf.zeros((1, 6), tf.bool))
    ours = GlobalAveragePooling1D(dtype="float64", keepdims=keepdims)
    stock = keras.layers.GlobalAveragePooling1D(dtype="float64", keepdims=keepdims)
    _assert_equal_to_stock(ours, stock, x, traced, mask=mask)
    # J_x y of the masked map at sample 0: the contract's rows with M = I (C = 2 rows).
    mask = tf.cast(mask, "float64")
    y = ours.forward(x[:1], mask[:1])
    eye = tf.reshape(tf.eye(2, dtype="float64"), [1, 2, *y.shape[1:]])
    rows, _ = ours.jacobian_rows(eye, x[:1], y, mask[:1])
    jacobian = np.asarray(rows).reshape(2, -1)
    kept = np.asarray(mask[0], float)
    np.testing.assert_allclose(jacobian, np.kron(kept[None] / kept.sum(), np.eye(2)), rtol=1e-15)


def test_mask_from_a_masking_layer_reaches_global_average_pooling_1d():
    """In a model, Keras hands the ``Masking`` layer's mask to the layer, as to the stock one."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, 3))
    x[0, 3:] = 0.0  # padded steps
    x = tf.constant(x)

    def model(pool):
        return keras.Sequential(
            [keras.Input((5, 3), dtype="float64"), keras.layers.Masking(0.0, dtype="float64"), pool]
        )

    ours = model(GlobalAveragePooling1D(dtype="float64"))
    stock = model(keras.layers.GlobalAveragePooling1D(dtype="float64"))
    np.testing.assert_allclose(ours(x)[0], np.mean(np.asarray(x)[0, :3], axis=0), rtol=1e-15)
    _assert_equal_to_stock(ours, stock, x)


# --- Images of any size (issue 15, item 5) ------------------------------------------------------


@pytest.mark.parametrize(
    "cls, input_shape, kwargs",
    [
        (MaxPooling2D, (None, None, 2), {"pool_size": 3, "strides": 2, "padding": "same"}),
        (AveragePooling2D, (None, 5, 2), {"pool_size": (2, 3), "strides": 1}),
        (MaxPooling1D, (None, 2), {}),  # tiled at even lengths
    ],
)
def test_pooling_takes_inputs_of_any_size(cls, input_shape, kwargs):
    """Built on ``keras.Input`` with unknown sizes, a pooling layer gives the stock values and
    gradients at each size it meets: eagerly and traced at a known size (NumPy maps, cached per
    size), and traced for an unknown size (maps from TensorFlow ops), compiled with XLA too."""
    layer = cls(dtype="float64", **kwargs)
    model = keras.Sequential([keras.Input(input_shape, dtype="float64"), layer])
    stock = getattr(keras.layers, cls.__name__)(dtype="float64", **kwargs)

    def dynamic(x, delta):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
        return tape.gradient(y, x, output_gradients=delta)

    signature = [tf.TensorSpec((None, *input_shape), tf.float64), tf.TensorSpec(None, tf.float64)]
    rng = np.random.default_rng(5)
    for size, jit in ((6, False), (9, True)):
        shape = [2] + [size if n is None else n for n in input_shape]
        x = tf.constant(rng.integers(0, 3, size=shape).astype(float))
        delta = tf.constant(rng.normal(size=stock(x).shape))
        _, expected = _values_and_gradients(stock, x, delta)
        for traced in (False, True):
            _, dx = _values_and_gradients(model, x, delta, traced)
            np.testing.assert_array_equal(dx, expected)
        compiled = tf.function(dynamic, input_signature=signature, jit_compile=jit)
        np.testing.assert_array_equal(compiled(x, delta), expected)
    before = window_maps.cache_info()
    image = (1, shape[1]) if layer.rank == 1 else shape[1:3]  # the last size met: cached
    window_maps(*image, *layer.image_window, layer.padding)
    assert window_maps.cache_info().hits == before.hits + 1


def test_fit_on_images_of_several_sizes():
    """``fit`` on three image sizes (Keras relaxes the traced shape to unknown sizes after the
    second): each step's update, which reaches the stock convolution through the pooling
    layers' backward passes, equals the reference route's."""
    import tf_jacbp

    def model():
        return keras.Sequential(
            [
                keras.Input((None, None, 1)),
                keras.layers.Conv2D(2, 3, padding="same", kernel_initializer="glorot_normal"),
                MaxPooling2D(2, strides=1, padding="same"),
                AveragePooling2D(2),
                GlobalMaxPooling2D(),
                keras.layers.Dense(1),
            ]
        )

    ours, reference = model(), model()
    for m in (ours, reference):
        m.compile(keras.optimizers.SGD(1.0), "mse")
    rng = np.random.default_rng(6)
    for size in (6, 8, 11):
        reference.set_weights(ours.get_weights())
        before = ours.get_weights()
        x, t = rng.normal(size=(4, size, size, 1)), rng.normal(size=(4, 1))
        ours.fit(x, t, batch_size=4, verbose=0)
        with tf_jacbp.reference_mode():
            reference.fit(x, t, batch_size=4, verbose=0)
        for w0, w, w_ref in zip(before, ours.get_weights(), reference.get_weights(), strict=True):
            update, expected = w0 - w, w0 - w_ref
            assert tolerances.relative_error(update, expected) <= tolerances.rtol("float32")


# --- Bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MaxPooling1D, AveragePooling1D])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pool_size": 0}, "pool_size=0"),
        ({"pool_size": (2, 2)}, r"pool_size=\(2, 2\)"),
        ({"strides": -1}, "strides=-1"),
        ({"padding": "causal"}, "padding='causal'"),
        ({"data_format": "channels_first"}, "data_format='channels_first'"),
    ],
)
def test_bad_1d_pooling_arguments_name_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [MaxPooling1D, AveragePooling1D])
def test_1d_pool_longer_than_a_valid_sequence_and_bad_ranks(cls):
    with pytest.raises(ValueError, match=r"pool_size \(5,\) spans 5 along the length"):
        keras.Sequential([keras.Input((4, 2)), cls(5)])
    with pytest.raises(ValueError, match=r"\(batch, length, channels\)"):
        keras.Sequential([keras.Input((4, 4, 2)), cls(2)])


@pytest.mark.parametrize(
    "cls", [GlobalAveragePooling1D, GlobalAveragePooling2D, GlobalMaxPooling1D, GlobalMaxPooling2D]
)
def test_bad_global_pooling_arguments_name_the_argument(cls):
    with pytest.raises(ValueError, match="data_format='channels_first'"):
        cls(data_format="channels_first")
    with pytest.raises(ValueError, match="keepdims='yes'"):
        cls(keepdims="yes")
    with pytest.raises(ValueError, match="expected ndim"):
        keras.Sequential([keras.Input((4, 4, 2, 2)), cls()])


STOCK_NAMED = [
    ("MaxPooling1D", {"pool_size": 3, "strides": 1, "padding": "same"}),
    ("AveragePooling1D", {"pool_size": 2}),
    ("MaxPooling2D", {"pool_size": (2, 3)}),
    ("AveragePooling2D", {"pool_size": 2, "strides": 1}),
    ("GlobalAveragePooling1D", {"keepdims": True}),
    ("GlobalMaxPooling1D", {}),
    ("GlobalAveragePooling2D", {}),
    ("GlobalMaxPooling2D", {"keepdims": True}),
]


@pytest.mark.parametrize("name, kwargs", STOCK_NAMED)
def test_configuration_attributes_and_masking_as_the_stock_layer(name, kwargs):
    """Built at construction as Keras builds them, the same ``get_config`` (so the same readable
    attributes) and the same masking support as the stock layer of the same name."""
    ours, stock = globals()[name](**kwargs), getattr(keras.layers, name)(**kwargs)
    assert ours.built and stock.built
    assert ours.supports_masking == stock.supports_masking
    config, stock_config = ours.get_config(), stock.get_config()
    for key, value in stock_config.items():
        if key not in ("name", "dtype"):
            assert config[key] == value, key
            assert getattr(ours, key) == getattr(stock, key), key
    assert type(ours).from_config(config).get_config() == config


def test_a_fully_masked_sample_sends_zero_back_to_masked_steps_as_stock():
    """Its output is 0/0 = NaN (stock too); the NaN coming back must stop at the masked steps,
    as stock's ``where`` stops it, so that an embedding before the pooling stays finite."""
    x = tf.constant(np.arange(12, dtype="float64").reshape(2, 3, 2))
    mask = tf.constant([[True, True, False], [False, False, False]])
    dy = tf.constant([[1.0, 2.0], [np.nan, np.nan]], tf.float64)
    ours = GlobalAveragePooling1D(dtype="float64")
    stock = keras.layers.GlobalAveragePooling1D(dtype="float64")
    grads = []
    for layer in (ours, stock):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, mask=mask)
        grads.append(tape.gradient(y, x, output_gradients=dy).numpy())
    np.testing.assert_array_equal(grads[0], grads[1])
    assert np.all(grads[0][1] == 0)


def test_an_integer_input_keeps_its_keras_mask_in_global_average_pooling_1d():
    """Issue 21 item 7: the cast of integer inputs to the compute dtype (``standardize_input``)
    dropped the ``_keras_mask`` the input carries, and the mean ran over the masked steps too:
    ``[[1.5, 2.0]]`` where stock gives ``[[3.0, 4.0]]``."""
    x = tf.constant([[[0, 0], [3, 4]]])
    x._keras_mask = tf.constant([[False, True]])
    ours = GlobalAveragePooling1D(dtype="float64")(x)
    stock = keras.layers.GlobalAveragePooling1D(dtype="float64")(x)
    np.testing.assert_array_equal(stock, [[3.0, 4.0]])
    np.testing.assert_array_equal(ours, stock)


@pytest.mark.parametrize(
    "cls, input_shape",
    [
        (MaxPooling2D, (2, 4, 4, 1)),
        (AveragePooling1D, (2, 4, 1)),
        (GlobalAveragePooling1D, (2, 4, 1)),
        (GlobalMaxPooling2D, (2, 3, 3, 1)),
        (MaxPooling3D, (2, 4, 4, 4, 1)),
        (AveragePooling3D, (2, 4, 4, 4, 1)),
    ],
)
def test_a_subclass_overriding_build_has_its_build_run(cls, input_shape):
    """Issue 21 item 7: the stateless pooling layers marked themselves built in ``__init__``, so
    a subclass's ``build`` never ran; as Keras, they are built at construction only when
    ``build`` is not overridden."""

    class Recording(cls):
        def build(self, shape):
            self.seen = tuple(shape)
            super().build(shape)

    assert cls().built
    layer = Recording()
    assert not layer.built
    layer(np.zeros(input_shape))
    assert layer.built and layer.seen == input_shape


@pytest.mark.parametrize(
    "cls, permute",
    [
        (MaxPooling1D, r"Permute\(\(2, 1\)\)"),
        (AveragePooling1D, r"Permute\(\(2, 1\)\)"),
        (GlobalMaxPooling1D, r"Permute\(\(2, 1\)\)"),
        (GlobalAveragePooling1D, r"Permute\(\(2, 1\)\)"),
        (GlobalMaxPooling2D, r"Permute\(\(2, 3, 1\)\)"),
        (MaxPooling2D, r"Permute\(\(2, 3, 1\)\)"),
    ],
)
def test_channels_first_message_names_the_fix_for_the_layers_rank(cls, permute):
    """Issue 21 item 7: the 1-D and global pooling layers suggested the 2-D layout and its
    ``Permute((2, 3, 1))`` whatever their rank."""
    layout = "batch, length, channels" if "1D" in cls.__name__ else "batch, height, width"
    with pytest.raises(ValueError, match=rf"\({layout}.*{permute}"):
        cls(data_format="channels_first")
