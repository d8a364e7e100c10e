"""Planted-bug layers: tf_jacbp layers whose backward pass is deliberately wrong.

Every planted-bug layer of the test suite is defined here, or, where written in ``keras.ops``
only for the tests of both backends, in ``tests/planted_layers.py`` and imported here; with the
small classifier they are planted in (``Input(6) -> Dense(4, tanh) "first" -> middle -> Dense(3)
"last"``, named "net") and its data. ``tests/layers/test_planted_bugs.py`` holds the tests about
them, and the other test modules import the layers they need from here. A planted bug is a
user-written layer on the public base classes that overrides a product of the contract
(``vjp_input`` or ``vjp_params``, ``tf_jacbp.contract``), or BatchNormalization's
``training_map``: training's backward pass, the per-example rows and the norms are all derived
from those.
"""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from planted_layers import OFF, WrongKernelGradient, one_percent_off  # noqa: F401 (re-exported)

from tf_jacbp import layers, losses, toeplitz
from tf_jacbp.callbacks import GradientCheck, GradientMismatchError
from tf_jacbp.layers.normalization_modes import BatchStatistics

N_FEATURES, N_CLASSES = 6, 3


class ScaledDense(layers.Dense):
    """Every Jacobian-transpose product scaled by 1.01."""

    def vjp_input(self, *args):
        return 1.01 * super().vjp_input(*args)

    def vjp_params(self, *args, **kwargs):
        return [1.01 * g for g in super().vjp_params(*args, **kwargs)]


class TransposedDense(layers.Dense):
    """The kernel gradient transposed: ``(A^T Delta)^T`` (a square kernel keeps the shape)."""

    def vjp_params(self, *args, **kwargs):
        grads = super().vjp_params(*args, **kwargs)
        return [ops.swapaxes(grads[0], -1, -2), *grads[1:]]


class FlippedSignDense(layers.Dense):
    """The kernel gradient with the wrong sign."""

    def vjp_params(self, *args, **kwargs):
        grads = super().vjp_params(*args, **kwargs)
        return [-grads[0], *grads[1:]]


class NoBiasTermDense(layers.Dense):
    """``J_{W,b} z = [I (x) a^T]`` without the ``| I`` block: the bias gradient is zero."""

    def vjp_params(self, *args, **kwargs):
        grads = super().vjp_params(*args, **kwargs)
        return [grads[0], ops.zeros_like(grads[1])]


class WrongDerivativeTanh(layers.Activation):
    """tanh with ``f'(z) = 1 - z^2`` instead of ``1 - a^2``."""

    def __init__(self, **kwargs):
        kwargs.pop("activation", None)
        super().__init__("tanh", **kwargs)

    def vjp_input(self, m, z, a):
        return (1 - z * z) * m


class SkipDroppingAdd(layers.Add):
    """Sends ``delta`` back along the first input only: the skip path's term is lost."""

    def vjp_input(self, m, xs, y, *args):
        dxs = super().vjp_input(m, xs, y, *args)
        return [dxs[0]] + [ops.zeros_like(d) for d in dxs[1:]]


class InfDense(layers.Dense):
    """The kernel gradient has ``inf`` in one entry."""

    def vjp_params(self, *args, **kwargs):
        grads = super().vjp_params(*args, **kwargs)
        n, m = grads[0].shape[-2:]
        first = np.zeros((n, m), bool)
        first[0, 0] = True
        inf = ops.where(first, np.inf, grads[0])
        return [ops.cast(inf, grads[0].dtype), *grads[1:]]


class OffByOneStrideConv2D(layers.Conv2D):
    """The input gradient ``dX = Delta T(K)`` uses ``T(K)`` built for ``stride + 1``.

    For a 5 x 5 input, a 2 x 2 kernel and stride 2 (valid) both strides give 2 x 2 outputs, so
    the shapes fit and only the index map is off by one.
    """

    def vjp_input(self, m, x, y, kernel, bias=None):
        wrong = toeplitz.conv_index(
            tuple(self.kernel.shape),
            self.conv_index.input_shape,
            tuple(s + 1 for s in self.strides),
            self.padding,
            self.dilation_rate,
        )
        rows = ops.reshape(m, (-1, wrong.shape[0]))
        dx = toeplitz.toeplitz_product(rows, wrong.transpose_matrix(kernel), transpose=True)
        return ops.reshape(dx, (m.shape[0], *x.shape))


class _NoVarianceTermMap(BatchStatistics):
    """BatchNormalization's training map with ``- xhat mean(m xhat)`` left out of ``J^T m``."""

    def vjp_input(self, m, x, y, *params):
        gamma, _ = self.split(params)
        _, s = self.normalized(x)
        axes = tuple(range(1, len(m.shape) - 1))
        projected = m - tf.reduce_mean(m, axis=axes, keepdims=True)  # missing: - xhat mean(m xhat)
        return gamma / s * projected


class NoVarianceTerm(layers.BatchNormalization):
    """The train-mode backward with ``- xhat mean(delta xhat)`` left out (docs/batchnorm.md)."""

    def training_map(self, masked=False):
        return _NoVarianceTermMap(self.epsilon, self.scale, self.center)


class MissingBias(layers.Dense):
    """A Dense whose backward pass returns no bias gradient (one parameter gradient of two)."""

    def vjp_params(self, *args, **kwargs):
        return super().vjp_params(*args, **kwargs)[:1]


BACKWARD_SCALE = 3.0


@keras.saving.register_keras_serializable(package="tf_jacbp_tests")
class ScaledBackwardDense(layers.Dense):
    """A Dense layer whose backward pass is ``BACKWARD_SCALE`` times the true one (a marker)."""

    def vjp_input(self, *args):
        return BACKWARD_SCALE * super().vjp_input(*args)

    def vjp_params(self, *args, **kwargs):
        return [BACKWARD_SCALE * g for g in super().vjp_params(*args, **kwargs)]


# GradientCheck's witness test (tests/check/test_witness.py): a factor per layer slot, planted in
# turn into each Dense and Conv2D parameter gradient of a model traced once.
MAX_SLOTS = 8

# Row ``slot``: the factors of that layer's parameter gradients (kernel, bias). All 1 by default.
FACTORS = tf.Variable(tf.ones([MAX_SLOTS, 2]), trainable=False)


class _Slotted:
    """Parameter gradients scaled by ``FACTORS[slot]`` (Jacobian route); ``slot`` is an argument
    and in the config. Mixed in before a tf_jacbp layer class."""

    def __init__(self, *args, slot=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot = slot

    def vjp_params(self, *args, **kwargs):
        grads = super().vjp_params(*args, **kwargs)
        factors = tf.convert_to_tensor(FACTORS)[self.slot]
        return [g * tf.cast(factors[i], g.dtype) for i, g in enumerate(grads)]

    def get_config(self):
        return {**super().get_config(), "slot": self.slot}


class PlantedDense(_Slotted, layers.Dense):
    """``Dense`` whose parameter gradients are scaled by ``FACTORS[slot]`` (Jacobian route)."""


class PlantedConv2D(_Slotted, layers.Conv2D):
    """``Conv2D`` whose parameter gradients are scaled by ``FACTORS[slot]`` (Jacobian route)."""


def plantable(model):
    """``model`` with every tf_jacbp Dense and Conv2D replaced by its planted twin (same config,
    one slot each); other layers are copied as they are."""
    slots = iter(range(MAX_SLOTS))

    def clone(layer):
        config = layer.get_config()
        if type(layer) is layers.Dense:
            return PlantedDense.from_config({**config, "slot": next(slots)})
        if type(layer) is layers.Conv2D:
            return PlantedConv2D.from_config({**config, "slot": next(slots)})
        return type(layer).from_config(config)

    return keras.models.clone_model(model, clone_function=clone)


# --- the model they are planted in, its data, and the check that catches them -----------------


def data(n=64, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)).astype(dtype)
    y = rng.integers(0, N_CLASSES, size=n)
    return x, y


def mlp(middle=None, dtype=None, regularizer=None):
    """``Input(6) -> Dense(4, tanh) -> middle -> Dense(3)`` (logits), all tf_jacbp."""
    middle = middle or layers.Dense(4, activation="relu", dtype=dtype, name="middle")
    return keras.Sequential(
        [
            keras.Input((N_FEATURES,)),
            layers.Dense(4, activation="tanh", dtype=dtype, name="first"),
            middle,
            layers.Dense(N_CLASSES, dtype=dtype, kernel_regularizer=regularizer, name="last"),
        ],
        name="net",
    )


def compile_model(model, dtype="float32", **kwargs):
    model.compile(
        keras.optimizers.SGD(0.1),
        losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype),
        **kwargs,
    )
    return model


def fit(model, check, epochs=1, dtype="float32", batch_size=16, n=64, extra=()):
    x, y = data(n, dtype=dtype)
    return model.fit(
        x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[check, *extra]
    )


def probe(dtype="float32", n=16):
    x, y = data(n, seed=1, dtype=dtype)
    return x, y


def residual(add):
    """``first -> Add([middle(h), h]) -> last``: a functional model with a skip."""
    x = keras.Input((N_FEATURES,))
    h = layers.Dense(4, activation="tanh", name="first")(x)
    r = add([layers.Dense(4, activation="relu", name="middle")(h), h])
    return keras.Model(x, layers.Dense(N_CLASSES, name="last")(r), name="net")


def assert_caught(model, layer, variable, dtype="float32"):
    """``fit`` stops with GradientMismatchError naming ``layer`` and its ``variable``."""
    compile_model(model, dtype)
    before = [np.asarray(v).copy() for v in model.trainable_variables]
    check = GradientCheck(probe(dtype), every_n_batches=1, verbose=0)
    with pytest.raises(GradientMismatchError) as info:
        fit(model, check, epochs=3, dtype=dtype)
    message = str(info.value)
    assert f"layer '{layer}'" in message, message
    # Sequential variables are named net/<layer>/..., functional ones <layer>/...
    assert re.search(rf"variable '(net/)?{layer}/{variable}'", message), message
    assert any(r.layer == layer and r.variable.endswith(variable) for r in info.value.records)
    # Caught by the check at the start of training: fit stopped before any update.
    for b, v in zip(before, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(b, np.asarray(v))
    return info.value
