"""Why an implicit convolution needs its own witness, shown on TensorFlow: a bug in a kernel that
the implicit route and stock autodiff share is invisible to stock autodiff, and caught by the
materialized ``T(K)`` and by finite differences (``tf_jacbp.check.conv_witness``).

The shared kernel: TensorFlow's ``Conv2DBackpropFilter``, which the implicit route calls for the
filter gradient (``backend.conv_kernel_product``: ``tf.compat.v1.nn.conv2d_backprop_filter``)
and stock autodiff of ``Conv2D`` calls for the same product (``nn_grad._Conv2DGrad``). Both reach
it through ``gen_nn_ops.conv2d_backprop_filter``, which the test scales by ``1 + 1e-3``. The
tests of both backends are ``tests/backends/test_conv_witness_backends.py``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tensorflow.python.ops import gen_nn_ops

from tf_jacbp import layers, losses, toeplitz, tolerances
from tf_jacbp.callbacks import FINITE_DIFFERENCES, REFERENCE, GradientCheck
from tf_jacbp.check import conv_witness

PLANTED = 1e-3


def net() -> keras.Model:
    """``Input(7, 7, 2) -> Conv2D "conv" (implicit) -> Flatten -> Dense(3)`` (no stock
    convolution besides: its reference would run the planted kernel too)."""
    model = keras.Sequential(
        [
            keras.Input((7, 7, 2)),
            layers.Conv2D(4, 3, padding="same", toeplitz="implicit", name="conv"),
            layers.Flatten(),
            layers.Dense(3, name="last"),
        ],
        name="net",
    )
    model.compile(
        keras.optimizers.SGD(0.01), losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


@pytest.fixture
def probe():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 7, 7, 2)).astype("float32"), rng.integers(0, 3, size=16)


@pytest.fixture
def shared_kernel_bug(monkeypatch):
    """TensorFlow's filter-gradient kernel, as both routes call it, ``1 + PLANTED`` times off."""
    original = gen_nn_ops.conv2d_backprop_filter

    def off(*args, **kwargs):
        return original(*args, **kwargs) * (1.0 + PLANTED)

    monkeypatch.setattr(gen_nn_ops, "conv2d_backprop_filter", off)


def conv_kernel(records, witness):
    (r,) = [r for r in records if r.witness == witness and r.variable.endswith("conv/kernel")]
    return r


def test_stock_autodiff_is_blind_to_a_bug_in_the_shared_kernel(
    probe, shared_kernel_bug, monkeypatch
):
    # the check as it was: the implicit convolution against stock autodiff
    monkeypatch.setattr(conv_witness, "choose", lambda layer, x: conv_witness.STOCK_AUTODIFF)
    keras.utils.set_random_seed(0)
    check = GradientCheck(probe, on_mismatch="log", verbose=0)
    records = check.check_now(net())
    assert all(r.passed for r in records), check.summary()
    assert conv_kernel(records, REFERENCE).float64_rel_err <= tolerances.rtol("float64")


def test_the_materialized_witness_catches_the_shared_kernel_bug(probe, shared_kernel_bug):
    keras.utils.set_random_seed(0)
    check = GradientCheck(probe, on_mismatch="log", verbose=0)
    records = check.check_now(net())
    failed = [r.variable for r in records if not r.passed]
    assert failed == ["net/conv/kernel"], check.summary()
    r = conv_kernel(records, REFERENCE)
    assert r.layer_witness == conv_witness.MATERIALIZED_T
    assert r.float64_rel_err == pytest.approx(PLANTED, rel=0.05)
    assert "materialized T(K)" in check.summary()


def test_over_the_budget_the_unfolded_patches_catch_the_shared_kernel_bug(probe, shared_kernel_bug):
    """Over the budget of the dense ``T(K)``, the probe's patch matrices are the witness (a
    gather and a matmul): they catch the bug in the filter-gradient kernel too."""
    keras.utils.set_random_seed(0)
    model = net()
    toeplitz.set_budget_bytes(2**20)
    try:
        check = GradientCheck(probe, on_mismatch="log", verbose=0)
        records = check.check_now(model)
    finally:
        toeplitz.set_budget_bytes(None)
    failed = [r.variable for r in records if not r.passed]
    assert failed == ["net/conv/kernel"], check.summary()
    r = conv_kernel(records, REFERENCE)
    assert r.layer_witness == conv_witness.UNFOLDED_PATCHES and r.independent
    assert r.float64_rel_err == pytest.approx(PLANTED, rel=0.05)


def test_over_the_budget_finite_differences_catch_the_shared_kernel_bug(
    probe, shared_kernel_bug, monkeypatch
):
    keras.utils.set_random_seed(0)
    model = net()
    monkeypatch.setattr(conv_witness, "patches_fit", lambda layer, x: False)
    toeplitz.set_budget_bytes(2**20)  # below any step's: the witness is finite differences
    try:
        check = GradientCheck(probe, on_mismatch="log", verbose=0)
        records = check.check_now(model)
    finally:
        toeplitz.set_budget_bytes(None)
    reference = conv_kernel(records, REFERENCE)
    assert reference.passed and not reference.independent  # the same kernel on both routes
    assert reference.layer_witness == conv_witness.FLOAT64_FINITE_DIFFERENCES
    fd = conv_kernel(records, FINITE_DIFFERENCES)
    assert not fd.passed and fd.rel_err > 10 * tolerances.FINITE_DIFFERENCE_RTOL, check.summary()
    assert [r.variable for r in records if not r.passed] == ["net/conv/kernel"]
    assert "'conv' against float64 finite differences" in check.summary()
