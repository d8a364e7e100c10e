"""Global average and max pooling: one output per channel, ``J`` a row of averaging or selection.

For one sample ``x`` of shape ``(*spatial, C)`` (``(H, W, C)`` or ``(T, C)``) with ``N`` spatial
positions, ``x`` read row-major as ``(n, c)`` (``tf_jacbp.layout``), the output ``y`` has shape
``(C,)`` (``keepdims=True``: ``(1, 1, C)`` or ``(1, C)``, the same numbering). Channels never mix:

* average: ``y[c] = (1 / N) sum_n x[n, c]``, so ``J_x y = (1 / N) 1_N^T (x) I_C``
  (``C x N C``), and ``(J_x y)^T delta = 1_N (x) delta / N``: every position gets ``delta / N``.
  With a ``mask`` ``m`` ``(T,)`` of 0/1 (``GlobalAveragePooling1D``, a masked sequence), the
  average runs over the kept steps, ``y[c] = sum_t m_t x[t, c] / sum_t m_t``, and
  ``J_x y = (m^T / |m|) (x) I_C`` with ``|m| = sum_t m_t``: masked steps get no gradient.
* max: ``y[c] = max_n x[n, c]`` and ``J[c, (n, c)] = 1 / k_c`` for the ``k_c`` positions ``n``
  where ``x[n, c] = y[c]``, else 0: ties share the gradient equally, which is the gradient
  autodiff gives ``keras.ops.max`` (TensorFlow's ``reduce_max``) and so the stock Keras layer
  (unlike windowed max pooling, whose ``MaxPoolGrad`` picks the first maximum). A channel that
  is ``-inf`` everywhere ties at every position; one containing NaN has ``y[c] = NaN``, equal to
  nothing, and a NaN gradient, both as in stock.

The products ``(J_x y)^T m`` (``vjp_input``, ``V`` stacked vectors ``m[v]`` per sample) are
broadcasts of ``m`` (times the 0/1 indicator for max): no index maps, so any spatial size works,
known or not.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp import numerics
from tf_jacbp._backend import keras
from tf_jacbp.geometry import check_channels_last
from tf_jacbp.layers.base import JacobianLayer, build_at_construction, route

Tensor = Any  # a tensor of Keras' backend


class _GlobalPooling(JacobianLayer):
    """``keepdims``, ``data_format``, shapes and the materialized Jacobian of global pooling."""

    rank = 2

    def __init__(self, data_format: str | None = None, keepdims: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.data_format = check_channels_last(data_format, owner, self.rank)
        if not isinstance(keepdims, bool):
            raise ValueError(f"{owner}: keepdims must be True or False, got keepdims={keepdims!r}.")
        self.keepdims = keepdims
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2)
        build_at_construction(self, _GlobalPooling)

    @property
    def sample_rank(self) -> int:
        """One sample is ``(*spatial, C)``: ``rank + 1`` axes."""
        return self.rank + 1

    @property
    def axes(self) -> list[int]:
        """The spatial axes of a batch, ``[1, ..., rank]``."""
        return list(range(1, self.rank + 1))

    def kept(self, t: Tensor) -> Tensor:
        """``t`` ``(..., C)`` or ``(..., 1, ..., 1, C)`` as ``(..., 1, ..., 1, C)``: the output's
        shape with ``keepdims``, for ``y`` ``(batch, ...)`` and ``m`` ``(V, batch, ...)``."""
        if self.keepdims:
            return t
        for _ in range(self.rank):
            t = ops.expand_dims(t, -2)
        return t

    def entries(self, x: Tensor, y: Tensor, *mask: Tensor) -> Tensor:
        """``J``'s entries ``J[c, (n, c)]`` per sample, broadcastable to ``x``'s shape."""
        raise NotImplementedError

    def vjp_input(self, m: Tensor, x: Tensor, y: Tensor, *mask: Tensor) -> Tensor:
        """``(J_x y)^T m``: ``m[v, i, c]`` times ``J[c, (n, c)]`` at every position ``n``,
        ``(V, batch, C)`` (or ``keepdims``' shape) -> ``(V, batch, *spatial, C)``."""
        dx = self.entries(x, self.kept(y), *mask) * self.kept(m)
        return ops.broadcast_to(dx, (ops.shape(m)[0], *ops.shape(x)))

    def jacobian_factors(self, x: Tensor) -> dict[str, Tensor]:
        """``{self.factor_name: J_x y}`` at one sample ``x`` ``(*spatial, C)``: ``(C, N C)``,
        columns row-major."""
        return {self.factor_name: self.input_jacobian(x)}

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        if self.keepdims:
            return (input_shape[0], *[1] * self.rank, input_shape[-1])
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "data_format": self.data_format, "keepdims": self.keepdims}


class _GlobalAverage(_GlobalPooling):
    factor_name = "J = (1/N) 1^T (x) I (averaging)"

    def forward(self, x: Tensor) -> Tensor:
        """``y[c] = (1 / N) sum_n x[n, c]``."""
        return numerics.mean(x, axis=self.axes, keepdims=self.keepdims)

    def reference(self, x: Tensor) -> Tensor:
        """``keras.ops.mean`` over the positions (``tf_jacbp.numerics.mean``: on JAX, where Keras
        sums float64 in float32, a float64 sum)."""
        return numerics.mean(x, axis=self.axes, keepdims=self.keepdims)

    def entries(self, x: Tensor, y: Tensor) -> Tensor:
        """``1 / N`` everywhere."""
        count = ops.prod(ops.shape(x)[1:-1])
        return ops.ones_like(y) / ops.cast(count, x.dtype)


class _GlobalMax(_GlobalPooling):
    factor_name = "J (the tied maxima, shared equally)"

    def forward(self, x: Tensor) -> Tensor:
        """``y[c] = max_n x[n, c]``."""
        return ops.max(x, axis=self.axes, keepdims=self.keepdims)

    def reference(self, x: Tensor) -> Tensor:
        return ops.max(x, axis=self.axes, keepdims=self.keepdims)

    def entries(self, x: Tensor, y: Tensor) -> Tensor:
        """``[x[n, c] = y[c]] / k_c``, ``k_c`` the number of positions attaining ``y[c]``."""
        attained = ops.cast(ops.equal(x, y), x.dtype)
        return attained / ops.sum(attained, axis=self.axes, keepdims=True)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class GlobalAveragePooling2D(_GlobalAverage):
    """The mean over the height and width per channel, like ``keras.layers.GlobalAveragePooling2D``;
    ``J = (1/N) 1_N^T (x) I_C`` with ``N = H W``.

    Args:
        data_format: ``None`` or ``"channels_last"``.
        keepdims: ``False``: output ``(batch, C)``; ``True``: ``(batch, 1, 1, C)``.

    Input ``(batch, H, W, C)``, any ``H``, ``W``.
    """


@keras.saving.register_keras_serializable(package="tf_jacbp")
class GlobalMaxPooling2D(_GlobalMax):
    """The maximum over the height and width per channel, like ``keras.layers.GlobalMaxPooling2D``;
    ``J`` shares each channel's gradient among its tied maxima.

    Args:
        data_format: ``None`` or ``"channels_last"``.
        keepdims: ``False``: output ``(batch, C)``; ``True``: ``(batch, 1, 1, C)``.

    Input ``(batch, H, W, C)``, any ``H``, ``W``.
    """


@keras.saving.register_keras_serializable(package="tf_jacbp")
class GlobalMaxPooling1D(_GlobalMax):
    """The maximum over the steps per channel, like ``keras.layers.GlobalMaxPooling1D``;
    ``J`` shares each channel's gradient among its tied maxima.

    Args:
        data_format: ``None`` or ``"channels_last"``.
        keepdims: ``False``: output ``(batch, C)``; ``True``: ``(batch, 1, C)``.

    Input ``(batch, T, C)``, any ``T``.
    """

    rank = 1


@keras.saving.register_keras_serializable(package="tf_jacbp")
class GlobalAveragePooling1D(_GlobalAverage):
    """The mean over the (unmasked) steps per channel, like
    ``keras.layers.GlobalAveragePooling1D``; ``J = (m^T / |m|) (x) I_C``, ``m = 1_T`` without a
    mask.

    Args:
        data_format: ``None`` or ``"channels_last"``.
        keepdims: ``False``: output ``(batch, C)``; ``True``: ``(batch, 1, C)``.

    Call arguments: ``inputs`` ``(batch, T, C)``, any ``T``; ``mask`` ``(batch, T)`` (bool or
    0/1), from a masking layer or given: masked steps are left out of the mean, and a sample with
    every step masked gives NaN, as stock. The output carries no mask.
    """

    rank = 1

    def __init__(self, data_format: str | None = None, keepdims: bool = False, **kwargs: Any):
        super().__init__(data_format, keepdims, **kwargs)
        self.supports_masking = True

    def call(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        """``y = forward(inputs)`` or, with a mask, ``forward(inputs, m)`` (``m`` a constant of
        the route: not differentiated)."""
        if mask is None:
            return route(self, inputs)
        return route(self, inputs, constants=[ops.cast(mask, self.compute_dtype)])

    def compute_mask(self, inputs: Tensor, mask: Tensor | None = None) -> None:
        return None

    def forward(self, x: Tensor, *mask: Tensor) -> Tensor:
        """``y[c] = sum_t m_t x[t, c] / sum_t m_t`` (``m = 1`` without a mask)."""
        if not mask:
            return super().forward(x)
        kept = ops.cast(mask[0], x.dtype)[:, :, None]
        total = ops.sum(ops.where(kept > 0, x, ops.zeros_like(x)), 1, keepdims=self.keepdims)
        return total / ops.sum(kept, axis=1, keepdims=self.keepdims)

    def reference(self, x: Tensor, *mask: Tensor) -> Tensor:
        if not mask:
            return super().reference(x)
        kept = ops.cast(mask[0], "bool")[:, :, None]
        total = ops.sum(ops.where(kept, x, ops.zeros_like(x)), axis=1, keepdims=self.keepdims)
        count = ops.sum(ops.cast(kept, x.dtype), axis=1, keepdims=self.keepdims)
        return total / count

    def entries(self, x: Tensor, y: Tensor, *mask: Tensor) -> Tensor:
        """``m_t / |m|`` (``1 / T`` without a mask); 0 where ``m_t = 0``, even when ``|m| = 0``
        (the stock layer's gradient there)."""
        if not mask:
            return super().entries(x, y)
        kept = ops.cast(mask[0], x.dtype)[:, :, None]
        return ops.divide_no_nan(kept, ops.sum(kept, axis=1, keepdims=True))

    def vjp_input(self, m: Tensor, x: Tensor, y: Tensor, *mask: Tensor) -> Tensor:
        """``(J_x y)^T m``; with a mask, exactly 0 at masked steps whatever ``m`` is (a fully
        masked sample's NaN output sends NaN back: the stock layer's ``where`` stops it there)."""
        dx = super().vjp_input(m, x, y, *mask)
        if mask:
            kept = ops.cast(mask[0], "bool")[:, :, None]
            dx = ops.where(kept, dx, ops.zeros_like(dx))
        return dx
