"""Sigmoid + binary cross entropy (Table 1, row 1): ``BinaryCrossentropy``.

With ``from_logits=True`` the backward pass is ``grad_z l = -(y - sigmoid(z)) / d`` (the mean
over the last axis, of size ``d``); with ``from_logits=False`` it is ``grad_p l`` on Keras'
clipped probabilities, and the model's Sigmoid layer applies its own Jacobian.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp import numerics
from tf_jacbp._backend import keras
from tf_jacbp.losses.base import _clip_mask, _SmoothedLoss

Tensor = Any


def _sigmoid_cross_entropy(y: Tensor, z: Tensor) -> Tensor:
    """``mean_i [max(z,0) - z y + log(1 + e^{-|z|})]``: ``-y log s - (1-y) log(1-s)``, stable."""
    return numerics.mean(ops.relu(z) - z * y + ops.log1p(ops.exp(-ops.abs(z))), axis=-1)


def _sigmoid_cross_entropy_grad(y: Tensor, z: Tensor) -> Tensor:
    """Table 1: ``grad_z l = -(y - sigmoid(z))``, divided by ``d`` for the mean over outputs."""
    return -(y - ops.sigmoid(z)) / ops.cast(ops.shape(z)[-1], z.dtype)


def _binary_cross_entropy(y: Tensor, p: Tensor) -> Tensor:
    """``mean_i [-y_i log c_i - (1 - y_i) log(1 - c_i)]``, ``c = clip(p)``."""
    c, _ = _clip_mask(p)
    return -numerics.mean(y * ops.log(c) + (1 - y) * ops.log(1 - c), axis=-1)


def _binary_cross_entropy_grad(y: Tensor, p: Tensor) -> Tensor:
    """``grad_p l = -(y / c - (1 - y) / (1 - c)) / d`` (zero where the clip is active)."""
    c, inside = _clip_mask(p)
    d = ops.cast(ops.shape(p)[-1], p.dtype)
    return -(y / c - (1 - y) / (1 - c)) / d * inside


def _reference_sigmoid_cross_entropy(y: Tensor, z: Tensor) -> Tensor:
    """TensorFlow's ``sigmoid_cross_entropy_with_logits``, composed of the same stock ops
    (``where`` on ``z >= 0``, so autodiff gives ``s - y`` at ``z = 0`` too), averaged over the
    last axis. Not ``keras.ops.binary_crossentropy``: it would take a sigmoid's input as the
    logits when ``y_pred`` comes out of a ``Sigmoid`` op. The mean is ``tf_jacbp.numerics.mean``
    (``keras.ops.mean``, but summed in float64 for float64 on JAX, where Keras sums in float32)."""
    positive = z >= 0
    relu_z = ops.where(positive, z, ops.zeros_like(z))
    minus_abs_z = ops.where(positive, -z, z)
    return numerics.mean(relu_z - z * y + ops.log1p(ops.exp(minus_abs_z)), axis=-1)


def _reference_binary_cross_entropy(y: Tensor, p: Tensor) -> Tensor:
    """Keras' clipped ``-y log c - (1 - y) log(1 - c)`` in stock ops, averaged over the last axis
    by ``tf_jacbp.numerics.mean`` (float64 on JAX too, where ``keras.ops.mean`` sums in
    float32)."""
    eps = keras.config.epsilon()
    c = ops.clip(p, eps, 1 - eps)
    return -numerics.mean(y * ops.log(c) + (1 - y) * ops.log(1 - c), axis=-1)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class BinaryCrossentropy(_SmoothedLoss):
    """Sigmoid + binary cross entropy (Table 1, row 1), averaged over the last axis (``d``).

    ``y_true`` in ``[0, 1]`` and ``y_pred`` are ``(batch, ..., d)``; Keras' rank matching applies
    (``(batch,)`` labels with ``(batch, 1)`` predictions). The loss per position has shape
    ``(batch, ...)``. With ``from_logits=True``, ``grad_z l = -(y - sigmoid(z)) / d``.
    ``label_smoothing`` ``a`` replaces ``y`` by ``(1 - a) y + a / 2``. Labels outside ``[0, 1]``
    stop the step (see "Bad labels" in ``tf_jacbp.losses``).
    """

    default_name = "binary_crossentropy"
    shape_hint = "Give one label in [0, 1] per output."
    on_logits = (
        _sigmoid_cross_entropy,
        _sigmoid_cross_entropy_grad,
        _reference_sigmoid_cross_entropy,
    )
    on_probabilities = (
        _binary_cross_entropy,
        _binary_cross_entropy_grad,
        _reference_binary_cross_entropy,
    )

    def classes(self, y_pred: Tensor) -> int:
        """2: smoothing moves each label towards ``1/2``."""
        return 2
