"""Bad input that a compiled step cannot stop never passes silently, on either backend.

A class label out of range (``SparseCategoricalCrossentropy``: ``>= C`` or negative; the other
cross entropies: a value outside ``[0, 1]``) or an ``Embedding`` id outside ``[-V, V)``:

* eagerly raises ``ValueError`` (an id on TensorFlow: ``InvalidArgumentError``);
* in the compiled step of an attached model (``jit_compile=True``: XLA on TensorFlow,
  ``jax.jit`` on JAX, where it is Keras' default) applies no update (weights, optimizer slots and
  step counter equal a twin's that never saw the bad batch) and ``fit``, ``evaluate`` and
  ``train_on_batch`` raise right after the step (``tf_jacbp.backend.label_error``'s type:
  ``InvalidArgumentError`` on TensorFlow, ``ValueError`` on JAX), naming the loss or the layer and
  the value;
* in the compiled step of a model that is not attached gives a NaN loss, not a wrong number.

The one difference between the backends: under XLA TensorFlow's gather clamps an Embedding id
out of range, as stock Keras' does (tests/layers/test_embedding.py), so on TensorFlow the id
stops a graph-mode ``fit``; on JAX it reads a row of NaN and stops the compiled ``fit``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import tf_jacbp
from tf_jacbp import backend as jb
from tf_jacbp import layers, losses

C = 3
BATCH = 8
STEP_ERROR = type(jb.label_error("a bad input in a compiled step"))


def _model(loss, attach=True, optimizer="adam", **compile_kwargs):
    """A small classifier of logits, compiled with ``loss`` (``jit_compile=True`` unless told)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), layers.Dense(6, activation="relu"), layers.Dense(C)]
    )
    compile_kwargs.setdefault("jit_compile", True)
    model.compile(optimizer, loss, **compile_kwargs)
    return tf_jacbp.hooks.attach(model) if attach else model


def _features(n=3 * BATCH):
    return np.random.default_rng(0).normal(size=(n, 4)).astype("float32")


def _sparse_labels(n=3 * BATCH):
    return np.random.default_rng(1).integers(0, C, size=n).astype("float32")


def _one_hot_labels(n=3 * BATCH):
    return np.eye(C, dtype="float32")[_sparse_labels(n).astype(int)]


def _state(model):
    """Weights, then every optimizer variable (slots and the step counter), as NumPy."""
    values = [np.array(w) for w in model.get_weights()]
    return values + [np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables]


def _assert_bit_equal(before, after):
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


# (loss, labels with a bad value at [index], the bad value as the message writes it)
CASES = {
    "sparse >= C": (lambda: losses.SparseCategoricalCrossentropy(from_logits=True), 7.0, "7"),
    "sparse negative": (lambda: losses.SparseCategoricalCrossentropy(from_logits=True), -1, "-1"),
    "categorical 1.5": (lambda: losses.CategoricalCrossentropy(from_logits=True), 1.5, "1.5"),
    "binary -0.5": (lambda: losses.BinaryCrossentropy(from_logits=True), -0.5, "-0.5"),
}


def _labels_with(case, index, n=3 * BATCH):
    make, bad, _ = CASES[case]
    loss = make()
    if isinstance(loss, losses.SparseCategoricalCrossentropy):
        y = _sparse_labels(n)
        y[index] = bad
    else:
        y = _one_hot_labels(n)
        y[index, 1] = bad
    return loss, y


def _message_pattern(loss, case):
    return rf"{type(loss).__name__}: y_true must hold .*found y_true = {CASES[case][2]} "


def _eager_pattern(loss, case):
    """Eagerly the value is NumPy's repr (``np.float32(7.0)``), as docs/errors.md shows it."""
    value = re.escape(repr(np.float32(CASES[case][1])))
    return rf"{type(loss).__name__}: y_true must hold .*found y_true = {value} "


@pytest.mark.parametrize("case", list(CASES))
def test_an_eager_loss_call_raises_value_error_naming_the_loss_and_the_value(case):
    loss, y = _labels_with(case, 2, n=4)
    with pytest.raises(ValueError, match=_eager_pattern(loss, case)):
        loss(y, np.zeros((4, C), "float32"))


@pytest.mark.parametrize("case", list(CASES))
def test_a_compiled_fit_applies_nothing_and_stops_right_after_the_bad_step(case):
    """The bad label sits in the second batch: the first batch trains, the second applies
    nothing (weights, Adam's moments and step counter bit-equal to a twin's trained on the first
    batch only) and fit raises right after it, naming the loss and the value."""
    x = _features()
    loss, y = _labels_with(case, BATCH + 1)
    model = _model(loss)
    with pytest.raises(STEP_ERROR, match=_message_pattern(loss, case)) as err:
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    assert "applied no update" in str(err.value)
    twin = _model(CASES[case][0]())
    twin.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    _assert_bit_equal(_state(twin), _state(model))
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 1


def test_a_bad_first_batch_leaves_the_initial_weights_and_a_usable_model():
    """On JAX, Keras' fit holds the weights outside the variables during the loop: after the
    first step raised they are back, equal to the initial ones, and the model trains on."""
    x = _features()
    loss, y = _labels_with("sparse >= C", 0)
    model = _model(loss)
    before = _state(model) if model.optimizer.built else [np.array(w) for w in model.get_weights()]
    with pytest.raises(STEP_ERROR, match="found y_true = 7 "):
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False)
    _assert_bit_equal(before, [np.array(w) for w in model.get_weights()][: len(before)])
    y[0] = 0.0
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.array_equal(model.get_weights()[0], before[0])


def test_evaluate_and_train_on_batch_stop_and_a_good_batch_runs_after():
    x = _features(BATCH)
    loss, y = _labels_with("sparse negative", 3, n=BATCH)
    model = _model(loss)
    model.train_on_batch(x, _sparse_labels(BATCH))
    before = _state(model)
    with pytest.raises(STEP_ERROR, match="found y_true = -1 "):
        model.evaluate(x, y, verbose=0)
    with pytest.raises(STEP_ERROR, match="found y_true = -1 "):
        model.train_on_batch(x, y)
    _assert_bit_equal(before, _state(model))
    y[3] = 0.0
    assert np.isfinite(model.train_on_batch(x, y))
    assert np.isfinite(model.evaluate(x, y, verbose=0))


def test_run_eagerly_fit_raises_value_error_and_keeps_the_weights():
    """``run_eagerly=True``: the labels have values, so the loss raises at once."""
    x = _features()
    loss, y = _labels_with("categorical 1.5", BATCH + 2)
    model = _model(loss, run_eagerly=True, jit_compile=False)
    model.train_on_batch(x[:BATCH], y[:BATCH])
    before = [np.array(w) for w in model.get_weights()]
    with pytest.raises(ValueError, match=_eager_pattern(loss, "categorical 1.5")):
        model.train_on_batch(x[BATCH : 2 * BATCH], y[BATCH : 2 * BATCH])
    _assert_bit_equal(before, [np.array(w) for w in model.get_weights()])


def test_several_steps_per_execution_still_stop():
    """With ``steps_per_execution=2`` the bad step applies nothing and fit stops after the
    execution holding it (on JAX the other step of that execution trains; on TensorFlow the
    record, a variable, skips it too)."""
    x = _features(4 * BATCH)
    loss, y = _labels_with("sparse >= C", BATCH + 1, n=4 * BATCH)
    model = _model(loss, optimizer=keras.optimizers.SGD(0.1), steps_per_execution=2)
    with pytest.raises(STEP_ERROR, match="found y_true = 7 "):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_mixed_precision_compiled_fit_applies_nothing_on_a_bad_label():
    """Under ``mixed_float16`` Keras wraps the optimizer in a ``LossScaleOptimizer``: its whole
    update (loss scale, step counter, inner slots) is skipped the same way."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x = _features()
        loss, y = _labels_with("sparse >= C", BATCH + 2)
        model = _model(loss)
        with pytest.raises(STEP_ERROR, match="found y_true = 7 "):
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
        twin = _model(CASES["sparse >= C"][0]())
        twin.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
        _assert_bit_equal(_state(twin), _state(model))
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("case", ["sparse >= C", "binary -0.5"])
def test_an_unattached_compiled_fit_gets_a_nan_loss(case):
    """Without ``tf_jacbp.hooks.attach`` nothing of Keras is wrapped: the bad label's step has a
    NaN loss (and a zero gradient), not a wrong number, and fit goes on."""
    x = _features(BATCH)
    loss, y = _labels_with(case, 0, n=BATCH)
    model = _model(loss, attach=False, optimizer=keras.optimizers.SGD(0.1))
    before = model.get_weights()
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    assert np.isnan(history.history["loss"][0])
    _assert_bit_equal(before, model.get_weights())  # SGD: a zero gradient moves nothing


def test_running_step_names_the_model_while_its_step_is_traced():
    """``tf_jacbp.hooks.running_step()`` is how a loss knows it is in an attached model's
    compiled step: set while Keras traces (and runs) the step, unset after. (Keras also calls
    the loss once symbolically, to build, before any step: there it is None.)"""
    seen = []

    class Spy(keras.losses.Loss):
        def call(self, y_true, y_pred):
            seen.append(tf_jacbp.hooks.running_step())
            return keras.ops.mean(keras.ops.square(y_pred), axis=-1)

    model = _model(Spy())
    model.fit(_features(BATCH), _sparse_labels(BATCH), batch_size=BATCH, verbose=0)
    in_steps = seen[1:] if seen[0] is None else seen
    assert in_steps and all(s is not None and s.model is model and s.xla for s in in_steps)
    assert tf_jacbp.hooks.running_step() is None


# --- Embedding: ids out of range -------------------------------------------------------------

V, D, P = 5, 2, 3


def _embedding_model(attach=True, jit_compile=True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((P,), dtype="int32"),
            layers.Embedding(V, D, name="words"),
            layers.Flatten(),
            layers.Dense(C),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return tf_jacbp.hooks.attach(model) if attach else model


def _ids(n=2 * BATCH):
    return np.random.default_rng(2).integers(-V, V, size=(n, P)).astype("int32")


@pytest.mark.parametrize("bad", [V, -V - 1, 40])
def test_an_embedding_id_out_of_range_stops_fit_with_nothing_applied(backend, bad):
    """The step that stops: a graph on TensorFlow (whose XLA gather clamps, as stock Keras'),
    ``jax.jit`` on JAX. The error names the layer (and on JAX the id); the second batch, which
    holds the bad id, applies nothing."""
    x, y = _ids(), _sparse_labels(2 * BATCH)
    x[BATCH + 3, 1] = bad
    model = _embedding_model(jit_compile=backend == "jax")
    error = ValueError if backend == "jax" else STEP_ERROR
    # (TensorFlow's assertion message escapes the quotes)
    named = r"Embedding \\?'words\\?': every id must lie in .* = \[-5, 5\)"
    with pytest.raises(error, match=named) as err:
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    if backend == "jax":
        assert f"Found id = {bad} " in str(err.value)
    twin = _embedding_model(jit_compile=backend == "jax")
    twin.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    _assert_bit_equal(_state(twin)[:3], _state(model)[:3])  # E, the Dense kernel and bias


def test_an_embedding_id_out_of_range_in_a_compiled_call(backend):
    """Compiled and not attached: on JAX the id reads a row of NaN on both routes (stock Keras'
    Embedding would clamp it silently); on TensorFlow XLA clamps it, as stock Keras does."""
    layer = layers.Embedding(V, D)
    layer.build()
    ids = np.array([[0, -1, V], [-V - 1, 2, 1]], "int32")
    table = keras.ops.convert_to_numpy(layer.embeddings)
    for reference in (False, True):
        if reference:
            with tf_jacbp.reference_mode():
                rows = keras.ops.convert_to_numpy(jb.xla_function(layer)(ids))
        else:
            rows = keras.ops.convert_to_numpy(jb.xla_function(layer)(ids))
        np.testing.assert_allclose(rows[0, :2], table[[0, V - 1]], rtol=1e-6)
        np.testing.assert_allclose(rows[1, 1:], table[[2, 1]], rtol=1e-6)
        if backend == "jax":
            assert np.isnan(rows[0, 2]).all() and np.isnan(rows[1, 0]).all()
        else:
            assert np.isfinite(rows).all()


def test_an_embedding_id_out_of_range_eagerly_raises(backend):
    layer = layers.Embedding(V, D)
    error = ValueError if backend == "jax" else STEP_ERROR
    with pytest.raises(error, match=r"Embedding '.*': every id must lie in .* = \[-5, 5\)"):
        layer(np.array([[0, V]], "int32"))


def test_an_unattached_jax_step_with_a_bad_id_has_a_nan_loss(backend):
    """Not attached, in a compiled step: on JAX the loss is NaN (a NaN row), not a wrong
    number; on TensorFlow the graph-mode step stops with the assertion."""
    x, y = _ids(BATCH), _sparse_labels(BATCH)
    x[2, 0] = V + 1
    model = _embedding_model(attach=False, jit_compile=backend == "jax")
    if backend == "jax":
        history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
        assert np.isnan(history.history["loss"][0])
    else:
        with pytest.raises(STEP_ERROR, match=r"every id must lie in .* = \[-5, 5\)"):
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)


DATA_PARALLEL = """
import numpy as np, keras, tf_jacbp
from tf_jacbp import layers, losses
devices = keras.distribution.list_devices()
assert len(devices) == 2, devices
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), layers.Dense(6, activation="relu"), layers.Dense(3)])
model.compile("adam", losses.SparseCategoricalCrossentropy(from_logits=True))
tf_jacbp.hooks.attach(model)
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 4)).astype("float32")
y = rng.integers(0, 3, 16).astype("float32")
model.fit(x[:8], y[:8], batch_size=8, verbose=0)
before = [np.array(w) for w in model.get_weights()]
y[13] = 9
try:
    model.fit(x[8:], y[8:], batch_size=8, verbose=0)
    raise SystemExit("no error")
except ValueError as err:
    assert "found y_true = 9 " in str(err), err
for b, a in zip(before, model.get_weights(), strict=True):
    np.testing.assert_array_equal(a, b)
assert int(np.array(model.optimizer.iterations)) == 1
print("stopped")
"""


def test_a_data_parallel_jax_step_stops_on_a_bad_label(backend):
    """``keras.distribution.DataParallel`` over two host devices (a subprocess: the device count
    is fixed when JAX starts): the batch is split, the record still reaches the host once, the
    step applies nothing and fit stops."""
    if backend != "jax":
        pytest.skip(
            "keras.distribution is Keras' JAX distribution; TensorFlow's tf.distribute "
            "steps do not record (tf_jacbp.hooks.report_bad_input)"
        )
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    result = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "stopped" in result.stdout, result.stderr[-3000:]
