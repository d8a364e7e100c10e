"""BatchNormalization: every mode of the harness in training and inference mode, Keras' semantics
(outputs, gradients, moving statistics over several steps, mixed precision), the train-mode batch
Jacobian and the inference factors against autodiff, Algorithm 1's walk, bad arguments."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from algorithm_1 import assert_algorithm_1_equals_autodiff

import tf_jacbp
from tf_jacbp import jacobian, layers, tolerances
from tf_jacbp.callbacks import GradientCheck
from tf_jacbp.testing import (
    InputScale,
    assert_gradients_close,
    model_gradients,
    model_state,
    set_model_state,
)
from tf_jacbp.testing import check_layer as run_layer_test

RTOL64 = tolerances.rtol("float64")


def initializers(seed=0):
    """Non-trivial gamma, beta and moving statistics, so that no term of a formula vanishes."""
    normal, uniform = keras.initializers.RandomNormal, keras.initializers.RandomUniform
    return {
        "gamma_initializer": normal(1.0, 0.3, seed=seed),
        "beta_initializer": normal(0.0, 0.3, seed=seed + 1),
        "moving_mean_initializer": normal(0.0, 0.5, seed=seed + 2),
        "moving_variance_initializer": uniform(0.5, 2.0, seed=seed + 3),
    }


@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("input_shape", [(5,), (3, 4, 2)], ids=["2d", "4d"])
def test_batchnorm_every_mode(input_shape, training, tmp_path):
    def make(dtype):
        return layers.BatchNormalization(dtype=dtype, momentum=0.8, **initializers())

    run_layer_test(make, input_shape, tmp_dir=tmp_path, batch_size=4, training=training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize(
    "kwargs",
    [{"scale": False, "beta_regularizer": "l2"}, {"center": False, "epsilon": 0.1}],
    ids=["no scale", "no center"],
)
def test_without_gamma_or_beta_both_routes_agree(kwargs, training):
    """The harness's first check, float64, for the layers with one parameter."""
    model = keras.Sequential(
        [
            keras.Input((2, 3, 2), dtype="float64"),
            InputScale(dtype="float64"),
            layers.BatchNormalization(dtype="float64", **initializers(), **kwargs),
        ]
    )
    assert len(model.layers[-1].trainable_variables) == 1
    rng = np.random.default_rng(11)
    x, t = tf.constant(rng.normal(size=(3, 2, 3, 2))), tf.constant(rng.normal(size=(3, 2, 3, 2)))
    state = model_state(model)
    grads = model_gradients(model, x, t, reference=False, training=training)
    set_model_state(model, state)
    refs = model_gradients(model, x, t, reference=True, training=training)
    assert_gradients_close(grads, refs, model.trainable_variables, "float64", str(kwargs))
    assert len(model.losses) == ("beta_regularizer" in kwargs)


# --- Keras semantics ------------------------------------------------------------------------


def twin_models(input_shape, dtype, **kwargs):
    """Ours and Keras' ``BatchNormalization`` alone in a model, with the same initial weights."""
    ours = keras.Sequential(
        [keras.Input(input_shape), layers.BatchNormalization(dtype=dtype, **kwargs)]
    )
    stock = keras.Sequential(
        [keras.Input(input_shape), keras.layers.BatchNormalization(dtype=dtype, **kwargs)]
    )
    stock.set_weights(ours.get_weights())
    return ours, stock


def outputs_and_gradients(model, x, w, training):
    """``y`` and the gradients of ``sum(w * y^2)`` with respect to ``x`` and the variables."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=training)
        loss = tf.reduce_sum(w * tf.square(tf.cast(y, w.dtype)))
    return [y, *tape.gradient(loss, [x, *model.trainable_variables])]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("input_shape", [(3,), (3, 2, 4)], ids=["2d", "4d"])
def test_matches_keras_over_training_steps(input_shape, dtype):
    """Three SGD steps through ``fit``: moving statistics, gamma, beta, outputs and gradients
    (train and inference mode) all equal Keras' after every step."""
    rtol = tolerances.rtol(dtype)
    ours, stock = twin_models(input_shape, dtype, momentum=0.7, **initializers())
    for model in (ours, stock):
        model.compile(keras.optimizers.SGD(0.5), "mse")
    initial_mean = np.asarray(ours.layers[0].moving_mean)
    rng = np.random.default_rng(0)
    for step in range(3):
        x = tf.constant(rng.normal(2.0, 3.0, size=(5, *input_shape)), dtype)
        t = rng.normal(size=(5, *input_shape)).astype(dtype)
        ours.train_on_batch(x, t)
        stock.train_on_batch(x, t)
        for a, b in zip(ours.weights, stock.weights, strict=True):
            assert a.path.split("/")[-1] == b.path.split("/")[-1]
            err = tolerances.relative_error(a, b, dtype)
            assert err <= rtol, f"step {step}: {a.path} differs from Keras' by {err:.3g}"
        w = tf.constant(rng.normal(size=x.shape), dtype)
        for training in (True, False):
            state = [np.asarray(v) for v in ours.non_trainable_variables]
            got = outputs_and_gradients(ours, x, w, training)
            expected = outputs_and_gradients(stock, x, w, training)
            for g, e in zip(got, expected, strict=True):
                assert tolerances.relative_error(g, e, dtype) <= rtol
            for v, s in zip(stock.non_trainable_variables, state, strict=True):
                v.assign(s)  # undo the extra training call on both models
            for v, s in zip(ours.non_trainable_variables, state, strict=True):
                v.assign(s)
    moved = np.asarray(ours.layers[0].moving_mean) - initial_mean
    assert np.all(np.abs(moved) > 0.1), "the moving mean must have moved towards 2"


def test_moving_statistics_use_the_biased_variance_by_hand():
    layer = layers.BatchNormalization(momentum=0.75, dtype="float64")
    x = np.random.default_rng(1).normal(size=(6, 2, 2, 3)) * [1.0, 2.0, 3.0] + [0.5, -1.0, 4.0]
    layer(x, training=True)
    mean, var = x.reshape(-1, 3).mean(axis=0), x.reshape(-1, 3).var(axis=0, ddof=0)
    np.testing.assert_allclose(layer.moving_mean, 0.25 * mean, rtol=1e-13)
    np.testing.assert_allclose(layer.moving_variance, 0.75 + 0.25 * var, rtol=1e-13)
    with tf_jacbp.reference_mode():
        layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean, 0.4375 * mean, rtol=1e-13)


def test_training_mode_normalizes_with_the_batch_and_inference_with_the_moving_statistics():
    layer = layers.BatchNormalization(epsilon=0.0, dtype="float64", **initializers())
    x = np.random.default_rng(2).normal(3.0, 2.0, size=(8, 4))
    layer.build(x.shape)
    gamma, beta = np.asarray(layer.gamma), np.asarray(layer.beta)
    m, v = np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)
    np.testing.assert_allclose(layer(x), gamma * (x - m) / np.sqrt(v) + beta, rtol=1e-12)
    y = np.asarray(layer(x, training=True))
    np.testing.assert_allclose((y - beta) / gamma, (x - x.mean(0)) / x.std(0), rtol=1e-10)


def test_frozen_layer_runs_in_inference_mode_like_keras():
    ours, stock = twin_models((3,), "float64", **initializers())
    x = tf.constant(np.random.default_rng(3).normal(size=(4, 3)))
    for model in (ours, stock):
        model.layers[0].trainable = False
    state = [np.asarray(v) for v in ours.non_trainable_variables]
    np.testing.assert_allclose(ours(x, training=True), ours(x, training=False), rtol=0)
    np.testing.assert_allclose(ours(x, training=True), stock(x, training=True), rtol=1e-14)
    for v, s in zip(ours.non_trainable_variables, state, strict=True):
        np.testing.assert_array_equal(v, s)
    assert ours.layers[0].jacobian_ops(training=True)[0][0] is ours.layers[0]


@pytest.mark.parametrize("training", [True, False])
def test_mixed_float16_computes_in_float32_like_keras(training):
    keras.config.set_dtype_policy("mixed_float16")
    ours, stock = twin_models((2, 2, 3), None, momentum=0.5, **initializers())
    x = tf.constant(np.random.default_rng(4).normal(1.0, 2.0, size=(4, 2, 2, 3)), "float32")
    layer = ours.layers[0]
    assert layer.gamma.dtype == layer.moving_mean.dtype == "float32"
    y, y_stock = ours(x, training=training), stock(x, training=training)
    assert y.dtype == y_stock.dtype == "float16"
    assert tolerances.relative_error(y, y_stock, "float16") <= 1e-3
    for a, b in zip(ours.weights, stock.weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    w = tf.constant(np.random.default_rng(5).normal(size=x.shape), "float32")
    got = outputs_and_gradients(ours, x, w, training)
    expected = outputs_and_gradients(stock, x, w, training)
    for g, e in zip(got[2:], expected[2:], strict=True):
        assert g.dtype == "float32"
        assert tolerances.relative_error(g, e, "float16") <= tolerances.rtol("float16")


# --- the Jacobians --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 2, 2)], ids=["2d", "4d"])
@pytest.mark.parametrize("scale", [True, False])
def test_batch_jacobian_equals_autodiff_of_the_reference_route(shape, scale):
    layer = layers.BatchNormalization(scale=scale, dtype="float64", **initializers())
    x = tf.constant(np.random.default_rng(6).normal(size=shape))
    layer.build(x.shape)
    with tf.GradientTape() as tape:
        tape.watch(x)
        with tf_jacbp.reference_mode():
            y = layer(x, training=True)
    size = int(np.prod(shape))
    expected = tf.reshape(tape.jacobian(y, x), [size, size])
    full = layer.batch_jacobian(x)
    assert full.shape == (size, size)
    assert tolerances.relative_error(full, expected) <= RTOL64
    np.testing.assert_allclose(full, tf.transpose(full), atol=1e-15)  # J is symmetric
    # Per channel: the blocks of the row-major matrix. J 1 = 0 (a shift of the channel changes
    # nothing); J xhat = (gamma / s) (eps / (sigma^2 + eps)) xhat, zero only when eps = 0.
    blocks = np.asarray(layer.batch_jacobian(x, per_channel=True))
    channels = shape[-1]
    gamma = np.asarray(layer.gamma) if scale else np.ones(channels)
    for c in range(channels):
        np.testing.assert_array_equal(blocks[c], np.asarray(full)[c::channels, c::channels])
        column = np.asarray(x).reshape(-1, channels)[:, c]
        np.testing.assert_allclose(blocks[c] @ np.ones_like(column), 0.0, atol=1e-12)
        variance = column.var()
        s = np.sqrt(variance + layer.epsilon)
        xhat = (column - column.mean()) / s
        expected = gamma[c] / s * layer.epsilon / (variance + layer.epsilon) * xhat
        np.testing.assert_allclose(blocks[c] @ xhat, expected, rtol=1e-9)
    # Its transpose times delta is the backward pass of the Jacobian route.
    delta = tf.constant(np.random.default_rng(7).normal(size=shape))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    dx = tape.gradient(y, x, output_gradients=delta)
    materialized = tf.linalg.matvec(full, tf.reshape(delta, [-1]), transpose_a=True)
    assert tolerances.relative_error(tf.reshape(dx, [-1]), materialized) <= RTOL64


@pytest.mark.parametrize("sample_shape", [(4,), (2, 3, 2)], ids=["features", "image"])
def test_inference_factors_equal_autodiff(sample_shape):
    layer = layers.BatchNormalization(dtype="float64", **initializers())
    layer.build((None, *sample_shape))
    x = tf.constant(np.random.default_rng(8).normal(size=sample_shape))
    gamma, beta = tf.identity(layer.gamma), tf.identity(layer.beta)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, gamma, beta])
        y = tf.reshape(layer.reference(x[None], gamma, beta), [-1])
    factors = layer.jacobian_factors(x)
    assert list(factors) == ["D", "[diag(xhat) | I]"]
    size = y.shape[0]
    d = tf.reshape(tape.jacobian(y, x), [size, size])
    params = tf.concat([tape.jacobian(y, gamma), tape.jacobian(y, beta)], axis=-1)
    assert tolerances.relative_error(factors["D"], d) <= RTOL64
    assert tolerances.relative_error(factors["[diag(xhat) | I]"], params) <= RTOL64
    if len(sample_shape) == 1:  # literally [diag(xhat) | I]
        m, v = np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)
        xhat = (np.asarray(x) - m) / np.sqrt(v + layer.epsilon)
        expected = np.concatenate([np.diag(xhat), np.eye(4)], axis=1)
        np.testing.assert_allclose(factors["[diag(xhat) | I]"], expected, rtol=1e-14)


def test_algorithm_1_walks_the_inference_map():
    """``parameter_jacobian``, ``per_example_gradients`` and ``layer_jacobians`` of a model
    with BatchNormalization (inference: the moving statistics) against autodiff."""
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            layers.Dense(3, activation="tanh", dtype="float64"),
            layers.BatchNormalization(dtype="float64", **initializers()),
            layers.Dense(2, dtype="float64"),
        ]
    )
    x = tf.constant(np.random.default_rng(9).normal(size=(3, 4)))
    y = tf.constant([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0]], "float64")
    variables = assert_algorithm_1_equals_autodiff(model, x, y)
    assert [v.path.split("/")[-1] for v in variables][2:4] == ["gamma", "beta"]

    with pytest.raises(ValueError, match="depends on the whole batch"):
        jacobian.parameter_jacobian(model, x, training=True)

    factors = jacobian.layer_jacobians(model, x[0])
    bn = model.layers[1].name
    assert factors[f"{bn}: D"].shape == (3, 3)
    assert factors[f"{bn}: [diag(xhat) | I]"].shape == (3, 6)


def test_jacobian_ops_in_training_mode_explain_why_not():
    layer = layers.BatchNormalization()
    layer.build((None, 3))
    with pytest.raises(ValueError, match=r"depends on the whole batch.*training=False"):
        layer.jacobian_ops(training=True)
    assert layer.jacobian_ops(training=False)[0][0] is layer


@pytest.mark.slow
def test_gradient_check_passes_while_a_model_with_batchnorm_and_dropout_trains():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(8, activation="tanh"),
            layers.BatchNormalization(),
            layers.Dropout(0.3, seed=1),
            layers.Dense(3),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), keras.losses.MeanSquaredError())
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")
    check = GradientCheck((x[:8], y[:8]), every_n_batches=2, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[check])
    assert len(check.records) >= 3 * len(model.trainable_variables)
    assert all(r.passed for r in check.records)
    assert max(r.rel_err for r in check.records) <= tolerances.rtol("float32")


# --- configuration and errors ----------------------------------------------------------------


def test_get_config_round_trip():
    layer = layers.BatchNormalization(
        axis=-1,
        momentum=0.9,
        epsilon=0.01,
        center=False,
        gamma_regularizer="l2",
        gamma_constraint="non_neg",
        name="bn",
        **initializers(),
    )
    config = layer.get_config()
    clone = layers.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert config["momentum"] == 0.9 and config["center"] is False
    clone.build((None, 2))
    assert clone.beta is None and clone.jacobian_parameters() == [clone.gamma]


@pytest.mark.parametrize("axis", [0, -2, 2.0, [1, 2]])
def test_bad_axis_names_axis_and_the_fix(axis):
    with pytest.raises(ValueError, match=r"axis=.*axis=-1"):
        layers.BatchNormalization(axis=axis)


def test_axis_that_is_not_last_at_build_is_an_error():
    keras.Sequential([keras.Input((4,)), layers.BatchNormalization(axis=1)])  # last: fine
    with pytest.raises(ValueError, match=r"axis=1 for inputs of rank 4.*axis=-1"):
        keras.Sequential([keras.Input((3, 3, 2)), layers.BatchNormalization(axis=1)])


def test_synchronized_is_an_error():
    with pytest.raises(ValueError, match="synchronized=True"):
        layers.BatchNormalization(synchronized=True)


# Masks: training statistics over the unmasked entries, as Keras' BatchNormalization.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tf_jacbp.layers.batch_moments import masked_backward, masked_moments  # noqa: E402
from tf_jacbp.layers.dense import Dense  # noqa: E402
from tf_jacbp.layers.embedding import Embedding  # noqa: E402
from tf_jacbp.layers.global_pooling import GlobalAveragePooling1D  # noqa: E402


def assert_close(got, want):
    """``got`` within float64's relative tolerance of ``want`` (Frobenius norms), both finite."""
    err = tolerances.relative_error(got, want, "float64")
    assert err <= RTOL64, f"relative error {err:.3g} > {RTOL64:.3g}"


def draw_mask(rng, shape, kind):
    """A random bool mask ``(batch, T)``, ``batch, T >= 2``, keeping at least two entries (one kept
    entry makes the output constant up to Keras' fuzz factor: its gradient is pure cancellation);
    ``kind`` also masks one whole sample, or keeps all, or none."""
    if kind in ("all ones", "none kept"):
        return np.full(shape, kind == "all ones")
    mask = rng.random(shape) < 0.6
    masked_sample = rng.integers(shape[0])
    if kind == "one sample masked":
        mask[masked_sample] = False
    other = (masked_sample + 1) % shape[0]
    mask[other, rng.choice(shape[1], 2, replace=False)] = True
    return mask


def masked_call(layer_class, x, mask, w, reference=False, **kwargs):
    """A fresh ``layer_class`` in float64 called in training on ``x`` with ``mask``: ``[y, dx,
    dgamma, dbeta, moving mean, moving variance]`` (the gradients of ``sum(w * y)``)."""
    layer = layer_class(dtype="float64", momentum=0.7, **initializers(3), **kwargs)
    layer.build(x.shape)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        if reference:
            with tf_jacbp.reference_mode():
                y = layer(x, training=True, mask=tf.constant(mask))
        else:
            y = layer(x, training=True, mask=tf.constant(mask))
        loss = tf.reduce_sum(w * y)
    grads = tape.gradient(loss, [x, *layer.trainable_variables])
    return [y, *grads, layer.moving_mean, layer.moving_variance]


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(2, 4),
    steps=st.integers(2, 5),
    channels=st.integers(1, 3),
    kind=st.sampled_from(["random", "one sample masked", "all ones", "none kept"]),
    center=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_masked_training_matches_keras_both_routes(batch, steps, channels, kind, center, seed):
    """Outputs, gradients (input, gamma, beta) and moving statistics after a masked training call
    equal Keras' in float64, on the Jacobian route and on the reference route."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=(batch, steps, channels))
    mask = draw_mask(rng, (batch, steps), kind)
    w = tf.constant(rng.normal(size=x.shape))
    stock = masked_call(keras.layers.BatchNormalization, x, mask, w, center=center)
    for reference in (False, True):
        ours = masked_call(layers.BatchNormalization, x, mask, w, reference, center=center)
        assert len(ours) == len(stock)
        for got, want in zip(ours, stock, strict=True):
            assert_close(got, want)


def test_masked_backward_is_the_masked_jacobian_transpose():
    """``masked_backward`` against ``tape.jacobian`` of the masked batch map, with a fully masked
    sample and a fully masked channel of a position: the sums run over every entry, masked ones
    included, and a masked entry gets only the diagonal ``gamma / s``."""
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(2.0, 1.5, size=(3, 4, 2)))
    mask = tf.constant(draw_mask(rng, (3, 4), "one sample masked"))
    gamma = tf.constant([0.7, -1.3], tf.float64)
    eps = 1e-3

    def batch_map(x):
        mean, variance, _ = masked_moments(x, mask)
        return gamma * (x - mean) / tf.sqrt(variance + eps)

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = batch_map(x)
    jac = tf.reshape(tape.jacobian(y, x), [24, 24])  # d y_j / d x_i, rows j
    dy = tf.constant(rng.normal(size=(3, 4, 2)))
    dx = masked_backward(dy, x, mask, gamma, eps)[0]
    want = tf.linalg.matvec(jac, tf.reshape(dy, [-1]), transpose_a=True)
    assert_close(tf.reshape(dx, [-1]), want)
    # A masked entry: the column of J is (gamma / s) e_i.
    _, variance, _ = masked_moments(x, mask)
    i = int(np.flatnonzero(~np.repeat(mask.numpy().reshape(-1), 2))[0])
    column = np.zeros(24)
    column[i] = gamma[i % 2] / np.sqrt(variance[i % 2] + eps)
    np.testing.assert_allclose(jac[:, i], column, rtol=RTOL64, atol=1e-15)


def test_all_ones_mask_is_keras_fuzzed_moments_not_the_unmasked_ones():
    """Keras divides by ``N + keras.config.epsilon()`` when a mask is given: an all-ones mask
    differs (slightly) from no mask, and ours follows Keras in both."""
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 1.0, size=(2, 3, 2))
    w = tf.constant(rng.normal(size=x.shape))
    ones = np.ones((2, 3), bool)
    ours = masked_call(layers.BatchNormalization, x, ones, w)
    stock = masked_call(keras.layers.BatchNormalization, x, ones, w)
    for got, want in zip(ours, stock, strict=True):
        assert_close(got, want)
    unmasked = layers.BatchNormalization(dtype="float64", momentum=0.7, **initializers(3))
    y = unmasked(tf.constant(x), training=True)
    assert not np.allclose(y, ours[0], rtol=1e-12, atol=0)


def test_inference_with_a_mask_is_the_plain_map_and_the_mask_passes_through():
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(2, 3, 2)))
    mask = tf.constant([[True, False, True], [False, False, True]])
    ours = layers.BatchNormalization(dtype="float64", **initializers())
    stock = keras.layers.BatchNormalization(dtype="float64", **initializers())
    assert_close(ours(x, training=False, mask=mask), ours(x, training=False))
    assert_close(ours(x, training=False, mask=mask), stock(x, training=False, mask=mask))
    assert ours.supports_masking and stock.supports_masking
    for m in (mask, None):
        got, want = ours.compute_mask(x, m), stock.compute_mask(x, m)
        assert (got is None) == (want is None)
        if m is not None:
            np.testing.assert_array_equal(got, want)


def test_mask_of_the_wrong_rank_names_the_mask_and_the_fix():
    layer = layers.BatchNormalization()
    with pytest.raises(ValueError, match=r"mask.*one dimension less.*\(2, 3\)"):
        layer(np.zeros((2, 3, 4), "float32"), training=True, mask=np.ones((2, 3, 4), bool))


def sequence_model(family, ids_shape, vocabulary=7, dim=3):
    """``Embedding(mask_zero=True) -> BatchNormalization -> GlobalAveragePooling1D -> Dense``."""
    embedding, batchnorm, pooling, dense = family
    return keras.Sequential(
        [
            keras.Input(ids_shape, dtype="int32"),
            embedding(vocabulary, dim, mask_zero=True, dtype="float64"),
            batchnorm(dtype="float64", momentum=0.6, **initializers(5)),
            pooling(dtype="float64"),
            dense(2, dtype="float64"),
        ]
    )


def test_masked_sequence_model_fits_one_step_like_keras():
    """One ``fit`` step of the masked sequence model of tf_jacbp layers equals the same model of
    stock layers with the same weights (float64): every variable after the step, the masks
    propagated through ``BatchNormalization`` to the pooling."""
    rng = np.random.default_rng(4)
    ids = rng.integers(1, 7, size=(5, 6)).astype("int32")
    for row, length in enumerate([6, 3, 1, 4, 2]):
        ids[row, length:] = 0  # padding (no sample of padding only: GlobalAveragePooling1D's 0/0)
    targets = rng.normal(size=(5, 2))
    ours = sequence_model(
        (Embedding, layers.BatchNormalization, GlobalAveragePooling1D, Dense), (6,)
    )
    stock = sequence_model(
        (
            keras.layers.Embedding,
            keras.layers.BatchNormalization,
            keras.layers.GlobalAveragePooling1D,
            keras.layers.Dense,
        ),
        (6,),
    )
    stock.set_weights(ours.get_weights())
    before = ours.get_weights()
    for model in (ours, stock):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(ids, targets, batch_size=5, epochs=1, verbose=0, shuffle=False)
    for got, want in zip(ours.get_weights(), stock.get_weights(), strict=True):
        assert_close(got, want)
    # The mask reached BatchNormalization: with the padding as data the moving mean would be
    # momentum m + (1 - momentum) mean(all embeddings).
    unmasked = 0.6 * before[3] + 0.4 * before[0][ids].reshape(-1, 3).mean(axis=0)
    assert not np.allclose(ours.layers[1].moving_mean.numpy(), unmasked, rtol=1e-6)


# --- the contract: the inference map is the layer's, the training maps are small objects ------

from tf_jacbp.contract import DERIVED  # noqa: E402
from tf_jacbp.layers.normalization_modes import (  # noqa: E402
    BatchStatistics,
    MaskedBatchStatistics,
)


def test_no_class_defines_what_the_contract_derives():
    for cls in (layers.BatchNormalization, BatchStatistics, MaskedBatchStatistics):
        assert not [name for name in DERIVED if name in cls.__dict__], cls
        for name in ("input_jacobian", "parameter_jacobian", "jacobian"):
            assert name not in cls.__dict__, (cls, name)


def batch_map_jacobian(fn, x):
    """``tape.jacobian`` of ``fn`` at the batch ``x``: ``(size, size)``, rows the outputs."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    size = int(np.prod(x.shape))
    return tf.reshape(tape.jacobian(y, x), [size, size])


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("shape", [(5, 3), (3, 4, 2)], ids=["2d", "3d"])
def test_training_maps_products_for_three_vectors_equal_autodiff(shape, masked):
    """``vjp_input`` of the training maps with ``V = 3`` vectors over the whole batch is ``J^T m``
    of the batch map (autodiff of the reference route); ``vjp_params`` summed over the batch is
    autodiff's too; ``sum_batch=False`` and so the per-example products raise."""
    rng = np.random.default_rng(20)
    layer = layers.BatchNormalization(dtype="float64", **initializers())
    layer.build((None, *shape[1:]))
    x = tf.constant(rng.normal(1.0, 2.0, size=shape))
    if len(shape) == 3:
        mask = tf.constant(draw_mask(rng, shape[:2], "random"))
    else:
        mask = tf.constant([True, False, True, True, False])
    op = layer.training_map(masked=masked)
    assert isinstance(op, MaskedBatchStatistics if masked else BatchStatistics)
    constants = [mask] if masked else []
    params = layer.read_parameters()
    jac = batch_map_jacobian(lambda x: op.reference(x, *params, *constants), x)
    m = tf.constant(rng.normal(size=(3, *shape)))
    y = op.forward(x, *params, *constants)
    got = op.vjp_input(m, x, y, *params, *constants)
    want = tf.matmul(tf.reshape(m, [3, -1]), jac)  # row v: m_v^T J
    assert_close(tf.reshape(got, [3, -1]), want)
    gamma, beta = (tf.identity(p) for p in params)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([gamma, beta])
        out = op.reference(x, gamma, beta, *constants)
        losses = [tf.reduce_sum(m[v] * out) for v in range(3)]
    grads = op.vjp_params(m, x, y, *params, *constants)
    for g, p in zip(grads, (gamma, beta), strict=True):
        assert_close(g, tf.stack([tape.gradient(loss, p) for loss in losses]))
    with pytest.raises(ValueError, match=r"no per-sample parameter products.*whole batch"):
        op.vjp_params(m, x, y, *params, *constants, sum_batch=False)
    with pytest.raises(ValueError, match=r"no per-sample"):
        op.per_example_backward(m[0], x, y, *params, *constants)
    dx, dparams = op.backward(m[0], x, y, *params, *constants)  # V = 1, the derived backward
    assert_close(dx, tf.reshape(want[0], shape))
    assert_close(dparams[0], grads[0][0])


def test_inference_products_for_three_vectors_per_sample():
    """The inference map (the layer): ``vjp_params(sum_batch=False)`` of ``V = 3`` vectors per
    sample against autodiff on each sample alone, and summed over the batch."""
    rng = np.random.default_rng(21)
    layer = layers.BatchNormalization(dtype="float64", **initializers())
    layer.build((None, 2, 3))
    x = tf.constant(rng.normal(size=(4, 2, 3)))
    m = tf.constant(rng.normal(size=(3, 4, 2, 3)))
    gamma, beta = layer.read_parameters()
    per_sample = layer.vjp_params(m, x, None, gamma, beta, sum_batch=False)
    summed = layer.vjp_params(m, x, None, gamma, beta)
    assert per_sample[0].shape == (3, 4, 3) and summed[1].shape == (3, 3)
    for v in range(3):
        for i in range(4):
            with tf.GradientTape() as tape:
                tape.watch([gamma, beta])
                loss = tf.reduce_sum(m[v, i] * layer.reference(x[i : i + 1], gamma, beta)[0])
            for got, want in zip(per_sample, tape.gradient(loss, [gamma, beta]), strict=True):
                assert_close(got[v, i], want)
    for s, p in zip(summed, per_sample, strict=True):
        assert_close(s, tf.reduce_sum(p, axis=1))
    dx = layer.vjp_input(m, x, None, gamma, beta)
    inverse = 1 / np.sqrt(np.asarray(layer.moving_variance) + layer.epsilon)
    assert_close(dx, np.asarray(m) * np.asarray(gamma) * inverse)


class _DoubledGammaProducts(BatchStatistics):
    """A training map whose gamma product is twice the true one (a planted bug)."""

    def vjp_params(self, m, x, y, *args, sum_batch=True):
        grads = super().vjp_params(m, x, y, *args, sum_batch=sum_batch)
        return [2 * grads[0], *grads[1:]]


class _PlantedBatchNormalization(layers.BatchNormalization):
    def training_map(self, masked=False):
        if masked:
            return super().training_map(masked)
        return _DoubledGammaProducts(self.epsilon, self.scale, self.center)


def test_training_map_is_the_map_call_routes_in_training():
    """``call(..., training=True)`` routes ``training_map()``: a subclass returning a planted map
    gets its gamma gradient doubled in training, not in inference."""
    rng = np.random.default_rng(22)
    x = tf.constant(rng.normal(size=(6, 3)))
    w = tf.constant(rng.normal(size=(6, 3)))
    grads = {}
    for cls in (layers.BatchNormalization, _PlantedBatchNormalization):
        layer = cls(dtype="float64", **initializers())
        for training in (True, False):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(w * layer(x, training=training))
            grads[cls, training] = tape.gradient(loss, layer.gamma)
    planted = _PlantedBatchNormalization
    assert_close(grads[planted, True], 2 * grads[layers.BatchNormalization, True])
    assert_close(grads[planted, False], grads[layers.BatchNormalization, False])
