"""GradientCheck: correct models pass, reports reach the user, bad arguments are named.

The planted-bug layers some tests train come from ``tests/planted.py``; the tests that GradientCheck
catches each planted bug are in ``tests/layers/test_planted_bugs.py``. Models and probes are small
so that the file runs in well under three minutes on two cores.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from planted import (
    N_CLASSES,
    N_FEATURES,
    FlippedSignDense,
    InfDense,
    ScaledDense,
    compile_model,
    data,
    fit,
    mlp,
    probe,
    residual,
)

import tf_jacbp
from tf_jacbp import layers, tolerances
from tf_jacbp.callbacks import (
    LOG_KEYS,
    GradientCheck,
    GradientCheckCoverageWarning,
    GradientMismatchError,
    GradientMismatchWarning,
)

# --- helpers ---------------------------------------------------------------------------------


def route_gradients(model, x, y, sample_weight=None):
    """Both routes' gradients of the compiled loss, eagerly, independently of the callback:
    ``(jacobian_route, reference_route)``, each a list over ``model.trainable_variables``."""
    grads = []
    for reference in (False, True):
        with tf.GradientTape() as tape:
            with tf_jacbp.reference_mode() if reference else contextlib.nullcontext():
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        grads.append([np.asarray(g) for g in tape.gradient(loss, model.trainable_variables)])
    return grads


@pytest.mark.slow
def test_residual_batchnorm_dropout_model_passes_under_xla_with_finite_differences():
    x = keras.Input((N_FEATURES,))
    h = layers.Dense(4, activation="tanh", name="first")(x)
    r = layers.BatchNormalization(name="bn")(layers.Dense(4, name="middle")(h))
    h = layers.Add()([layers.Dropout(0.3, seed=2)(r), h])
    model = keras.Model(x, layers.Dense(N_CLASSES, name="last")(h), name="net")
    compile_model(model, jit_compile=True)
    check = GradientCheck(probe(), every_n_batches=2, finite_differences=True, verbose=0)
    fit(model, check)
    witnesses = collections.Counter(r.witness for r in check.records)
    assert witnesses["finite_differences"] >= 3 * len(model.trainable_variables), witnesses
    assert witnesses["reference"] == witnesses["finite_differences"]
    assert all(r.passed for r in check.records), check.summary()


def test_a_zero_gradient_is_measured_against_the_noise_floor_of_the_whole_gradient():
    """Rounding noise (1e-8) in a gradient that is exactly zero (a bias before a train-mode
    batch normalization) fails against itself but passes against the scale of the check; a
    real 1% error in a gradient of norm 1 still fails."""
    rtol = tolerances.rtol("float32")
    assert tolerances.relative_error_from_norms(1e-8, 1e-9, "float32") > rtol
    assert tolerances.relative_error_from_norms(1e-8, 1e-9, "float32", scale=1.0) <= rtol
    assert tolerances.relative_error_from_norms(1e-2, 1.0, "float32", scale=1.0) > rtol


def test_residual_model_passes_whole_fit():
    model = compile_model(residual(layers.Add(name="add")))
    check = GradientCheck(probe(), every_n_batches=1, verbose=0)
    fit(model, check, epochs=2)
    per_variable = collections.Counter(r.variable for r in check.records)
    assert set(per_variable) == {v.path for v in model.trainable_variables}
    assert min(per_variable.values()) >= 8  # every one of the 8 steps was checked
    assert all(r.passed for r in check.records)


# --- correct models pass ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_correct_model_passes_whole_fit(dtype):
    # Keras adds a float64 regularization loss to the float32 compiled loss only if floatx is
    # float64, so the float64 model has none.
    regularizer = "l2" if dtype == "float32" else None
    model = compile_model(mlp(dtype=dtype, regularizer=regularizer), dtype)
    check = GradientCheck(probe(dtype), every_n_batches=2, verbose=0)
    history = fit(model, check, epochs=3, dtype=dtype)
    assert check.records and all(r.passed for r in check.records)
    steps = sorted({r.step for r in check.records})
    assert steps == [0, 2, 4, 6, 8, 10, 12], steps  # start, every 2 batches, each epoch end
    if dtype == "float64":  # the model is its own float64 twin: the fixed float64 tolerance
        assert {r.rtol for r in check.records} == {tolerances.rtol(dtype)}
        assert {r.criterion for r in check.records} == {"rtol"}
    else:  # the bound is derived from the reference route's own rounding floor
        assert {r.criterion for r in check.records} == {"rounding_floor"}
        for r in check.records:
            assert r.rtol == pytest.approx(tolerances.FLOOR_RATIO * r.floor)
            assert r.float64_rel_err <= tolerances.rtol("float64")
    assert {r.gradient_dtype for r in check.records} == {dtype}
    assert history.history["grad_check_mismatches"] == [0.0, 0.0, 0.0]
    assert max(history.history["grad_check_max_rel_err"]) <= tolerances.rtol(dtype)


def test_float64_model_with_float32_loss_gets_float32_tolerance():
    model = compile_model(mlp(dtype="float64"), "float32")
    check = GradientCheck(probe("float64"), verbose=0)
    fit(model, check, dtype="float64")
    assert {r.tolerance_dtype for r in check.records} == {"float32"}
    assert all(r.passed for r in check.records)


def test_numbers_agree_with_an_independent_gradient_tape():
    model = compile_model(mlp(ScaledDense(4, activation="relu", name="middle"), regularizer="l2"))
    x, y = probe()
    check = GradientCheck((x, y), on_mismatch="log", verbose=0)
    fit(model, check, epochs=2)
    last = [r for r in check.records if r.step == check.records[-1].step]
    grads, refs = route_gradients(model, x, y)
    for r, g, ref in zip(last, grads, refs, strict=True):
        rel = tolerances.relative_error(g, ref, "float32")
        assert r.rel_err == pytest.approx(rel, rel=1e-3, abs=1e-6), r
        assert r.abs_err == pytest.approx(np.max(np.abs(g - ref)), rel=1e-3, abs=1e-7), r
        cosine = np.vdot(g, ref) / (np.linalg.norm(g) * np.linalg.norm(ref))
        assert r.cosine == pytest.approx(cosine, abs=1e-6)
        assert r.passed == (rel <= r.rtol and r.float64_rel_err <= r.float64_rtol)
    # The data term of every variable up to 'middle' is scaled by 1.01; 'last' is untouched.
    assert [r.passed for r in last] == [False, False, False, False, True, True]


# --- non-finite gradients are failures ---------------------------------------------------------


def test_inf_in_a_gradient_is_a_failure():
    model = compile_model(mlp(InfDense(4, activation="relu", name="middle")))
    check = GradientCheck(probe(), on_mismatch="log", verbose=0)
    history = fit(model, check)
    bad = [r for r in check.records if r.variable == "net/middle/kernel"]
    assert bad and all(not r.passed and math.isnan(r.rel_err) for r in bad)
    assert math.isnan(history.history["grad_check_max_rel_err"][0])
    # The worst variable is named in the summary, not logged as a float index.
    assert "grad_check_worst_variable" not in history.history
    assert "Worst: variable 'net/middle/kernel' (layer 'middle'), non-finite" in check.summary()


def test_nan_in_probe_inputs_is_a_failure():
    model = compile_model(mlp())
    x, y = probe()
    x[3, 2] = np.nan
    check = GradientCheck((x, y), verbose=0)
    with pytest.raises(GradientMismatchError, match="non-finite"):
        fit(model, check)


def test_nan_in_weights_is_a_failure():
    model = compile_model(mlp())
    kernel = model.get_layer("last").kernel
    kernel.assign(np.where(np.eye(4, N_CLASSES, dtype=bool), np.nan, np.asarray(kernel)))
    check = GradientCheck(probe(), on_mismatch="log", verbose=0)
    history = fit(model, check)
    assert check.records and not any(r.passed for r in check.records)
    assert history.history["grad_check_mismatches"][0] == len(check.records)


# --- reporting -------------------------------------------------------------------------------


def test_metrics_reach_history_and_summary(capsys):
    model = compile_model(mlp())
    check = GradientCheck(probe(), every_n_batches=3)
    history = fit(model, check, epochs=2)
    assert set(history.history) >= set(LOG_KEYS[:4])
    for key in LOG_KEYS[:4]:
        assert len(history.history[key]) == 2
    assert all(type(v) is float for v in history.history["grad_check_max_rel_err"])
    assert history.history["grad_check_mismatches"] == [0, 0]
    assert history.history["grad_check_independent_variables"] == [6, 6]
    assert all(type(v) is int for v in history.history["grad_check_independent_variables"])
    printed = capsys.readouterr().out
    assert printed.strip() == check.summary()
    assert "0 mismatches" in printed and "net/middle/kernel" in printed


def test_verbose_0_prints_nothing(capsys):
    fit(compile_model(mlp()), GradientCheck(probe(), verbose=0))
    assert capsys.readouterr().out == ""


def event_tags(directory):
    tags = set()
    for path in glob.glob(os.path.join(directory, "**", "*tfevents*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_tensorboard_event_files(tmp_path):
    model = compile_model(mlp())
    check = GradientCheck(probe(), log_dir=tmp_path / "grad_check", verbose=0)
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "board"))
    fit(model, check, epochs=2, extra=[board])
    assert "epoch_grad_check_max_rel_err" in event_tags(tmp_path / "board")
    tags = event_tags(tmp_path / "grad_check")
    assert "grad_check/reference/net/middle/kernel" in tags
    assert len(tags) == len(model.trainable_variables)


def test_log_dir_without_tensorboard_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        GradientCheck(probe(), log_dir=tmp_path)


@pytest.mark.slow
def test_plot_writes_a_png(tmp_path):
    model = compile_model(mlp(InfDense(4, activation="relu", name="middle")))
    check = GradientCheck(
        probe(), every_n_batches=2, on_mismatch="log", verbose=0, finite_differences=True
    )
    fit(model, check, epochs=2)
    path = tmp_path / "errors.png"
    check.plot(path)
    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'tf_jacbp\[plot\]'"):
        GradientCheck(probe()).plot(tmp_path / "errors.png")


# --- on_mismatch modes -----------------------------------------------------------------------


@pytest.mark.slow
def test_warn_mode_warns_and_goes_on():
    model = compile_model(mlp(FlippedSignDense(4, activation="relu", name="middle")))
    check = GradientCheck(probe(), every_n_batches=2, on_mismatch="warn", verbose=0)
    with pytest.warns(GradientMismatchWarning, match="net/middle/kernel"):
        history = fit(model, check, epochs=2)
    assert len(history.history["loss"]) == 2
    assert history.history["grad_check_mismatches"] == [3.0, 2.0]


def test_log_mode_only_records():
    model = compile_model(mlp(FlippedSignDense(4, activation="relu", name="middle")))
    check = GradientCheck(probe(), on_mismatch="log", verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMismatchWarning)
        history = fit(model, check, epochs=2)
    assert len(history.history["loss"]) == 2
    failed = [r for r in check.records if not r.passed]
    assert {r.variable for r in failed} == {"net/middle/kernel"}
    assert len(failed) == 3  # start, end of epoch 0, end of epoch 1
    assert "3 mismatches" in check.summary()
    # A second fit's epoch 0 reports its own check (the end), not the first fit's epoch 0.
    again = fit(model, check)
    assert again.history["grad_check_mismatches"] == [1.0]


# --- arguments and probes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_batches": 0}, "every_n_batches must be a positive int, got every_n_batches=0"),
        ({"every_n_batches": -3}, "every_n_batches=-3"),
        ({"every_n_batches": 2.5}, "every_n_batches=2.5"),
        ({"every_n_batches": True}, "every_n_batches=True"),
        ({"on_mismatch": "ignore"}, "'raise', 'warn', 'log'.*on_mismatch='ignore'"),
        ({"rtol": -1e-3}, "rtol must be a positive number"),
        ({"atol": 0}, "atol must be a positive number"),
        ({"finite_differences": "yes"}, "finite_differences must be True or False"),
        ({"verbose": -1}, "verbose must be 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientCheck(probe(), **kwargs)


def test_probe_of_zero_samples():
    x, y = probe()
    with pytest.raises(ValueError, match=r"probe has zero samples \(shapes \(\(0, 6\), \(0,\)\)"):
        GradientCheck((x[:0], y[:0]))


@pytest.mark.parametrize(
    ("bad_probe", "match"),
    [
        ("not a probe", "probe must be \\(x, y\\)"),
        ((np.zeros((4, 6)), np.zeros(3)), "same number of samples"),
        (
            tf.data.Dataset.from_tensor_slices((np.zeros((0, 6)), np.zeros(0))).batch(2),
            "empty tf.data.Dataset",
        ),
    ],
)
def test_malformed_probe(bad_probe, match):
    with pytest.raises(ValueError, match=match):
        GradientCheck(bad_probe)


def test_probe_that_does_not_fit_the_model():
    model = compile_model(mlp())
    x = np.zeros((8, N_FEATURES + 1), "float32")
    check = GradientCheck((x, np.zeros(8, "int64")))
    with pytest.raises(
        ValueError,
        match=r"probe does not fit the model: x has shape \(8, 7\), but model 'net' expects "
        r"inputs of shape \(None, 6\)",
    ):
        fit(model, check)


def test_probe_targets_that_do_not_fit_the_loss():
    model = compile_model(mlp())
    x, _ = probe(n=8)
    check = GradientCheck((x, np.zeros((8, 5), "int64")))
    with pytest.raises(ValueError, match=r"loss .* failed on probe \(y has shape \(8, 5\)"):
        fit(model, check)


@pytest.mark.slow
def test_dataset_probe_with_sample_weights():
    x, y = probe(n=32)
    weights = np.linspace(0, 2, 32).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(8)
    check = GradientCheck(dataset, verbose=0)
    assert [tuple(t.shape) for t in check.probe] == [(8, N_FEATURES), (8,), (8,)]
    model = compile_model(mlp(ScaledDense(4, activation="relu", name="middle")))
    check = GradientCheck(dataset, on_mismatch="log", verbose=0)
    fit(model, check)
    # Independently: the weighted loss's gradients, both routes.
    grads = route_gradients(model, *(np.asarray(t) for t in check.probe))
    last = check.records[-len(model.trainable_variables) :]
    for r, g, ref in zip(last, *grads, strict=True):
        assert r.rel_err == pytest.approx(tolerances.relative_error(g, ref), rel=1e-3, abs=1e-6)
    # The weights are applied: with all of them zero there is no gradient, so no mismatch.
    unweighted = GradientCheck((x[:8], y[:8], np.zeros(8, "float32")), verbose=0)
    fit(model, unweighted)
    assert all(r.passed and r.rel_err == 0 for r in unweighted.records)


# --- modes: jit, mixed layers, nested models, mixed precision, retracing ----------------------


@pytest.mark.slow
def test_jit_compile():
    model = compile_model(mlp(), jit_compile=True)
    check = GradientCheck(probe(), every_n_batches=1, verbose=0)
    fit(model, check, epochs=2)
    assert all(r.passed for r in check.records)
    assert check.tracing_counts == {
        "jacobian": 1,
        "reference": 1,
        "comparison": 1,
        "float64_jacobian": 1,
        "float64_reference": 1,
    }
    bad = compile_model(
        mlp(FlippedSignDense(4, activation="relu", name="middle")), jit_compile=True
    )
    with pytest.raises(GradientMismatchError, match="net/middle/kernel"):
        fit(bad, GradientCheck(probe(), verbose=0))


def test_stock_and_tf_jacbp_layers_nested():
    inner = keras.Sequential(
        [keras.Input((8,)), layers.Dense(8, activation="tanh", name="jac_inner")], name="inner"
    )
    inputs = keras.Input((N_FEATURES,))
    h = keras.layers.Dense(8, activation="relu", name="stock")(inputs)
    h = keras.layers.Dropout(0.5)(h)
    h = inner(keras.layers.BatchNormalization(name="bn")(h))
    outputs = layers.Dense(N_CLASSES, name="last")(h)
    model = compile_model(keras.Model(inputs, outputs))
    check = GradientCheck(probe(), every_n_batches=1, verbose=0)
    with pytest.warns(GradientCheckCoverageWarning) as caught:
        fit(model, check, epochs=2)
    messages = [str(w.message) for w in caught]
    assert not any("has no tf_jacbp layer" in m for m in messages), messages
    # The stock Dense and BatchNormalization are compared with themselves: named, not counted.
    assert any("4 of 8 trainable variables" in m and "'stock/kernel'" in m for m in messages)
    assert "4 of 8 variables checked against an independent witness" in check.summary()
    assert {r.variable for r in check.records if not r.independent} == {
        "stock/kernel",
        "stock/bias",
        "bn/gamma",
        "bn/beta",
    }
    # Dropout is active in both routes with the same mask, so they still agree.
    assert all(r.passed for r in check.records)
    layer_names = [r.layer for r in check.records[: len(model.trainable_variables)]]
    assert layer_names == ["stock", "stock", "bn", "bn", "jac_inner", "jac_inner", "last", "last"]


def test_check_does_not_disturb_training_state():
    """Batch-norm statistics and dropout seeds are as if the callback were not there."""

    def train(with_check):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((N_FEATURES,)),
                layers.Dense(8, activation="relu"),
                keras.layers.Dropout(0.5, seed=1),
                keras.layers.BatchNormalization(),
                layers.Dense(N_CLASSES),
            ]
        )
        compile_model(model)
        callbacks = [GradientCheck(probe(), every_n_batches=1, verbose=0)] if with_check else []
        x, y = data()
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=callbacks, shuffle=False)
        return model.get_weights()

    for a, b in zip(train(True), train(False), strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_tf_jacbp_layer_warns():
    model = keras.Sequential(
        [keras.Input((N_FEATURES,)), keras.layers.Dense(4), keras.layers.Dense(N_CLASSES)]
    )
    compile_model(model)
    with pytest.warns(UserWarning, match="has no tf_jacbp layer"):
        fit(model, GradientCheck(probe(), verbose=0))
    # A tf_jacbp layer inside a nested model counts.
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(N_CLASSES)])
    outer = compile_model(
        keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(4), inner])
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(outer, GradientCheck(probe(), verbose=0))
    assert not any("has no tf_jacbp layer" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("policy", "compute"), [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")]
)
def test_mixed_precision_uses_the_compute_dtype_tolerance(policy, compute):
    keras.config.set_dtype_policy(policy)
    model = compile_model(mlp())
    check = GradientCheck(probe(), every_n_batches=2, verbose=0)
    fit(model, check, epochs=2)
    assert {r.tolerance_dtype for r in check.records} == {compute}
    assert {r.criterion for r in check.records} == {"rounding_floor"}
    # The floor is at least a few units in the last place of the compute dtype.
    assert (
        min(r.floor for r in check.records) >= tolerances.FLOOR_MIN_ULPS * tolerances.EPS[compute]
    )
    assert {r.gradient_dtype for r in check.records} == {"float32"}
    assert all(r.passed for r in check.records)
    # The looser tolerance still sees a real bug.
    bad = compile_model(mlp(FlippedSignDense(4, activation="relu", name="middle")))
    with pytest.raises(GradientMismatchError, match="net/middle/kernel"):
        fit(bad, GradientCheck(probe(), verbose=0))


def test_routes_are_traced_once_and_reused():
    model = compile_model(mlp())
    check = GradientCheck(probe(), every_n_batches=1, finite_differences=True, verbose=0)
    fit(model, check, epochs=2)
    fit(model, check, epochs=1)
    assert len({r.step for r in check.records}) == 13  # 12 batches and the start
    assert check.tracing_counts == {
        "jacobian": 1,
        "reference": 1,
        "comparison": 1,
        "float64_jacobian": 1,
        "float64_reference": 1,
        "finite_differences_loss": 1,
    }


# --- finite differences ----------------------------------------------------------------------


def test_finite_differences_pass_on_a_correct_model():
    model = compile_model(mlp(regularizer="l2"))
    check = GradientCheck(probe(), every_n_batches=2, finite_differences=True, verbose=0)
    history = fit(model, check, epochs=2)
    fd = [r for r in check.records if r.witness == "finite_differences"]
    assert len(fd) == len([r for r in check.records if r.witness == "reference"])
    assert all(r.passed for r in check.records)
    assert {r.rtol for r in fd} == {tolerances.FINITE_DIFFERENCE_RTOL}
    assert max(history.history["grad_check_fd_max_rel_err"]) <= tolerances.FINITE_DIFFERENCE_RTOL


# --- distribution ----------------------------------------------------------------------------

MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from tf_jacbp import layers, losses
    from tf_jacbp.callbacks import GradientCheck, GradientMismatchError
    from planted import FlippedSignDense

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)
    out = {"replicas": strategy.num_replicas_in_sync}
    for name, cls in (("correct", layers.Dense), ("flipped", FlippedSignDense)):
        with strategy.scope():
            model = keras.Sequential([keras.Input((6,)), layers.Dense(4, activation="tanh"),
                                      cls(4, activation="relu", name="middle"), layers.Dense(3)])
            model.compile("sgd", losses.SparseCategoricalCrossentropy(from_logits=True))
        check = GradientCheck((x[:16], y[:16]), every_n_batches=2, verbose=0)
        try:
            history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[check])
            out[name] = {"passed": all(r.passed for r in check.records),
                         "checks": len({r.step for r in check.records}),
                         "mismatches": history.history["grad_check_mismatches"]}
        except GradientMismatchError as err:
            out[name] = {"error": str(err)}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_mirrored_strategy_over_two_logical_cpus():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tests = os.path.join(root, "tests")  # for the planted-bug layers
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, tests, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["replicas"] == 2
    assert out["correct"] == {"passed": True, "checks": 5, "mismatches": [0.0, 0.0]}
    assert "layer 'middle', variable 'sequential_1/middle/kernel'" in out["flipped"]["error"]
