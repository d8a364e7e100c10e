"""Embedding: ``Y = S(x) E`` with a scatter-add backward pass.

``tf_jacbp.testing.check_layer`` puts a trainable ``InputScale`` before the layer and needs a
gradient to reach it; integer ids have none. These tests run the kit's comparisons explicitly
instead: the reference route in float64 (1e-12) and float32, finite differences on the
embeddings, ``fit`` eagerly, as a graph and with XLA, mixed precision, a ``.keras`` round trip,
per-example rows against batches of one; plus stock ``keras.layers.Embedding`` in float64, the
materialized Jacobians, the norms without the ``V x D`` gradients, masks and bad input.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_jacbp
from tf_jacbp import jacobian, tolerances
from tf_jacbp.layers.dense import Dense
from tf_jacbp.layers.embedding import Embedding
from tf_jacbp.testing import assert_gradients_close, half_squared_error, model_gradients
from tf_jacbp.testing.contract import check_contract

RTOL64 = tolerances.rtol("float64")
V, D, T = 7, 3, 5  # vocabulary, embedding size, positions


def _model(dtype, dense=False, **kwargs):
    """``ids (batch, T) -> Embedding(V, D)``, optionally followed by ``Dense(2, tanh)``."""
    layers = [keras.Input((T,), dtype="int32"), Embedding(V, D, dtype=dtype, **kwargs)]
    if dense:
        layers.append(Dense(2, activation="tanh", dtype=dtype))
    model = keras.Sequential(layers)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    return model


def _data(model, batch=4, seed=1):
    """Ids with repeats within and across samples, and targets."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, size=(batch, T)).astype("int32")
    x[0, :2] = 3  # a repeated id in one sample
    t = rng.normal(size=model(x).shape)
    return x, tf.constant(t, model.layers[-1].compute_dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("dense", [False, True])
def test_jacobian_route_equals_the_reference_route(dtype, dense):
    model = _model(dtype, dense, embeddings_regularizer="l2")
    x, t = _data(model)
    grads = model_gradients(model, x, t, reference=False)
    refs = model_gradients(model, x, t, reference=True)
    assert_gradients_close(grads, refs, model.trainable_variables, dtype, f"{dtype} route")


def test_gradient_equals_finite_differences_on_the_embeddings():
    model = _model("float64", dense=True)
    x, t = _data(model)
    values = [tf.identity(v) for v in model.trainable_variables]

    def loss_at(embeddings):
        y, _ = model.stateless_call([embeddings, *values[1:]], [], x)
        return tf.reduce_mean(half_squared_error(t, y))

    theoretical, numerical = tf.test.compute_gradient(
        loss_at, [values[0]], delta=tolerances.FINITE_DIFFERENCE_DELTA
    )
    assert tolerances.relative_error(theoretical[0], numerical[0]) <= (
        tolerances.FINITE_DIFFERENCE_RTOL
    )


@pytest.mark.parametrize(
    "compile_args",
    [{"run_eagerly": True}, {"jit_compile": False}, {"jit_compile": True}],
    ids=["eager", "graph", "jit_compile"],
)
def test_fit_applies_the_reference_gradient(compile_args):
    """One SGD step with learning rate 1: the update is the gradient."""
    model = _model("float32", dense=True)
    x, t = _data(model)
    refs = model_gradients(model, x, t, reference=True)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=half_squared_error, **compile_args)
    before = [np.asarray(v) for v in model.trainable_variables]
    model.train_on_batch(x, t)
    update = [b - np.asarray(v) for b, v in zip(before, model.trainable_variables, strict=True)]
    assert_gradients_close(update, refs, model.trainable_variables, "float32", str(compile_args))


def test_mixed_precision_gives_float32_gradients_equal_to_the_reference():
    model = _model("mixed_float16", dense=True)
    x, t = _data(model)
    assert model.layers[0].compute_dtype == "float16"
    grads = model_gradients(model, x, t, reference=False)
    refs = model_gradients(model, x, t, reference=True)
    for g in grads:
        assert g.dtype == np.float32
    assert_gradients_close(grads, refs, model.trainable_variables, "float16", "mixed_float16")


def test_keras_round_trip_gives_identical_predictions_and_gradients(tmp_path):
    model = _model("float32", dense=True, mask_zero=True, embeddings_constraint="non_neg")
    x, t = _data(model)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.layers[0]) is Embedding
    assert loaded.layers[0].get_config() == model.layers[0].get_config()
    np.testing.assert_array_equal(loaded(x), model(x))
    for g, r in zip(
        model_gradients(loaded, x, t, False), model_gradients(model, x, t, False), strict=True
    ):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("dense", [False, True])
def test_per_example_gradients_equal_batches_of_one(dense):
    model = _model("float64", dense)
    x, t = _data(model)
    rows = jacobian.per_example_gradients(model, x, t, loss=half_squared_error, flatten=False)
    flat = jacobian.per_example_gradients(model, x, t, loss=half_squared_error)
    assert rows[0].shape == (4, V, D)
    for i in range(4):
        refs = model_gradients(model, x[i : i + 1], t[i : i + 1], reference=True)  # mean of one
        for g, r in zip(rows, refs, strict=True):
            assert tolerances.relative_error(g[i], r) <= RTOL64
        vec = np.concatenate([r.reshape(-1, order="F") for r in refs])
        assert tolerances.relative_error(flat[i], vec) <= RTOL64


@pytest.mark.parametrize("dense", [False, True])
def test_norms_without_the_gradients_equal_the_materialized_norms(dense):
    """``sum_v ||sum_{p: x_p = v} delta_p||^2`` by sorting, against the ``(batch, V, D)`` rows;
    also compiled with XLA (static shapes)."""
    model = _model("float64", dense)
    x, t = _data(model, batch=5)
    x[1] = 2  # one sample of a single repeated id
    rows = jacobian.per_example_gradients(model, x, t, loss=half_squared_error, flatten=False)
    expected = np.stack([np.sum(np.square(g).reshape(5, -1), axis=1) for g in rows], 1)
    norms = jacobian.per_example_gradient_norms(
        model, x, t, loss=half_squared_error, per_variable=True
    )
    assert tolerances.relative_error(np.square(norms), expected) <= RTOL64
    layer = model.layers[0]
    delta = tf.constant(np.random.default_rng(2).normal(size=(5, T, D)))
    params = layer.read_parameters()
    _, (g,) = layer.per_example_backward(delta, tf.constant(x), None, *params)
    materialized = np.sum(np.square(g).reshape(5, -1), axis=1)
    for compiled in (False, True):
        fn = tf.function(layer.per_example_squared_norms, jit_compile=True)
        (fast,) = (fn if compiled else layer.per_example_squared_norms)(delta, x, None, *params)
        assert tolerances.relative_error(fast, materialized) <= RTOL64


def test_backward_is_the_transposed_parameter_jacobian_and_that_equals_autodiff():
    """``J_E y`` (rows of position ``p``: ``[I_D (x) s_p^T]``) equals ``tape.jacobian`` in
    ``Vec`` order; its transpose times ``delta`` is the scatter-add, ``Vec(S^T Delta)``."""
    layer = _model("float64").layers[0]
    x = tf.constant([4, 1, 4, 0, 6])
    embeddings = tf.identity(layer.embeddings)
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        y = tf.reshape(layer.reference(x, embeddings), [-1])
    expected = np.asarray(tape.jacobian(y, embeddings)).transpose(0, 2, 1).reshape(T * D, V * D)
    np.testing.assert_array_equal(layer.parameter_jacobian(x), expected)
    np.testing.assert_array_equal(layer.parameter_jacobian(x[None])[0], expected)
    factors = layer.jacobian_factors(x)
    np.testing.assert_array_equal(factors["S(x)"], np.eye(V)[x.numpy()])
    np.testing.assert_array_equal(factors["[I (x) s^T]"], expected)
    delta = tf.constant(np.random.default_rng(3).normal(size=(1, T, D)))
    _, (de,) = layer.backward(delta, x[None], None, embeddings)
    materialized = tf.linalg.matvec(expected, tf.reshape(delta, [-1]), transpose_a=True)
    assert tolerances.relative_error(np.asarray(de).reshape(-1, order="F"), materialized) <= (
        RTOL64
    )
    one_hot = factors["S(x)"]  # S^T Delta as a product, the formula the scatter-add computes
    assert tolerances.relative_error(de, tf.transpose(one_hot) @ delta[0]) <= RTOL64


def test_parameter_jacobian_of_a_model_equals_autodiff():
    model = _model("float64", dense=True)
    x, _ = _data(model, batch=2)
    variables = jacobian.parameter_variables(model)
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            out = tf.reshape(model(x), [2, -1])
    blocks = []
    for b in tape.jacobian(out, variables):
        b = np.asarray(tf.convert_to_tensor(b))
        trailing = list(range(b.ndim - 1, 1, -1))
        blocks.append(np.transpose(b, [0, 1, *trailing]).reshape(*b.shape[:2], -1))
    got = jacobian.parameter_jacobian(model, x)
    assert tolerances.relative_error(got, np.concatenate(blocks, -1)) <= RTOL64


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 3),
    positions=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    input_dim=st.integers(1, 6),
    output_dim=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_matches_keras_embedding_values_and_gradients_in_float64(
    batch, positions, input_dim, output_dim, seed
):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, input_dim, size=(batch, *positions))
    ours = Embedding(input_dim, output_dim, dtype="float64")
    stock = keras.layers.Embedding(input_dim, output_dim, dtype="float64")
    ours.build(x.shape)
    stock.build(x.shape)
    ours.set_weights([rng.normal(size=(input_dim, output_dim))])
    stock.set_weights(ours.get_weights())
    probe = tf.constant(rng.normal(size=(*x.shape, output_dim)))
    results = []
    for layer in (ours, stock):
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(y * probe)
        results.append([y, tf.convert_to_tensor(tape.gradient(loss, layer.embeddings))])
    for got, expected in zip(*results, strict=True):
        assert tolerances.relative_error(got, expected) <= RTOL64


def test_ids_stay_integers_and_other_dtypes_are_cast_as_keras_does():
    layer = Embedding(V, D, dtype="float64")
    stock = keras.layers.Embedding(V, D, dtype="float64")
    layer.build()
    stock.build()
    stock.set_weights(layer.get_weights())
    for ids in (np.array([[1, 6]], "int64"), np.array([[1.0, 6.0]], "float32")):
        np.testing.assert_array_equal(layer(ids), stock(ids))


def test_mask_zero_masks_the_padding_as_keras_does():
    ids = np.array([[0, 2, 0, 5]])
    ours, stock = Embedding(V, D, mask_zero=True), keras.layers.Embedding(V, D, mask_zero=True)
    assert ours.supports_masking and not Embedding(V, D).supports_masking
    np.testing.assert_array_equal(ours.compute_mask(ids), stock.compute_mask(ids))
    assert Embedding(V, D).compute_mask(ids) is None
    # The mask reaches the next layer; Dense passes it on, as Keras' Dense does.
    y = Dense(2)(ours(ids))
    np.testing.assert_array_equal(y._keras_mask, stock.compute_mask(ids))


def test_weights_argument_sets_the_initial_embeddings():
    e = np.arange(V * D, dtype="float32").reshape(V, D)
    np.testing.assert_array_equal(Embedding(V, D, weights=e)(np.array([[2]])), e[None, [2]])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("bad", [V, -V - 1])
def test_ids_outside_the_vocabulary_are_a_clear_error(bad, compiled):
    layer = Embedding(V, D)
    ids = tf.constant([[1, bad]])
    call = tf.function(layer) if compiled else layer
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"must lie in \[-input_dim, input_dim\)"
    ):
        call(ids)


def _values_and_gradients(layer, ids, probe, route):
    def run(ids):
        with tf.GradientTape() as tape:
            y = layer(ids)
            loss = tf.reduce_sum(y * probe)
        return y, tf.convert_to_tensor(tape.gradient(loss, layer.embeddings))

    if route == "eager":
        return run(ids)
    return tf.function(run, jit_compile=route == "jit_compile")(ids)


@pytest.mark.parametrize("route", ["eager", "graph", "jit_compile"])
def test_negative_ids_count_from_the_end_as_stock(route):
    """Issue 21 item 8: stock Keras (``ops.take``) reads id ``-k`` as row ``V - k`` on every
    route; ours refused it eagerly and in a graph and read row 0 under XLA (which clamps). Values
    and embedding gradients equal stock's for ids in ``[-V, V)``; under XLA, ids outside clamp
    after the wrap, as stock's."""
    ours, stock = Embedding(V, D, dtype="float64"), keras.layers.Embedding(V, D, dtype="float64")
    for layer in (ours, stock):
        layer.build((None, 4))
    ours.set_weights([np.random.default_rng(4).normal(size=(V, D))])
    stock.set_weights(ours.get_weights())
    ids = tf.constant([[-1, 3, -V, -1], [6, -2, 0, -3]])
    probe = tf.constant(np.random.default_rng(5).normal(size=(2, 4, D)))
    got = _values_and_gradients(ours, ids, probe, route)
    expected = _values_and_gradients(stock, ids, probe, route)
    np.testing.assert_array_equal(got[0], np.asarray(ours.embeddings)[np.asarray(ids) % V])
    for g, e in zip(got, expected, strict=True):
        assert tolerances.relative_error(g, e) <= RTOL64
    if route == "jit_compile":
        outside = tf.constant([[-V - 1, V, 1, -1]])
        np.testing.assert_array_equal(
            tf.function(ours, jit_compile=True)(outside),
            tf.function(stock, jit_compile=True)(outside),
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_dim": 0}, "input_dim=0"),
        ({"output_dim": "3"}, "output_dim='3'"),
        ({"mask_zero": "yes"}, "mask_zero='yes'"),
        ({"lora_rank": 2}, "lora_rank=2 is not supported"),
        ({"quantization_config": "int8"}, "quantization_config='int8' is not supported"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = {"input_dim": V, "output_dim": D, **kwargs}
    with pytest.raises(ValueError, match=match):
        Embedding(**args)


def test_input_length_warns_and_is_ignored_as_keras_does():
    with pytest.warns(UserWarning, match="input_length"):
        layer = Embedding(V, D, input_length=T)
    assert "input_length" not in layer.get_config()


def test_ragged_ids_are_refused_with_the_conversion():
    with pytest.raises(TypeError, match="to_tensor"):
        Embedding(V, D)(tf.ragged.constant([[1, 2], [3]]))


def test_large_ids_survive_the_jacobian_walk_under_mixed_float16():
    """float16 holds integers exactly only up to 2048: the walk must not cast the ids (it cast
    them to the first layer's compute dtype, and id 4097 became 4096)."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((2,), dtype="int32"), Embedding(4100, 1)])
    finally:
        keras.config.set_dtype_policy("float32")
    x, t = np.array([[4097, 5]], "int32"), np.zeros((1, 2, 1), "float32")
    (rows,) = jacobian.per_example_gradients(model, x, t, loss=half_squared_error, flatten=False)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(rows[0, :, 0])), [5, 4097])


def test_the_contract_products_equal_autodiff_of_the_reference_route():
    """``vjp_params`` for ``V = 1`` and ``V = 3`` (summed and per sample), ``squared_norms`` and
    the derived rows against autodiff of ``reference``, with repeated and negative ids."""
    layer = _model("float64").layers[0]
    ids = tf.constant([[3, 3, -1, 0, 6], [2, -7, 5, 5, 5], [1, 1, 1, 1, 1]])
    check_contract(layer, ids, seed=7)


def test_the_jacobians_of_an_unbuilt_embedding_build_it():
    """``parameter_jacobian`` on a fresh layer builds it first (as Dense's does); each sample
    position selects one row: ``J_E y`` has a single one per output entry."""
    layer = Embedding(5, 2, dtype="float64")
    jacobian = np.asarray(layer.parameter_jacobian(np.array([1, 2, 1])))
    assert layer.built and jacobian.shape == (6, 10)
    np.testing.assert_array_equal(jacobian.sum(axis=1), np.ones(6))
