"""The witness of a convolution on the implicit route shares no kernel with it, on every backend.

A convolution with ``toeplitz="implicit"`` applies ``T(K)`` by the convolution, the transposed
convolution and the filter gradient; stock autodiff of its reference route runs those kernels
too. ``GradientCheck`` and ``check_layer`` compare it with autodiff of the materialized ``T(K)``
where a step with the dense float64 ``T(K)`` fits the Toeplitz budget, else with float64 finite
differences (``tf_jacbp.check.conv_witness``), and say which. Here: the materialized product
equals the stock convolution (grouped and channels_first too); ``Conv2D`` (also grouped and
channels_first), ``Conv1D`` and ``Conv2DTranspose`` on the implicit route train under
``GradientCheck`` with zero mismatches and report the materialized witness; an error of 1e-3
planted in the implicit kernel gradient (``ImplicitConv.kernel_gradient``) or in its input
product (``apply_transpose``; ``apply`` for ``Conv2DTranspose``, whose input product that is)
is caught by both; with the budget lowered the witness is finite differences, reported, and
they still catch the planted kernel-gradient error.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from tf_jacbp import layers, losses, toeplitz, tolerances
from tf_jacbp.callbacks import FINITE_DIFFERENCES, REFERENCE, GradientCheck
from tf_jacbp.check import conv_witness
from tf_jacbp.testing import check_layer
from tf_jacbp.toeplitz_implicit import ImplicitConv

PLANTED = 1e-3
"""The planted error, relative: ``1 + 1e-3`` times one product of the implicit route."""

N_CLASSES = 3

OWN_BUDGET = {"toeplitz_budget_bytes": toeplitz.DEFAULT_BUDGET_BYTES}
"""The materialized first layer keeps its own budget when a test lowers the process-wide one."""

# (name, input shape without the batch, the layer before (materialized), the implicit layer)
CASES = {
    "Conv2D": (
        (7, 7, 2),
        lambda: layers.Conv2D(
            3, 2, activation="tanh", toeplitz="materialize", name="first", **OWN_BUDGET
        ),
        lambda: layers.Conv2D(4, 3, strides=2, padding="same", toeplitz="implicit", name="conv"),
    ),
    "Conv1D": (
        (9, 2),
        lambda: layers.Conv1D(
            3, 2, activation="tanh", toeplitz="materialize", name="first", **OWN_BUDGET
        ),
        lambda: layers.Conv1D(
            4, 3, padding="causal", dilation_rate=2, toeplitz="implicit", name="conv"
        ),
    ),
    "Conv2D grouped channels_first": (
        (2, 7, 7),
        lambda: layers.Conv2D(
            4,
            2,
            activation="tanh",
            data_format="channels_first",
            toeplitz="materialize",
            name="first",
            **OWN_BUDGET,
        ),
        lambda: layers.Conv2D(
            4,
            3,
            groups=2,
            bias="untied",
            data_format="channels_first",
            toeplitz="implicit",
            name="conv",
        ),
    ),
    "Conv2DTranspose": (
        (4, 5, 2),
        lambda: layers.Conv2D(
            3, 2, activation="tanh", toeplitz="materialize", name="first", **OWN_BUDGET
        ),
        lambda: layers.Conv2DTranspose(
            2, 3, strides=2, padding="same", toeplitz="implicit", name="conv"
        ),
    ),
}

INPUT_PRODUCT = {
    "Conv2D grouped channels_first": "apply_transpose",
    "Conv2D": "apply_transpose",
    "Conv1D": "apply_transpose",
    "Conv2DTranspose": "apply",
}
"""The method of ``ImplicitConv`` that computes each layer's input product ``(J_x F)^T delta``."""


def net(case: str) -> keras.Model:
    """``Input -> first (materialized, tanh) -> conv (implicit) -> Flatten -> Dense "last"``."""
    shape, first, conv = CASES[case]
    model = keras.Sequential(
        [
            keras.Input(shape),
            first(),
            conv(),
            layers.Flatten(),
            layers.Dense(N_CLASSES, name="last"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.01), losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def data(case: str, n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *CASES[case][0])).astype("float32")
    return x, rng.integers(0, N_CLASSES, size=n)


def plant(monkeypatch, method: str) -> None:
    """``ImplicitConv.method`` returns ``1 + PLANTED`` times its product."""
    original = getattr(ImplicitConv, method)

    def off(self, *args, **kwargs):
        return original(self, *args, **kwargs) * (1.0 + PLANTED)

    monkeypatch.setattr(ImplicitConv, method, off)


@pytest.fixture
def low_budget(monkeypatch):
    """A Toeplitz budget of 1 MiB, below any training step's (``STEP_OVERHEAD_BYTES``), and the
    unfolded patches taken as not fitting either: every implicit convolution's witness is
    finite differences. Restored after the test."""
    monkeypatch.setattr(conv_witness, "patches_fit", lambda layer, x: False)
    toeplitz.set_budget_bytes(2**20)
    try:
        yield
    finally:
        toeplitz.set_budget_bytes(None)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: layers.Conv2D(3, 3, padding="same", strides=2), (2, 7, 6, 2)),
        (lambda: layers.Conv2D(3, (2, 3), dilation_rate=2, bias="untied"), (2, 7, 8, 2)),
        (lambda: layers.Conv1D(3, 3, padding="causal", dilation_rate=2), (2, 9, 2)),
        (lambda: layers.Conv1D(2, 3, strides=2, padding="same", bias="untied"), (2, 9, 2)),
        (lambda: layers.Conv3D(2, 2, padding="same"), (2, 4, 5, 3, 2)),
        (lambda: layers.Conv2DTranspose(3, 3, strides=2, padding="same"), (2, 4, 5, 2)),
        (lambda: layers.Conv2DTranspose(3, 3, dilation_rate=2), (2, 4, 5, 2)),
        (lambda: layers.Conv2D(4, 3, padding="same", strides=2, groups=2), (2, 7, 6, 4)),
        (
            lambda: layers.Conv2D(
                4, (2, 3), dilation_rate=2, groups=2, bias="untied", data_format="channels_first"
            ),
            (2, 4, 7, 8),
        ),
        (
            lambda: layers.Conv1D(4, 3, padding="causal", groups=2, data_format="channels_first"),
            (2, 2, 9),
        ),
        (lambda: layers.Conv1D(6, 3, groups=3, bias="untied"), (2, 9, 3)),
        (
            lambda: layers.Conv3D(4, 2, padding="same", groups=2, data_format="channels_first"),
            (2, 2, 4, 5, 3),
        ),
        (
            lambda: layers.Conv2DTranspose(
                3, 3, strides=2, padding="same", data_format="channels_first"
            ),
            (2, 2, 4, 5),
        ),
    ],
)
def test_the_materialized_product_is_the_stock_convolution_in_float64(backend, make, shape):
    layer = make()
    layer = type(layer).from_config(
        {**layer.get_config(), "toeplitz": "implicit", "dtype": "float64"}
    )
    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.normal(size=shape), "float64")
    layer(x)
    params = [
        ops.convert_to_tensor(rng.normal(size=tuple(p.shape)), "float64") for p in layer.weights
    ]
    assert conv_witness.choose(layer, x) == conv_witness.MATERIALIZED_T
    want = ops.convert_to_numpy(layer.reference(x, *params))
    got = ops.convert_to_numpy(conv_witness.materialized_reference(layer, x, *params))
    assert got.shape == want.shape
    assert tolerances.relative_error(got, want) <= tolerances.rtol("float64")


@pytest.mark.parametrize("case", sorted(CASES))
def test_implicit_convolutions_report_the_materialized_witness_and_no_mismatch(backend, case):
    keras.utils.set_random_seed(0)
    model = net(case)
    x, y = data(case)
    conv = model.get_layer("conv")
    assert conv.route_for(conv.image(model.get_layer("first")(x[:1]))) == "implicit"
    check = GradientCheck((x, y), every_n_batches=2, verbose=0)  # on_mismatch="raise"
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[check])
    assert history.history["grad_check_mismatches"] == [0]
    witnesses = {r.layer: r.layer_witness for r in check.records if r.witness == REFERENCE}
    assert witnesses == {
        "first": conv_witness.STOCK_AUTODIFF,
        "conv": conv_witness.MATERIALIZED_T,
        "last": conv_witness.STOCK_AUTODIFF,
    }
    for r in check.records:
        assert r.passed and r.independent, r
        assert r.float64_rel_err <= tolerances.rtol("float64"), r
    assert not [r for r in check.records if r.witness == FINITE_DIFFERENCES]
    summary = check.summary()
    assert "'conv' against the materialized T(K)" in summary
    assert "reference (materialized T(K))" in summary


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("product", ["kernel_gradient", "input product"])
def test_gradient_check_catches_an_error_planted_in_the_implicit_route(
    backend, case, product, monkeypatch
):
    keras.utils.set_random_seed(0)
    method = INPUT_PRODUCT[case] if product == "input product" else product
    plant(monkeypatch, method)
    model = net(case)
    x, y = data(case)
    check = GradientCheck((x, y), on_mismatch="log", verbose=0)
    records = check.check_now(model)
    failed = {r.variable for r in records if not r.passed}
    # the kernel gradient shows in the layer's kernel; the input product before it
    expected = {"sequential/conv/kernel"} if method == "kernel_gradient" else None
    if expected is None:
        assert {"first/kernel", "first/bias"} <= {v.split("/", 1)[1] for v in failed}, (
            check.summary()
        )
    else:
        assert {v.split("/", 1)[1] for v in failed} == {"conv/kernel"}, check.summary()
    for r in records:
        if not r.passed:
            assert r.float64_rel_err > 100 * tolerances.rtol("float64"), r
    conv = {r.layer_witness for r in records if r.layer == "conv"}
    assert conv == {conv_witness.MATERIALIZED_T}
    if method == "kernel_gradient":
        assert records[0].layer == "first"  # (records follow the variables)
        (r,) = [r for r in records if r.variable.endswith("conv/kernel")]
        assert r.float64_rel_err == pytest.approx(PLANTED, rel=0.05)


@pytest.mark.parametrize("case", sorted(CASES))
def test_over_the_budget_the_witness_is_finite_differences(backend, case, low_budget, monkeypatch):
    keras.utils.set_random_seed(0)
    model = net(case)
    x, y = data(case)
    check = GradientCheck((x, y), every_n_batches=2, verbose=0)  # finite_differences=False
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[check])
    assert history.history["grad_check_mismatches"] == [0]
    assert history.history["grad_check_fd_max_rel_err"][0] <= tolerances.FINITE_DIFFERENCE_RTOL
    reference = {r.layer: r for r in check.records if r.witness == REFERENCE}
    assert reference["conv"].layer_witness == conv_witness.FLOAT64_FINITE_DIFFERENCES
    assert not reference["conv"].independent  # stock autodiff runs the same kernels
    fd = {r.variable for r in check.records if r.witness == FINITE_DIFFERENCES}
    assert fd == {v.path for v in model.trainable_variables}
    assert "'conv' against float64 finite differences" in check.summary()
    # The planted kernel-gradient error: the finite differences catch it themselves.
    plant(monkeypatch, "kernel_gradient")
    planted = net(case)
    planted.set_weights(model.get_weights())
    check = GradientCheck((x, y), on_mismatch="log", verbose=0)
    records = check.check_now(planted)
    failed_fd = [r.variable for r in records if r.witness == FINITE_DIFFERENCES and not r.passed]
    assert [v.split("/", 1)[1] for v in failed_fd] == ["conv/kernel"], check.summary()
    (r,) = [r for r in records if r.witness == FINITE_DIFFERENCES and not r.passed]
    assert r.rel_err > 10 * tolerances.FINITE_DIFFERENCE_RTOL
    assert r.layer_witness == conv_witness.FLOAT64_FINITE_DIFFERENCES


@pytest.mark.parametrize("case", sorted(c for c in CASES if c != "Conv2DTranspose"))
def test_over_the_budget_the_unfolded_patches_are_the_witness(case, monkeypatch):
    """A dense float64 ``T(K)`` over the budget (1 MiB) while the probe's patch matrices fit it:
    the witness is autodiff of ``X_patch K + b`` (gathers and a matmul), named in the records
    and the summary, with no false alarm; a 1e-3 error planted in the filter gradient or in the
    input product is caught by the reference record. (``Conv2DTranspose`` has no patch witness:
    its witness over the budget is finite differences.)"""
    toeplitz.set_budget_bytes(2**20)
    try:
        keras.utils.set_random_seed(0)
        model = net(case)
        x, y = data(case)
        check = GradientCheck((x, y), every_n_batches=2, verbose=0)
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[check])
        assert history.history["grad_check_mismatches"] == [0]
        reference = {r.layer: r for r in check.records if r.witness == REFERENCE}
        assert reference["conv"].layer_witness == conv_witness.UNFOLDED_PATCHES
        assert reference["conv"].independent
        assert "'conv' against the unfolded patches" in check.summary()
        for method in ("kernel_gradient", INPUT_PRODUCT[case]):
            with monkeypatch.context() as patched:
                plant(patched, method)
                planted = net(case)
                planted.set_weights(model.get_weights())
                check = GradientCheck((x, y), on_mismatch="log", verbose=0)
                records = check.check_now(planted)
            failed = {r.variable.split("/", 1)[1] for r in records if not r.passed}
            assert failed, (method, check.summary())
            if method == "kernel_gradient":
                assert failed == {"conv/kernel"}, check.summary()
    finally:
        toeplitz.set_budget_bytes(None)


def implicit_conv2d(dtype):
    return layers.Conv2D(3, 3, padding="same", toeplitz="implicit", dtype=dtype)


def test_check_layer_uses_and_names_the_materialized_witness(backend):
    result = check_layer(implicit_conv2d, (5, 5, 2), modes=False)
    assert result.witnesses == {
        "float64": conv_witness.MATERIALIZED_T,
        "float32": conv_witness.MATERIALIZED_T,
    }
    assert result.witness == conv_witness.MATERIALIZED_T
    materialized = check_layer(
        lambda d: layers.Conv2D(3, 3, padding="same", toeplitz="materialize", dtype=d),
        (5, 5, 2),
        modes=False,
    )
    assert materialized.witness == conv_witness.STOCK_AUTODIFF


@pytest.mark.parametrize("method", ["kernel_gradient", "apply_transpose"])
def test_check_layer_catches_an_error_planted_in_the_implicit_route(backend, method, monkeypatch):
    plant(monkeypatch, method)
    with pytest.raises(AssertionError, match="relative error"):
        check_layer(implicit_conv2d, (5, 5, 2), modes=False)


def test_check_layer_over_the_budget_names_finite_differences_and_runs_them(
    backend, low_budget, monkeypatch
):
    result = check_layer(implicit_conv2d, (4, 4, 2), modes=False, finite_differences=False)
    assert result.witness == conv_witness.FLOAT64_FINITE_DIFFERENCES
    assert result.finite_differences  # run although finite_differences=False
    plant(monkeypatch, "kernel_gradient")
    from tf_jacbp.testing import harness

    # check 2 alone (the finite differences) catches the planted kernel-gradient error
    with pytest.raises(AssertionError, match="finite differences: gradient of .*kernel"):
        harness._check_finite_differences(implicit_conv2d, (4, 4, 2), 3, 0, None, None)
