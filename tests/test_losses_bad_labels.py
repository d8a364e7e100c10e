"""One bad label never costs the model.

A class label out of range (``< 0`` or ``>= C``) or not an integer (``2.5``), or a one-hot/binary
label outside ``[0, 1]``, inside ``fit``:

* in graph mode stops the step with an error naming the offending value and the class count,
  before the optimizer applies anything: the weights (and Adam's moments) are bit-identical to
  what they were before the step;
* under XLA, where assertions are compiled away, the step applies nothing (its gradient is zero
  and the optimizer's update is skipped) and fit stops right after it with the same error.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_jacbp
from tf_jacbp import layers, losses

C = 3
BATCH = 8


def _model(loss, optimizer="adam", jit_compile=False, softmax=False):
    """A small classifier; with ``softmax`` its outputs are probabilities (our Softmax layer)."""
    keras.utils.set_random_seed(0)
    tail = [layers.Softmax()] if softmax else []
    model = keras.Sequential(
        [keras.Input((4,)), layers.Dense(6, activation="relu"), layers.Dense(C), *tail]
    )
    model.compile(optimizer, loss, jit_compile=jit_compile)
    return tf_jacbp.hooks.attach(model)


def _data(bad_index, bad_value, n=3 * BATCH):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.integers(0, C, size=n).astype("float32")
    y[bad_index] = bad_value
    return x, y


def _weights(model):
    return [w.numpy().copy() for w in model.weights]


def _optimizer_state(model):
    """The optimizer's slots (Adam's moments), without its step counter: the counter's increment
    does not wait for the gradient, in stock Keras either, so a stopped step may count."""
    return [
        v.numpy().copy() for v in model.optimizer.variables if v is not model.optimizer.iterations
    ]


def _assert_bit_equal(before, after):
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def _sparse(from_logits):
    return losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def _model_for(from_logits):
    return _model(_sparse(from_logits), softmax=not from_logits)


@pytest.mark.parametrize("bad, from_logits", [(7.0, True), (2.5, False)])
def test_graph_fit_stops_before_any_weight_changes(bad, from_logits):
    """The bad label sits in the second batch: the first batch trains, the second stops the fit
    with the value and the class count named, and nothing of the second step is applied."""
    x, y = _data(BATCH + 5, bad)
    model = _model_for(from_logits)
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    weights, state = _weights(model), _optimizer_state(model)
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    message = str(err.value)
    assert f"found y_true =] [{bad:g}]" in message
    assert f"y_pred has {C} classes" in message
    # The first batch of the second fit trained; compare with a twin that saw only it.
    twin = _model_for(from_logits)
    twin.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    twin.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    _assert_bit_equal(_weights(twin), _weights(model))
    assert not np.array_equal(_weights(twin)[0], weights[0])  # the good batch did train
    _assert_bit_equal(_optimizer_state(twin), _optimizer_state(model))
    assert len(state) == len(_optimizer_state(model))


def test_graph_fit_with_the_bad_label_first_keeps_the_initial_weights():
    bad = -1.0
    x, y = _data(2, bad)
    model = _model(_sparse(True))
    before = _weights(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"found y_true =\] \[{bad:g}\]"):
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False)
    _assert_bit_equal(before, _weights(model))
    assert all(np.isfinite(w).all() for w in model.weights)


def test_train_on_batch_stops_too():
    x, y = _data(0, 9.0)
    model = _model(_sparse(True))
    model.train_on_batch(x[BATCH:], y[BATCH:])
    before = _weights(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"found y_true =\] \[9\]"):
        model.train_on_batch(x[:BATCH], y[:BATCH])
    _assert_bit_equal(before, _weights(model))


@pytest.mark.parametrize(
    "loss, y_bad",
    [
        (losses.CategoricalCrossentropy(from_logits=True), np.array([0.0, np.nan, 1.0])),
        (losses.BinaryCrossentropy(from_logits=True), np.array([1.0, -1.0, 0.0])),
    ],
    ids=["one-hot NaN", "binary -1"],
)
def test_graph_fit_stops_on_a_one_hot_label_outside_the_unit_interval(loss, y_bad):
    x, y = _data(0, 0.0)
    y = np.eye(C, dtype="float32")[y.astype(int)]
    y[3] = y_bad
    model = _model(loss)
    before = _weights(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"values in \[0, 1\]"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    _assert_bit_equal(before, _weights(model))


@pytest.mark.parametrize(
    "bad, reference", [(7.0, False), (-1.0, False), (4.0, False), (2.5, False), (7.0, True)]
)
def test_graph_gradient_waits_for_the_check(bad, reference):
    """Not only fit: any gradient of the loss in a tf.function raises, on both routes."""
    loss = _sparse(True)

    @tf.function
    def grad(y, z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            value = loss(y, z)
        return tape.gradient(value, z)

    y, z = tf.constant([0.0, bad, 2.0]), tf.zeros((3, 4))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=rf"y_pred has 4 classes.*found y_true =\] \[{bad:g}\]"
    ):
        if reference:
            with tf_jacbp.reference_mode():
                grad(y, z)
        else:
            grad(y, z)


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("from_logits", [True, False])
def test_xla_step_gets_a_zero_gradient_and_a_nan_loss(from_logits, reference):
    """Under XLA: the value is NaN at the bad position only, the gradient exactly zero."""
    loss = losses.SparseCategoricalCrossentropy(from_logits=from_logits, reduction=None)

    @tf.function(jit_compile=True)
    def value_and_grad(y, z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            value = loss(y, z)
        return value, tape.gradient(value, z)

    z = tf.constant(np.random.default_rng(0).uniform(0.1, 1, size=(3, 4)), "float32")
    if reference:
        with tf_jacbp.reference_mode():
            value, g = value_and_grad(tf.constant([0.0, 2.5, 2.0]), z)
    else:
        value, g = value_and_grad(tf.constant([0.0, 2.5, 2.0]), z)
    value = value.numpy()
    assert np.isnan(value[1]) and np.isfinite(value[[0, 2]]).all()
    np.testing.assert_array_equal(g.numpy(), np.zeros((3, 4)))


def _twin_trained_on(x, y, optimizer):
    twin = _model(_sparse(True), optimizer=optimizer, jit_compile=True)
    twin.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    return twin


@pytest.mark.parametrize(
    "optimizer",
    [lambda: keras.optimizers.SGD(0.1), lambda: keras.optimizers.SGD(0.1, momentum=0.9), "adam"],
    ids=["sgd", "momentum", "adam"],
)
@pytest.mark.slow
def test_xla_fit_applies_nothing_and_stops_right_after_the_bad_step(optimizer):
    """Under XLA the step with the bad label cannot stop itself: it applies nothing (weights,
    momentum or Adam's moments, step counter: bit-identical to a twin trained on the batches
    before it), and fit raises right after it, naming the value and the class count."""
    make = optimizer if callable(optimizer) else (lambda: optimizer)
    x, y = _data(BATCH + 1, 7.0)
    model = _model(_sparse(True), optimizer=make(), jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    message = str(err.value)
    assert f"y_pred has {C} classes" in message and "found y_true = 7 " in message
    assert "XLA" in message
    twin = _twin_trained_on(x[:BATCH], y[:BATCH], make())
    _assert_bit_equal(_weights(twin), _weights(model))
    _assert_bit_equal(_optimizer_state(twin), _optimizer_state(model))
    assert int(model.optimizer.iterations) == 1
    # Reported once: with the label fixed, training goes on.
    y[BATCH + 1] = 0.0
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"]).all()


def test_xla_fit_with_the_bad_label_in_the_last_batch_stops_after_it():
    """The last batch is reported too: fit raises right after it, having applied nothing."""
    x, y = _data(2 * BATCH + 3, 2.5)
    model = _model(_sparse(True), jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"found y_true = 2\.5 "):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    twin = _twin_trained_on(x[: 2 * BATCH], y[: 2 * BATCH], "adam")
    _assert_bit_equal(_weights(twin), _weights(model))
    _assert_bit_equal(_optimizer_state(twin), _optimizer_state(model))


def test_xla_evaluate_and_train_on_batch_stop_on_a_bad_label():
    x, y = _data(3, -1.0, n=BATCH)
    model = _model(_sparse(True), jit_compile=True)
    before = _weights(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"found y_true = -1 "):
        model.evaluate(x, y, verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"found y_true = -1 "):
        model.train_on_batch(x, y)
    _assert_bit_equal(before, _weights(model))
    # Nothing is left over: a good batch runs.
    y[3] = 0.0
    assert np.isfinite(model.train_on_batch(x, y))


@pytest.mark.slow
def test_mixed_precision_xla_fit_applies_nothing_on_a_bad_label():
    """Under a loss-scaled optimizer the inner optimizer's update is skipped the same way."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, y = _data(BATCH + 2, 9.0)
        model = _model(_sparse(True), jit_compile=True)
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"found y_true = 9 "):
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
        twin = _twin_trained_on(x[:BATCH], y[:BATCH], "adam")
        _assert_bit_equal(_weights(twin), _weights(model))
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize(
    "loss, bad_row",
    [
        (losses.CategoricalCrossentropy(from_logits=True, reduction=None), [np.nan, 1, 0, 0]),
        (losses.CategoricalCrossentropy(reduction=None), [0, 3, 0, 0]),
        (losses.BinaryCrossentropy(from_logits=True, reduction=None), [0, 1, -2, 1]),
    ],
    ids=["one-hot NaN", "one-hot 3", "binary -2"],
)
def test_xla_step_on_a_bad_one_hot_label_gets_a_zero_gradient(loss, bad_row):
    @tf.function(jit_compile=True)
    def value_and_grad(y, z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            value = loss(y, z)
        return value, tape.gradient(value, z)

    y = np.eye(4, dtype="float32")[[0, 2, 3]]
    y[1] = bad_row
    z = tf.constant(np.random.default_rng(0).uniform(0.1, 1, size=(3, 4)), "float32")
    value, g = value_and_grad(tf.constant(y), z)
    assert np.isnan(value.numpy()[1]) and np.isfinite(value.numpy()[[0, 2]]).all()
    np.testing.assert_array_equal(g.numpy(), np.zeros((3, 4)))


def test_a_bad_label_recorded_by_another_model_does_not_stop_this_one():
    """A record belongs to the loss of the model whose step wrote it: another attached model,
    compiled with another loss, trains on after the first one stopped."""
    x_bad, y_bad = _data(0, 7.0)
    first = _model(_sparse(True), jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError):
        first.fit(x_bad, y_bad, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    x, y = _data(0, 0.0)
    model = _model(_sparse(True), jit_compile=True)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"]).all()


def test_an_unattached_xla_model_gets_a_nan_loss_and_goes_on():
    """Without tf_jacbp.hooks.attach nothing of Keras is wrapped: under XLA the bad label's
    step has a NaN loss and a zero gradient (documented), and fit is not stopped."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(C)])
    model.compile(keras.optimizers.SGD(0.1), _sparse(True), jit_compile=True)
    x, y = _data(0, 7.0, n=BATCH)
    before = model.get_weights()
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    assert np.isnan(history.history["loss"][0])
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)  # SGD without momentum: a zero gradient moves nothing
