"""Identity + squared error (Table 1, row 3): the paper's ``SquaredError`` (a sum over the last
axis) and Keras' ``MeanSquaredError`` (a mean), with ``grad_yhat l = -2 (y - yhat)`` (over ``d``
for the mean)."""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp._backend import keras
from tf_jacbp.losses.base import _check_same_shape, _fused, _match_ranks

Tensor = Any


def _squared_error(y: Tensor, yhat: Tensor) -> Tensor:
    """``||y - yhat||^2`` over the last axis."""
    return ops.sum(ops.square(y - yhat), axis=-1)


def _squared_error_grad(y: Tensor, yhat: Tensor) -> Tensor:
    """Table 1: ``grad_yhat l = -2 (y - yhat)``."""
    return -2 * (y - yhat)


class _Squared(keras.losses.Loss):
    """Identity + squared error (Table 1, row 3) over the last axis; ``mean`` divides by its
    size ``d``. ``y_true``, ``y_pred``: ``(batch, ..., d)`` after Keras' rank matching; the loss
    per position has shape ``(batch, ...)``."""

    mean = False

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        name = type(self).__name__
        y_true, y_pred = _match_ranks(y_true, y_pred)
        _check_same_shape(y_true, y_pred, name, "Give one target per output.")
        if self.mean:
            scale = 1 / ops.cast(ops.shape(y_pred)[-1], y_pred.dtype)
        else:
            scale = ops.ones((), y_pred.dtype)
        return _fused(
            y_true,
            y_pred,
            lambda y, yhat: scale * _squared_error(y, yhat),
            lambda y, yhat: scale * _squared_error_grad(y, yhat),
            lambda y, yhat: scale * ops.sum(ops.square(ops.subtract(y, yhat)), axis=-1),
        )


@keras.saving.register_keras_serializable(package="tf_jacbp")
class SquaredError(_Squared):
    """The paper's ``l = ||y - yhat||^2``, a sum (not a mean) over the last axis;
    ``grad_yhat l = -2 (y - yhat)``.

    ``y_true`` and ``y_pred`` are ``(batch, ..., d)``; the loss per position, ``(batch, ...)``,
    is ``d`` times ``MeanSquaredError``'s, and the reduction then averages over the positions.
    """

    def __init__(
        self,
        reduction: str | None = "sum_over_batch_size",
        name: str = "squared_error",
        dtype: Any = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class MeanSquaredError(_Squared):
    """Keras' ``mean_i (y_i - yhat_i)^2`` over the last axis; ``grad_yhat l = -2 (y - yhat) / d``.

    Shapes as ``SquaredError``; values equal ``keras.losses.MeanSquaredError``'s for any rank.
    """

    mean = True

    def __init__(
        self,
        reduction: str | None = "sum_over_batch_size",
        name: str = "mean_squared_error",
        dtype: Any = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
