"""1-D and 3-D max and average pooling: the 2-D layers' matrices (``tf_jacbp.layers.pooling``)
on a sequence read as the image ``(1, T, C)``, and on a volume ``(D, H, W, C)``.

The formulas are ``pooling``'s (a selection by each window's first arg-max, an averaging matrix
``1 / |S_o|``); these classes give only the geometry. In 3-D, for dtypes without a TensorFlow 3-D
pooling kernel on every device (float64, float16), the forward pass takes the window gathers,
and the reference route (autodiff's witness) reads the windows as strided slices of the padded
input, independent of ``tf_jacbp.layers.pool_windows``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from tf_jacbp._backend import keras
from tf_jacbp.layers.pooling import _Averaging, _MaxSelection, _Pooling

Tensor = Any  # a tensor of Keras' backend

# The dtypes TensorFlow's 3-D pooling kernels take on every device (no float64; float16 has
# GPU and XLA kernels only).
_POOL3D_DTYPES = ("bfloat16", "float32")


class _Pooling1D(_Pooling):
    """A sequence ``(batch, T, C)`` pooled as the image ``(batch, 1, T, C)``, windows ``(1, p)``."""

    rank = 1

    def __init__(self, pool_size: Any = 2, strides: Any = None, padding: str = "valid", **kwargs):
        super().__init__(pool_size, strides, padding, **kwargs)

    @property
    def image_window(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return (1, self.pool_size[0]), (1, self.strides[0])

    def as_image(self, x: Tensor, lead: int = 1) -> Tensor:
        return ops.expand_dims(x, lead)

    def from_image(self, v: Tensor, lead: int = 1) -> Tensor:
        return ops.squeeze(v, lead)


class _Pooling3D(_Pooling):
    """A volume ``(batch, D, H, W, C)`` pooled by windows ``(p_d, p_h, p_w)``."""

    rank = 3

    def __init__(
        self,
        pool_size: Any = (2, 2, 2),
        strides: Any = None,
        padding: str = "valid",
        data_format: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(pool_size, strides, padding, data_format, **kwargs)

    def has_kernel(self, x: Tensor) -> bool:
        """Whether TensorFlow's 3-D pooling kernels take ``x``'s dtype on every device
        (float32, bfloat16; not float64, and float16 not on CPU)."""
        return keras.backend.standardize_dtype(x.dtype) in _POOL3D_DTYPES

    def window_forward(self, x: Tensor) -> Tensor:
        """``y`` from the window gathers (``pool_windows``: the max or mean over the slots),
        ``(batch, D, H, W, C)`` -> ``(batch, D_out, H_out, W_out, C)``."""
        maps = self.maps(x)
        y = self.pool_windows(maps, x)  # (batch, P, C)
        return ops.reshape(y, (ops.shape(x)[0], *maps.output_sizes, x.shape[-1]))

    def strided_windows(self, x: Tensor, fill: float) -> Tensor:
        """Every window's inputs as strided slices of the padded input (no index maps):
        ``(batch, D, H, W, C)`` -> ``(batch, D_out, H_out, W_out, C, S)``, slot ``s`` (row-major
        over the window) the slice starting at its offset; padding reads ``fill``. The
        reference routes' window extraction, independent of ``tf_jacbp.layers.pool_windows``."""
        sizes = ops.shape(x)[1:-1]  # ints, or scalar tensors for sizes unknown when traced
        pads, outs = [], []
        for n, k, s in zip(sizes, self.pool_size, self.strides, strict=True):
            if self.padding == "same":  # TensorFlow's rule (tf_jacbp.geometry.same_padding)
                out = (n + s - 1) // s
                total = (out - 1) * s + k - n
                total = max(total, 0) if isinstance(total, int) else ops.maximum(total, 0)
                pads.append((total // 2, total - total // 2))
            else:
                out = (n - k) // s + 1
                pads.append((0, 0))
            outs.append(out)
        padded = ops.pad(x, ((0, 0), *pads, (0, 0)), constant_values=fill)
        slots = []
        for offset in np.ndindex(*self.pool_size):
            index = tuple(
                slice(t, t + (o - 1) * s + 1, s)
                for t, o, s in zip(offset, outs, self.strides, strict=True)
            )
            slots.append(padded[(slice(None), *index)])
        return ops.stack(slots, axis=-1)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class MaxPooling1D(_MaxSelection, _Pooling1D):
    """1-D max pooling: ``MaxPooling2D``'s selection on the image ``(1, T, C)``.

    Args (as ``keras.layers.MaxPooling1D``):
        pool_size: ``p``, a positive int (or a 1-tuple).
        strides: a positive int (or a 1-tuple), or ``None`` for ``pool_size``.
        padding: ``"valid"`` or ``"same"`` (padding never wins the max).
        data_format: ``None`` or ``"channels_last"``.

    Input ``(batch, T, C)`` with ``C`` known (``T`` may be None); output ``(batch, T_out, C)``.
    """


@keras.saving.register_keras_serializable(package="tf_jacbp")
class AveragePooling1D(_Averaging, _Pooling1D):
    """1-D average pooling: ``AveragePooling2D``'s matrix on the image ``(1, T, C)``.

    Args (as ``keras.layers.AveragePooling1D``):
        pool_size: ``p``, a positive int (or a 1-tuple).
        strides: a positive int (or a 1-tuple), or ``None`` for ``pool_size``.
        padding: ``"valid"`` or ``"same"`` ("same" divides by the inputs inside each window).
        data_format: ``None`` or ``"channels_last"``.

    Input ``(batch, T, C)`` with ``C`` known (``T`` may be None); output ``(batch, T_out, C)``.
    """


@keras.saving.register_keras_serializable(package="tf_jacbp")
class MaxPooling3D(_MaxSelection, _Pooling3D):
    """3-D max pooling with ``J`` the selection of each window's (first) arg-max, row-major
    within the ``p_d x p_h x p_w`` window.

    Args (as ``keras.layers.MaxPooling3D``):
        pool_size: ``(p_d, p_h, p_w)`` or one int, >= 1.
        strides: ``(s_d, s_h, s_w)``, one int, or ``None`` for ``pool_size``.
        padding: ``"valid"`` or ``"same"`` (padding never wins the max).
        data_format: ``None`` or ``"channels_last"``.

    Input ``(batch, D, H, W, C)`` with ``C`` known (``D``, ``H``, ``W`` may be None: maps per
    size met); output ``(batch, D_out, H_out, W_out, C)``. float64 works (the forward pass then
    takes each window's maximum from the window gathers: TensorFlow's 3-D pooling has no float64
    kernel).
    """


@keras.saving.register_keras_serializable(package="tf_jacbp")
class AveragePooling3D(_Averaging, _Pooling3D):
    """3-D average pooling with ``J`` the averaging matrix (``1 / |S_o|`` over each window).

    Args (as ``keras.layers.AveragePooling3D``):
        pool_size: ``(p_d, p_h, p_w)`` or one int, >= 1.
        strides: ``(s_d, s_h, s_w)``, one int, or ``None`` for ``pool_size``.
        padding: ``"valid"`` or ``"same"`` ("same" divides by the inputs inside each window).
        data_format: ``None`` or ``"channels_last"``.

    Input ``(batch, D, H, W, C)`` with ``C`` known (``D``, ``H``, ``W`` may be None); output
    ``(batch, D_out, H_out, W_out, C)``. float64 works (the forward pass then averages the
    window gathers: TensorFlow's 3-D pooling has no float64 kernel).
    """
