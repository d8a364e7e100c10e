"""Dense: every mode and comparison of the harness, the paper's 3 x 15 example, inputs of any
rank (the last axis, as Keras), the activation set after construction, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_jacbp
from tf_jacbp import jacobian, layers, tolerances
from tf_jacbp.layers.dense import Dense
from tf_jacbp.testing import check_layer as run_layer_test
from tf_jacbp.testing import half_squared_error

RTOL64 = tolerances.rtol("float64")


# modes=False: the formulas only (fit modes, mixed precision and saving are the class's, run
# for the configurations with modes=True).
@pytest.mark.parametrize(
    "kwargs, modes",
    [
        ({}, True),
        ({"activation": "relu"}, False),
        ({"activation": "tanh", "use_bias": False}, False),
        ({"activation": "softmax"}, True),
        ({"activation": "sigmoid", "kernel_regularizer": "l2"}, True),
        ({"activation": "gelu"}, False),  # D needs z, not only a
    ],
)
def test_dense_every_mode(kwargs, modes, tmp_path):
    run_layer_test(
        lambda dtype: layers.Dense(4, dtype=dtype, **kwargs), (5,), tmp_dir=tmp_path, modes=modes
    )


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


def test_rank_1_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"rank at least 2.*x\[None\]"):
        Dense(3).build((4,))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lora_rank": 2}, "lora_rank=2 is not supported"),
        ({"quantization_config": "int8"}, "quantization_config='int8' is not supported"),
    ],
)
def test_lora_and_quantization_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Dense(3, **kwargs)


def test_the_refusal_lives_in_the_base_and_dense_re_exports_it():
    """The convolutions and Embedding take ``refuse_unsupported`` from ``layers.base`` (issue 21
    item 9); ``layers.dense`` re-exports the same function for older imports."""
    from tf_jacbp.layers import base, dense

    assert dense.refuse_unsupported is base.refuse_unsupported
    assert dense._UNSUPPORTED is base._UNSUPPORTED
    kwargs = {"lora_rank": None, "units": 3}
    base.refuse_unsupported("Dense", kwargs)  # None is Keras' default: popped, accepted
    assert kwargs == {"units": 3}


# --- inputs of any rank: the kernel acts on the last axis at every position -------------------


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [
        ((3, 5), {"activation": "softmax", "kernel_regularizer": "l2"}),
        ((2, 3, 4), {"activation": "gelu", "use_bias": False}),
    ],
)
def test_dense_on_positions_every_mode(input_shape, kwargs, tmp_path):
    run_layer_test(lambda dtype: Dense(4, dtype=dtype, **kwargs), input_shape, tmp_dir=tmp_path)


def _set_weights(layer_or_model, seed):
    rng = np.random.default_rng(seed)
    layer_or_model.set_weights([rng.normal(size=w.shape) for w in layer_or_model.get_weights()])


@pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")  # units=1, as stock
@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 3),
    positions=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    features=st.integers(1, 4),
    units=st.integers(1, 4),
    activation=st.sampled_from([None, "relu", "tanh", "sigmoid", "softmax"]),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_keras_dense_values_and_gradients_in_float64(
    batch, positions, features, units, activation, use_bias, seed
):
    """Same weights, float64: outputs and the gradients of a random projection of them with
    respect to the input, the kernel and the bias equal stock ``keras.layers.Dense``'s."""
    shape = (batch, *positions, features)
    ours = Dense(units, activation=activation, use_bias=use_bias, dtype="float64")
    stock = keras.layers.Dense(units, activation=activation, use_bias=use_bias, dtype="float64")
    ours.build(shape)
    stock.build(shape)
    _set_weights(ours, seed)
    stock.set_weights(ours.get_weights())
    rng = np.random.default_rng(seed + 1)
    x = tf.constant(rng.normal(size=shape))
    probe = tf.constant(rng.normal(size=(*shape[:-1], units)))
    results = []
    for layer in (ours, stock):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * probe)
        results.append([y, *tape.gradient(loss, [x, *layer.trainable_variables])])
    for got, expected in zip(*results, strict=True):
        assert tolerances.relative_error(got, expected) <= RTOL64


def _sequence_model(units=(5, 2), activation="tanh", shape=(3, 4)):
    model = keras.Sequential(
        [
            keras.Input(shape, dtype="float64"),
            Dense(units[0], activation=activation, dtype="float64"),
            Dense(units[1], dtype="float64"),
        ]
    )
    _set_weights(model, 0)
    return model


def _reference_parameter_jacobian(model, x):
    """``tape.jacobian`` of the reference route, columns in theta order (``Vec`` column-major)."""
    variables = jacobian.parameter_variables(model)
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            out = tf.reshape(model(x), [x.shape[0], -1])
    blocks = []
    for b in tape.jacobian(out, variables):
        b = np.asarray(b)  # (batch, n_out, *variable shape)
        trailing = list(range(b.ndim - 1, 1, -1))  # Vec: the first index runs fastest
        blocks.append(np.transpose(b, [0, 1, *trailing]).reshape(*b.shape[:2], -1))
    return np.concatenate(blocks, axis=-1)


@pytest.mark.parametrize("activation", ["tanh", "softmax"])
def test_parameter_jacobian_of_a_sequence_model_equals_autodiff(activation):
    model = _sequence_model(activation=activation)
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 3, 4)))
    got = jacobian.parameter_jacobian(model, x)
    assert got.shape == (2, 3 * 2, 4 * 5 + 5 + 5 * 2 + 2)
    assert tolerances.relative_error(got, _reference_parameter_jacobian(model, x)) <= RTOL64


def test_per_example_gradients_on_positions_equal_batches_of_one():
    model = _sequence_model()
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(3, 3, 4)), rng.normal(size=(3, 3, 2))
    rows = jacobian.per_example_gradients(model, x, y, loss=half_squared_error, flatten=False)
    flat = jacobian.per_example_gradients(model, x, y, loss=half_squared_error)
    for i in range(3):
        with tf.GradientTape() as tape:
            with tf_jacbp.reference_mode():
                loss = tf.reduce_sum(half_squared_error(y[i : i + 1], model(x[i : i + 1])))
        refs = tape.gradient(loss, model.trainable_variables)
        for g, r in zip(rows, refs, strict=True):
            assert tolerances.relative_error(g[i], r) <= RTOL64
        vec = np.concatenate([np.asarray(r).reshape(-1, order="F") for r in refs])
        assert tolerances.relative_error(flat[i], vec) <= RTOL64


@pytest.mark.parametrize(
    "shape, units",
    [((2, 6), (3, 2)), ((8, 7), (9, 4)), ((2, 2, 3), (2, 2))],
    ids=["gram form", "outer form", "rank 4"],
)
def test_norms_on_positions_equal_the_norms_of_materialized_gradients(shape, units):
    """``||A_i^T Delta_i||^2`` by ``patch_product_squared_norms`` (Gram form when positions are
    few, outer form otherwise) and ``||Delta_i^T 1||^2``, against the materialized rows."""
    model = _sequence_model(units=units, shape=shape)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4, *shape)), rng.normal(size=(4, *shape[:-1], units[1]))
    rows = jacobian.per_example_gradients(model, x, y, loss=half_squared_error, flatten=False)
    expected = np.stack([np.sum(np.square(g).reshape(4, -1), axis=1) for g in rows], 1)
    norms = jacobian.per_example_gradient_norms(
        model, x, y, loss=half_squared_error, per_variable=True
    )
    assert tolerances.relative_error(np.square(norms), expected) <= RTOL64
    layer, a = model.layers[0], tf.constant(x)
    delta = tf.constant(rng.normal(size=(4, *shape[:-1], units[0])))
    params = layer.read_parameters()
    fast = layer.per_example_squared_norms(delta, a, None, *params)
    _, grads = layer.per_example_backward(delta, a, None, *params)
    for f, g in zip(fast, grads, strict=True):
        assert tolerances.relative_error(f, np.sum(np.square(g).reshape(4, -1), 1)) <= RTOL64


@pytest.mark.parametrize("activation", [None, "tanh", "softmax"])
def test_one_sample_of_positions_jacobians_equal_autodiff(activation):
    """For one sample ``(T, n)``: ``J_a = D (I_T (x) W^T)`` and ``J_{W,b}`` (rows of position
    ``t``: ``[I (x) a_t^T | I]``) equal ``tape.jacobian``; the factors multiply to ``J_a``."""
    layer = Dense(3, activation=activation, dtype="float64")
    layer.build((None, 4, 2))
    _set_weights(layer, 4)
    a = tf.constant(np.random.default_rng(5).normal(size=(4, 2)))
    kernel, bias = (tf.identity(v) for v in layer.trainable_variables)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([a, kernel, bias])
        z = layer.activation.reference(layer.reference(a[None], kernel, bias))
        y = tf.reshape(z, [-1])
    j_a = tf.reshape(tape.jacobian(y, a), [12, 8])
    assert tolerances.relative_error(layer.input_jacobian(a), j_a) <= RTOL64
    assert tolerances.relative_error(layer.input_jacobian(a[None])[0], j_a) <= RTOL64
    j_w = np.asarray(tape.jacobian(y, kernel)).transpose(0, 2, 1).reshape(12, 6)  # Vec order
    j_b = np.asarray(tape.jacobian(y, bias))
    factors = layer.jacobian_factors(a)
    if activation is None:  # z itself: the parameter Jacobian is J_{W,b} z
        expected = np.concatenate([j_w, j_b], axis=1)
        np.testing.assert_array_equal(layer.parameter_jacobian(a), expected)
        np.testing.assert_array_equal(factors["I_P (x) W^T"], j_a)
    np.testing.assert_array_equal(factors["[I (x) a^T | I]"], layer.parameter_jacobian(a))
    np.testing.assert_array_equal(layer.parameter_jacobian(a[None])[0], layer.parameter_jacobian(a))
    layer_jacobians = jacobian.layer_jacobians(keras.Sequential([keras.Input((4, 2)), layer]), a)
    name = layer.name
    chain = (
        layer_jacobians[f"{name}: D"] @ layer_jacobians[f"{name}: I_P (x) W^T"]
        if activation
        else layer_jacobians[f"{name}: I_P (x) W^T"]
    )
    assert tolerances.relative_error(chain, j_a) <= RTOL64


def test_sample_of_the_wrong_rank_is_a_clear_error():
    layer = Dense(3)
    layer.build((None, 4, 2))
    with pytest.raises(ValueError, match=r"one sample of rank 2 or a batch.*\(2,\)"):
        layer.parameter_jacobian(np.ones(2))


# --- the activation, set after construction as on keras.layers.Dense --------------------------


def test_activation_set_after_construction_is_used_and_saved(tmp_path):
    layer = Dense(2, use_bias=False, dtype="float64")
    layer.build((1, 2))
    layer.set_weights([np.array([[1.0, -2.0], [3.0, -4.0]])])
    x = np.array([[-1.0, 2.0]])
    np.testing.assert_array_equal(layer(x), [[5.0, -6.0]])
    layer.activation = "relu"
    np.testing.assert_array_equal(layer(x), [[5.0, 0.0]])
    with tf.GradientTape() as tape:
        tape.watch(x := tf.constant(x))
        y = tf.reduce_sum(layer(x))
    np.testing.assert_array_equal(tape.gradient(y, x), [[1.0, 3.0]])  # only unit 0 passes
    model = keras.Sequential([keras.Input((2,), dtype="float64"), layer])
    model.save(tmp_path / "m.keras")
    assert keras.models.load_model(tmp_path / "m.keras").layers[0].activation.name == "relu"
    layer.activation = None  # Keras' own test: None is linear again
    np.testing.assert_array_equal(layer(x), [[5.0, -6.0]])


def test_unknown_activation_set_after_construction_is_a_clear_error():
    layer = Dense(2)
    with pytest.raises(ValueError, match="Unknown activation='nonsense'"):
        layer.activation = "nonsense"
    assert layer.activation.name == "linear"  # unchanged


def test_changed_feature_count_after_build_is_an_error():
    layer = layers.Dense(2)
    layer(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 4"):
        layer(np.zeros((1, 5), "float32"))


def test_keras_activation_callable_set_after_construction_maps_to_ours():
    layer = Dense(2, dtype="float64")
    layer.activation = keras.activations.relu
    assert layer.activation.name == "relu"
    x = tf.constant([[-1.0, 2.0, 0.5]], "float64")
    np.testing.assert_array_equal(layer(x), tf.nn.relu(x @ layer.kernel + layer.bias))
    with pytest.raises(ValueError, match="Unknown activation=<function"):
        layer.activation = lambda z: z
    assert layer.activation.name == "relu"  # unchanged
