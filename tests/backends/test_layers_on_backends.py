"""Every tf_jacbp layer, activation and Table 1 loss on the backend this run uses (TensorFlow or
JAX), in float64 that is float64.

* ``tf_jacbp.numerics`` (the ops Keras computes in float32 on JAX) gives float64 for float64.

* ``tf_jacbp.testing.check_layer`` on one configuration of every public layer class
  (``layer_cases.py``; every mode for a few classes, the formula checks for the others): the
  Jacobian route's gradients equal the backend's autodiff through the reference route to 1e-12 in
  float64, central finite differences, the per-example rows and the whole contract.
* The same on every activation of the registry (``map_cases.ACTIVATIONS``), as an ``Activation``.
* Every Table 1 loss (``map_cases.LOSSES``): value and gradient of the Jacobian route against the
  reference route (float64 and float32) and finite differences.
* What has no JAX form (the sparse Toeplitz fallback of a convolution over its memory budget)
  raises on JAX naming the alternative, and works on TensorFlow.
* Against stock Keras: each layer's output and its gradients (input and weights) equal the stock
  Keras layer's with the same weights to 1e-12 where stock Keras computes float64 on this backend.
  On JAX Keras computes ``tanh``, ``mean`` and ``var`` in float32 (``tf_jacbp.numerics``), so the
  stock ``Dense(activation="tanh")``, global average pooling, ``BatchNormalization``,
  ``LayerNormalization`` (4e-8 off) and ``Activation("tanh")`` are not float64 there: those
  compare with a float64 computation of our own (NumPy: the map, and its gradients by the
  complex step ``Im f(x + i h e_j) / h``, exact to rounding), on both backends. On TensorFlow
  the stock 3-D pooling layers (no float64 kernel) and ``LeakyReLU`` (a float32 slope) are not
  float64 either (``STOCK_NOT_FLOAT64``).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops
from layer_cases import CASES
from map_cases import ACTIVATIONS, LOSSES, labels, prediction

import tf_jacbp
from tf_jacbp import backend as tb
from tf_jacbp import layers, numerics, tolerances
from tf_jacbp.testing import check_layer

RTOL64 = tolerances.rtol("float64")
# The layer cases whose stock Keras layer is not float64 on a backend, by backend. JAX (measured,
# Keras 3.15.1: 4e-8 to 1e-7 off): tanh (Dense's activation, Activation("tanh")), mean (global
# average pooling), the moments of BatchNormalization and LayerNormalization. TensorFlow: its
# MaxPool3D and AvgPool3D kernels take no float64, and tf.nn.leaky_relu holds its slope as a
# float32 attribute (1.3e-8 off). Their float64 witness there is NumPy
# (test_layer_equals_a_numpy_float64_computation); the 3-D pooling layers have check_layer's.
STOCK_NOT_FLOAT64 = {
    "jax": {
        "Dense",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "BatchNormalization (training)",
        "BatchNormalization (inference)",
        "LayerNormalization",
        "LayerNormalization (rms_scaling)",
        "Activation",
    },
    "tensorflow": {"MaxPooling3D", "AveragePooling3D", "LeakyReLU"},
}


def test_every_public_layer_class_has_a_case():
    public = {
        name
        for name in layers.__all__
        if isinstance(getattr(layers, name), type)
        and issubclass(getattr(layers, name), layers.JacobianLayer)
        and name not in ("JacobianLayer", "Embedding")  # Embedding: layer_cases.py says why
    }
    assert public == {case.cls.__name__ for case in CASES.values()}


def test_numerics_compute_float64_in_float64():
    """``tf_jacbp.numerics``' tanh, mean and var of float64 inputs are float64 and within a few
    ulps of NumPy's (Keras' own are 1e-7 off on JAX), and result_type keeps float64."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(4, 50)) * 3, np.full((4, 1), 1e-10)], axis=1)
    t = ops.convert_to_tensor(x)
    for got, want in [
        (numerics.tanh(t), np.tanh(x)),
        (numerics.mean(t, axis=1, keepdims=True), x.mean(axis=1, keepdims=True)),
        (numerics.mean(t, axis=[0, 1]), x.mean()),
        (numerics.var(t, axis=(1,)), x.var(axis=1)),
    ]:
        got = ops.convert_to_numpy(got)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    assert numerics.result_type("float64", "float32") == "float64"
    assert numerics.result_type("float16", "float32") == "float32"


def test_numerics_leave_other_dtypes_to_keras():
    x = ops.convert_to_tensor(np.random.default_rng(1).normal(size=(3, 5)), "float32")
    np.testing.assert_array_equal(numerics.tanh(x), ops.tanh(x))
    np.testing.assert_array_equal(numerics.mean(x, axis=0), ops.mean(x, axis=0))
    np.testing.assert_array_equal(numerics.var(x, axis=1), ops.var(x, axis=1))


@pytest.mark.parametrize("name", list(CASES))
def test_check_layer_on_every_layer(name, tmp_path):
    case = CASES[name]
    check_layer(
        case.make(), case.input_shape, tmp_dir=str(tmp_path), modes=case.modes, **case.options
    )


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_check_layer_on_every_activation(name):
    check_layer(
        lambda dtype: layers.Activation(ACTIVATIONS[name](), dtype=dtype), (5,), modes=False
    )


# --- Table 1 losses --------------------------------------------------------------------------

BATCH, CLASSES = 5, 4


def _loss_data(name: str, dtype: str):
    make, kind = LOSSES[name]
    rng = np.random.default_rng(3)
    y = ops.convert_to_tensor(
        labels(kind, rng, BATCH, CLASSES), dtype if kind != "sparse" else None
    )
    z = 2 * rng.normal(size=(BATCH, CLASSES))
    return make(dtype), y, z


def _loss_and_gradient(loss, y, z, reference: bool, dtype: str):
    def value(z):
        if reference:
            with tf_jacbp.reference_mode():
                return loss(y, prediction(loss, z))
        return loss(y, prediction(loss, z))

    value, (grad,) = tb.value_and_gradients(value, [ops.convert_to_tensor(z, dtype)])
    return ops.convert_to_numpy(value), ops.convert_to_numpy(grad)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_routes_agree(name, dtype):
    loss, y, z = _loss_data(name, dtype)
    value, grad = _loss_and_gradient(loss, y, z, False, dtype)
    ref_value, ref_grad = _loss_and_gradient(loss, y, z, True, dtype)
    assert value.dtype == np.dtype(dtype) and grad.dtype == np.dtype(dtype)
    assert tolerances.relative_error(value, ref_value, dtype) <= tolerances.rtol(dtype)
    assert tolerances.relative_error(grad, ref_grad, dtype) <= tolerances.rtol(dtype)


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_gradient_equals_finite_differences(name):
    loss, y, z = _loss_data(name, "float64")
    _, grad = _loss_and_gradient(loss, y, z, False, "float64")
    delta = tolerances.FINITE_DIFFERENCE_DELTA
    numerical = np.zeros(z.size)
    for j in range(z.size):
        ends = []
        for step in (delta, -delta):
            moved = z.copy().reshape(-1)
            moved[j] += step
            moved = ops.convert_to_tensor(moved.reshape(z.shape), "float64")
            ends.append(float(ops.convert_to_numpy(loss(y, prediction(loss, moved)))))
        numerical[j] = (ends[0] - ends[1]) / (2 * delta)
    err = tolerances.relative_error(grad.reshape(-1), numerical)
    assert err <= tolerances.FINITE_DIFFERENCE_RTOL


# --- against stock Keras, or against NumPy where stock Keras is not float64 --------------------


def _layer_gradients(layer, x, m, training):
    """``(y, d sum(m * y) / d [x..., weights...])`` of a built float64 ``layer`` at ``x``."""
    xs = list(x) if isinstance(x, list) else [x]
    flag = {} if training is None else {"training": training}
    trainable = [ops.convert_to_tensor(v) for v in layer.trainable_variables]
    fixed = [ops.convert_to_tensor(v) for v in layer.non_trainable_variables]

    def total(*tensors):
        inputs = list(tensors[: len(xs)])
        y, _ = layer.stateless_call(
            list(tensors[len(xs) :]),
            fixed,
            inputs if isinstance(x, list) else inputs[0],
            **flag,
        )
        return ops.sum(m * y)

    _, grads = tb.value_and_gradients(total, [*xs, *trainable])
    y, _ = layer.stateless_call(
        trainable, fixed, x, **({} if training is None else {"training": training})
    )
    return ops.convert_to_numpy(y), [ops.convert_to_numpy(g) for g in grads]


def _inputs(input_shape, batch, rng):
    if isinstance(input_shape, list):
        return [ops.convert_to_tensor(rng.normal(size=(batch, *s))) for s in input_shape]
    return ops.convert_to_tensor(rng.normal(size=(batch, *input_shape)))


NUMPY_WITNESSES = {}  # name: layer -> NumPy's map f(x, *trainable, *non_trainable), defined below
STOCK = [
    name
    for name, case in CASES.items()
    if case.stock is not None and name not in STOCK_NOT_FLOAT64[keras.backend.backend()]
]


@pytest.mark.parametrize("name", STOCK)
def test_layer_equals_the_stock_keras_layer(name):
    """Output and gradients (inputs, then weights) of our layer and the stock Keras layer with
    the same weights, in float64, to 1e-12."""
    case = CASES[name]
    rng = np.random.default_rng(5)
    x = _inputs(case.input_shape, case.options.get("batch_size", 3), rng)
    training = case.options.get("training")
    ours, stock = case.make()("float64"), case.stock(**case.kwargs, dtype="float64")
    ours(x), stock(x)
    stock.set_weights(ours.get_weights())
    m = ops.convert_to_tensor(rng.normal(size=ops.shape(ours(x))))
    y, grads = _layer_gradients(ours, x, m, training)
    y_stock, grads_stock = _layer_gradients(stock, x, m, training)
    assert tolerances.relative_error(y, y_stock) <= RTOL64
    assert len(grads) == len(grads_stock)
    for g, r in zip(grads, grads_stock, strict=True):
        assert tolerances.relative_error(g, r) <= RTOL64


def _normalization(axes, epsilon, center=True, rms_scaling=False, moving=False):
    """NumPy's batch or layer normalization (complex-safe): ``gamma (x - mu) / sqrt(var + eps)
    + beta``, the moments over ``axes`` (or the moving ones), ``rms_scaling``: ``gamma x /
    sqrt(var + eps)`` (Keras' definition: the centered variance)."""

    def f(x, gamma, beta=None, moving_mean=None, moving_variance=None):
        if moving:
            mu, var = moving_mean, moving_variance
        else:
            mu = x.mean(axis=axes, keepdims=True)
            var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
        if rms_scaling:
            return gamma * x / np.sqrt(var + epsilon)
        return gamma * (x - mu) / np.sqrt(var + epsilon) + (beta if center else 0)

    return f


# Where stock Keras is not float64 on JAX (Keras computes tanh, mean and var in float32 there:
# tf_jacbp.numerics), a float64 computation of our own: run on both backends.
NUMPY_WITNESSES.update(
    {
        "Dense": lambda layer: lambda x, kernel, bias: np.tanh(x @ kernel + bias),
        "GlobalAveragePooling1D": lambda layer: lambda x: x.mean(axis=1),
        "GlobalAveragePooling2D": lambda layer: lambda x: x.mean(axis=(1, 2), keepdims=True),
        "BatchNormalization (training)": lambda layer: _normalization((0, 1, 2), layer.epsilon),
        "BatchNormalization (inference)": lambda layer: _normalization(
            (0,), layer.epsilon, moving=True
        ),
        "LayerNormalization": lambda layer: _normalization((-1,), layer.epsilon),
        "LayerNormalization (rms_scaling)": lambda layer: _normalization(
            (1, 2), layer.epsilon, rms_scaling=True
        ),
        "Activation": lambda layer: np.tanh,
        "LeakyReLU": lambda layer: lambda x: np.where(x.real > 0, x, layer.negative_slope * x),
    }
)


def _complex_step(f, arrays, fixed, m, h=1e-30):
    """The gradients of ``sum(m * f(*arrays, *fixed))`` with respect to each of ``arrays``, entry
    by entry by the complex step ``Im(sum(m * f(a + i h e_j))) / h``: no cancellation, so exact
    to rounding in float64 for the analytic maps here."""
    grads = []
    for i, a in enumerate(arrays):
        g = np.zeros(a.size)
        for j in range(a.size):
            moved = [b.astype(complex) for b in arrays]
            moved[i].reshape(-1)[j] += 1j * h
            g[j] = np.sum(m * f(*moved, *fixed)).imag / h
        grads.append(g.reshape(a.shape))
    return grads


@pytest.mark.parametrize("name", list(NUMPY_WITNESSES))
def test_layer_equals_a_numpy_float64_computation(name):
    """The output of our layer and its gradients (input, then trainable weights) equal NumPy's
    float64 map and its complex-step gradients to 1e-12: the float64 witness where stock Keras
    is not float64 (``STOCK_NOT_FLOAT64``)."""
    case = CASES[name]
    rng = np.random.default_rng(6)
    x = rng.normal(size=(case.options.get("batch_size", 3), *case.input_shape))
    layer = case.make()("float64")
    layer(x)
    for v in layer.trainable_variables:
        v.assign(1 + 0.3 * rng.normal(size=v.shape))
    m = rng.normal(size=ops.shape(layer(x)))
    training = case.options.get("training")
    y, grads = _layer_gradients(layer, ops.convert_to_tensor(x), ops.convert_to_tensor(m), training)
    trainable = [ops.convert_to_numpy(v) for v in layer.trainable_variables]
    fixed = [ops.convert_to_numpy(v) for v in layer.non_trainable_variables]
    f = NUMPY_WITNESSES[name](layer)
    assert tolerances.relative_error(y, f(x, *trainable, *fixed)) <= RTOL64
    for g, r in zip(grads, _complex_step(f, [x, *trainable], fixed, m), strict=True):
        assert tolerances.relative_error(g, r) <= RTOL64


# --- TensorFlow-only paths ---------------------------------------------------------------------


def test_a_convolution_over_its_budget_is_sparse_on_tensorflow_and_refused_on_jax(backend):
    """T(K) of a 32 x 32 image is 7 MiB dense, 0.3 MiB sparse: with a budget of 13 MiB the step
    fits only sparse. TensorFlow multiplies by the sparse T(K) (with a warning) and gives stock
    Keras' convolution; JAX has no sparse fallback and says what to do instead. (Under the default
    ``toeplitz="auto"`` neither happens: the layer applies T(K) without forming it.)"""
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 1))
    layer = layers.Conv2D(
        2, 3, toeplitz="materialize", toeplitz_budget_bytes=13 * 2**20, dtype="float64"
    )
    if backend == "jax":
        with pytest.raises(NotImplementedError, match=r"TensorFlow-only.*toeplitz_budget"):
            layer(x)
        return
    with pytest.warns(UserWarning, match="sparse"):
        y = layer(x)
    stock = keras.layers.Conv2D(2, 3, dtype="float64")
    stock(x)
    stock.set_weights(layer.get_weights())
    assert tolerances.relative_error(y, stock(x)) <= RTOL64
