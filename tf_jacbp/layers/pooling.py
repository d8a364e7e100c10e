"""Max and average pooling with explicit Jacobians: a selection and an averaging matrix.

For one sample ``x`` of shape ``(H, W, C)`` and output ``y`` of shape ``(H_out, W_out, C)``, each
output ``y[o, c]`` (``o`` an output position) reads the window ``S_o`` of input positions (the
taps of ``tf_jacbp.geometry.axis_taps``; "same" windows may stick out into the padding, which
they ignore). Channels never mix, so ``J_x y`` is block diagonal over ``c``:

* max: ``J[(o, c), (n, c)] = 1`` if ``n`` is the first position of ``S_o`` (row-major within the
  window) where ``x[., c]`` attains the maximum, else 0: a selection by the arg-max, ties to the
  first maximum, like TensorFlow's ``MaxPoolGrad``. A window with no maximum to select (all its
  inputs ``-inf`` or NaN: ``tf.nn.max_pool2d`` then returns the lowest finite value, equal to
  none of them) selects its first position inside the input, as ``MaxPoolGrad`` does.
* average: ``J[(o, c), (n, c)] = 1 / |S_o|`` for ``n`` in ``S_o``, else 0. ``|S_o|`` counts the
  window's positions inside the input, so "same" windows at the border average over fewer
  values, as ``tf.nn.avg_pool2d`` does.

``(J_x y)^T m`` (the contract's ``vjp_input``, for each of the ``V`` stacked vectors ``m[v]``)
sends each ``m[v, o, c]`` back to the window's selected (max) or every (average) position and
sums where windows overlap. Both products are gathers with the
index maps of ``tf_jacbp.layers.pool_windows``: ``window_index`` (output -> its window's inputs)
and its transpose ``input_index`` (input -> the window slots that read it), computed in NumPy
once per image size (``window_maps``, cached: an input of unknown height or width,
``keras.Input((None, None, C))``, gets the maps of each size it meets), static shapes,
XLA-friendly. A graph traced for an unknown size computes the same
``window_index`` with TensorFlow ops (``DynamicWindowMaps``) and sums with a segment sum.

The 1-D layers pool a sequence ``(T, C)`` as the image ``(1, T, C)`` with windows ``(1, p)``:
the same matrices, rows and columns in the same row-major order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from tf_jacbp._backend import keras, tf
from tf_jacbp.geometry import (
    as_tuple,
    check_channels_last,
    check_padding,
    check_window_fits,
    output_size,
    spatial_shape,
)
from tf_jacbp.layers.base import JacobianLayer, build_at_construction
from tf_jacbp.layers.pool_windows import DynamicWindowMaps, WindowMaps, window_maps


class _Pooling(JacobianLayer):
    """Arguments, validation, window maps and Jacobian assembly shared by the pooling layers.

    The maps work on ``(batch, H, W, C)``; the 1-D layers override ``as_image``/``from_image``.
    """

    rank = 2

    def __init__(
        self,
        pool_size: Any = (2, 2),
        strides: Any = None,
        padding: str = "valid",
        data_format: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.pool_size = self.as_window(pool_size, "pool_size", owner)
        self.strides = (
            self.pool_size if strides is None else self.as_window(strides, "strides", owner)
        )
        self.padding = check_padding(padding, owner)
        self.data_format = check_channels_last(data_format, owner, self.rank)
        self._compiled_input_gradient = tf.function(
            self.input_gradient, jit_compile=True, autograph=False
        )
        build_at_construction(self, _Pooling)

    @property
    def sample_rank(self) -> int:
        """One sample is ``(*spatial, C)``: ``rank + 1`` axes."""
        return self.rank + 1

    def as_window(self, value: Any, name: str, owner: str) -> tuple[int, ...]:
        """``value`` (an int or ``rank`` ints, >= 1) as one int per spatial axis."""
        return as_tuple(value, self.rank, name, owner)

    @property
    def window_2d(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(pool_size, strides)`` of the windows on the ``(H, W, C)`` image."""
        return self.pool_size, self.strides

    def as_image(self, x: tf.Tensor, lead: int = 1) -> tf.Tensor:
        """The input (after ``lead`` leading axes: the batch, or ``V`` and the batch) as
        ``(..., H, W, C)``."""
        return x

    def from_image(self, v: tf.Tensor, lead: int = 1) -> tf.Tensor:
        """An image-shaped ``(..., H, W, C)`` tensor (``lead`` leading axes) in the layer's own
        shape."""
        return v

    def check_input(self, input_shape: tuple) -> None:
        """A ValueError naming the fix for a wrong rank, an unknown channel count, or a
        ``"valid"`` window longer than a known input size."""
        owner = f"{type(self).__name__} '{self.name}'"
        sizes = spatial_shape(tuple(input_shape), self.rank, owner, allow_unknown=True)
        if None not in sizes:
            check_window_fits(sizes, self.pool_size, self.padding, owner, "pool_size")

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        """``check_input``, then ``y = forward(inputs)`` by ``route``."""
        self.check_input(inputs.shape)
        return super().call(inputs)

    def maps(self, x: tf.Tensor) -> WindowMaps | DynamicWindowMaps:
        """The window maps of ``x``'s image size (``(batch, H, W, C)``)."""
        height, width = x.shape[1], x.shape[2]
        if height is None or width is None:
            return DynamicWindowMaps(x, *self.window_2d, self.padding)
        return window_maps(height, width, *self.window_2d, self.padding)

    def weights_per_slot(self, maps, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """``(batch, P, S, C)``: the entry ``J[(o, c), (window slot s, c)]`` for each sample."""
        raise NotImplementedError

    def input_gradient(self, m: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """``(J^T m[v, i])``: each ``m[v, i, o, c]`` times its slots' weights, summed onto the
        inputs.

        ``m`` ``(V, batch, H_out, W_out, C)``, ``x`` ``(batch, H, W, C)``, ``y = forward(x)``;
        returns ``(V, batch, H, W, C)``. The weights depend on the sample only, not on ``v``.
        """
        maps = self.maps(x)
        lead = tf.shape(m)[:2]
        m = tf.reshape(m, tf.concat([lead, [-1, 1, x.shape[-1]]], 0))  # (V, batch, P, 1, C)
        slots = self.weights_per_slot(maps, x, y) * m  # (V, batch, P, S, C)
        return maps.transpose(slots, tf.concat([lead, tf.shape(x)[1:]], 0))

    def vjp_input(self, m: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """``(J_x y)^T m``: ``(V, batch, *y.shape[1:])`` -> ``(V, batch, *x.shape[1:])``.

        Traced into a graph (``model.fit``), ``input_gradient`` runs compiled with XLA, which
        fuses its gathers, comparisons and products into a few loops (op by op it is about 3x
        slower on CPU); executing eagerly it runs op by op, since compiling for each new call
        site would cost more than it saves."""
        args = (self.as_image(m, lead=2), self.as_image(x), self.as_image(y))
        gradient = self.input_gradient if tf.executing_eagerly() else self._compiled_input_gradient
        return self.from_image(gradient(*args), lead=2)

    def jacobian_factors(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        """``{self.factor_name: J_x y}`` at one sample ``x`` (``(H, W, C)``, or ``(T, C)`` for
        the 1-D layers): ``(H_out W_out C, H W C)``, rows and columns row-major
        (``tf_jacbp.layout``)."""
        return {self.factor_name: self.input_jacobian(x)}

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        self.check_input(input_shape)
        sizes = [
            None if n is None else output_size(n, k, s, self.padding)
            for n, k, s in zip(input_shape[1:-1], self.pool_size, self.strides, strict=True)
        ]
        return (input_shape[0], *sizes, input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "pool_size": self.pool_size,
                "strides": self.strides,
                "padding": self.padding,
                "data_format": self.data_format,
            }
        )
        return config


class _Pooling1D(_Pooling):
    """A sequence ``(batch, T, C)`` pooled as the image ``(batch, 1, T, C)``, windows ``(1, p)``."""

    rank = 1

    def __init__(self, pool_size: Any = 2, strides: Any = None, padding: str = "valid", **kwargs):
        super().__init__(pool_size, strides, padding, **kwargs)

    @property
    def window_2d(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return (1, self.pool_size[0]), (1, self.strides[0])

    def as_image(self, x: tf.Tensor, lead: int = 1) -> tf.Tensor:
        return tf.expand_dims(x, lead)

    def from_image(self, v: tf.Tensor, lead: int = 1) -> tf.Tensor:
        return tf.squeeze(v, lead)


class _MaxSelection:
    """The arg-max selection of max pooling (mixed into ``_Pooling``)."""

    factor_name = "J (selection by the arg-max)"

    def forward(self, x: tf.Tensor) -> tf.Tensor:
        """``y[o, c] = max_{n in S_o} x[n, c]``."""
        return ops.max_pool(x, self.pool_size, self.strides, self.padding, "channels_last")

    def reference(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.max_pool(x, self.pool_size, self.strides, self.padding.upper())

    def input_gradient(self, m: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """``J^T m[v, i]``. When the windows tile the input (``strides == pool_size``,
        ``"valid"``, the size known) they are axes of ``x`` reshaped to
        ``(batch, H_out, p_h, W_out, p_w, C)``: the same selection of each window's first
        maximum, by reshapes and comparisons instead of the gathers of ``windows`` (rows and
        columns past the last window get zero). ``m`` ``(V, batch, H_out, W_out, C)``."""
        maps = self.maps(x)
        if not maps.tiled:
            return super().input_gradient(m, x, y)
        (h_out, w_out), (p_h, p_w) = maps.output_hw, self.window_2d[0]
        (height, width), channels = maps.input_hw, x.shape[-1]
        x = tf.reshape(x[:, : h_out * p_h, : w_out * p_w], [-1, h_out, p_h, w_out, p_w, channels])
        y = tf.reshape(y, [-1, h_out, 1, w_out, 1, channels])
        taken = tf.zeros_like(y, dtype=tf.bool)
        rows = []
        for s in range(p_h):  # slots in row-major order within the window, as ``windows``
            row = []
            for t in range(p_w):
                first = tf.logical_and(
                    tf.equal(x[:, :, s : s + 1, :, t : t + 1], y), tf.logical_not(taken)
                )
                taken = tf.logical_or(taken, first)
                row.append(first)
            rows.append(tf.concat(row, axis=4))
        selected = tf.concat(rows, axis=2)  # J's entries, (batch, H_out, p_h, W_out, p_w, C)
        first_slot = np.zeros((1, 1, p_h, 1, p_w, 1), bool)
        first_slot[..., 0, :, 0, :] = True
        selected = tf.logical_or(selected, tf.logical_and(tf.logical_not(taken), first_slot))
        lead = tf.shape(m)[:2]
        m = tf.reshape(m, tf.concat([lead, [h_out, 1, w_out, 1, channels]], 0))
        dx = tf.where(selected, m, tf.zeros([], m.dtype))  # (V, batch, H_out, p_h, W_out, p_w, C)
        dx = tf.reshape(dx, tf.concat([lead, [h_out * p_h, w_out * p_w, channels]], 0))
        if (h_out * p_h, w_out * p_w) == (height, width):
            return dx
        return tf.pad(
            dx, [[0, 0], [0, 0], [0, height - h_out * p_h], [0, width - w_out * p_w], [0, 0]]
        )

    def weights_per_slot(self, maps, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """1 at the first slot of each window equal to its maximum ``y`` (the first slot inside
        the input if none is), else 0. Padding reads NaN, which equals nothing."""
        windows = maps.windows(x, np.nan)  # (batch, P, S, C)
        y = tf.reshape(y, [tf.shape(y)[0], -1, x.shape[-1]])
        taken = tf.zeros_like(y, dtype=tf.bool)
        selected = []
        for slot in range(windows.shape[2]):
            first = tf.logical_and(tf.equal(windows[:, :, slot], y), tf.logical_not(taken))
            taken = tf.logical_or(taken, first)
            selected.append(first)
        fallback = tf.logical_and(
            tf.logical_not(taken)[:, :, None, :], maps.first_inside()[None, :, :, None]
        )
        return tf.cast(tf.logical_or(tf.stack(selected, axis=2), fallback), x.dtype)


class _Averaging:
    """The averaging matrix of average pooling (mixed into ``_Pooling``)."""

    factor_name = "J (averaging)"

    def forward(self, x: tf.Tensor) -> tf.Tensor:
        """``y[o, c] = (1 / |S_o|) sum_{n in S_o} x[n, c]``."""
        return ops.average_pool(x, self.pool_size, self.strides, self.padding, "channels_last")

    def reference(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.avg_pool(x, self.pool_size, self.strides, self.padding.upper())

    def weights_per_slot(self, maps, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """``1 / |S_o|`` at every slot inside the input, 0 at slots in the padding."""
        return tf.cast(maps.averaging(), x.dtype)[None, :, :, None]


@keras.saving.register_keras_serializable(package="tf_jacbp")
class MaxPooling2D(_MaxSelection, _Pooling):
    """Max pooling with ``J`` the selection of each window's (first) arg-max.

    Args (as ``keras.layers.MaxPooling2D``):
        pool_size: ``(p_h, p_w)`` or one int, >= 1.
        strides: ``(s_h, s_w)``, one int, or ``None`` for ``pool_size``.
        padding: ``"valid"`` or ``"same"`` (padding never wins the max).
        data_format: ``None`` or ``"channels_last"``.

    Input ``(batch, H, W, C)`` with ``C`` known (``H``, ``W`` may be None: maps per size met);
    output ``(batch, H_out, W_out, C)``.
    """


@keras.saving.register_keras_serializable(package="tf_jacbp")
class AveragePooling2D(_Averaging, _Pooling):
    """Average pooling with ``J`` the averaging matrix (``1 / |S_o|`` over each window).

    Args (as ``keras.layers.AveragePooling2D``):
        pool_size: ``(p_h, p_w)`` or one int, >= 1.
        strides: ``(s_h, s_w)``, one int, or ``None`` for ``pool_size``.
        padding: ``"valid"`` or ``"same"`` ("same" divides by the inputs inside each window).
        data_format: ``None`` or ``"channels_last"``.

    Input ``(batch, H, W, C)`` with ``C`` known (``H``, ``W`` may be None: maps per size met);
    output ``(batch, H_out, W_out, C)``.
    """


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
