"""Max and average pooling with explicit Jacobians: a selection and an averaging matrix.

For one sample ``x`` of shape ``(H, W, C)`` and output ``y`` of shape ``(H_out, W_out, C)``, each
output ``y[o, c]`` (``o`` an output position) reads the window ``S_o`` of input positions (the
taps of ``tf_jacbp.toeplitz.axis_taps``; "same" windows may stick out into the padding, which
they ignore). Channels never mix, so ``J_x y`` is block diagonal over ``c``:

* max: ``J[(o, c), (n, c)] = 1`` if ``n`` is the first position of ``S_o`` (row-major within the
  window) where ``x[., c]`` attains the maximum, else 0: a selection by the arg-max, ties to the
  first maximum, like TensorFlow's ``MaxPoolGrad``. A window with no maximum to select (all its
  inputs ``-inf`` or NaN: ``tf.nn.max_pool2d`` then returns the lowest finite value, equal to
  none of them) selects its first position inside the input, as ``MaxPoolGrad`` does.
* average: ``J[(o, c), (n, c)] = 1 / |S_o|`` for ``n`` in ``S_o``, else 0. ``|S_o|`` counts the
  window's positions inside the input, so "same" windows at the border average over fewer
  values, as ``tf.nn.avg_pool2d`` does.

``(J_x y)^T delta`` sends each ``delta[o, c]`` back to the window's selected (max) or every
(average) position and sums where windows overlap. Both backward passes are gathers with index
maps computed once in NumPy at build: ``window_index`` (output -> its window's inputs) and its
transpose ``input_index`` (input -> the window slots that read it), static shapes, XLA-friendly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tf_jacbp import toeplitz
from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import JacobianLayer, as_float_tensor
from tf_jacbp.layers.conv import check_channels_last, image_shape


def transpose_index(index: np.ndarray, size: int) -> np.ndarray:
    """The transpose of a gather, as a gather: ``(O, S)`` indices in ``[0, size]`` -> ``(size, m)``.

    ``index[o, s]`` is an input position or ``size`` (no input). Row ``n`` of the result lists the
    flat slots ``o S + s`` with ``index[o, s] == n``, padded with ``O S`` (an appended zero), so
    that ``dx[n] = sum_k v[result[n, k]]`` computes ``dx = J^T v`` for ``v`` of shape ``(O S,)``.
    """
    slots = np.flatnonzero(index.reshape(-1) < size)
    targets = index.reshape(-1)[slots]
    counts = np.bincount(targets, minlength=size)
    result = np.full((size, max(int(counts.max()), 1)), index.size, dtype=np.int64)
    order = np.argsort(targets, kind="stable")
    rank = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    result[targets[order], rank] = slots[order]
    return result


class _Pooling2D(JacobianLayer):
    """Shared arguments, validation, window geometry and Jacobian assembly of 2-D pooling."""

    def __init__(
        self,
        pool_size: int | tuple[int, int] = (2, 2),
        strides: int | tuple[int, int] | None = None,
        padding: str = "valid",
        data_format: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.pool_size = toeplitz.as_pair(pool_size, "pool_size", owner)
        self.strides = (
            self.pool_size if strides is None else toeplitz.as_pair(strides, "strides", owner)
        )
        self.padding = toeplitz.check_padding(padding, owner)
        self.data_format = check_channels_last(data_format, owner)

    def build(self, input_shape: tuple) -> None:
        owner = f"{type(self).__name__} '{self.name}'"
        height, width, channels = image_shape(input_shape, owner)
        toeplitz.check_window_fits(
            (height, width, channels), self.pool_size, self.padding, owner, "pool_size"
        )
        taps_h = toeplitz.axis_taps(height, self.pool_size[0], self.strides[0], self.padding)
        taps_w = toeplitz.axis_taps(width, self.pool_size[1], self.strides[1], self.padding)
        self.output_hw = (taps_h.shape[0], taps_w.shape[0])
        self.input_hwc = (height, width, channels)
        inside = (taps_h[:, None, :, None] >= 0) & (taps_w[None, :, None, :] >= 0)
        # window_index[o, s]: input position (row-major (i, j)) of slot s of window o, or H W.
        window = np.where(
            inside, taps_h[:, None, :, None] * width + taps_w[None, :, None, :], height * width
        )
        self.window_index = window.reshape(self.output_hw[0] * self.output_hw[1], -1)
        inside = inside.reshape(self.window_index.shape)
        self.window_counts = inside.sum(axis=1)
        # (P, S): True at each window's first slot inside the input.
        self.first_inside = np.arange(inside.shape[1]) == np.argmax(inside, axis=1)[:, None]
        self.input_index = transpose_index(self.window_index, height * width)
        self.index_tensors = toeplitz.IndexTensors(
            window_index=self.window_index.astype(np.int32),
            input_index=self.input_index.astype(np.int32),
        )
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={1: height, 2: width, -1: channels})
        # The windows tile the input (no overlap, no padding): its reshape holds them as axes.
        self.tiled = self.strides == self.pool_size and self.padding == "valid"
        self._compiled_input_gradient = tf.function(self.input_gradient, jit_compile=True)

    def windows(self, x: tf.Tensor, fill: float) -> tf.Tensor:
        """Every window's inputs: ``(batch, H, W, C)`` -> ``(batch, P, S, C)``; padding reads
        ``fill``."""
        height, width, channels = self.input_hwc
        flat = tf.reshape(x, [-1, height * width, channels])
        flat = tf.concat(
            [flat, tf.fill([tf.shape(flat)[0], 1, channels], tf.cast(fill, x.dtype))], 1
        )
        return tf.gather(flat, self.index_tensors["window_index"], axis=1)

    def windows_transpose(self, v: tf.Tensor) -> tf.Tensor:
        """``(batch, P, S, C)`` slot values -> ``(batch, H, W, C)``, summed per input position.

        The transpose of ``windows``, computed as a gather with ``input_index``.
        """
        height, width, channels = self.input_hwc
        v = tf.reshape(v, [tf.shape(v)[0], -1, channels])
        v = tf.concat([v, tf.zeros_like(v[:, :1])], axis=1)
        gathered = tf.gather(v, self.index_tensors["input_index"], axis=1)  # (batch, H W, m, C)
        return tf.reshape(tf.reduce_sum(gathered, axis=2), [-1, height, width, channels])

    def weights_per_slot(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """``(batch, P, S, C)``: the entry ``J[(o, c), (window slot s, c)]`` for each sample."""
        raise NotImplementedError

    def input_gradient(self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """``dx = J^T dy``: each ``dy[o, c]`` times its slots' weights, summed onto the inputs.

        ``dy`` ``(batch, H_out, W_out, C)``, ``x`` ``(batch, H, W, C)``, ``y = forward(x)``.
        """
        dy = tf.reshape(dy, [-1, self.window_index.shape[0], 1, self.input_hwc[2]])
        return self.windows_transpose(self.weights_per_slot(x, y) * dy)

    def backward(self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, list]:
        """``(J^T dy, [])``. Traced into a graph (``model.fit``), ``input_gradient`` runs compiled
        with XLA, which fuses its gathers, comparisons and products into a few loops (op by op
        it is about 3x slower on CPU); executing eagerly it runs op by op, since compiling for
        each new call site would cost more than it saves."""
        if tf.executing_eagerly():
            return self.input_gradient(dy, x, y), []
        return self._compiled_input_gradient(dy, x, y), []

    def jacobian(self, x: Any) -> tf.Tensor:
        """``J_x y`` for one sample ``x`` ``(H, W, C)``: ``(H_out W_out C, H W C)``, rows and
        columns row-major (``tf_jacbp.layout``)."""
        x = as_float_tensor(x, self.compute_dtype)[None]
        height, width, channels = self.input_hwc
        weights = self.weights_per_slot(x, self.forward(x))[0]  # (P, S, C)
        one_hot = tf.one_hot(self.window_index, height * width + 1, dtype=x.dtype)[..., :-1]
        per_channel = tf.einsum("psc,psn->pcn", weights, one_hot)  # (P, C, H W)
        eye = tf.eye(channels, dtype=x.dtype)
        blocks = per_channel[:, :, :, None] * eye[None, :, None, :]  # (P, C, H W, C)
        return tf.reshape(blocks, [-1, height * width * channels])

    def jacobian_factors(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        """``{self.factor_name: J_x y}`` at one sample ``x`` ``(H, W, C)``."""
        return {self.factor_name: self.jacobian(x)}

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        sizes = [
            None if n is None else toeplitz.output_size(n, k, s, self.padding)
            for n, k, s in zip(input_shape[1:3], self.pool_size, self.strides, strict=True)
        ]
        return (input_shape[0], *sizes, input_shape[3])

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


@keras.saving.register_keras_serializable(package="tf_jacbp")
class MaxPooling2D(_Pooling2D):
    """Max pooling with ``J`` the selection of each window's (first) arg-max.

    Args (as ``keras.layers.MaxPooling2D``):
        pool_size: ``(p_h, p_w)`` or one int, >= 1.
        strides: ``(s_h, s_w)``, one int, or ``None`` for ``pool_size``.
        padding: ``"valid"`` or ``"same"`` (padding never wins the max).
        data_format: ``None`` or ``"channels_last"``.

    Input ``(batch, H, W, C)`` with ``H, W, C`` known; output ``(batch, H_out, W_out, C)``.
    """

    factor_name = "J (selection by the arg-max)"

    def forward(self, x: tf.Tensor) -> tf.Tensor:
        """``y[o, c] = max_{n in S_o} x[n, c]``."""
        return tf.nn.max_pool2d(x, self.pool_size, self.strides, self.padding.upper())

    def reference(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.max_pool2d(x, self.pool_size, self.strides, self.padding.upper())

    def input_gradient(self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """``dx = J^T dy``. When the windows tile the input (``strides == pool_size``,
        ``"valid"``) they are axes of ``x`` reshaped to ``(batch, H_out, p_h, W_out, p_w, C)``:
        the same selection of each window's first maximum, by reshapes and comparisons instead of
        the gathers of ``windows`` (rows and columns past the last window get zero)."""
        if not self.tiled:
            return super().input_gradient(dy, x, y)
        (h_out, w_out), (p_h, p_w) = self.output_hw, self.pool_size
        height, width, channels = self.input_hwc
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
        dy = tf.reshape(dy, [-1, h_out, 1, w_out, 1, channels])
        dx = tf.reshape(
            tf.where(selected, dy, tf.zeros([], dy.dtype)), [-1, h_out * p_h, w_out * p_w, channels]
        )
        if (h_out * p_h, w_out * p_w) == (height, width):
            return dx
        return tf.pad(dx, [[0, 0], [0, height - h_out * p_h], [0, width - w_out * p_w], [0, 0]])

    def weights_per_slot(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """1 at the first slot of each window equal to its maximum ``y`` (the first slot inside
        the input if none is), else 0. Padding reads NaN, which equals nothing."""
        windows = self.windows(x, np.nan)  # (batch, P, S, C)
        y = tf.reshape(y, [tf.shape(y)[0], -1, self.input_hwc[2]])
        taken = tf.zeros_like(y, dtype=tf.bool)
        selected = []
        for slot in range(windows.shape[2]):
            first = tf.logical_and(tf.equal(windows[:, :, slot], y), tf.logical_not(taken))
            taken = tf.logical_or(taken, first)
            selected.append(first)
        fallback = tf.logical_and(
            tf.logical_not(taken)[:, :, None, :], self.first_inside[None, :, :, None]
        )
        return tf.cast(tf.logical_or(tf.stack(selected, axis=2), fallback), x.dtype)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class AveragePooling2D(_Pooling2D):
    """Average pooling with ``J`` the averaging matrix (``1 / |S_o|`` over each window).

    Args (as ``keras.layers.AveragePooling2D``):
        pool_size: ``(p_h, p_w)`` or one int, >= 1.
        strides: ``(s_h, s_w)``, one int, or ``None`` for ``pool_size``.
        padding: ``"valid"`` or ``"same"`` ("same" divides by the inputs inside each window).
        data_format: ``None`` or ``"channels_last"``.

    Input ``(batch, H, W, C)`` with ``H, W, C`` known; output ``(batch, H_out, W_out, C)``.
    """

    factor_name = "J (averaging)"

    def forward(self, x: tf.Tensor) -> tf.Tensor:
        """``y[o, c] = (1 / |S_o|) sum_{n in S_o} x[n, c]``."""
        return tf.nn.avg_pool2d(x, self.pool_size, self.strides, self.padding.upper())

    def reference(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.avg_pool2d(x, self.pool_size, self.strides, self.padding.upper())

    def weights_per_slot(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """``1 / |S_o|`` at every slot inside the input, 0 at slots in the padding."""
        inside = self.window_index < self.input_hwc[0] * self.input_hwc[1]
        weights = inside / self.window_counts[:, None]  # (P, S)
        return tf.constant(weights[None, :, :, None], dtype=x.dtype)
