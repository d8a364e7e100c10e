"""The losses of Table 1, with the last activation fused in (MATH.md, Eq. 1 and Table 1).

Each loss returns one value per sample; Keras' ``reduction`` (default ``"sum_over_batch_size"``)
then averages them, which divides each row of the gradient by the batch size.

With ``from_logits=True`` the backward pass is Table 1's ``grad_{z[L]} l`` directly:

| loss                            | ``l(y, z)`` per sample                  | ``grad_z l``          |
|---------------------------------|-----------------------------------------|-----------------------|
| (Sparse)CategoricalCrossentropy | ``-sum_i y_i log softmax(z)_i``          | ``-(y - softmax(z))`` |
| BinaryCrossentropy              | ``mean_i [-y log s - (1-y) log(1-s)]``  | ``-(y - s) / d``      |
| SquaredError (``||y - yhat||^2``) | ``sum_i (y_i - yhat_i)^2``             | ``-2 (y - yhat)``     |
| MeanSquaredError                | ``mean_i (y_i - yhat_i)^2``             | ``-2 (y - yhat) / d`` |

(``s = sigmoid(z)``, ``d`` the number of outputs; the cross-entropy row is exact for labels that
sum to one, and ``-(sum(y) softmax(z) - y)`` in general.) With ``from_logits=False`` the loss
sees probabilities ``p`` and its backward pass is ``grad_p l`` (``-y / p`` for cross entropy);
the model's Softmax/Sigmoid layer then applies its own Jacobian, and the chain gives the same
``grad_z l``. Probabilities are clipped to ``[eps, 1 - eps]`` as Keras does (``eps =
keras.config.epsilon()``), and the gradient is zero where the clip is active. Unlike Keras,
``p`` is not renormalized to sum to one (it does for a softmax output).

Inside ``tf_jacbp.reference_mode()`` each loss computes the same value with stock TensorFlow ops
and autodiff differentiates it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tf_jacbp._backend import keras, tf
from tf_jacbp.mode import in_reference_mode


def _fused(
    y: tf.Tensor,
    z: tf.Tensor,
    value: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    gradient: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    reference: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
) -> tf.Tensor:
    """Per-sample loss ``value(y, z)`` ``(batch,)`` whose backward pass is ``gradient(y, z)``.

    ``gradient`` returns ``grad_z l`` for each sample, ``(batch, d)``; the upstream vector (one
    scalar per sample, from the reduction) scales its rows. No gradient flows to ``y``.
    """
    if in_reference_mode():
        return reference(y, z)

    @tf.custom_gradient
    def loss(z):
        def grad(upstream):
            return tf.cast(upstream[:, None] * gradient(y, z), z.dtype)

        return value(y, z), grad

    return loss(z)


def _check_axis(axis: int, name: str) -> None:
    if axis != -1:
        raise ValueError(
            f"{name}: tf_jacbp supports axis=-1 only (classes on the last axis), got axis={axis}."
        )


def _check_same_shape(y: tf.Tensor, p: tf.Tensor, name: str, hint: str) -> None:
    if y.shape.rank is not None and p.shape.rank is not None:
        if not y.shape.is_compatible_with(p.shape):
            raise ValueError(
                f"{name}: y_true has shape {tuple(y.shape)} but y_pred has shape "
                f"{tuple(p.shape)}; they must match. {hint}"
            )


def _check_range(y: tf.Tensor, low: float, high: float, name: str, what: str) -> None:
    """Raise in eager mode when labels leave ``[low, high]``; no-op while tracing."""
    if tf.executing_eagerly():
        values = np.asarray(y)
        if values.size and (values.min() < low or values.max() > high):
            raise ValueError(
                f"{name}: y_true must be {what}, found values from {values.min()} to "
                f"{values.max()}."
            )


class _Table1Loss(keras.losses.Loss):
    """Shared constructor of the Table 1 losses (``from_logits``, ``reduction``, ``name``)."""

    def __init__(
        self,
        from_logits: bool = False,
        reduction: str = "sum_over_batch_size",
        name: str | None = None,
        dtype: Any = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "from_logits": self.from_logits}


class _SmoothedLoss(_Table1Loss):
    """A Table 1 loss with Keras' ``label_smoothing`` in ``[0, 1]`` and ``axis=-1`` only."""

    def __init__(
        self,
        from_logits: bool,
        label_smoothing: float,
        axis: int,
        reduction: str,
        name: str,
        dtype: Any,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        owner = type(self).__name__
        _check_axis(axis, owner)
        if not 0 <= label_smoothing <= 1:
            raise ValueError(
                f"{owner}: label_smoothing must be in [0, 1], got label_smoothing={label_smoothing}."
            )
        self.label_smoothing = float(label_smoothing)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def _softmax_cross_entropy(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """``-sum_i y_i log softmax(z)_i = sum(y) logsumexp(z) - <y, z>``, stable for any ``|z|``."""
    return tf.reduce_sum(y, -1) * tf.reduce_logsumexp(z, -1) - tf.reduce_sum(y * z, -1)


def _softmax_cross_entropy_grad(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """Table 1: ``grad_z l = -(y - sum(y) softmax(z))``, ``-(y - yhat)`` for labels summing to 1."""
    return -(y - tf.reduce_sum(y, -1, keepdims=True) * tf.nn.softmax(z, -1))


def _one_hot_softmax_cross_entropy(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """Softmax + cross entropy for one-hot rows ``y`` (integer labels): ``logsumexp(z) - z_y``,
    with Table 1's ``grad_z l = -(y - softmax(z))`` as the backward pass.

    The sparse loss' Jacobian route, in fewer ops than ``_softmax_cross_entropy``: the forward
    keeps ``e = exp(z - max z)`` and ``s = sum(e)``, so that the backward's ``softmax(z) = e / s``
    (times the upstream ``u``) is ``e (u / s)``: one division per sample. Both divide by ``n = sum(y)``, which is 1 for a label in range (exactly:
    ``v / 1 = v``) and 0 for the zero row that ``tf.one_hot`` gives a label out of range, so
    that such a sample's loss and gradient are NaN, never silently wrong.
    """

    @tf.custom_gradient
    def loss(z):
        m = tf.reduce_max(z, -1, keepdims=True)
        e = tf.exp(z - m)
        s = tf.reduce_sum(e, -1, keepdims=True)
        n = tf.reduce_sum(y, -1, keepdims=True)
        value = m + tf.math.log(s) - tf.reduce_sum(y * z, -1, keepdims=True) / n

        def grad(upstream):
            u = upstream[:, None]  # (batch, 1): the divisions stay on vectors
            return tf.cast(e * (u / s) - y * (u / n), z.dtype)

        return value[:, 0], grad

    return loss(z)


def _log_clipped(p: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(log clip(p), log(1 - clip(p)), inside)``: Keras' clip to ``[eps, 1 - eps]``."""
    eps = keras.config.epsilon()
    clipped = tf.clip_by_value(p, eps, 1 - eps)
    inside = tf.cast((p >= eps) & (p <= 1 - eps), p.dtype)
    return tf.math.log(clipped), tf.math.log(1 - clipped), inside


def _cross_entropy(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """``-sum_i y_i log p_i`` over the last axis."""
    return -tf.reduce_sum(y * _log_clipped(p)[0], -1)


def _cross_entropy_grad(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """``grad_p l = -y / p`` (zero where the clip is active)."""
    eps = keras.config.epsilon()
    return -y / tf.clip_by_value(p, eps, 1 - eps) * _log_clipped(p)[2]


def _reference_cross_entropy(y: tf.Tensor, out: tf.Tensor, from_logits: bool) -> tf.Tensor:
    eps = keras.config.epsilon()
    if from_logits:
        return -tf.reduce_sum(y * tf.nn.log_softmax(out, axis=-1), axis=-1)
    return -tf.reduce_sum(y * tf.math.log(tf.clip_by_value(out, eps, 1 - eps)), axis=-1)


def _categorical(y: tf.Tensor, out: tf.Tensor, from_logits: bool) -> tf.Tensor:
    if from_logits:
        return _fused(
            y,
            out,
            _softmax_cross_entropy,
            _softmax_cross_entropy_grad,
            lambda y, z: _reference_cross_entropy(y, z, True),
        )
    return _fused(
        y,
        out,
        _cross_entropy,
        _cross_entropy_grad,
        lambda y, p: _reference_cross_entropy(y, p, False),
    )


@keras.saving.register_keras_serializable(package="tf_jacbp")
class CategoricalCrossentropy(_SmoothedLoss):
    """Softmax + cross entropy (Table 1, row 2) for one-hot or probability labels.

    ``y_true`` and ``y_pred`` are ``(batch, d)``. With ``from_logits=True``, ``y_pred`` is
    ``z[L]`` and ``grad_z l = -(y - softmax(z))``; otherwise ``y_pred`` holds probabilities.
    """

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        reduction: str = "sum_over_batch_size",
        name: str = "categorical_crossentropy",
        dtype: Any = None,
    ):
        super().__init__(from_logits, label_smoothing, axis, reduction, name, dtype)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        _check_same_shape(
            y_true,
            y_pred,
            "CategoricalCrossentropy",
            "For integer class labels use SparseCategoricalCrossentropy, or one-hot encode "
            "them with keras.utils.to_categorical.",
        )
        _check_range(y_true, 0, 1, "CategoricalCrossentropy", "one-hot or probabilities in [0, 1]")
        if self.label_smoothing:
            d = tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
            y_true = y_true * (1 - self.label_smoothing) + self.label_smoothing / d
        return _categorical(y_true, y_pred, self.from_logits)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class SparseCategoricalCrossentropy(_Table1Loss):
    """Softmax + cross entropy (Table 1, row 2) for integer labels.

    ``y_true`` is ``(batch,)`` or ``(batch, 1)`` with integers in ``[0, d)``; ``y_pred`` is
    ``(batch, d)``. The labels are one-hot encoded and the loss is ``CategoricalCrossentropy``'s
    (with logits, in fewer ops: ``_one_hot_softmax_cross_entropy``). Labels out of range raise in eager mode; in a compiled function they give a NaN loss, never a
    silently wrong value (no assertion op: it would be a host-only op on a GPU's training path).
    """

    def __init__(
        self,
        from_logits: bool = False,
        ignore_class: int | None = None,
        reduction: str = "sum_over_batch_size",
        axis: int = -1,
        name: str = "sparse_categorical_crossentropy",
        dtype: Any = None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        _check_axis(axis, "SparseCategoricalCrossentropy")
        if ignore_class is not None:
            raise ValueError(
                f"SparseCategoricalCrossentropy: ignore_class={ignore_class!r} is not supported "
                "by tf_jacbp; pass ignore_class=None and drop those samples (or give them "
                "sample_weight=0)."
            )

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        name = "SparseCategoricalCrossentropy"
        if y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == 1:
            y_true = tf.squeeze(y_true, -1)
        if y_true.shape.rank is not None and y_true.shape.rank != y_pred.shape.rank - 1:
            raise ValueError(
                f"{name}: y_true must hold one integer class per sample, shape (batch,) or "
                f"(batch, 1), but has shape {tuple(y_true.shape)} for y_pred of shape "
                f"{tuple(y_pred.shape)}. For one-hot labels use CategoricalCrossentropy."
            )
        d = y_pred.shape[-1]
        if tf.executing_eagerly():
            labels = np.asarray(y_true)
            if labels.size and not np.all(labels == np.round(labels)):
                raise ValueError(f"{name}: y_true must be integer class indices, got {labels}.")
        _check_range(
            y_true, 0, d - 1, name, f"class indices in [0, {d - 1}] (y_pred has {d} classes)"
        )
        labels = tf.cast(y_true, tf.int32)
        y = tf.one_hot(labels, d, dtype=y_pred.dtype)
        if self.from_logits and not in_reference_mode():
            return _one_hot_softmax_cross_entropy(y, y_pred)
        valid = (labels >= 0) & (labels < d)
        nan_if_invalid = tf.where(valid, tf.zeros_like(y_pred[:, 0]), np.nan)
        return _categorical(y, y_pred, self.from_logits) + tf.stop_gradient(nan_if_invalid)


def _sigmoid_cross_entropy(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """``mean_i [max(z,0) - z y + log(1 + e^{-|z|})]``: ``-y log s - (1-y) log(1-s)``, stable."""
    return tf.reduce_mean(tf.nn.relu(z) - z * y + tf.math.log1p(tf.exp(-tf.abs(z))), -1)


def _sigmoid_cross_entropy_grad(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """Table 1: ``grad_z l = -(y - sigmoid(z))``, divided by ``d`` for the mean over outputs."""
    return -(y - tf.math.sigmoid(z)) / tf.cast(tf.shape(z)[-1], z.dtype)


def _binary_cross_entropy(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    log_p, log_1mp, _ = _log_clipped(p)
    return -tf.reduce_mean(y * log_p + (1 - y) * log_1mp, -1)


def _binary_cross_entropy_grad(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """``grad_p l = -(y / p - (1 - y) / (1 - p)) / d`` (zero where the clip is active)."""
    eps = keras.config.epsilon()
    clipped = tf.clip_by_value(p, eps, 1 - eps)
    d = tf.cast(tf.shape(p)[-1], p.dtype)
    return -(y / clipped - (1 - y) / (1 - clipped)) / d * _log_clipped(p)[2]


def _reference_binary(y: tf.Tensor, out: tf.Tensor, from_logits: bool) -> tf.Tensor:
    if from_logits:
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=out), -1)
    eps = keras.config.epsilon()
    p = tf.clip_by_value(out, eps, 1 - eps)
    return -tf.reduce_mean(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p), -1)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class BinaryCrossentropy(_SmoothedLoss):
    """Sigmoid + binary cross entropy (Table 1, row 1), averaged over the ``d`` outputs.

    ``y_true`` in ``[0, 1]`` and ``y_pred`` are ``(batch, d)`` (``y_true`` may be ``(batch,)``
    when ``d = 1``). With ``from_logits=True``, ``grad_z l = -(y - sigmoid(z)) / d``.
    """

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        reduction: str = "sum_over_batch_size",
        name: str = "binary_crossentropy",
        dtype: Any = None,
    ):
        super().__init__(from_logits, label_smoothing, axis, reduction, name, dtype)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        if y_true.shape.rank == y_pred.shape.rank - 1 and y_pred.shape[-1] == 1:
            y_true = y_true[..., None]
        _check_same_shape(
            y_true, y_pred, "BinaryCrossentropy", "Give one label in [0, 1] per output."
        )
        _check_range(y_true, 0, 1, "BinaryCrossentropy", "in [0, 1]")
        if self.label_smoothing:
            y_true = y_true * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.from_logits:
            return _fused(
                y_true,
                y_pred,
                _sigmoid_cross_entropy,
                _sigmoid_cross_entropy_grad,
                lambda y, z: _reference_binary(y, z, True),
            )
        return _fused(
            y_true,
            y_pred,
            _binary_cross_entropy,
            _binary_cross_entropy_grad,
            lambda y, p: _reference_binary(y, p, False),
        )


def _squared_error(y: tf.Tensor, yhat: tf.Tensor) -> tf.Tensor:
    """``||y - yhat||^2`` over the last axis."""
    return tf.reduce_sum(tf.square(y - yhat), -1)


def _squared_error_grad(y: tf.Tensor, yhat: tf.Tensor) -> tf.Tensor:
    """Table 1: ``grad_yhat l = -2 (y - yhat)``."""
    return -2 * (y - yhat)


class _Squared(keras.losses.Loss):
    """Identity + squared error (Table 1, row 3); ``mean`` divides by the ``d`` outputs."""

    mean = False

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        name = type(self).__name__
        if y_true.shape.rank == y_pred.shape.rank - 1 and y_pred.shape[-1] == 1:
            y_true = y_true[..., None]
        _check_same_shape(y_true, y_pred, name, "Give one target per output.")
        scale = 1.0 / y_pred.shape[-1] if self.mean else 1.0
        return _fused(
            y_true,
            y_pred,
            lambda y, yhat: scale * _squared_error(y, yhat),
            lambda y, yhat: scale * _squared_error_grad(y, yhat),
            lambda y, yhat: scale * tf.reduce_sum(tf.math.squared_difference(y, yhat), -1),
        )


@keras.saving.register_keras_serializable(package="tf_jacbp")
class SquaredError(_Squared):
    """The paper's ``l = ||y - yhat||^2`` (a sum over outputs); ``grad_yhat l = -2 (y - yhat)``.

    ``y_true`` and ``y_pred`` are ``(batch, d)``; the reduction then averages over the batch.
    """

    def __init__(
        self, reduction: str = "sum_over_batch_size", name: str = "squared_error", dtype: Any = None
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class MeanSquaredError(_Squared):
    """Keras' ``mean_i (y_i - yhat_i)^2``; ``grad_yhat l = -2 (y - yhat) / d``."""

    mean = True

    def __init__(
        self,
        reduction: str = "sum_over_batch_size",
        name: str = "mean_squared_error",
        dtype: Any = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
