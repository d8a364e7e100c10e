"""Masked batch statistics of train-mode batch normalization and their Jacobian (docs/batchnorm.md).

Per channel, with ``m`` the 0/1 mask over the entries (a Keras mask of shape ``(batch, ...)``,
broadcast over the channels), ``N = 1^T m`` and ``k`` Keras' fuzz factor
(``keras.config.epsilon()``, 1e-7), Keras' masked moments are

    N' = N + k,   mu = (1/N') m^T x,   sigma^2 = (1/N') m^T (x - mu 1)^2,

and ``y = gamma (x - mu 1) / s + beta 1`` (``s = sqrt(sigma^2 + eps)``) at *every* entry, masked
ones included. With ``xhat = (x - mu 1) / s``, ``A = m^T (x - mu 1)`` (``= k mu``, zero when
``k = 0``) and ``a = A / (N' s)``, the Jacobian of this batch map is

    J_x y = (gamma / s) (I - (1/N') 1 m^T - (1/N') xhat (m * (xhat - a 1))^T)      (not symmetric),

so ``J^T delta = (gamma / s) (delta - (m/N') 1^T delta - (m/N') (xhat - a) xhat^T delta)``:
the sums run over every entry (a masked entry's output depends on ``mu`` and ``s`` too), and a
masked entry receives only the diagonal term ``(gamma / s) delta_i``. ``J_gamma^T delta =
xhat^T delta``, ``J_beta^T delta = 1^T delta`` as without a mask.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp._backend import keras

__all__ = [
    "broadcast_mask",
    "channel_axes",
    "masked_backward",
    "masked_input_product",
    "masked_moments",
]


def channel_axes(x: Any) -> list[int]:
    """The axes a channel's statistics reduce over: all but the last."""
    return list(range(len(x.shape) - 1))


def broadcast_mask(mask: Any, x: Any) -> Any:
    """The bool mask ``(batch, ...)`` of ``x`` ``(batch, ..., C)`` broadcast to ``x``'s shape
    (nonzero means kept, as Keras casts it)."""
    kept = ops.expand_dims(ops.cast(mask, "bool"), -1)
    return ops.logical_and(kept, ops.ones_like(x, dtype="bool"))


def masked_moments(x: Any, mask: Any) -> tuple[Any, Any, Any]:
    """``(mu, sigma^2, N')`` per channel, shapes ``(C,)``, over the unmasked entries of ``x``
    ``(batch, ..., C)`` with ``mask`` ``(batch, ...)``, exactly as Keras' ``BatchNormalization``
    (``N' = N + keras.config.epsilon()``, ``sigma^2`` divided by ``N'``)."""
    axes = tuple(channel_axes(x))
    kept = broadcast_mask(mask, x)
    zero = ops.zeros_like(x)
    n = ops.sum(ops.cast(kept, x.dtype), axis=axes) + keras.config.epsilon()
    mean = ops.sum(ops.where(kept, x, zero), axis=axes) / n
    variance = ops.sum(ops.square(ops.where(kept, x - mean, zero)), axis=axes) / n
    return mean, variance, n


def masked_input_product(m: Any, x: Any, mask: Any, gamma: Any | None, epsilon: float) -> Any:
    """``J^T m`` of the module docstring per channel for a stack of ``V`` vectors ``m``
    ``(V, batch, ..., C)`` over the whole batch ``x`` ``(batch, ..., C)``:
    ``(gamma / s) (m - (mask / N') (sum(m) + (xhat - a) sum(m * xhat)))``, the sums over every
    entry of the channel (each ``v`` on its own). Returns ``(V, batch, ..., C)``."""
    axes = tuple(range(1, len(m.shape) - 1))  # all but V and the channel
    kept = ops.cast(broadcast_mask(mask, x), x.dtype)
    mean, variance, n = masked_moments(x, mask)
    s = ops.sqrt(variance + epsilon)
    xhat = (x - mean) / s
    a = ops.sum(kept * (x - mean), axis=tuple(channel_axes(x))) / (n * s)
    sum_m = ops.sum(m, axis=axes, keepdims=True)
    sum_m_xhat = ops.sum(m * xhat, axis=axes, keepdims=True)
    projected = m - (kept / n) * (sum_m + (xhat - a) * sum_m_xhat)
    return projected * ((1.0 / s) if gamma is None else (gamma / s))


def masked_backward(
    dy: Any, x: Any, mask: Any, gamma: Any | None, epsilon: float
) -> tuple[Any, Any]:
    """``(dx, xhat)``: ``dx = J^T delta`` of the module docstring per channel
    (``masked_input_product`` with ``V = 1``), all shapes ``(batch, ..., C)``; ``xhat`` for the
    parameter gradients."""
    mean, variance, _ = masked_moments(x, mask)
    xhat = (x - mean) / ops.sqrt(variance + epsilon)
    return masked_input_product(dy[None], x, mask, gamma, epsilon)[0], xhat
