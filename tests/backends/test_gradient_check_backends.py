"""GradientCheck on every backend: its witnesses catch a planted 1e-6 kernel-gradient error, the
float64 twin and finite differences agree in float64, and a model that clips per example gets
the per-example norm witness.

The reference route is autodiff through ``tf_jacbp.reference_mode()``: ``tf.GradientTape`` on
TensorFlow, ``jax.value_and_grad`` over the values of the model's variables (a stateless call,
as Keras' JAX ``train_step``) on JAX. The planted layer here is backend-neutral (``keras.ops``
only): ``tests/planted.py`` imports TensorFlow.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from tf_jacbp import backend as tb
from tf_jacbp import layers, losses, tolerances
from tf_jacbp.callbacks import (
    FINITE_DIFFERENCES,
    PER_EXAMPLE_NORMS,
    REFERENCE,
    GradientCheck,
    GradientMismatchError,
)
from tf_jacbp.check import norms

N_FEATURES, N_CLASSES = 6, 3
PLANTED = 1e-6
"""The planted kernel-gradient error, relative: 1e-6 is 100x below float32's fixed tolerance
(1e-4) and 4 orders of magnitude above float64's (1e-12)."""


class SlightlyOffDense(layers.Dense):
    """A Dense whose kernel gradient (``vjp_params``' first product, ``A^T Delta``) is
    ``1 + 1e-6`` times the true one; its bias gradient and input product are right."""

    def vjp_params(self, *args, **kwargs):
        grads = super().vjp_params(*args, **kwargs)
        return [grads[0] * (1.0 + PLANTED), *grads[1:]]


class QuarterNormDense(layers.Dense):
    """A Dense whose per-example squared norms (``squared_norms``) are a quarter of the true
    ones: DP-SGD would clip with half the norm; its training products are right."""

    def squared_norms(self, m, a, z, kernel, bias=None):
        return [s / 4 for s in super().squared_norms(m, a, z, kernel, bias)]


def net(middle: keras.layers.Layer | None = None) -> keras.Model:
    """``Input(6) -> Dense(4, tanh) "first" -> middle -> Dense(3) "last"``, compiled with the
    fused softmax cross-entropy."""
    middle = middle or layers.Dense(5, activation="relu", name="middle")
    model = keras.Sequential(
        [
            keras.Input((N_FEATURES,)),
            layers.Dense(4, activation="tanh", name="first"),
            middle,
            layers.Dense(N_CLASSES, name="last"),
        ],
        name="net",
    )
    model.compile(
        keras.optimizers.SGD(0.05), losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def data(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)).astype("float32")
    return x, rng.integers(0, N_CLASSES, size=n)


def by_witness(records, witness):
    return {r.variable: r for r in records if r.witness == witness}


def test_a_planted_1e_6_kernel_gradient_error_is_caught_and_named(backend):
    keras.utils.set_random_seed(0)
    model = net(SlightlyOffDense(5, activation="relu", name="middle"))
    x, y = data()
    check = GradientCheck((x[:16], y[:16]), on_mismatch="log", verbose=0)
    records = check.check_now(model)
    failed = [r for r in records if not r.passed]
    assert [r.variable for r in failed] == ["net/middle/kernel"], check.summary()
    (r,) = failed
    # Caught by the float64 formula comparison, at its full size; the float32 one cannot.
    assert r.float64_rel_err == pytest.approx(PLANTED, rel=0.05)
    assert r.float64_rtol == tolerances.rtol("float64")
    assert r.rel_err < tolerances.rtol("float32")
    assert r.recheck_passed is False
    assert "net/middle/kernel" in check.summary()
    # The others agree in float64 to within float64's tolerance.
    for other in records:
        if other is not r:
            assert other.float64_rel_err <= tolerances.rtol("float64"), other
    # Raised in fit by default, naming the variable.
    with pytest.raises(GradientMismatchError, match="net/middle/kernel"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[GradientCheck((x, y))])


def test_the_float64_twin_and_finite_differences_agree_in_float64(backend):
    keras.utils.set_random_seed(1)
    model = net()
    x, y = data()
    check = GradientCheck((x, y), every_n_batches=2, finite_differences=True, verbose=0)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[check])
    assert history.history["grad_check_mismatches"] == [0, 0]
    twin = check._witnesses.twin
    # The twin really is float64: its variables, and the gradients its routes return.
    assert {keras.backend.standardize_dtype(v.dtype) for v in twin.model.variables} <= {
        "float64",
        "int64",
        "uint32",
        "int32",
    }
    out = check._witnesses.run(*check.probe)
    assert {ops.convert_to_numpy(h).dtype for h in out.h} == {np.dtype("float64")}
    reference = by_witness(check.records, REFERENCE)
    fd = by_witness(check.records, FINITE_DIFFERENCES)
    assert set(reference) == set(fd) == {v.path for v in model.trainable_variables}
    for r in check.records:
        assert r.passed, r
        if r.witness == REFERENCE:
            assert r.float64_rel_err <= tolerances.rtol("float64")
            assert r.criterion == "rounding_floor"
        else:
            assert r.gradient_dtype == "float64"
            assert r.rel_err <= tolerances.FINITE_DIFFERENCE_RTOL
    # Finite differences see a 1% error of a kernel gradient (the reference sees it too).
    planted = net(SlightlyOffDense(5, activation="relu", name="middle"))
    planted.set_weights(model.get_weights())
    previous = SlightlyOffDense.vjp_params

    def one_percent_off(self, *args, **kwargs):
        grads = previous(self, *args, **kwargs)
        return [g * (1.01 / (1.0 + PLANTED)) if i == 0 else g for i, g in enumerate(grads)]

    SlightlyOffDense.vjp_params = one_percent_off
    try:
        records = GradientCheck(
            (x, y), finite_differences=True, on_mismatch="log", verbose=0
        ).check_now(planted)
    finally:
        SlightlyOffDense.vjp_params = previous
    failed = {(r.witness, r.variable) for r in records if not r.passed}
    assert failed == {
        (REFERENCE, "net/middle/kernel"),
        (FINITE_DIFFERENCES, "net/middle/kernel"),
    }


def test_the_reference_gradient_is_the_backends_autodiff_of_the_loss(backend):
    """The twin's reference gradient of the last kernel, against an own float64 NumPy formula:
    ``dL/dW = a^T (softmax(z) - onehot(y)) / n`` for ``z = a W + b`` (``a`` the middle layer's
    output, computed in float64 by the twin)."""
    keras.utils.set_random_seed(2)
    model = net()
    x, y = data(16)
    check = GradientCheck((x, y), on_mismatch="log", verbose=0)
    check.check_now(model)
    witnesses = check._witnesses
    twin = witnesses.twin
    twin.synchronize()
    loss, grads = twin.reference_fn(*check.probe)
    middle = keras.Model(twin.model.inputs, twin.model.get_layer("middle").output)
    a = ops.convert_to_numpy(middle(ops.convert_to_tensor(x.astype("float64"))))
    w, b = (ops.convert_to_numpy(v.value) for v in twin.model.get_layer("last").weights)
    assert a.dtype == w.dtype == np.float64
    z = a @ w + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expected = a.T @ (p - np.eye(N_CLASSES)[y]) / len(y)
    index = [v.path for v in twin.variables].index(twin.model.get_layer("last").kernel.path)
    got = ops.convert_to_numpy(grads[index])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    nll = -np.log(p[np.arange(len(y)), y]).mean()
    assert float(loss) == pytest.approx(nll, rel=1e-13)


def test_a_model_that_clips_per_example_gets_the_norm_witness(backend):
    keras.utils.set_random_seed(3)
    x, y = data()
    model = net()
    model.l2_norm_clip = 1.0  # norms.CLIP_ATTRIBUTE: what DPModel sets
    check = GradientCheck((x, y), on_mismatch="log", verbose=0)
    records = check.check_now(model)
    found = by_witness(records, PER_EXAMPLE_NORMS)
    assert set(found) == {v.path for v in model.trainable_variables}
    for r in found.values():
        assert r.passed and r.gradient_dtype == "float64", r
        assert r.rel_err <= tolerances.rtol("float64"), r
    # A quarter-norm formula fails this witness only (training's gradient is right).
    bad = net(QuarterNormDense(5, activation="relu", name="middle"))
    bad.set_weights(model.get_weights())
    bad.l2_norm_clip = 1.0
    records = GradientCheck((x, y), on_mismatch="log", verbose=0).check_now(bad)
    failed = [r for r in records if not r.passed]
    assert {(r.witness, r.variable) for r in failed} == {
        (PER_EXAMPLE_NORMS, "net/middle/kernel"),
        (PER_EXAMPLE_NORMS, "net/middle/bias"),
    }
    for r in failed:  # half the norm: ||n - n_ref|| / ||n_ref|| = 1/2
        assert r.rel_err == pytest.approx(0.5, rel=1e-6)
    assert norms.NORM_SAMPLES == 8


def test_on_jax_the_twin_refuses_float32_posing_as_float64(backend, monkeypatch):
    """JAX computes float64 in float32 unless x64 is enabled: GradientCheck then refuses to
    start, naming how to enable it. (On TensorFlow float64 is always float64: nothing to
    refuse, and the check runs.)"""
    model = net()
    x, y = data(8)
    if backend == "jax":
        import tf_jacbp.backend.jax as jax_module

        monkeypatch.setattr(jax_module, "float64_enabled", lambda: False)
        with pytest.raises(RuntimeError, match="jax_enable_x64"):
            GradientCheck((x, y), verbose=0).check_now(model)
    else:
        assert tb.float64_enabled()
        records = GradientCheck((x, y), verbose=0).check_now(model)
        assert all(r.passed for r in records)


@pytest.mark.parametrize(
    "dropout, policy",
    [
        (keras.layers.Dropout, "float32"),
        (keras.layers.Dropout, "mixed_bfloat16"),
        (layers.Dropout, "float32"),
    ],
    ids=["keras-float32", "keras-mixed_bfloat16", "tf_jacbp-float32"],
)
def test_dropout_masks_are_replayed_in_the_twin_under_each_policy(backend, dropout, policy):
    """Keras' or tf_jacbp's Dropout between tf_jacbp layers: the twin draws the model's own
    mask, so the rounding-floor criterion applies (not the fixed tolerance) and every check
    passes, in the policy's dtype as in float32."""
    keras.utils.set_random_seed(4)
    x, y = data(64)
    model = keras.Sequential(
        [
            keras.Input((N_FEATURES,)),
            layers.Dense(8, activation="tanh", name="first", dtype=policy),
            dropout(0.3, seed=1, dtype=policy),
            layers.Dense(N_CLASSES, name="last", dtype=policy),
        ],
        name="dropped",
    )
    model.compile(
        keras.optimizers.SGD(0.05), losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    check = GradientCheck((x[:16], y[:16]), every_n_batches=2, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[check])
    assert check._witnesses.twin.replays_dropout
    assert len(check.records) == 3 * len(model.trainable_variables)  # steps 0, 2, 4
    compute = "bfloat16" if policy == "mixed_bfloat16" else "float32"
    for r in check.records:
        assert r.passed and r.criterion == "rounding_floor", r
        assert r.tolerance_dtype == compute and r.gradient_dtype == "float32"
        assert r.float64_rel_err <= tolerances.rtol("float64"), r
