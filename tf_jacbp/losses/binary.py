"""Sigmoid + binary cross entropy (Table 1, row 1): ``BinaryCrossentropy``.

With ``from_logits=True`` the backward pass is ``grad_z l = -(y - sigmoid(z)) / d`` (the mean
over the last axis, of size ``d``); with ``from_logits=False`` it is ``grad_p l`` on Keras'
clipped probabilities, and the model's Sigmoid layer applies its own Jacobian.
"""

from __future__ import annotations

from keras import ops

from tf_jacbp._backend import keras, tf
from tf_jacbp.losses.base import _clip_mask, _SmoothedLoss


def _sigmoid_cross_entropy(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """``mean_i [max(z,0) - z y + log(1 + e^{-|z|})]``: ``-y log s - (1-y) log(1-s)``, stable."""
    return ops.mean(ops.relu(z) - z * y + ops.log1p(ops.exp(-ops.abs(z))), axis=-1)


def _sigmoid_cross_entropy_grad(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """Table 1: ``grad_z l = -(y - sigmoid(z))``, divided by ``d`` for the mean over outputs."""
    return -(y - ops.sigmoid(z)) / ops.cast(ops.shape(z)[-1], z.dtype)


def _binary_cross_entropy(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """``mean_i [-y_i log c_i - (1 - y_i) log(1 - c_i)]``, ``c = clip(p)``."""
    c, _ = _clip_mask(p)
    return -ops.mean(y * ops.log(c) + (1 - y) * ops.log(1 - c), axis=-1)


def _binary_cross_entropy_grad(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """``grad_p l = -(y / c - (1 - y) / (1 - c)) / d`` (zero where the clip is active)."""
    c, inside = _clip_mask(p)
    d = ops.cast(ops.shape(p)[-1], p.dtype)
    return -(y / c - (1 - y) / (1 - c)) / d * inside


def _reference_sigmoid_cross_entropy(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z), -1)


def _reference_binary_cross_entropy(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    eps = keras.config.epsilon()
    c = tf.clip_by_value(p, eps, 1 - eps)
    return -tf.reduce_mean(y * tf.math.log(c) + (1 - y) * tf.math.log(1 - c), -1)


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

    def classes(self, y_pred: tf.Tensor) -> int:
        """2: smoothing moves each label towards ``1/2``."""
        return 2
