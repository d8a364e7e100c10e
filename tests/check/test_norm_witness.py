"""GradientCheck on a DP model also checks the per-example gradient norms DP-SGD clips with.

DP-SGD's first pass (``per_example_gradient_norms``, the layers' ``squared_norms`` formulas) is
not what training differentiates, so only the ``"per_example_norms"`` witness can catch a wrong
norm formula: a Dense whose ``squared_norms`` returns a quarter of the truth trains with the
right gradient and fails the check. A plain model runs nothing more than before.
"""

from __future__ import annotations

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_jacbp import jacobian, layers, losses, privacy, tolerances
from tf_jacbp.callbacks import LOG_KEYS, GradientCheck, GradientMismatchError
from tf_jacbp.check import norms

N_FEATURES, N_CLASSES = 6, 3
WITNESS = "per_example_norms"


class QuarterNormDense(layers.Dense):
    """A Dense whose per-example squared norms are a quarter of the true ones (DP-SGD would
    clip with half the norm); its training products are right."""

    def squared_norms(self, m, a, z, kernel, bias=None):
        return [s / 4 for s in super().squared_norms(m, a, z, kernel, bias)]


def net(middle=None, dropout=0.0, dtype="float32"):
    """``Input(6) -> Dense(4, tanh) -> [Dropout] -> middle -> Dense(3)``."""
    middle = middle or layers.Dense(5, activation="relu", name="middle", dtype=dtype)
    stack = [
        keras.Input((N_FEATURES,), dtype=dtype),
        layers.Dense(4, activation="tanh", name="first", dtype=dtype),
    ]
    if dropout:
        stack.append(layers.Dropout(dropout, seed=3, dtype=dtype))
    stack += [middle, layers.Dense(N_CLASSES, name="last", dtype=dtype)]
    return keras.Sequential(stack, name="net")


def private(model, dtype="float32"):
    model = privacy.make_private(model, 1.0, 0.5, seed=0)
    model.compile(
        keras.optimizers.SGD(0.05),
        losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype),
    )
    return model


def data(n=32, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, N_FEATURES)).astype(dtype), rng.integers(0, N_CLASSES, size=n)


def test_a_dp_model_with_correct_layers_passes_and_records_the_norm_witness(tmp_path):
    model = private(net(dropout=0.25))
    x, y = data()
    check = GradientCheck((x[:16], y[:16]), every_n_batches=2, verbose=0)
    history = model.fit(x, y, batch_size=8, epochs=2, callbacks=[check], verbose=0)
    assert check.records and all(r.passed for r in check.records), check.summary()
    by_witness = collections.Counter(r.witness for r in check.records)
    assert by_witness[WITNESS] == by_witness["reference"] > 0, by_witness
    for r in check.records:
        if r.witness == WITNESS:
            assert r.gradient_dtype == "float64" and r.rtol == tolerances.rtol("float64")
            assert r.criterion == "rtol" and r.rel_err <= r.rtol and r.independent
    assert {r.variable for r in check.records if r.witness == WITNESS} == {
        v.path for v in model.trainable_variables
    }
    assert len(history.history["grad_check_norms_max_rel_err"]) == 2
    assert max(history.history["grad_check_norms_max_rel_err"]) <= tolerances.rtol("float64")
    assert "grad_check_norms_max_rel_err" in LOG_KEYS
    summary = check.summary()
    assert WITNESS in summary and "0 mismatches" in summary
    check.plot(tmp_path / "norms.png")
    assert (tmp_path / "norms.png").stat().st_size > 0


def test_the_norm_witness_equals_norms_of_independent_per_sample_gradients():
    """The record's numbers are those of a per-sample tf.GradientTape, computed here apart."""
    model = private(net(dtype="float64"), "float64")
    x, y = data(dtype="float64")
    check = GradientCheck((x[:12], y[:12]), on_mismatch="log", verbose=0)
    records = [r for r in check.check_now(model) if r.witness == WITNESS]
    walk = np.asarray(jacobian.per_example_gradient_norms(model, x[:8], y[:8], per_variable=True))
    auto = []
    for i in range(norms.NORM_SAMPLES):
        with tf.GradientTape() as tape:
            loss = model.loss(y[i : i + 1], model(x[i : i + 1]))
        auto.append([np.linalg.norm(g) for g in tape.gradient(loss, model.trainable_variables)])
    auto = np.asarray(auto)
    assert np.max(np.abs(walk - auto)) <= 1e-12 * np.max(auto)
    for r, column in zip(records, range(auto.shape[1]), strict=True):
        assert r.abs_err == pytest.approx(
            np.max(np.abs(walk[:, column] - auto[:, column])), abs=1e-15
        )
        assert r.passed and r.tolerance_dtype == "float64"


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_a_quarter_norm_formula_fails_only_the_norm_witness(dropout):
    model = private(net(QuarterNormDense(5, activation="relu", name="middle"), dropout))
    x, y = data()
    check = GradientCheck((x[:16], y[:16]), verbose=0)
    with pytest.raises(GradientMismatchError) as caught:
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[check], verbose=0)
    failed = caught.value.records
    assert {r.witness for r in failed} == {WITNESS}
    assert {r.variable for r in failed} == {"net/middle/kernel", "net/middle/bias"}
    for r in failed:  # sqrt(1/4): the norms are half the true ones
        assert r.rel_err == pytest.approx(0.5, rel=1e-6) and r.recheck_passed is False
    assert all(r.passed for r in check.records if r.witness == "reference")
    message = str(caught.value)
    assert "layer 'middle', variable 'net/middle/kernel'" in message
    assert "squared_norms" in message


def test_a_plain_model_runs_no_norm_witness():
    """The check of a model that does not clip per example is unchanged: no norm witness is
    built, traced or recorded."""
    model = net()
    model.compile(
        keras.optimizers.SGD(0.05), losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y = data()
    check = GradientCheck((x[:16], y[:16]), every_n_batches=2, verbose=0)
    history = model.fit(x, y, batch_size=8, epochs=1, callbacks=[check], verbose=0)
    assert not norms.clips_per_example(model)
    assert check._witnesses.norms is None
    assert {r.witness for r in check.records} == {"reference"}
    assert "grad_check_norms_max_rel_err" not in history.history
    assert set(check.tracing_counts) == {
        "jacobian",
        "reference",
        "comparison",
        "float64_jacobian",
        "float64_reference",
    }


def test_the_dp_marker_is_the_clip_norm():
    model = private(net())
    assert norms.clips_per_example(model)
    assert getattr(model, norms.CLIP_ATTRIBUTE) == 1.0
