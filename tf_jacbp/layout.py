"""Orderings and layouts, defined once (docs/math.md, "Layouts chosen by the code") and
imported everywhere.

* ``Vec(W)`` stacks the columns of a matrix, first column on top: column-major (Fortran) order.
  For a Dense kernel ``W`` of shape ``(n, m)``, entry ``W[i, j]`` sits at ``j * n + i``.
* A conv kernel ``K`` of shape ``(kh, kw, c_in, c_out)`` is vectorized the same way, column-major
  over the array as stored: entry ``K[p, q, c, f]`` sits at
  ``p + kh * (q + kw * (c + c_in * f))``.
* Images are channels_last, ``(H, W, C)``, and ``vec(x)`` is their row-major flattening:
  ``x[i, j, c]`` sits at ``(i * W + j) * C + c``. For one channel this is the paper's
  ``Vec(X^T)`` (Lemma 2). Conv outputs ``(H_out, W_out, C_out)`` are flattened the same way, so
  the rows of the Toeplitz matrix ``T(K)`` are output positions in row-major order. A
  convolution with ``data_format="channels_first"`` sees its samples as ``(C, H, W)``: its
  Jacobians are over the row-major ``vec`` of that array, ``T(K)`` with rows and columns
  permuted (``tf_jacbp.layers.toeplitz_layer``).
* ``theta = [Vec(W[1]); b[1]; Vec(W[2]); b[2]; ...]``: each layer's parameters in the order of
  ``JacobianLayer.jacobian_parameters()`` (kernel, then bias), layers in model order, each
  parameter by ``vec_parameter``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

Tensor = Any  # a tensor of the backend Keras runs on


def vec_parameter(p: Tensor) -> Tensor:
    """``Vec(p)``: column-major flattening of a parameter of any rank (``p.shape`` ->
    ``(size,)``).

    A rank-1 parameter (a bias) is returned as it is.
    """
    rank = len(p.shape)
    if rank <= 1:
        return ops.reshape(p, (-1,))
    return ops.reshape(ops.transpose(p, axes=list(range(rank - 1, -1, -1))), (-1,))


def unvec_parameter(v: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of ``vec_parameter``: ``(prod(shape),)`` -> ``shape``."""
    rank = len(shape)
    if rank <= 1:
        return ops.reshape(v, shape)
    reversed_shape = tuple(shape)[::-1]
    return ops.transpose(ops.reshape(v, reversed_shape), axes=list(range(rank - 1, -1, -1)))


def vec_parameter_batch(p: Tensor) -> Tensor:
    """``Vec`` applied to each entry of a batch: ``(batch, *shape)`` -> ``(batch, size)``."""
    rank = len(p.shape)
    if rank <= 2:
        return ops.reshape(p, (ops.shape(p)[0], -1))
    axes = [0] + list(range(rank - 1, 0, -1))
    return ops.reshape(ops.transpose(p, axes=axes), (ops.shape(p)[0], -1))


def unvec_parameter_batch(v: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of ``vec_parameter_batch``: ``(batch, prod(shape))`` -> ``(batch, *shape)``."""
    rank = len(shape)
    if rank <= 1:
        return ops.reshape(v, (-1, *shape))
    v = ops.reshape(v, (-1, *tuple(shape)[::-1]))
    return ops.transpose(v, axes=[0] + list(range(rank, 0, -1)))


def vec_index(shape: tuple[int, ...]) -> np.ndarray:
    """Array of ``shape`` whose entry at each index is that entry's position in ``Vec``."""
    size = int(np.prod(shape))
    return np.arange(size).reshape(shape, order="F")
