"""GradientCheck says what it checked, where a non-finite value came from, and rejects bad setups.

* Coverage: a variable whose gradient the same code computes on both routes (here a layer with
  its own ``tf.custom_gradient``, 2x wrong) is named in a ``GradientCheckCoverageWarning`` at the
  start of ``fit``, counted apart in ``summary()``, ``records`` and ``logs``; finite differences
  catch its wrong gradient.
* Non-finite values: the message tells the data or loss (probe, loss value, reference route
  non-finite too) from a layer's backward pass (reference finite, Jacobian route not).
* Clear errors: an unwritable ``log_dir``, an unbatched ``tf.data`` probe, a model without layers
  or without trainable variables.
* Logs: the worst variable is named in the summary and records, never a float index in ``logs``.
* The criterion is stated once (``tf_jacbp.check.criterion.STATEMENT``, numbers from
  ``tf_jacbp.tolerances``): ``GradientCheck``'s docstring includes it, docs/gradient_check.md's
  copy equals it.
"""

from __future__ import annotations

import math
import pathlib
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from planted import InfDense

from tf_jacbp import layers, losses, tolerances
from tf_jacbp.callbacks import (
    LOG_KEYS,
    GradientCheck,
    GradientCheckCoverageWarning,
    GradientMismatchError,
)
from tf_jacbp.check import criterion

N_FEATURES, N_CLASSES = 6, 3


def data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, N_FEATURES)).astype("float32"), rng.integers(0, N_CLASSES, n)


def compile_model(model):
    model.compile(keras.optimizers.SGD(0.1), losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit(model, check, epochs=1):
    x, y = data()
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, callbacks=[check])


class DoubledGradientScale(keras.layers.Layer):
    """``y = x * s`` with its own ``tf.custom_gradient`` whose ``ds`` is twice the truth.

    Not a tf_jacbp layer: both routes run this same custom gradient.
    """

    def build(self, input_shape):
        self.s = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="s")

    def call(self, x):
        @tf.custom_gradient
        def scale(x, s):
            def grad(dy):
                return dy * s, 2.0 * tf.reduce_sum(dy * x, axis=0)

            return x * s, grad

        return scale(x, tf.convert_to_tensor(self.s))


def custom_gradient_model():
    return compile_model(
        keras.Sequential(
            [
                keras.Input((N_FEATURES,)),
                layers.Dense(4, activation="tanh", name="first"),
                DoubledGradientScale(name="doubled"),
                layers.Dense(N_CLASSES, name="last"),
            ],
            name="net",
        )
    )


# --- coverage (issue 13 item 4) ----------------------------------------------------------------


def test_a_custom_gradient_layer_is_named_as_unchecked_and_counted_apart():
    model = custom_gradient_model()
    check = GradientCheck(data(16, seed=1), every_n_batches=2, verbose=0)
    with pytest.warns(GradientCheckCoverageWarning, match="'net/doubled/s'") as caught:
        history = fit(model, check)
    message = next(str(w.message) for w in caught if "doubled" in str(w.message))
    assert "1 of 5 trainable variables" in message
    assert "finite_differences=True" in message
    # Its 2x-wrong gradient agrees with itself: passed, but not counted as checked.
    doubled = [r for r in check.records if r.variable == "net/doubled/s"]
    assert doubled and all(r.passed and not r.independent for r in doubled)
    assert all(r.independent for r in check.records if r.layer in ("first", "last"))
    assert history.history["grad_check_independent_variables"] == [4]
    summary = check.summary()
    assert "4 of 5 variables checked against an independent witness" in summary
    assert "not checked (the same code on both routes): 'net/doubled/s'" in summary


def test_finite_differences_catch_the_2x_wrong_custom_gradient():
    model = custom_gradient_model()
    check = GradientCheck(data(16, seed=1), finite_differences=True, on_mismatch="log", verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(model, check)
    # With finite differences every variable has an independent witness: no coverage warning.
    assert not any(issubclass(w.category, GradientCheckCoverageWarning) for w in caught)
    assert history.history["grad_check_independent_variables"] == [5]
    fd_failed = {
        r.variable for r in check.records if r.witness == "finite_differences" and not r.passed
    }
    assert fd_failed == {"net/doubled/s"}
    assert all(r.passed for r in check.records if r.witness == "reference")
    assert "5 of 5 variables checked against an independent witness" in check.summary()


# --- where a non-finite value comes from (issue 13 item 3) -----------------------------------


class Sqrt(keras.layers.Layer):
    """``sqrt(x)``, stock ops: its derivative is infinite at 0, on both routes."""

    def call(self, x):
        return tf.sqrt(x)


def mlp(middle):
    return compile_model(
        keras.Sequential(
            [
                keras.Input((N_FEATURES,)),
                layers.Dense(4, activation="tanh", name="first"),
                middle,
                layers.Dense(N_CLASSES, name="last"),
            ],
            name="net",
        )
    )


def failure(model, probe):
    with pytest.raises(GradientMismatchError) as info:
        fit(model, GradientCheck(probe, verbose=0))
    return info.value


def test_non_finite_from_a_backward_pass_is_blamed_on_the_backward_pass():
    err = failure(mlp(InfDense(4, name="middle")), data(16, seed=1))
    (record,) = err.records
    assert record.variable == "net/middle/kernel" and record.cause == "backward"
    assert "the reference route is finite and the Jacobian route is not" in str(err)
    assert "a layer's backward pass produced it" in str(err)


def test_non_finite_in_the_probe_is_blamed_on_the_data():
    x, y = data(16, seed=1)
    x[3, 2] = np.nan
    err = failure(mlp(layers.Dense(4, name="middle")), (x, y))
    assert {r.cause for r in err.records} == {"probe"}
    assert "the probe batch has NaN or inf values: the data, not a backward pass" in str(err)


def test_non_finite_loss_is_blamed_on_the_data_or_loss():
    model = mlp(layers.Dense(4, name="middle"))
    kernel = model.get_layer("last").kernel
    kernel.assign(np.full(kernel.shape, np.inf, "float32"))
    err = failure(model, data(16, seed=1))
    assert {r.cause for r in err.records} == {"loss"}
    assert "the loss on the probe is NaN or inf" in str(err)
    assert "not a backward pass" in str(err)


def test_non_finite_on_both_routes_is_blamed_on_the_data_not_a_backward_pass():
    # ReLU zeros reach sqrt, whose derivative is infinite there: the loss is finite, both routes'
    # gradients are not.
    model = compile_model(
        keras.Sequential(
            [
                keras.Input((N_FEATURES,)),
                layers.Dense(4, activation="relu", name="first"),
                Sqrt(name="sqrt"),
                layers.Dense(N_CLASSES, name="last"),
            ],
            name="net",
        )
    )
    x, y = data(16, seed=1)
    err = failure(model, (x, y))
    assert err.records and {r.cause for r in err.records} == {"reference"}
    assert "the reference route's gradient is not finite either" in str(err)
    assert "not from a layer's backward pass" in str(err)


# --- clear errors (issue 13 item 10) ---------------------------------------------------------


def test_unwritable_log_dir_is_named_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    log_dir = blocker / "logs"
    with pytest.raises(ValueError, match=r"log_dir='.*a_file/logs' is not a writable directory"):
        GradientCheck(data(8), log_dir=log_dir)


@pytest.mark.parametrize("one_hot", [False, True])
def test_unbatched_dataset_probe_says_to_call_batch(one_hot):
    x, y = data(8)
    labels = np.eye(N_CLASSES, dtype="float32")[y] if one_hot else y
    dataset = tf.data.Dataset.from_tensor_slices((x, labels))
    with pytest.raises(ValueError, match=r"\.batch\(n\)"):
        GradientCheck(dataset)


def test_model_without_layers_is_a_clear_error():
    model = keras.Sequential(name="empty")
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x = np.zeros((8, N_FEATURES), "float32")
    with pytest.raises(ValueError, match="model 'empty' has no layers"):
        model.fit(x, x, verbose=0, callbacks=[GradientCheck((x, x), verbose=0)])


@pytest.mark.parametrize("targets", [N_FEATURES, 5])
def test_model_without_trainable_variables_is_a_clear_error(targets):
    # Said first, whether or not the probe's targets would fit the loss.
    model = keras.Sequential([keras.Input((N_FEATURES,)), layers.ReLU()], name="frozen")
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x = np.zeros((8, N_FEATURES), "float32")
    check = GradientCheck((x, np.zeros((8, targets), "float32")), verbose=0)
    with pytest.raises(ValueError, match="model 'frozen' has no trainable variables"):
        model.fit(x, x, verbose=0, callbacks=[check])


# --- logs (issue 14 item 3) --------------------------------------------------------------------


def test_logs_hold_no_float_index_and_the_summary_names_the_worst_variable():
    model = mlp(layers.Dense(4, name="middle"))
    check = GradientCheck(data(16, seed=1), verbose=0)
    history = fit(model, check, epochs=2)
    assert "grad_check_worst_variable" not in history.history
    assert set(LOG_KEYS) - set(history.history) == {
        "grad_check_fd_max_rel_err",  # no finite differences
        "grad_check_norms_max_rel_err",  # not a DP model
    }
    for key in ("grad_check_mismatches", "grad_check_independent_variables"):
        assert all(type(v) is int for v in history.history[key]), history.history[key]
    # The worst over the whole training: under the rounding-floor criterion the bound is
    # FLOOR_RATIO x floor, so the largest rel_err / bound is the largest ratio.
    worst = max(check.records, key=lambda r: r.ratio)
    assert f"Worst: variable '{worst.variable}'" in check.summary()
    assert math.isfinite(worst.ratio)


def test_the_criterion_is_stated_once_with_the_numbers_of_tolerances():
    statement = criterion.normalized(criterion.STATEMENT)
    docs = pathlib.Path(__file__).parents[2] / "docs" / "gradient_check.md"
    assert statement in criterion.normalized(docs.read_text()), (
        "docs/gradient_check.md's criterion differs from tf_jacbp.check.criterion.STATEMENT; "
        "paste STATEMENT (with single backticks) into it:\n" + criterion.STATEMENT
    )
    assert statement in criterion.normalized(GradientCheck.__doc__)
    assert "{criterion}" not in GradientCheck.__doc__
    for number in (
        tolerances.rtol("float64"),
        tolerances.rtol("float32"),
        tolerances.FLOOR_MIN_ULPS,
        tolerances.FINITE_DIFFERENCE_RTOL,
    ):
        assert f"{number:g}" in statement
    assert f"<= {tolerances.FLOOR_RATIO:g} * floor" in statement
