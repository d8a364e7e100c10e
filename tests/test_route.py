"""``reference_mode()`` is honoured by Keras' cached step functions, in both orders, on the
models ``tf_jacbp.hooks.attach`` was given.

``fit``, ``evaluate``, ``predict`` and the ``*_on_batch`` methods cache their compiled function on
the model; a function traced in one mode must not run the other mode's route. Two planted layers
make the route observable: ``WrongKernelGradient`` (tests/planted.py: the Jacobian route's
kernel gradient doubled) tells which route a training step applied, ``RouteTell`` (the reference
route adds 1) which route a forward pass ran.
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from planted import WrongKernelGradient

import tf_jacbp
from tf_jacbp import layers

MODES = {"jacobian": contextlib.nullcontext, "reference": tf_jacbp.reference_mode}
ORDERS = [("jacobian", "reference"), ("reference", "jacobian")]


class RouteTell(layers.JacobianLayer):
    """``y = x`` on the Jacobian route, ``x + 1`` on the reference route."""

    def forward(self, x):
        return tf.identity(x)

    def reference(self, x):
        return x + 1.0

    def vjp_input(self, m, x, y):
        return m


def sequential(layer):
    return tf_jacbp.hooks.attach(keras.Sequential([keras.Input((3,)), layer]))


def functional(layer):
    x = keras.Input((3,))
    return tf_jacbp.hooks.attach(keras.Model(x, layer(x)))


BUILDERS = {"Sequential": sequential, "functional": functional}
COMPILE = {"graph": {"jit_compile": False}, "xla": {"jit_compile": True}}


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 3)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")


def compiled(build, weights=None, **compile_args):
    model = build(WrongKernelGradient(2))
    if weights is not None:
        model.set_weights(weights)
    model.compile(keras.optimizers.SGD(0.1), "mse", **compile_args)
    return model


def train(model, entry):
    x, y = data()
    if entry == "fit":
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    else:
        model.train_on_batch(x, y)


def cases(entries, xla_entry):
    """Every entry on both model kinds compiled as graphs, and one entry compiled with XLA."""
    graph = [(e, b, "graph") for e in entries for b in BUILDERS]
    return graph + [(xla_entry, "Sequential", "xla")]


@pytest.mark.parametrize("entry, builder, compile_mode", cases(["fit", "train_on_batch"], "fit"))
@pytest.mark.parametrize("first, second", ORDERS)
def test_training_after_a_switch_runs_the_new_route(first, second, entry, builder, compile_mode):
    """The weights after ``second``'s step equal a fresh model's traced in ``second``'s mode, and
    differ from a step of ``first``'s route from the same point."""
    build, compile_args = BUILDERS[builder], COMPILE[compile_mode]
    model = compiled(build, **compile_args)
    with MODES[first]():
        train(model, entry)
    start = model.get_weights()
    with MODES[second]():
        train(model, entry)
    expected, other = compiled(build, start, **compile_args), compiled(build, start, **compile_args)
    with MODES[second]():
        train(expected, entry)
    with MODES[first]():
        train(other, entry)
    for got, want in zip(model.get_weights(), expected.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(model.get_weights()[0], other.get_weights()[0], rtol=1e-4)


def forward_result(model, entry):
    """What ``entry`` returns for inputs of ones and targets of zeros (``mse``)."""
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 3), "float32")
    if entry == "predict":
        return model.predict(x, batch_size=4, verbose=0)
    if entry == "predict_on_batch":
        return model.predict_on_batch(x)
    if entry == "evaluate":
        return model.evaluate(x, y, batch_size=4, verbose=0)
    return model.test_on_batch(x, y)


@pytest.mark.parametrize(
    "entry, builder, compile_mode",
    cases(["predict", "predict_on_batch", "evaluate", "test_on_batch"], "evaluate"),
)
@pytest.mark.parametrize("first, second", ORDERS)
def test_evaluate_and_predict_after_a_switch_run_the_new_route(
    first, second, entry, builder, compile_mode
):
    model = BUILDERS[builder](RouteTell())
    model.compile(loss="mse", **COMPILE[compile_mode])
    results = {}
    for mode in (first, second, first):
        with MODES[mode]():
            results.setdefault(mode, []).append(np.asarray(forward_result(model, entry)))
    shift = {"jacobian": 0.0, "reference": 1.0}
    for mode, values in results.items():
        for value in values:
            if entry.startswith("predict"):
                np.testing.assert_array_equal(value, np.full((4, 3), 1.0 + shift[mode]))
            else:  # mean squared error of (1 + shift) against zeros
                np.testing.assert_allclose(value, (1.0 + shift[mode]) ** 2, rtol=1e-6)


def test_no_new_trace_while_the_mode_stays():
    """The cached functions are kept when the mode has not changed (no retracing cost)."""
    model = compiled(sequential)
    x, y = data()
    for mode in ("jacobian", "reference"):
        with MODES[mode]():
            model.fit(x, y, batch_size=4, epochs=1, verbose=0)
            model.predict(x, verbose=0)
            functions = (model.train_function, model.predict_function)
            model.fit(x, y, batch_size=4, epochs=1, verbose=0)
            model.train_on_batch(x, y)
            model.predict(x, verbose=0)
            assert (model.train_function, model.predict_function) == functions


def test_a_fit_inside_reference_mode_trains_like_autodiff():
    """The reference route's update is autodiff's: SGD with rate 1 moves the kernel by the tape's
    gradient of the reference route, after a normal fit cached the Jacobian route's step."""
    model = compiled(sequential)
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.compile(keras.optimizers.SGD(1.0), "mse")
    model.train_on_batch(x, y)  # the Jacobian route's step is cached again after compile
    before = model.get_weights()
    with tf_jacbp.reference_mode():
        with tf.GradientTape() as tape:
            loss = keras.losses.mean_squared_error(y, model(x))
            loss = tf.reduce_mean(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        model.train_on_batch(x, y)
    for b, g, v in zip(before, grads, model.trainable_variables, strict=True):
        np.testing.assert_allclose(b - np.asarray(v), np.asarray(g), rtol=1e-5, atol=1e-7)
