"""Flatten: ``y = vec(x)``, the row-major flattening of ``tf_jacbp.layout``; ``J_x y = I``.

For a channels_last sample ``x`` of shape ``(H, W, C)`` (or any shape), ``vec(x)`` lists the entries
in row-major order, which is exactly how ``tf_jacbp.layout`` numbers them. So the Jacobian is the
identity ``I_N`` (``N`` = entries per sample): flattening changes the shape, not the numbering, and
``(J_x y)^T m = m`` reshaped back to the input's shape (``vjp_input``, for each of the ``V``
stacked vectors ``m[v, i]``). (With channels_first it would be a
permutation; tf_jacbp is channels_last throughout.)
"""

from __future__ import annotations

import math
from typing import Any

from keras import ops

from tf_jacbp._backend import keras
from tf_jacbp.geometry import check_channels_last
from tf_jacbp.layers.base import JacobianLayer

Tensor = Any  # a tensor of Keras' backend


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Flatten(JacobianLayer):
    """Flattens each sample row-major, like ``keras.layers.Flatten``; ``J = I``.

    Args:
        data_format: ``None`` or ``"channels_last"``; ``"channels_first"`` is an error.

    Input ``(batch, d_1, ..., d_k)``, output ``(batch, d_1 ... d_k)``.
    """

    def __init__(self, data_format: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.data_format = check_channels_last(data_format, "Flatten")

    def forward(self, x: Tensor) -> Tensor:
        """``y = vec(x)`` per sample: ``(batch, ...)`` -> ``(batch, N)`` (``N`` static where the
        sample shape is known, so a graph traced for any batch size keeps it)."""
        rest = tuple(x.shape[1:])
        size = -1 if None in rest else math.prod(rest)
        return ops.reshape(x, (ops.shape(x)[0], size))

    def reference(self, x: Tensor) -> Tensor:
        return ops.reshape(x, (ops.shape(x)[0], -1))

    def vjp_input(self, m: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(J_x y)^T m = I m``: each ``m[v, i]`` (``N``) in ``x``'s sample shape,
        ``(V, batch, N)`` -> ``(V, batch, *x.shape[1:])``."""
        return ops.reshape(m, (ops.shape(m)[0], *ops.shape(x)))

    def jacobian_factors(self, x: Tensor) -> dict[str, Tensor]:
        """``{"J = I": I_N}`` at one sample ``x`` (``N`` entries)."""
        return {"J = I": self.input_jacobian(x)}

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        rest = input_shape[1:]
        return (input_shape[0], None if None in rest else math.prod(rest))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "data_format": self.data_format}
