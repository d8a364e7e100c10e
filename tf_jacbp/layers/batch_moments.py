"""Masked batch statistics of train-mode batch normalization and their Jacobian (docs/batchnorm.md).

Per channel, with ``m`` the 0/1 mask over the entries (a Keras mask of shape ``(batch, ...)``,
broadcast over the channels), ``N = 1^T m`` and ``k`` Keras' fuzz factor
(``keras.config.epsilon()``, 1e-7), Keras' masked moments are

    N' = N + k,   mu = (1/N') m^T x,   sigma^2 = (1/N') m^T (x - mu 1)^2,

and ``y = gamma (x - mu 1) / s + beta 1`` (``s = sqrt(sigma^2 + eps)``) at *every* entry, masked
ones included. With ``xhat = (x - mu 1) / s``, ``A = m^T (x - mu 1)`` (``= k mu``, zero when
``k = 0``) and ``a = A / (N' s)``, the Jacobian of this batch map is

    J_x y = (gamma / s) (I - (1/N') 1 m^T - (1/N') xhat (m * (xhat - a 1))^T)      (not symmetric),

so ``dx = J^T delta = (gamma / s) (delta - (m/N') 1^T delta - (m/N') (xhat - a) xhat^T delta)``:
the sums run over every entry (a masked entry's output depends on ``mu`` and ``s`` too), and a
masked entry receives only the diagonal term ``(gamma / s) delta_i``. ``dgamma = xhat^T delta``,
``dbeta = 1^T delta`` as without a mask.
"""

from __future__ import annotations

from tf_jacbp._backend import keras, tf


def channel_axes(x: tf.Tensor) -> list[int]:
    """The axes a channel's statistics reduce over: all but the last."""
    return list(range(len(x.shape) - 1))


def broadcast_mask(mask: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """The bool mask ``(batch, ...)`` of ``x`` ``(batch, ..., C)`` broadcast to ``x``'s shape
    (nonzero means kept, as Keras casts it)."""
    mask = tf.cast(mask, tf.bool) if mask.dtype != tf.bool else mask
    return tf.broadcast_to(mask[..., None], tf.shape(x))


def masked_moments(x: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(mu, sigma^2, N')`` per channel, shapes ``(C,)``, over the unmasked entries of ``x``
    ``(batch, ..., C)`` with ``mask`` ``(batch, ...)``, exactly as Keras' ``BatchNormalization``
    (``N' = N + keras.config.epsilon()``, ``sigma^2`` divided by ``N'``)."""
    axes = channel_axes(x)
    kept = broadcast_mask(mask, x)
    zero = tf.zeros_like(x)
    n = tf.reduce_sum(tf.cast(kept, x.dtype), axis=axes) + keras.config.epsilon()
    mean = tf.reduce_sum(tf.where(kept, x, zero), axis=axes) / n
    variance = tf.reduce_sum(tf.square(tf.where(kept, x - mean, zero)), axis=axes) / n
    return mean, variance, n


def masked_backward(
    dy: tf.Tensor, x: tf.Tensor, mask: tf.Tensor, gamma: tf.Tensor | None, epsilon: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """``(dx, xhat)``: ``dx = J^T delta`` of the module docstring per channel, all shapes
    ``(batch, ..., C)``; ``xhat`` for the parameter gradients."""
    axes = channel_axes(x)
    m = tf.cast(broadcast_mask(mask, x), x.dtype)
    mean, variance, n = masked_moments(x, mask)
    s = tf.sqrt(variance + epsilon)
    xhat = (x - mean) / s
    a = tf.reduce_sum(m * (x - mean), axis=axes) / (n * s)
    sum_dy = tf.reduce_sum(dy, axis=axes)
    sum_dy_xhat = tf.reduce_sum(dy * xhat, axis=axes)
    projected = dy - (m / n) * (sum_dy + (xhat - a) * sum_dy_xhat)
    factor = 1.0 / s if gamma is None else gamma / s
    return factor * projected, xhat
