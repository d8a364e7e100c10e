"""UpSampling2D, ZeroPadding2D and Reshape: maps that move entries, with 0/1 Jacobians.

Each sample ``x`` is read row-major (``tf_jacbp.layout``), ``x`` ``(H, W, C)`` as ``vec(x)`` of
``H W C`` entries, and each map is linear, ``vec(y) = J vec(x)`` with ``J`` a 0/1 matrix:

* ``UpSampling2D(size=(s_h, s_w))``, nearest: ``y[i, j, c] = x[i // s_h, j // s_w, c]``, so

      J = E_h (x) E_w (x) I_C,    E_h = I_H (x) 1_{s_h}  (H s_h x H),  E_w = I_W (x) 1_{s_w},

  of shape ``(H s_h W s_w C) x (H W C)``: each input is copied into an ``s_h x s_w`` block.
  ``J^T m`` sums each block of ``m``: a summation matrix. Bilinear (``interpolation=
  "bilinear"``) is the one map here whose ``J`` is not 0/1: ``J = A_h (x) A_w (x) I_C`` with
  the interpolation weights of ``_bilinear_matrix`` (two per row, summing to 1).
* ``ZeroPadding2D(padding=((t, b), (l, r)))``: ``y`` is ``x`` framed by zeros,

      J = P_h (x) P_w (x) I_C, P_h = [0_{t x H}; I_H; 0_{b x H}], P_w = [0_{l x W}; I_W; 0_{r x W}]

  of shape ``((H + t + b) (W + l + r) C) x (H W C)``: a selection. ``J^T m`` crops ``m`` back
  to the input's rows and columns.
* ``Reshape(target_shape)``: ``vec(y) = vec(x)`` (a reshape keeps the row-major numbering), so
  ``J = I_N`` and ``J^T m`` is ``m`` in ``x``'s shape, like ``Flatten``.

Each ``vjp_input`` (the contract of ``tf_jacbp.contract``) applies ``J^T`` to each of the ``V``
stacked vectors ``m[v, i]`` of each sample: ``(V, batch, *y.shape[1:])`` ->
``(V, batch, *x.shape[1:])``. The materialized ``J`` is the base's ``input_jacobian``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp._backend import keras
from tf_jacbp.geometry import as_pair, check_channels_last
from tf_jacbp.layers.base import JacobianLayer, build_at_construction

Tensor = Any  # a tensor of Keras' backend


class _Reshaping(JacobianLayer):
    """A map ``vec(y) = J vec(x)`` with a 0/1 matrix ``J``: its ``jacobian_factors``."""

    factor_name = "J"

    def jacobian_factors(self, x: Tensor) -> dict[str, Tensor]:
        """``{self.factor_name: J_x y}`` at one sample ``x``: ``(N_out, N_in)``, rows and columns
        row-major."""
        return {self.factor_name: self.input_jacobian(x)}


class _Image(_Reshaping):
    """A map of images ``(batch, H, W, C)``: one sample is ``(H, W, C)``."""

    sample_rank = 3


def _bilinear_matrix(n: Any, s: int, dtype: str) -> Tensor:
    """``A`` ``(n s, n)`` of bilinear upsampling by ``s`` along one axis of ``n`` pixels (Keras'
    ``"bilinear"`` resize, half-pixel centers): ``A[i, k] = max(0, 1 - |u_i - k|)`` with

        u_i = clip((i + 1/2) / s - 1/2, 0, n - 1),

    the hat kernel at the source coordinate of output pixel ``i``: ``1 - f_i`` at ``floor(u_i)``
    and ``f_i`` at ``floor(u_i) + 1``, ``f_i`` the fractional part of ``u_i``. Each row sums to 1.
    Computed in integers, ``t_i = 2 s u_i = clip(2 i + 1 - s, 0, 2 s (n - 1))`` and ``A[i, k] =
    max(0, 2 s - |t_i - 2 s k|) / (2 s)``, so each weight is one rounding of a fraction. ``n``
    is an int or, for an axis unknown when traced, the runtime size (a scalar tensor)."""
    t = ops.clip(2 * ops.arange(n * s) + 1 - s, 0, 2 * s * (n - 1))
    k = 2 * s * ops.arange(n)
    hat = ops.maximum(2 * s - ops.abs(t[:, None] - k[None, :]), 0)
    return ops.cast(hat, dtype) / ops.cast(2 * s, dtype)


def _along(a: Tensor, t: Tensor, axis: int) -> Tensor:
    """``a`` ``(p, n)`` applied along ``axis`` of ``t`` (``n`` entries there):
    ``out[..., i, ...] = sum_k a[i, k] t[..., k, ...]``, ``axis`` becoming ``p`` long. One
    matrix product over ``t`` viewed as ``(rest before, n, rest after)`` (on TensorFlow about
    twice as fast as the same ``einsum``)."""
    shape = ops.shape(t)
    after = math.prod(shape[axis + 1 :])
    out = ops.matmul(a, ops.reshape(t, (-1, shape[axis], after)))
    return ops.reshape(out, (*shape[:axis], -1, *shape[axis + 1 :]))


def _lerp_along(x: Tensor, axis: int, s: int) -> Tensor:
    """Stock-op linear interpolation of ``x`` by ``s`` along ``axis`` (float64), with TensorFlow's
    resize rule (``ResizeBilinear``, half-pixel centers): output ``i`` reads source ``u = (i + 1/2)
    / s - 1/2``, ``lo = max(floor(u), 0)``, ``hi = min(ceil(u), n - 1)``, ``y_i = x_lo (1 - l) +
    x_hi l`` with ``l = u - floor(u)``. A gather, not the matrix ``A`` of the Jacobian route."""
    n = ops.shape(x)[axis]
    u = (ops.cast(ops.arange(n * s), "float64") + 0.5) / s - 0.5
    lerp = u - ops.floor(u)
    lo = ops.maximum(ops.cast(ops.floor(u), "int32"), 0)
    hi = ops.minimum(ops.cast(ops.ceil(u), "int32"), n - 1)
    shape = [1] * len(x.shape)
    shape[axis] = -1
    lerp = ops.reshape(ops.cast(lerp, x.dtype), shape)
    return ops.take(x, lo, axis=axis) * (1 - lerp) + ops.take(x, hi, axis=axis) * lerp


UPSAMPLING_INTERPOLATIONS = ("nearest", "bilinear")


@keras.saving.register_keras_serializable(package="tf_jacbp")
class UpSampling2D(_Image):
    """Upsampling by whole factors ``(s_h, s_w)``, like ``keras.layers.UpSampling2D``: a linear
    map ``vec(y) = J vec(x)`` with ``J = A_h (x) A_w (x) I_C`` (Kronecker products), per channel
    ``y[:, :, c] = A_h x[:, :, c] A_w^T``.

    * ``interpolation="nearest"``: ``A_h = I_H (x) 1_{s_h}`` ``(H s_h, H)``, ``A_w = I_W (x)
      1_{s_w}``: each ``x[i, j, c]`` is copied into an ``s_h x s_w`` block.
    * ``interpolation="bilinear"`` (Keras' ``keras.ops.image.resize(..., "bilinear")``,
      half-pixel centers): ``A[i, k] = max(0, 1 - |u_i - k|)``, ``u_i = clip((i + 1/2) / s -
      1/2, 0, n - 1)`` (``_bilinear_matrix``): output row ``i`` mixes source rows ``floor(u_i)``
      and ``floor(u_i) + 1`` with weights ``1 - frac(u_i)`` and ``frac(u_i)``; the edge rows copy
      the edge. The forward pass and ``J^T m`` apply ``A_h``, ``A_w`` (or their transposes) as
      two contractions, never forming ``J``; the matrices are built from the runtime size, so
      ``H``, ``W`` may be unknown when traced.

    Args:
        size: ``(s_h, s_w)`` or one int, >= 1.
        data_format: ``None`` or ``"channels_last"``.
        interpolation: ``"nearest"`` or ``"bilinear"``. Keras' other modes (``"bicubic"``,
            ``"lanczos3"``, ...) are an error.

    Input ``(batch, H, W, C)`` (``H``, ``W`` may be unknown); output
    ``(batch, H s_h, W s_w, C)``.

    The reference route is stock Keras': ``ops.repeat`` (nearest) or ``ops.image.resize``
    (bilinear), except bilinear in float64, where TensorFlow's resize computes in float32
    (1e-7 off): there it is stock ``ops.take`` of the two source rows and columns with
    TensorFlow's resize weights (``_lerp_along``), float64 on both backends.
    """

    factor_name = "J = E_h (x) E_w (x) I (copies)"

    def __init__(
        self,
        size: Any = (2, 2),
        data_format: str | None = None,
        interpolation: str = "nearest",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.size = as_pair(size, "size", "UpSampling2D")
        self.data_format = check_channels_last(data_format, "UpSampling2D")
        mode = interpolation.lower() if isinstance(interpolation, str) else None
        if mode not in UPSAMPLING_INTERPOLATIONS:
            raise ValueError(
                "UpSampling2D: interpolation must be 'nearest' or 'bilinear', got "
                f"interpolation={interpolation!r}. (Keras' other modes, 'bicubic', 'lanczos3', "
                "'lanczos5', 'area', have no Jacobian here; use one of the two.)"
            )
        self.interpolation = mode
        if mode == "bilinear":
            self.factor_name = "J = A_h (x) A_w (x) I (bilinear weights)"
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def _matrices(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(A_h, A_w)`` at ``x`` ``(batch, H, W, C)``: ``(H s_h, H)`` and ``(W s_w, W)``."""
        _, height, width, _ = ops.shape(x)
        dtype = keras.backend.standardize_dtype(x.dtype)
        return (
            _bilinear_matrix(height, self.size[0], dtype),
            _bilinear_matrix(width, self.size[1], dtype),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Nearest: each ``x[i, j, c]`` broadcast to an ``s_h x s_w`` block of ``y``. Bilinear:
        ``y[b, i, j, c] = sum_{h, w} A_h[i, h] x[b, h, w, c] A_w[j, w]``, two contractions."""
        if self.interpolation == "bilinear":
            a_h, a_w = self._matrices(x)
            return _along(a_w, _along(a_h, x, 1), 2)
        (s_h, s_w), (batch, height, width, channels) = self.size, ops.shape(x)
        blocks = ops.broadcast_to(
            x[:, :, None, :, None, :], (batch, height, s_h, width, s_w, channels)
        )
        return ops.reshape(blocks, (batch, height * s_h, width * s_w, channels))

    def reference(self, x: Tensor) -> Tensor:
        s_h, s_w = self.size
        if self.interpolation == "nearest":
            return ops.repeat(ops.repeat(x, s_h, axis=1), s_w, axis=2)
        if keras.backend.standardize_dtype(x.dtype) == "float64":
            return _lerp_along(_lerp_along(x, 1, s_h), 2, s_w)
        _, height, width, _ = ops.shape(x)
        return ops.image.resize(x, (height * s_h, width * s_w), interpolation="bilinear")

    def vjp_input(self, m: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``J^T m`` for each of the ``V`` stacked ``m[v, b]``, ``(V, batch, H s_h, W s_w, C)`` ->
        ``(V, batch, H, W, C)``. Nearest: the sum of ``m[v, b]``'s block ``(h, w)`` of channel
        ``c``. Bilinear: ``dx[v, b, h, w, c] = sum_{i, j} A_h[i, h] m[v, b, i, j, c] A_w[j, w]``,
        two contractions."""
        if self.interpolation == "bilinear":
            a_h, a_w = self._matrices(x)
            return _along(ops.transpose(a_w), _along(ops.transpose(a_h), m, 2), 3)
        batch, height, width, channels = ops.shape(x)
        (s_h, s_w), v = self.size, ops.shape(m)[0]
        blocks = ops.reshape(m, (v, batch, height, s_h, width, s_w, channels))
        return ops.sum(blocks, axis=(3, 5))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        batch, height, width, channels = input_shape
        scaled = [
            None if n is None else n * s for n, s in zip((height, width), self.size, strict=True)
        ]
        return (batch, *scaled, channels)

    def get_config(self) -> dict[str, Any]:
        config = {"size": self.size, "data_format": self.data_format}
        return {**super().get_config(), **config, "interpolation": self.interpolation}


def _as_padding(padding: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras' three forms of ``ZeroPadding2D(padding)`` as ``((top, bottom), (left, right))``."""

    def amount(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(
                "ZeroPadding2D: padding must be a non-negative int, a pair of them (height, "
                "width), or a pair of pairs ((top, bottom), (left, right)); got "
                f"padding={padding!r}."
            )
        return int(value)

    if isinstance(padding, int | np.integer) and not isinstance(padding, bool):
        return ((amount(padding),) * 2,) * 2
    if not isinstance(padding, tuple | list) or len(padding) != 2:
        amount(None)
    pairs = []
    for side in padding:
        if isinstance(side, tuple | list):
            if len(side) != 2:
                amount(None)
            pairs.append((amount(side[0]), amount(side[1])))
        else:
            pairs.append((amount(side),) * 2)
    return tuple(pairs)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class ZeroPadding2D(_Image):
    """Zero rows and columns around each image, like ``keras.layers.ZeroPadding2D``;
    ``J = P_h (x) P_w (x) I_C``, a selection.

    Args:
        padding: an int (all four sides), ``(h, w)`` (``h`` rows above and below, ``w`` columns
            left and right), or ``((top, bottom), (left, right))``; non-negative ints.
        data_format: ``None`` or ``"channels_last"``.

    Input ``(batch, H, W, C)`` (``H``, ``W`` may be unknown); output
    ``(batch, H + top + bottom, W + left + right, C)``.
    """

    factor_name = "J = P_h (x) P_w (x) I (selection)"

    def __init__(self, padding: Any = (1, 1), data_format: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.padding = _as_padding(padding)
        self.data_format = check_channels_last(data_format, "ZeroPadding2D")
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` framed by zeros."""
        return ops.pad(x, ((0, 0), *self.padding, (0, 0)))

    def reference(self, x: Tensor) -> Tensor:
        return ops.pad(x, ((0, 0), *self.padding, (0, 0)), mode="constant")

    def vjp_input(self, m: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``J^T m``: each ``m[v, i]`` cropped to the input's rows and columns,
        ``(V, batch, H + t + b, W + l + r, C)`` -> ``(V, batch, H, W, C)``."""
        (top, _), (left, _) = self.padding
        _, height, width, _ = ops.shape(x)
        return m[:, :, top : top + height, left : left + width]

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        batch, height, width, channels = input_shape
        sizes = [
            None if n is None else n + sum(p)
            for n, p in zip((height, width), self.padding, strict=True)
        ]
        return (batch, *sizes, channels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "padding": self.padding, "data_format": self.data_format}


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Reshape(_Reshaping):
    """Each sample reshaped row-major, like ``keras.layers.Reshape``; ``J = I``.

    Args:
        target_shape: the shape of each output sample (no batch axis): positive ints and at
            most one ``-1``, which takes what the input's size leaves.

    Input ``(batch, ...)`` with as many entries per sample as ``target_shape``.
    """

    factor_name = "J = I"

    def __init__(self, target_shape: Any, **kwargs: Any):
        super().__init__(**kwargs)
        try:
            shape = tuple(target_shape)
        except TypeError:
            shape = None
        if (
            shape is None
            or sum(n == -1 for n in shape) > 1
            or any(
                isinstance(n, bool) or not isinstance(n, int | np.integer) or (n < 1 and n != -1)
                for n in shape
            )
        ):
            raise ValueError(
                "Reshape: target_shape must be a tuple of positive ints with at most one -1 (the "
                "size the input leaves), without the batch axis; got "
                f"target_shape={target_shape!r}."
            )
        self.target_shape = tuple(int(n) for n in shape)
        build_at_construction(self, Reshape)

    def resolved_shape(self, sample_shape: tuple) -> tuple:
        """``target_shape`` with ``-1`` resolved for a sample of ``sample_shape`` (``None`` when
        unknown); a ValueError naming the layer, both shapes and the fix when the numbers of
        entries cannot match."""
        if None in sample_shape:
            return tuple(None if n == -1 else n for n in self.target_shape)
        size, known = math.prod(sample_shape), math.prod(n for n in self.target_shape if n != -1)
        if (-1 in self.target_shape and size % known) or (
            -1 not in self.target_shape and size != known
        ):
            need = (
                f"a multiple of {known} entries" if -1 in self.target_shape else f"{known} entries"
            )
            raise ValueError(
                f"Reshape '{self.name}': cannot reshape samples of shape {tuple(sample_shape)} "
                f"({size} entries) to target_shape={self.target_shape}, which needs {need}; a "
                f"reshape keeps the number of entries. Give a target_shape of {size} entries "
                "(one axis may be -1: the size the input leaves), or check the input shape "
                "reaching this layer."
            )
        return tuple(size // known if n == -1 else n for n in self.target_shape)

    def forward(self, x: Tensor) -> Tensor:
        """``vec(y) = vec(x)`` in ``target_shape``, its ``-1`` resolved from ``x``'s static
        shape where known (a traced graph then keeps the size it infers, as stock)."""
        resolved = self.resolved_shape(tuple(x.shape[1:]))
        return ops.reshape(x, (ops.shape(x)[0], *(-1 if n is None else n for n in resolved)))

    def reference(self, x: Tensor) -> Tensor:
        resolved = self.resolved_shape(tuple(x.shape[1:]))
        return ops.reshape(x, (ops.shape(x)[0], *(-1 if n is None else n for n in resolved)))

    def vjp_input(self, m: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``J^T m = m``: each ``m[v, i]`` in ``x``'s sample shape, ``(V, batch, *target)`` ->
        ``(V, batch, *x.shape[1:])``."""
        return ops.reshape(m, (ops.shape(m)[0], *ops.shape(x)))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], *self.resolved_shape(tuple(input_shape[1:])))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "target_shape": self.target_shape}
