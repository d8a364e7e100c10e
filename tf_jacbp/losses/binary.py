"""Sigmoid + binary cross entropy (Table 1, row 1): ``BinaryCrossentropy``.

With ``from_logits=True`` the backward pass is ``grad_z l = -(y - sigmoid(z)) / d`` (the mean
over the last axis, of size ``d``); with ``from_logits=False`` it is ``grad_p l`` on Keras'
clipped probabilities, and the model's Sigmoid layer applies its own Jacobian.
"""

from __future__ import annotations

from typing import Any

from tf_jacbp._backend import keras, tf
from tf_jacbp.losses.base import _check_same_shape, _clip_mask, _fused, _match_ranks, _SmoothedLoss
from tf_jacbp.losses.labels import _guard_unit_interval


def _sigmoid_cross_entropy(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """``mean_i [max(z,0) - z y + log(1 + e^{-|z|})]``: ``-y log s - (1-y) log(1-s)``, stable."""
    return tf.reduce_mean(tf.nn.relu(z) - z * y + tf.math.log1p(tf.exp(-tf.abs(z))), -1)


def _sigmoid_cross_entropy_grad(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """Table 1: ``grad_z l = -(y - sigmoid(z))``, divided by ``d`` for the mean over outputs."""
    return -(y - tf.math.sigmoid(z)) / tf.cast(tf.shape(z)[-1], z.dtype)


def _binary_cross_entropy(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """``mean_i [-y_i log c_i - (1 - y_i) log(1 - c_i)]``, ``c = clip(p)``."""
    c, _ = _clip_mask(p)
    return -tf.reduce_mean(y * tf.math.log(c) + (1 - y) * tf.math.log(1 - c), -1)


def _binary_cross_entropy_grad(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """``grad_p l = -(y / c - (1 - y) / (1 - c)) / d`` (zero where the clip is active)."""
    c, inside = _clip_mask(p)
    d = tf.cast(tf.shape(p)[-1], p.dtype)
    return -(y / c - (1 - y) / (1 - c)) / d * inside


def _reference_binary(y: tf.Tensor, out: tf.Tensor, from_logits: bool) -> tf.Tensor:
    if from_logits:
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=out), -1)
    eps = keras.config.epsilon()
    p = tf.clip_by_value(out, eps, 1 - eps)
    return -tf.reduce_mean(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p), -1)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class BinaryCrossentropy(_SmoothedLoss):
    """Sigmoid + binary cross entropy (Table 1, row 1), averaged over the last axis (``d``).

    ``y_true`` in ``[0, 1]`` and ``y_pred`` are ``(batch, ..., d)``; Keras' rank matching applies
    (``(batch,)`` labels with ``(batch, 1)`` predictions). The loss per position has shape
    ``(batch, ...)``. With ``from_logits=True``, ``grad_z l = -(y - sigmoid(z)) / d``.
    ``label_smoothing`` ``a`` replaces ``y`` by ``(1 - a) y + a / 2``. Labels outside ``[0, 1]``
    stop the step (see "Bad labels" in ``tf_jacbp.losses``).
    """

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str = "binary_crossentropy",
        dtype: Any = None,
    ):
        super().__init__(from_logits, label_smoothing, axis, reduction, name, dtype)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        name = "BinaryCrossentropy"
        y_true, y_pred = _match_ranks(y_true, y_pred)
        _check_same_shape(y_true, y_pred, name, "Give one label in [0, 1] per output.")
        guard = _guard_unit_interval(y_true, self, y_pred.shape.rank - 1)
        y = guard.y
        if self.label_smoothing:
            y = y * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.from_logits:
            loss = _fused(
                y,
                y_pred,
                _sigmoid_cross_entropy,
                _sigmoid_cross_entropy_grad,
                lambda y, z: _reference_binary(y, z, True),
            )
        else:
            loss = _fused(
                y,
                y_pred,
                _binary_cross_entropy,
                _binary_cross_entropy_grad,
                lambda y, p: _reference_binary(y, p, False),
            )
        return guard.finish(loss)
