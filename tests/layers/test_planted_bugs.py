"""Every public layer's documented products are the ones training applies.

For each layer class of ``tf_jacbp.layers`` a subclass overrides one product of the contract
(``vjp_input`` or ``vjp_params``; for BatchNormalization in training the map of ``training_map``)
1% off:
the first parameter gradient for a layer with trainable parameters, the input gradient otherwise.
Then

* ``fit``'s update changes by exactly that 1%: the planted variable's update, or the update of the
  variable before the layer (its gradient is linear in the layer's input gradient), is 1.01 times
  the unmodified layer's;
* ``GradientCheck`` stops ``fit`` with ``GradientMismatchError`` on the planted model.

The module also holds the other tests about planted bugs: ``GradientCheck`` names the planted
layer and variable (scaled, transposed, sign-flipped and bias-less Dense kernels, a wrong tanh
derivative, an off-by-one Toeplitz stride, a skip connection without its gradient, a
BatchNormalization backward without its variance term; finite differences too), ``fit`` applies a
planted backward, and the layer-test kit ``check_layer`` and the route catch one. The planted-bug
layers themselves are defined in ``tests/planted.py``, which other test modules import.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from planted import (
    N_CLASSES,
    N_FEATURES,
    OFF,
    FlippedSignDense,
    MissingBias,
    NoBiasTermDense,
    NoVarianceTerm,
    OffByOneStrideConv2D,
    ScaledDense,
    SkipDroppingAdd,
    TransposedDense,
    WrongDerivativeTanh,
    WrongKernelGradient,
    assert_caught,
    compile_model,
    fit,
    mlp,
    one_percent_off,
    probe,
    residual,
)

from tf_jacbp import layers, testing
from tf_jacbp.callbacks import GradientCheck, GradientMismatchError
from tf_jacbp.layers import global_pooling, pooling_nd, reshaping
from tf_jacbp.testing import check_layer as run_layer_test


def image_model(middle: keras.layers.Layer | None, flatten: keras.layers.Layer | None = None):
    """``Input(6, 6, 1) -> Conv2D(2, 3, same, tanh) "first" -> middle -> Flatten -> Dense(3)``."""
    stack = [
        keras.Input((6, 6, 1)),
        layers.Conv2D(2, 3, padding="same", activation="tanh", name="first"),
    ]
    stack += [middle] if middle is not None else []
    stack += [flatten or layers.Flatten(), layers.Dense(3, name="last")]
    return keras.Sequential(stack)


def sequence_model(middle: keras.layers.Layer):
    """``Input(6, 2) -> Dense(3, tanh) "first" -> middle -> Flatten -> Dense(3)``."""
    return keras.Sequential(
        [
            keras.Input((6, 2)),
            layers.Dense(3, activation="tanh", name="first"),
            middle,
            layers.Flatten(),
            layers.Dense(3, name="last"),
        ]
    )


def embedding_model(cls):
    """``Input(6) ids -> Embedding(10, 4) "middle" -> Dense(4, tanh) "first" -> Flatten ->
    Dense(3)``: the embeddings get the planted gradient."""
    return keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            cls(10, 4, name="middle"),
            layers.Dense(4, activation="tanh", name="first"),
            layers.Flatten(),
            layers.Dense(3, name="last"),
        ]
    )


def frozen_batchnorm(cls):
    layer = cls(name="middle")
    layer.trainable = False  # training=True then runs the inference map, as in Keras
    return layer


def volume_model(middle: keras.layers.Layer):
    """``Input(4, 4, 4, 1) -> Dense(2, tanh) "first" -> middle -> Flatten -> Dense(3)``."""
    return keras.Sequential(
        [
            keras.Input((4, 4, 4, 1)),
            layers.Dense(2, activation="tanh", name="first"),
            middle,
            layers.Flatten(),
            layers.Dense(3, name="last"),
        ]
    )


# name: (model from the layer class, layer class, planted method, where the 1% goes, variable
# whose update shows it).
CASES = {
    "Dense": (
        lambda c: mlp(c(4, activation="relu", name="middle")),
        layers.Dense,
        "vjp",
        "param",
        "middle/kernel",
    ),
    "Conv2D": (
        lambda c: image_model(c(2, 3, activation="relu", name="middle")),
        layers.Conv2D,
        "vjp",
        "param",
        "middle/kernel",
    ),
    "Conv1D": (
        lambda c: sequence_model(c(2, 3, padding="same", activation="relu", name="middle")),
        layers.Conv1D,
        "vjp",
        "param",
        "middle/kernel",
    ),
    "LayerNormalization": (
        lambda c: mlp(c(name="middle")),
        layers.LayerNormalization,
        "vjp",
        "param",
        "middle/gamma",
    ),
    "Conv2DTranspose": (
        lambda c: image_model(c(2, 3, strides=2, padding="same", activation="relu", name="middle")),
        layers.Conv2DTranspose,
        "vjp",
        "param",
        "middle/kernel",
    ),
    "Conv3D": (
        lambda c: volume_model(c(2, 2, padding="same", activation="relu", name="middle")),
        layers.Conv3D,
        "vjp",
        "param",
        "middle/kernel",
    ),
    "MaxPooling2D": (
        lambda c: image_model(c(2, name="middle")),
        layers.MaxPooling2D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "AveragePooling2D": (
        lambda c: image_model(c(2, name="middle")),
        layers.AveragePooling2D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "MaxPooling1D": (
        lambda c: sequence_model(c(3, strides=2, padding="same", name="middle")),
        pooling_nd.MaxPooling1D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "AveragePooling1D": (
        lambda c: sequence_model(c(2, name="middle")),
        pooling_nd.AveragePooling1D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "MaxPooling3D": (
        lambda c: volume_model(c(2, strides=(1, 2, 1), padding="same", name="middle")),
        pooling_nd.MaxPooling3D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "AveragePooling3D": (
        lambda c: volume_model(c((2, 3, 2), strides=1, padding="same", name="middle")),
        pooling_nd.AveragePooling3D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "GlobalMaxPooling1D": (
        lambda c: sequence_model(c(keepdims=True, name="middle")),
        global_pooling.GlobalMaxPooling1D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "GlobalAveragePooling1D": (
        lambda c: sequence_model(c(name="middle")),
        global_pooling.GlobalAveragePooling1D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "GlobalMaxPooling2D": (
        lambda c: image_model(c(name="middle")),
        global_pooling.GlobalMaxPooling2D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "GlobalAveragePooling2D": (
        lambda c: image_model(c(name="middle")),
        global_pooling.GlobalAveragePooling2D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "UpSampling2D": (
        lambda c: image_model(c((2, 1), name="middle")),
        reshaping.UpSampling2D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "ZeroPadding2D": (
        lambda c: image_model(c(((1, 0), (2, 1)), name="middle")),
        reshaping.ZeroPadding2D,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "Reshape": (
        lambda c: image_model(c((-1, 2), name="middle")),
        reshaping.Reshape,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "BatchNormalization (training)": (
        lambda c: mlp(c(name="middle")),
        layers.BatchNormalization,
        "training_map",
        "param",
        "middle/gamma",
    ),
    "BatchNormalization (inference)": (
        lambda c: mlp(frozen_batchnorm(c)),
        layers.BatchNormalization,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "Dropout": (
        lambda c: mlp(c(0.3, seed=3, name="middle")),
        layers.Dropout,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "Flatten": (
        lambda c: image_model(None, c(name="middle")),
        layers.Flatten,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "Add": (
        lambda c: residual(c(name="middle_add")),
        layers.Add,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "Multiply": (
        lambda c: residual(c(name="middle_add")),
        layers.Multiply,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "Concatenate": (
        lambda c: residual(c(name="middle_add")),
        layers.Concatenate,
        "vjp",
        "dx",
        "first/kernel",
    ),
    "Embedding": (
        embedding_model,
        layers.Embedding,
        "vjp",
        "param",
        "middle/embeddings",
    ),
    "Activation": (
        lambda c: mlp(c("tanh", name="middle")),
        layers.Activation,
        "vjp",
        "dx",
        "first/kernel",
    ),
}
for _name in (
    "ReLU",
    "Sigmoid",
    "Tanh",
    "LeakyReLU",
    "ELU",
    "Softplus",
    "GELU",
    "Swish",
    "Softmax",
):
    CASES[_name] = (
        lambda c: mlp(c(name="middle")),
        getattr(layers, _name),
        "vjp",
        "dx",
        "first/kernel",
    )


def test_every_public_layer_class_has_a_case():
    public = {
        name
        for name in layers.__all__
        if isinstance(getattr(layers, name), type)
        and issubclass(getattr(layers, name), layers.JacobianLayer)
        and name != "JacobianLayer"
    }
    covered = {case[1].__name__ for case in CASES.values()}
    assert public == covered, public ^ covered


def data(model, n, seed):
    rng = np.random.default_rng(seed)
    shape = (n, *model.inputs[0].shape[1:])
    if "int" in model.inputs[0].dtype:  # ids for an Embedding
        x = rng.integers(0, 10, size=shape).astype("int32")
    else:
        x = rng.normal(size=shape).astype("float32")
    return x, rng.normal(size=(n, 3)).astype("float32")


def update(build, cls, variable):
    """One SGD step (rate 1) of ``fit`` from seed 0: the update of ``variable``.

    Eagerly, to save the tracing: ``fit`` calls the layers' ``call`` in every mode, and
    ``tests/test_route.py`` and the harness check compiled ``fit`` steps."""
    keras.utils.set_random_seed(0)
    model = build(cls)
    model.compile(keras.optimizers.SGD(1.0), "mse", run_eagerly=True)
    v = next(v for v in model.trainable_variables if v.path.endswith(variable))
    before = np.asarray(v).copy()
    x, y = data(model, 8, seed=1)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return before - np.asarray(v)


@pytest.mark.parametrize("name", list(CASES))
def test_a_one_percent_error_in_backward_changes_fit_and_is_caught(name):
    build, cls, method, into, variable = CASES[name]
    planted = one_percent_off(cls, method, into)
    plain, off = update(build, cls, variable), update(build, planted, variable)
    assert np.abs(plain).max() > 1e-4, "the check needs a nonzero update"
    np.testing.assert_allclose(off, OFF * plain, rtol=1e-4, atol=1e-7)

    # GradientCheck's own check of the planted model (what its fit callback runs), without a
    # fit: the callback inside fit is tested in tests/check/, and fit's tracing would double this
    # test's time. In float64 the check compares the routes directly (at 1e-12), with no float64
    # twin to build; catching 1% in float32 is tests/check/test_witness.py's.
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy("float64")
    model = build(planted)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    check = GradientCheck(data(model, 8, seed=3), verbose=0)
    with pytest.raises(GradientMismatchError):
        check.check_now(model)


# --- GradientCheck names the planted layer and variable ------------------------------------


def test_catches_jacobian_scaled_by_1_01():
    err = assert_caught(mlp(ScaledDense(4, activation="relu", name="middle")), "middle", "kernel")
    worst = max(err.records, key=lambda r: r.rel_err)
    assert worst.rel_err == pytest.approx(0.01, rel=1e-3)


def test_catches_transposed_jacobian():
    assert_caught(mlp(TransposedDense(4, activation="relu", name="middle")), "middle", "kernel")


def test_catches_flipped_sign():
    err = assert_caught(
        mlp(FlippedSignDense(4, activation="relu", name="middle")), "middle", "kernel"
    )
    kernel = next(r for r in err.records if r.variable == "net/middle/kernel")
    assert kernel.cosine == pytest.approx(-1.0)
    assert kernel.rel_err == pytest.approx(2.0)


def test_catches_missing_bias_term():
    err = assert_caught(mlp(NoBiasTermDense(4, activation="relu", name="middle")), "middle", "bias")
    assert [r.variable for r in err.records] == ["net/middle/bias"]
    assert err.records[0].rel_err == pytest.approx(1.0)


def test_catches_wrong_activation_derivative():
    # The wrong f' is in the input gradient, so it shows in the variables before the activation.
    model = keras.Sequential(
        [
            keras.Input((N_FEATURES,)),
            layers.Dense(4, name="first"),
            WrongDerivativeTanh(name="bad_tanh"),
            layers.Dense(N_CLASSES, name="last"),
        ],
        name="net",
    )
    err = assert_caught(model, "first", "kernel")
    assert not any(r.layer == "last" for r in err.records)
    assert "layers before it" in str(err)


def test_catches_toeplitz_with_off_by_one_stride():
    model = keras.Sequential(
        [
            keras.Input((5, 5, 1)),
            layers.Conv2D(2, 3, padding="same", name="conv_first"),
            OffByOneStrideConv2D(2, 2, strides=2, name="conv_bad"),
            keras.layers.Reshape((-1,)),
            layers.Dense(N_CLASSES, name="last"),
        ],
        name="net",
    )
    compile_model(model)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 5, 5, 1)).astype("float32"), rng.integers(0, N_CLASSES, 32)
    check = GradientCheck((x[:8], y[:8]), verbose=0)
    with pytest.raises(GradientMismatchError) as info:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[check])
    failed = {r.variable for r in info.value.records}
    assert "net/conv_first/kernel" in failed
    # conv_bad's own kernel gradient (from the patches) is right; its input gradient is not.
    assert not any(r.layer == "conv_bad" for r in info.value.records)
    assert "layer 'conv_first', variable 'net/conv_first/kernel'" in str(info.value)


def test_catches_a_skip_connection_without_its_gradient():
    err = assert_caught(residual(SkipDroppingAdd(name="bad_add")), "first", "kernel")
    assert not any(r.layer in ("middle", "last") for r in err.records)


def test_catches_batchnorm_backward_without_the_variance_term():
    """The train-mode backward with ``- xhat mean(delta xhat)`` left out (docs/batchnorm.md)."""

    err = assert_caught(mlp(NoVarianceTerm(name="middle")), "first", "kernel")
    assert not any(r.layer in ("middle", "last") for r in err.records)


def test_finite_differences_catch_a_planted_bug():
    model = compile_model(mlp(NoBiasTermDense(4, activation="relu", name="middle")))
    check = GradientCheck(probe(), finite_differences=True, on_mismatch="log", verbose=0)
    fit(model, check)
    fd_failed = {
        r.variable for r in check.records if r.witness == "finite_differences" and not r.passed
    }
    assert fd_failed == {"net/middle/bias"}


# --- the base class applies the planted backward; the harness and route catch it -------------


def test_fit_applies_the_custom_gradient():
    """``model.fit`` applies the Jacobian route: a doubled kernel gradient doubles the update."""
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = np.random.default_rng(1).normal(size=(8, 2)).astype("float32")
    updates = []
    for cls in (layers.Dense, WrongKernelGradient):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), cls(2)])
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        before = model.layers[0].kernel.numpy()
        model.train_on_batch(x, y)
        updates.append(before - model.layers[0].kernel.numpy())
    np.testing.assert_allclose(updates[1], 2 * updates[0], rtol=1e-5)


@pytest.mark.parametrize("modes", [True, False])
def test_harness_catches_a_planted_bug(modes, tmp_path):
    """With or without the modes (``check_layer(modes=False)``): the formula checks catch it."""
    with pytest.raises(AssertionError, match="kernel differs from the reference"):
        run_layer_test(
            lambda dtype: WrongKernelGradient(2, dtype=dtype), (3,), tmp_dir=tmp_path, modes=modes
        )


def test_harness_without_modes_runs_the_formula_checks_only(monkeypatch):
    """``modes=False`` skips checks 3-5 (fit modes, mixed precision, saving) and runs 1, 2, 6
    and 7 (the contract)."""
    ran = []
    for name in (
        "_check_routes_agree",
        "_check_finite_differences",
        "_check_fit_modes",
        "_check_mixed_precision",
        "_check_saving",
        "_check_per_example_rows",
        "_check_contract",
    ):
        monkeypatch.setattr(testing, name, lambda *args, name=name: ran.append(name))
    run_layer_test(lambda dtype: layers.Dense(2, dtype=dtype), (3,), modes=False)
    assert ran == [
        "_check_routes_agree",
        "_check_finite_differences",
        "_check_per_example_rows",
        "_check_contract",
    ]


def test_backward_with_a_missing_parameter_gradient_is_an_error():
    layer = MissingBias(2)
    x = tf.ones((1, 3))
    with pytest.raises(
        ValueError, match="returned 1 input and 1 parameter gradients for 1 inputs and 2 parameters"
    ):
        with tf.GradientTape() as tape:
            y = layer(x)
        tape.gradient(y, layer.trainable_variables)
