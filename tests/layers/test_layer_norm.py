"""LayerNormalization: every mode of the harness, agreement with keras.layers.LayerNormalization
in float64, the materialized per-sample Jacobians, Algorithm 1 through it, bad arguments."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from algorithm_1 import assert_algorithm_1_equals_autodiff
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_jacbp
from tf_jacbp import jacobian, layers, tolerances
from tf_jacbp.contract import squared_norms_of as squared_norms
from tf_jacbp.layers.layer_norm import LayerNormalization
from tf_jacbp.testing import check_layer as run_layer_test

RTOL64 = tolerances.rtol("float64")
# Stock LayerNormalization warns on every call with rms_scaling=True; ours warns when constructed.
pytestmark = pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`:UserWarning")
INITIALIZERS = {"gamma_initializer": "random_normal", "beta_initializer": "random_normal"}


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [
        ((5,), {}),
        ((3, 4), {}),
        ((3, 4), {"axis": [1, 2], "gamma_regularizer": "l2", **INITIALIZERS}),
        ((3, 4), {"rms_scaling": True, **INITIALIZERS}),
    ],
)
def test_layer_norm_every_mode(input_shape, kwargs, tmp_path):
    """Rank-2 and rank-3 inputs, the default last axis and two axes, rms_scaling."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_scaling's deprecation warning, as Keras'
        run_layer_test(
            lambda dtype: LayerNormalization(dtype=dtype, **kwargs), input_shape, tmp_dir=tmp_path
        )


def _twins(shape, seed, **kwargs):
    """Ours and stock, built, with the same random gamma and beta."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = LayerNormalization(dtype="float64", **kwargs)
        stock = keras.layers.LayerNormalization(dtype="float64", **kwargs)
    ours.build(shape)
    stock.build(shape)
    rng = np.random.default_rng(seed)
    for mine, theirs in zip(ours.weights, stock.weights, strict=True):
        value = rng.normal(size=mine.shape)
        mine.assign(value)
        theirs.assign(value)
    return ours, stock


def _value_and_gradients(layer, x, dy, reference=False):
    with tf.GradientTape() as tape:
        tape.watch(x)
        if reference:
            with tf_jacbp.reference_mode():
                y = layer(x)
        else:
            y = layer(x)
    grads = tape.gradient(y, [x, *layer.trainable_weights], output_gradients=dy)
    return [np.asarray(y)] + [np.asarray(g) for g in grads]


@st.composite
def configurations(draw):
    rank = draw(st.integers(2, 4))
    shape = (draw(st.integers(1, 3)),) + tuple(draw(st.integers(1, 4)) for _ in range(rank - 1))
    axes = draw(st.lists(st.integers(1, rank - 1), min_size=1, max_size=rank - 1, unique=True))
    axis = draw(st.sampled_from([axes, [a - rank for a in axes]]))
    if len(axis) == 1 and draw(st.booleans()):
        axis = axis[0]
    kwargs = {
        "axis": axis,
        "epsilon": draw(st.sampled_from([1e-3, 1e-5, 0.5])),
        "center": draw(st.booleans()),
        "scale": draw(st.booleans()),
        "rms_scaling": draw(st.booleans()),
    }
    return shape, kwargs


@settings(max_examples=12, deadline=None)
@given(configuration=configurations(), seed=st.integers(0, 2**16))
def test_layer_norm_equals_keras_in_float64(configuration, seed):
    """Values and the gradients with respect to the input, gamma and beta equal
    ``keras.layers.LayerNormalization``'s to 1e-12 in float64, for drawn shapes (rank 2 to 4),
    axes (one or several, positive or negative), epsilon, center, scale and rms_scaling; the
    reference route too."""
    shape, kwargs = configuration
    ours, stock = _twins(shape, seed, **kwargs)
    rng = np.random.default_rng(seed + 1)
    x = tf.constant(rng.normal(size=shape) * 2 + rng.normal())
    dy = tf.constant(rng.normal(size=shape))
    expected = _value_and_gradients(stock, x, dy)
    for reference in (False, True):
        got = _value_and_gradients(ours, x, dy, reference)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert tolerances.relative_error(g, e) <= RTOL64
    assert ours.axis == stock.axis  # as Keras after build: a sorted list


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((3, 5), {}),
        ((2, 3, 4), {}),
        ((2, 3, 4, 2), {"axis": [1, 3]}),
        ((2, 3, 4), {"rms_scaling": True}),
        ((2, 3, 4), {"axis": [-1, -2], "center": False}),
    ],
)
def test_materialized_jacobians_equal_autodiff(shape, kwargs):
    """``input_jacobian`` equals ``tape.batch_jacobian`` of the stock layer; per sample,
    ``jacobian_factors`` gives the same ``J_x y`` and ``[diag(xhat) | I]`` equal to
    ``tape.jacobian`` with respect to gamma and beta (columns in Vec order)."""
    ours, stock = _twins(shape, 4, **kwargs)
    x = tf.constant(np.random.default_rng(5).normal(size=shape))
    size = int(np.prod(shape[1:]))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = stock(x)
        y0 = tf.reshape(stock(x[:1]), [-1])
    expected = tf.reshape(tape.batch_jacobian(y, x), [shape[0], size, size])
    assert tolerances.relative_error(ours.input_jacobian(x), expected) <= RTOL64
    factors = ours.jacobian_factors(x[0])
    assert tolerances.relative_error(factors["J_x y"], expected[0]) <= RTOL64
    blocks = []
    for v in stock.trainable_weights:
        j = np.asarray(tape.jacobian(y0, v))  # (size, *v.shape): Vec is column-major
        blocks.append(j.transpose(0, *range(j.ndim - 1, 0, -1)).reshape(size, -1))
    (name,) = [k for k in factors if k != "J_x y"]
    assert tolerances.relative_error(factors[name], np.concatenate(blocks, axis=1)) <= RTOL64


def test_jacobian_is_the_formula_for_one_vector():
    """``J_x y = diag(gamma) (1/s) (I - 11^T/n - xhat xhat^T/n)``, written out in NumPy; it kills
    constant shifts (``J 1 = 0``) and ``J^T delta`` is the backward pass."""
    layer, _ = _twins((1, 6), 6, epsilon=0.1)
    x = np.random.default_rng(7).normal(size=6)
    gamma = np.asarray(layer.gamma)
    s = np.sqrt(x.var() + 0.1)
    xhat = (x - x.mean()) / s
    formula = np.diag(gamma) @ (np.eye(6) - 1 / 6 - np.outer(xhat, xhat) / 6) / s
    jac = np.asarray(layer.input_jacobian(x[None])[0])
    np.testing.assert_allclose(jac, formula, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(jac @ np.ones(6), 0.0, atol=1e-14)
    delta = np.random.default_rng(8).normal(size=6)
    params = layer.read_parameters()
    dx, _ = layer.backward(tf.constant(delta[None]), tf.constant(x[None]), None, *params)
    assert tolerances.relative_error(dx[0], jac.T @ delta) <= RTOL64


@pytest.mark.parametrize("input_shape", [(4,), (3, 4)])
def test_algorithm_1_walks_layer_norm(input_shape):
    """``parameter_jacobian`` and ``per_example_gradients`` of a model with LayerNormalization
    against ``tape.jacobian`` of the reference route; its per-example squared norms against the
    per-example gradients."""
    model = keras.Sequential(
        [
            keras.Input(input_shape, dtype="float64"),
            LayerNormalization(axis=-1, dtype="float64", **INITIALIZERS),
            layers.Flatten(dtype="float64"),
            layers.Dense(2, activation="tanh", dtype="float64"),
        ]
    )
    x = tf.constant(np.random.default_rng(9).normal(size=(3, *input_shape)))
    y = tf.constant(np.random.default_rng(10).normal(size=(3, 2)))
    variables = assert_algorithm_1_equals_autodiff(model, x, y)
    assert [v.path.split("/")[-1] for v in variables][:2] == ["gamma", "beta"]

    layer = model.layers[0]
    factors = jacobian.layer_jacobians(model, x[0])
    size = int(np.prod(input_shape))
    assert factors[f"{layer.name}: J_x y"].shape == (size, size)
    assert factors[f"{layer.name}: [diag(xhat) | I]"].shape == (size, 2 * input_shape[-1])
    dy = tf.constant(np.random.default_rng(11).normal(size=(3, *input_shape)))
    params = layer.read_parameters()
    norms = layer.per_example_squared_norms(dy, x, None, *params)
    _, grads = layer.per_example_backward(dy, x, None, *params)
    for n, g in zip(norms, grads, strict=True):
        np.testing.assert_allclose(n, squared_norms(g), rtol=1e-14)


def test_config_round_trip_and_keras_conventions():
    """The config has stock's keys; ``from_config`` rebuilds the layer; a mask passes through;
    gamma and beta stay float32 under mixed precision while the output is float16."""
    layer = LayerNormalization(axis=(1, 2), epsilon=1e-4, center=False, gamma_regularizer="l2")
    layer.build((None, 3, 4))
    stock = keras.layers.LayerNormalization(axis=(1, 2))
    stock.build((None, 3, 4))
    config = layer.get_config()
    assert set(config) == set(stock.get_config())
    assert config["axis"] == stock.axis == [1, 2]
    clone = LayerNormalization.from_config(config)
    clone.build((None, 3, 4))
    assert [v.shape for v in clone.weights] == [(3, 4)] and clone.epsilon == 1e-4
    assert layer.supports_masking and layer.beta is None
    inputs = keras.Input((3, 4))
    out = LayerNormalization()(keras.layers.Masking()(inputs))
    x = np.ones((1, 3, 4), "float32")
    x[0, 1] = 0.0
    np.testing.assert_array_equal(keras.Model(inputs, out)(x)._keras_mask, [[True, False, True]])
    mixed = LayerNormalization(dtype="mixed_float16")
    y = mixed(tf.constant(np.random.default_rng(0).normal(size=(2, 5)), tf.float32))
    assert y.dtype == tf.float16 and mixed.gamma.dtype == "float32"


@pytest.mark.parametrize(
    "kwargs, shape, error, match",
    [
        ({"axis": 0}, (2, 3), ValueError, r"axis=0 includes the batch axis"),
        ({"axis": [1, -2]}, (2, 3, 4), ValueError, r"axis=\[1, -2\] names an axis twice"),
        ({"axis": 3}, (2, 3, 4), ValueError, r"axis=3 is out of bounds"),
        ({"axis": "last"}, None, TypeError, r"axis must be an int.*axis='last'"),
        ({"axis": []}, None, TypeError, r"axis=\[\]"),
        ({"epsilon": -1.0}, None, ValueError, r"epsilon=-1.0"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, shape, error, match):
    with pytest.raises(error, match=match):
        layer = LayerNormalization(**kwargs)
        layer.build(shape)


def test_docstring_example_builds_the_layer():
    """The class docstring's example: ``input_jacobian`` on a layer not yet built builds it for
    the sample shape (gamma, beta of ones and zeros: ``J = (1/s) (I - 11^T/n - xhat xhat^T/n)``)."""
    layer = LayerNormalization(dtype="float64")
    x = np.random.default_rng(0).normal(size=(2, 3))
    jac = layer.input_jacobian(x)
    assert jac.shape == (2, 3, 3) and layer.built and layer.gamma.shape == (3,)
    np.testing.assert_allclose(np.asarray(jac) @ np.ones(3), 0.0, atol=1e-14)
    np.testing.assert_allclose(jac, np.transpose(jac, (0, 2, 1)), atol=1e-15)  # gamma = 1


def test_unknown_normalized_size_is_an_error():
    with pytest.raises(ValueError, match="must be known"):
        LayerNormalization().build((None, None))


def test_rms_scaling_warns_as_keras_does():
    with pytest.warns(UserWarning, match="rms_scaling=True is deprecated"):
        layer = LayerNormalization(rms_scaling=True)
    layer.build((None, 3))
    assert layer.beta is None and layer.gamma is not None


@pytest.mark.parametrize(
    "axis, built, shape",
    [
        (-1, (None, 3, 4), (2, 4)),
        (-1, (None, 3, 4), (2, 5, 3, 4)),
        (-1, (None, 4), (2, 3, 4)),
        (1, (None, 4), (2, 4, 3)),
        ([1, 2], (None, 3, 4), (2, 3, 4, 5)),
        ([-2, -1], (None, 3, 4), (2, 5, 3, 4)),
    ],
)
def test_inputs_of_another_rank_than_built_are_accepted_like_keras(axis, built, shape):
    """Issue 21 item 7: stock LayerNormalization takes inputs of any rank whose normalized axes
    have gamma's shape (it keeps the axes as given: ``-1`` is the last axis of every input,
    ``1`` the second); ours refused every rank but the one it was built with. Values and the
    gradients (input, gamma, beta) against stock in float64, both routes, eagerly and traced."""
    ours, stock = _twins(built, 12, axis=axis)
    rng = np.random.default_rng(13)
    x = tf.constant(rng.normal(size=shape) * 2 + 1)
    dy = tf.constant(rng.normal(size=shape))
    expected = _value_and_gradients(stock, x, dy)
    for reference in (False, True):
        got = _value_and_gradients(ours, x, dy, reference)
        for g, e in zip(got, expected, strict=True):
            assert tolerances.relative_error(g, e) <= RTOL64
    traced = tf.function(lambda x: ours(x))(x)
    assert tolerances.relative_error(traced, expected[0]) <= RTOL64
    inputs = keras.Input(shape[1:], dtype="float64")  # a functional model at the new rank
    model = keras.Model(inputs, ours(inputs))
    assert tolerances.relative_error(model(x), expected[0]) <= RTOL64


@pytest.mark.parametrize(
    "axis, built, shape, match",
    [
        (-1, (None, 3, 4), (2, 3, 5), r"axis=\[-1\].*\(5,\).*gamma.*\(4,\)"),
        (1, (None, 4), (2, 3, 4), r"axis=\[1\].*\(3,\).*\(4,\)"),
        (2, (None, 3, 4), (2, 4), r"axis=\[2\] is out of bounds for inputs of rank 2"),
        (-2, (None, 3, 4), (3, 4), r"includes the batch axis"),
    ],
)
def test_inputs_whose_normalized_axes_do_not_fit_name_the_axes(axis, built, shape, match):
    """Where stock fails with TensorFlow's reshape or index error (or, for the batch axis,
    normalizes across samples: no per-sample Jacobian), ours names the axis and the shapes, eagerly
    and in a functional model."""
    layer = LayerNormalization(axis=axis, dtype="float64")
    layer.build(built)
    with pytest.raises(ValueError, match=match):
        layer(np.zeros(shape))
    with pytest.raises(ValueError, match=match):
        layer(keras.Input(shape[1:], batch_size=shape[0]))


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((3, 5), {}),
        ((2, 3, 4), {"axis": -2}),
        ((2, 3, 4, 2), {"axis": [1, 3], "rms_scaling": True}),
        ((2, 3, 4), {"axis": [-1, -2], "center": False}),
    ],
)
def test_products_for_three_vectors_equal_autodiff(shape, kwargs):
    """The contract with ``V = 3`` vectors per sample: ``vjp_input`` and ``vjp_params`` with
    ``sum_batch`` both ways against autodiff of the stock layer, each vector and sample alone."""
    ours, stock = _twins(shape, 14, **kwargs)
    rng = np.random.default_rng(15)
    x = tf.constant(rng.normal(size=shape) * 2 + 1)
    m = tf.constant(rng.normal(size=(3, *shape)))
    params = ours.read_parameters()
    dx = ours.vjp_input(m, x, None, *params)
    per_sample = ours.vjp_params(m, x, None, *params, sum_batch=False)
    summed = ours.vjp_params(m, x, None, *params)
    for v in range(3):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = stock(x)
            losses = tf.reduce_sum(tf.reshape(m[v] * y, [shape[0], -1]), axis=1)
            total = tf.reduce_sum(losses)
        assert tolerances.relative_error(dx[v], tape.gradient(y, x, m[v])) <= RTOL64
        weights = stock.trainable_weights
        for got, want in zip(per_sample, tape.jacobian(losses, weights), strict=True):
            assert got.shape == (3, *want.shape)
            assert tolerances.relative_error(got[v], want) <= RTOL64
        for got, want in zip(summed, tape.gradient(total, weights), strict=True):
            assert tolerances.relative_error(got[v], want) <= RTOL64


def test_no_class_defines_what_the_contract_derives():
    from tf_jacbp.contract import DERIVED

    for name in (*DERIVED, "input_jacobian", "parameter_jacobian", "jacobian"):
        assert name not in LayerNormalization.__dict__, name
