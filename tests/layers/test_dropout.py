"""Dropout: every mode of the harness in training and inference mode, the same masks as
``keras.layers.Dropout`` and ``stateless_dropout``, the 0/scale diagonal Jacobian, the fresh-mask
op of ``jacobian_ops(training=True)``, bad arguments."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_jacbp
from tf_jacbp import jacobian, layers, tolerances
from tf_jacbp.testing import check_layer as run_layer_test
from tf_jacbp.testing import model_state, set_model_state
from tf_jacbp.testing.contract import check_map


@pytest.mark.parametrize(
    "input_shape, kwargs, training",
    [
        ((6,), {"rate": 0.4}, True),
        ((3, 4, 2), {"rate": 0.3, "seed": 7, "noise_shape": (None, 1, 4, None)}, True),
        ((6,), {"rate": 0.4}, False),
        ((3, 4, 2), {"rate": 0.4}, False),
    ],
    ids=["2d-train", "4d-noise-shape-train", "2d-inference", "4d-inference"],
)
def test_dropout_every_mode(input_shape, kwargs, training, tmp_path):
    run_layer_test(
        lambda dtype: layers.Dropout(dtype=dtype, **kwargs),
        input_shape,
        tmp_dir=tmp_path,
        batch_size=4,
        training=training,
    )


def test_same_masks_as_keras_dropout_eager_graph_and_xla():
    """Same seed, same calls: ours and Keras' drop the same entries and scale the rest alike."""
    x = tf.constant(np.random.default_rng(0).normal(size=(8, 5)) + 3.0, "float32")
    for compile_args in ({}, {"jit_compile": False}, {"jit_compile": True}):
        ours, stock = layers.Dropout(0.4, seed=11), keras.layers.Dropout(0.4, seed=11)
        if compile_args:
            run_ours = tf.function(lambda x, layer=ours: layer(x, training=True), **compile_args)
            run_stock = tf.function(lambda x, layer=stock: layer(x, training=True), **compile_args)
        else:
            run_ours = run_stock = None
        outputs = []
        for _ in range(3):  # the seed generators advance in step
            y = run_ours(x) if run_ours else ours(x, training=True)
            y_stock = run_stock(x) if run_stock else stock(x, training=True)
            np.testing.assert_array_equal(y, y_stock)
            outputs.append(np.asarray(y))
        kept = outputs[0] != 0
        np.testing.assert_allclose(outputs[0][kept], np.asarray(x)[kept] / 0.6, rtol=1e-6)
        assert 0.3 < kept.mean() < 0.9
        assert not np.array_equal(outputs[0] != 0, outputs[1] != 0), "a fresh mask per call"
        np.testing.assert_array_equal(ours(x), x)
        np.testing.assert_array_equal(ours(x, training=False), x)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_the_diagonal_is_stock_stateless_dropouts_mask(dtype):
    """``stateless_uniform(noise_shape, seed) >= rate`` is ``stateless_dropout``'s mask, and both
    routes of a training call apply the one diagonal drawn for it."""
    layer = layers.Dropout(0.5, noise_shape=(None, 1, 3), dtype=dtype)
    x = tf.constant(np.random.default_rng(1).normal(size=(16, 4, 3)) + 3.0, dtype)
    seed = tf.constant([3, 7], tf.int32)
    stock = tf.nn.experimental.stateless_dropout(x, 0.5, seed, noise_shape=[16, 1, 3])
    np.testing.assert_array_equal(x * layer.diagonal(x, seed), stock)
    assert 0 < np.mean(np.asarray(stock) == 0) < 1
    model = keras.Sequential([keras.Input((4, 3), dtype=dtype), layer])
    state = model_state(model)
    y = model(x, training=True)
    set_model_state(model, state)
    with tf_jacbp.reference_mode():
        y_ref = model(x, training=True)
    np.testing.assert_array_equal(y, y_ref)


def test_backward_is_the_0_or_scale_diagonal_of_the_forward_mask():
    layer = layers.Dropout(0.25, noise_shape=(None, 1, 3), dtype="float64")
    x = tf.constant(np.random.default_rng(2).normal(size=(5, 4, 3)) + 5.0)  # no zeros
    delta = tf.constant(np.random.default_rng(3).normal(size=(5, 4, 3)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    dx = np.asarray(tape.gradient(y, x, output_gradients=delta))
    kept = np.asarray(y) != 0
    np.testing.assert_array_equal(kept, kept[:, :1, :] * np.ones((1, 4, 1), bool))  # noise_shape
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] * 4 / 3, rtol=1e-15)
    np.testing.assert_allclose(dx, kept * (4 / 3) * np.asarray(delta), rtol=1e-15)


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_rate_zero_is_the_identity_and_rate_one_drops_everything(rate):
    layer = layers.Dropout(rate, dtype="float64")
    x = tf.constant(np.random.default_rng(4).normal(size=(3, 4)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    dx = tape.gradient(y, x, output_gradients=tf.ones_like(x))
    np.testing.assert_array_equal(y, x * (1 - rate))
    np.testing.assert_array_equal(dx, np.full((3, 4), 1 - rate))
    np.testing.assert_array_equal(keras.layers.Dropout(rate, dtype="float64")(x, training=True), y)


def test_jacobian_ops_in_training_mode_draw_a_fresh_mask():
    """The op's forward draws a mask; its backward, its ``jacobian_rows`` (``k`` rows per sample,
    as ``tf_jacbp.jacobian`` passes them) and ``jacobian_factors`` use that same mask."""
    layer = layers.Dropout(0.5, seed=3, dtype="float64")
    x = tf.constant(np.random.default_rng(5).normal(size=(6, 4)) + 5.0)
    ((op, params),) = layer.jacobian_ops(training=True)
    assert params == []
    y = op.forward(x)
    diagonal = np.asarray(y) / np.asarray(x)
    rows = tf.constant(np.random.default_rng(6).normal(size=(6, 3, 4)))
    dx, _ = op.jacobian_rows(rows, x, y)
    np.testing.assert_allclose(dx, np.asarray(rows) * diagonal[:, None, :], rtol=1e-15)
    dx, _ = op.backward(rows[:, 0], x, y)
    np.testing.assert_allclose(dx, np.asarray(rows[:, 0]) * diagonal, rtol=1e-15)
    # one sample: the mask a batch of one draws from the op's seed (layer_jacobians' forward)
    first = np.asarray(op.forward(x[:1])) / np.asarray(x[:1])
    np.testing.assert_array_equal(op.jacobian_factors(x[0])["diag(k / (1 - r))"], np.diag(first[0]))
    np.testing.assert_array_equal(op.forward(x), y)  # the same mask every time
    ((other, _),) = layer.jacobian_ops(training=True)
    assert not np.array_equal(np.asarray(other.forward(x)) == 0, diagonal == 0)
    assert layer.jacobian_ops(training=False) == [(layer, [])]
    np.testing.assert_array_equal(layer.jacobian_factors(x[0])["J = I"], np.eye(4))


def test_algorithm_1_in_training_mode_uses_the_mask_of_one_training_call():
    """``parameter_jacobian`` and ``per_example_gradients`` with ``training=True`` draw one mask,
    the one a training call with the same seed state draws; autodiff of the reference route with
    that mask gives the same numbers."""
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            layers.Dense(5, activation="tanh", dtype="float64"),
            layers.Dropout(0.5, seed=2, dtype="float64"),
            layers.Dense(3, dtype="float64"),
        ]
    )
    rng = np.random.default_rng(7)
    x, y = tf.constant(rng.normal(size=(4, 4))), tf.constant(rng.normal(size=(4, 3)))
    variables = jacobian.parameter_variables(model)
    state = model_state(model)
    ours = jacobian.parameter_jacobian(model, x, training=True)
    set_model_state(model, state)
    per_example = jacobian.per_example_gradients(model, x, y, "mse", flatten=False, training=True)
    set_model_state(model, state)
    with tf.GradientTape(persistent=True) as tape:
        with tf_jacbp.reference_mode():
            out = model(x, training=True)
        losses = keras.losses.mean_squared_error(y, out)
    assert not np.allclose(out, model(x, training=False)), "the mask must drop something"
    # Vec is column-major: reverse each parameter's axes before flattening.
    expected = np.concatenate(
        [
            np.transpose(b, (0, 1, *range(len(b.shape) - 1, 1, -1))).reshape(4, 3, -1)
            for b in (np.asarray(g) for g in tape.jacobian(out, variables))
        ],
        axis=-1,
    )
    assert tolerances.relative_error(ours, expected) <= tolerances.rtol("float64")
    for got, want in zip(per_example, tape.jacobian(losses, variables), strict=True):
        assert tolerances.relative_error(got, want) <= tolerances.rtol("float64")


def test_get_config_round_trip():
    layer = layers.Dropout(0.3, noise_shape=[None, 1], seed=5, name="drop")
    config = layer.get_config()
    assert config["rate"] == 0.3 and config["noise_shape"] == (None, 1) and config["seed"] == 5
    assert layers.Dropout.from_config(config).get_config() == config


@pytest.mark.parametrize("rate", [-0.1, 1.5, "0.5", True, None])
def test_bad_rate_names_rate(rate):
    with pytest.raises(ValueError, match=r"rate must be a number between 0 and 1.*rate="):
        layers.Dropout(rate)


@pytest.mark.parametrize("noise_shape", ["abc", (None, 0), (2, 1.5), 3, ()])
def test_bad_noise_shape_names_noise_shape(noise_shape):
    with pytest.raises(ValueError, match="noise_shape="):
        layers.Dropout(0.5, noise_shape=noise_shape)


def test_bad_seed_names_seed():
    with pytest.raises(ValueError, match="seed="):
        layers.Dropout(0.5, seed=1.5)


def test_dropout_is_built_at_construction_as_keras_dropout():
    assert layers.Dropout(0.5).built == keras.layers.Dropout(0.5).built is True


def test_a_dropout_subclass_overriding_build_has_its_build_run():
    """Issue 21 item 7: ``Dropout`` marked itself built in ``__init__``, so a subclass's
    ``build`` never ran; it is built at construction only when ``build`` is not overridden."""

    class Recording(layers.Dropout):
        def build(self, shape):
            self.seen = tuple(shape)
            super().build(shape)

    layer = Recording(0.5)
    assert not layer.built
    layer(np.zeros((2, 3)), training=True)
    assert layer.built and layer.seen == (2, 3)


@pytest.mark.parametrize("noise_shape", [None, (None, 1, 4)])
def test_the_training_map_meets_the_contract(noise_shape):
    """``DropoutMask`` (the training map with its mask as the constant): ``vjp_input`` for
    ``V = 1`` and ``V = 3`` and the derived rows against autodiff of its ``reference``."""
    layer = layers.Dropout(0.4, noise_shape=noise_shape, seed=1, dtype="float64")
    x = tf.constant(np.random.default_rng(8).normal(size=(5, 3, 4)))
    ((op, params),) = layer.jacobian_ops(training=True)
    check_map(op, x, params, "Dropout (training)", seed=2)
    check_map(layer, x, [], "Dropout (inference)", seed=3)
