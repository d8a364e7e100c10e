"""Max and average pooling with explicit Jacobians: a selection and an averaging matrix.

For one sample ``x`` of shape ``(*spatial, C)`` (``(H, W, C)``; ``(D, H, W, C)`` for the 3-D
layers) and output ``y`` of shape ``(*spatial_out, C)``, each output ``y[o, c]`` (``o`` an output
position) reads the window ``S_o`` of input positions (the taps of
``tf_jacbp.geometry.axis_taps`` along each axis; "same" windows may stick out into the padding,
which they ignore). Channels never mix, so ``J_x y`` is block diagonal over ``c``:

* max: ``J[(o, c), (n, c)] = 1`` if ``n`` is the first position of ``S_o`` (row-major within the
  window) where ``x[., c]`` attains the maximum, else 0: a selection by the arg-max, ties to the
  first maximum, like TensorFlow's ``MaxPoolGrad``. A window with no maximum to select (all its
  inputs ``-inf`` or NaN: TensorFlow's max pooling then returns the lowest finite value, equal to
  none of them) selects its first position inside the input, as ``MaxPoolGrad`` does.
* average: ``J[(o, c), (n, c)] = 1 / |S_o|`` for ``n`` in ``S_o``, else 0. ``|S_o|`` counts the
  window's positions inside the input, so "same" windows at the border average over fewer
  values, as ``keras.ops.average_pool`` does.

``(J_x y)^T m`` (the contract's ``vjp_input``, for each of the ``V`` stacked vectors ``m[v]``)
sends each ``m[v, o, c]`` back to the window's selected (max) or every (average) position and
sums where windows overlap. Both products are gathers with the index maps of
``tf_jacbp.layers.pool_windows``: ``window_index`` (output -> its window's inputs) and its
transpose ``input_index`` (input -> the window slots that read it), computed in NumPy once per
input size (``window_maps``, cached: an input of unknown sizes, ``keras.Input((None, None, C))``,
gets the maps of each size it meets), static shapes, XLA-friendly. A graph traced for an
unknown size takes the same ``window_index`` from ``tf_jacbp.backend`` (``DynamicWindowMaps``)
and sums with a segment sum.

The 1-D layers pool a sequence ``(T, C)`` as the image ``(1, T, C)`` with windows ``(1, p)``:
the same matrices, rows and columns in the same row-major order. The 3-D layers use the same
maps over ``(D, H, W)``. Both are in ``tf_jacbp.layers.pooling_nd``.

Forward passes are ``keras.ops.max_pool``/``average_pool``, except in 3-D for dtypes without a
TensorFlow 3-D pooling kernel on every device (float64, float16), where the window gathers
compute them. The reference
routes (autodiff's witness) are ``keras.ops.max_pool``/``average_pool`` in 1-D and 2-D; in 3-D,
where TensorFlow has no float64 kernel and its float32 ``MaxPool3DGrad`` misroutes near-ties,
an independent computation: the window's slots as strided slices of the padded input, the max
picked by ``keras.ops.argmax`` (the first maximum) or the mean over the slots inside the input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend
from tf_jacbp._backend import keras
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

Tensor = Any  # a tensor of Keras' backend


class _Pooling(JacobianLayer):
    """Arguments, validation, window maps and Jacobian assembly shared by the pooling layers.

    The maps work on ``(batch, *image, C)`` (``image`` the ``(H, W)`` or ``(D, H, W)`` sizes);
    the 1-D layers override ``as_image``/``from_image``.
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
        self._compiled_input_gradient = backend.xla_function(self.input_gradient)
        build_at_construction(self, _Pooling)

    @property
    def sample_rank(self) -> int:
        """One sample is ``(*spatial, C)``: ``rank + 1`` axes."""
        return self.rank + 1

    def as_window(self, value: Any, name: str, owner: str) -> tuple[int, ...]:
        """``value`` (an int or ``rank`` ints, >= 1) as one int per spatial axis."""
        return as_tuple(value, self.rank, name, owner)

    @property
    def image_window(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(pool_size, strides)`` of the windows on the image ``(*image, C)``."""
        return self.pool_size, self.strides

    def as_image(self, x: Tensor, lead: int = 1) -> Tensor:
        """The input (after ``lead`` leading axes: the batch, or ``V`` and the batch) as
        ``(..., *image, C)``."""
        return x

    def from_image(self, v: Tensor, lead: int = 1) -> Tensor:
        """An image-shaped ``(..., *image, C)`` tensor (``lead`` leading axes) in the layer's
        own shape."""
        return v

    def check_input(self, input_shape: tuple) -> None:
        """A ValueError naming the fix for a wrong rank, an unknown channel count, or a
        ``"valid"`` window longer than a known input size."""
        owner = f"{type(self).__name__} '{self.name}'"
        sizes = spatial_shape(tuple(input_shape), self.rank, owner, allow_unknown=True)
        if None not in sizes:
            check_window_fits(sizes, self.pool_size, self.padding, owner, "pool_size")

    def call(self, inputs: Tensor) -> Tensor:
        """``check_input``, then ``y = forward(inputs)`` by ``route``."""
        self.check_input(inputs.shape)
        return super().call(inputs)

    def maps(self, x: Tensor) -> WindowMaps | DynamicWindowMaps:
        """The window maps of ``x``'s image size (``(batch, *image, C)``)."""
        sizes = tuple(x.shape[1:-1])
        if None in sizes:
            return DynamicWindowMaps(x, *self.image_window, self.padding)
        return window_maps(*sizes, *self.image_window, self.padding)

    def weights_per_slot(self, maps, x: Tensor, y: Tensor) -> Tensor:
        """``(batch, P, S, C)``: the entry ``J[(o, c), (window slot s, c)]`` for each sample."""
        raise NotImplementedError

    def input_gradient(self, m: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(J^T m[v, i])``: each ``m[v, i, o, c]`` times its slots' weights, summed onto the
        inputs.

        ``m`` ``(V, batch, *image_out, C)``, ``x`` ``(batch, *image, C)``, ``y = forward(x)``;
        returns ``(V, batch, *image, C)``. The weights depend on the sample only, not on ``v``.
        """
        maps = self.maps(x)
        lead = tuple(ops.shape(m)[:2])
        m = ops.reshape(m, (*lead, -1, 1, x.shape[-1]))  # (V, batch, P, 1, C)
        slots = self.weights_per_slot(maps, x, y) * m  # (V, batch, P, S, C)
        return maps.transpose(slots, (*lead, *ops.shape(x)[1:]))

    def vjp_input(self, m: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(J_x y)^T m``: ``(V, batch, *y.shape[1:])`` -> ``(V, batch, *x.shape[1:])``.

        Traced into a graph (``model.fit``), ``input_gradient`` runs compiled with XLA, which
        fuses its gathers, comparisons and products into a few loops (op by op it is about 3x
        slower on CPU); executing eagerly it runs op by op, since compiling for each new call
        site would cost more than it saves."""
        args = (self.as_image(m, lead=2), self.as_image(x), self.as_image(y))
        eager = backend.executing_eagerly()
        gradient = self.input_gradient if eager else self._compiled_input_gradient
        return self.from_image(gradient(*args), lead=2)

    def jacobian_factors(self, x: Tensor) -> dict[str, Tensor]:
        """``{self.factor_name: J_x y}`` at one sample ``x`` (``(*spatial, C)``):
        ``(N_out C, N C)``, rows and columns row-major (``tf_jacbp.layout``)."""
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


class _MaxSelection:
    """The arg-max selection of max pooling (mixed into ``_Pooling``)."""

    factor_name = "J (selection by the arg-max)"

    def forward(self, x: Tensor) -> Tensor:
        """``y[o, c] = max_{n in S_o} x[n, c]``."""
        if self.rank == 3 and not self.has_kernel(x):
            return self.window_forward(x)
        return ops.max_pool(x, self.pool_size, self.strides, self.padding, "channels_last")

    def reference(self, x: Tensor) -> Tensor:
        """Stock ``keras.ops.max_pool`` (1-D, 2-D); in 3-D each window's first maximum
        (``keras.ops.argmax``) among its strided slices, picked by ``where``."""
        if self.rank != 3:
            return ops.max_pool(x, self.pool_size, self.strides, self.padding, "channels_last")
        windows = self.strided_windows(x, -np.inf)  # (batch, *out, C, S)
        first = ops.one_hot(ops.argmax(windows, axis=-1), windows.shape[-1], dtype="bool")
        return ops.sum(ops.where(first, windows, ops.zeros_like(windows)), axis=-1)

    def pool_windows(self, maps, x: Tensor) -> Tensor:
        """``(batch, P, C)``: each window's maximum over its gathered inputs."""
        return ops.max(maps.windows(x, -np.inf), axis=2)

    def input_gradient(self, m: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``J^T m[v, i]``. When the windows tile an image (``strides == pool_size``,
        ``"valid"``, the sizes known; 1-D and 2-D) they are axes of ``x`` reshaped to
        ``(batch, o_1, p_1, ..., o_k, p_k, C)``: the same selection of each window's first
        maximum, by reshapes and comparisons instead of the gathers of ``windows`` (positions
        past the last window get zero). ``m`` ``(V, batch, *image_out, C)``."""
        maps = self.maps(x)
        if not maps.tiled or len(maps.input_sizes) > 2:  # (3-D: TensorFlow's kernels take at
            return super().input_gradient(m, x, y)  # most 5 broadcast axes, and rank 6 pads)
        pool, outs, sizes = self.image_window[0], maps.output_sizes, maps.input_sizes
        channels, rank = x.shape[-1], len(pool)
        covered = [o * p for o, p in zip(outs, pool, strict=True)]
        split = [d for o, p in zip(outs, pool, strict=True) for d in (o, p)]
        x = ops.reshape(x[(slice(None), *(slice(0, n) for n in covered))], (-1, *split, channels))
        y = ops.reshape(y, (-1, *(d for o in outs for d in (o, 1)), channels))
        taken = ops.zeros_like(y, dtype="bool")

        def select(axis: int, offset: tuple) -> Tensor:
            """The selection of the slots under ``offset`` (row-major, as ``windows``)."""
            nonlocal taken
            if axis == rank:
                index = [slice(None)] * len(x.shape)
                for a, t in enumerate(offset):
                    index[2 + 2 * a] = slice(t, t + 1)
                first = ops.logical_and(ops.equal(x[tuple(index)], y), ops.logical_not(taken))
                taken = ops.logical_or(taken, first)
                return first
            parts = [select(axis + 1, (*offset, t)) for t in range(pool[axis])]
            return ops.concatenate(parts, axis=2 + 2 * axis)

        selected = select(0, ())  # J's entries, (batch, o_1, p_1, ..., o_k, p_k, C)
        first_slot = np.zeros((1, *(d for p in pool for d in (1, p)), 1), bool)
        first_slot[(slice(None), *(d for _ in pool for d in (slice(None), 0)))] = True
        selected = ops.logical_or(selected, ops.logical_and(ops.logical_not(taken), first_slot))
        lead = tuple(ops.shape(m)[:2])
        m = ops.reshape(m, (*lead, *(d for o in outs for d in (o, 1)), channels))
        dx = ops.where(selected, m, ops.zeros((), m.dtype))  # (V, batch, o_1, p_1, ..., C)
        dx = ops.reshape(dx, (*lead, *covered, channels))
        if tuple(covered) == tuple(sizes):
            return dx
        pads = [(0, n - c) for n, c in zip(sizes, covered, strict=True)]
        return ops.pad(dx, ((0, 0), (0, 0), *pads, (0, 0)))

    def weights_per_slot(self, maps, x: Tensor, y: Tensor) -> Tensor:
        """1 at the first slot of each window equal to its maximum ``y`` (the first slot inside
        the input if none is), else 0. Padding reads NaN, which equals nothing."""
        windows = maps.windows(x, np.nan)  # (batch, P, S, C)
        y = ops.reshape(y, (ops.shape(y)[0], -1, x.shape[-1]))
        taken = ops.zeros_like(y, dtype="bool")
        selected = []
        for slot in range(windows.shape[2]):
            first = ops.logical_and(ops.equal(windows[:, :, slot], y), ops.logical_not(taken))
            taken = ops.logical_or(taken, first)
            selected.append(first)
        fallback = ops.logical_and(
            ops.logical_not(taken)[:, :, None, :], maps.first_inside()[None, :, :, None]
        )
        return ops.cast(ops.logical_or(ops.stack(selected, axis=2), fallback), x.dtype)


class _Averaging:
    """The averaging matrix of average pooling (mixed into ``_Pooling``)."""

    factor_name = "J (averaging)"

    def forward(self, x: Tensor) -> Tensor:
        """``y[o, c] = (1 / |S_o|) sum_{n in S_o} x[n, c]``."""
        if self.rank == 3 and not self.has_kernel(x):
            return self.window_forward(x)
        return ops.average_pool(x, self.pool_size, self.strides, self.padding, "channels_last")

    def reference(self, x: Tensor) -> Tensor:
        """Stock ``keras.ops.average_pool`` (1-D, 2-D); in 3-D the sum of each window's strided
        slices over the number of them inside the input."""
        if self.rank != 3:
            return ops.average_pool(x, self.pool_size, self.strides, self.padding, "channels_last")
        total = ops.sum(self.strided_windows(x, 0.0), axis=-1)
        count = ops.sum(self.strided_windows(ops.ones_like(x[:1, ..., :1]), 0.0), axis=-1)
        return total / count

    def pool_windows(self, maps, x: Tensor) -> Tensor:
        """``(batch, P, C)``: each window's mean over its inputs inside the input."""
        weights = ops.cast(maps.averaging(), x.dtype)[None, :, :, None]
        return ops.sum(maps.windows(x, 0.0) * weights, axis=2)

    def weights_per_slot(self, maps, x: Tensor, y: Tensor) -> Tensor:
        """``1 / |S_o|`` at every slot inside the input, 0 at slots in the padding."""
        return ops.cast(maps.averaging(), x.dtype)[None, :, :, None]


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
