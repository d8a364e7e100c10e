"""The index maps of pooling windows: which inputs each window reads, and the transpose.

For an image of ``H x W`` positions pooled by windows of ``S = p_h p_w`` slots (the taps of
``tf_jacbp.geometry.axis_taps`` along each axis), ``window_index`` ``(P, S)`` lists, for each of
the ``P = H_out W_out`` windows, the row-major input position ``i W + j`` of each slot, or ``H W``
for a slot in the "same" padding. Gathering ``x`` (with a fill value appended at position
``H W``) by it gives every window's inputs, ``(batch, P, S, C)``; the transpose of that gather,
which sums each slot's value onto the input it read, is ``J^T`` for a pooling layer's Jacobian
``J`` of entries per slot (``tf_jacbp.layers.pooling``).

``WindowMaps`` computes the maps once in NumPy for a known size (``window_maps`` caches one per
size and configuration) and sums by a second gather with ``transpose_index``;
``DynamicWindowMaps`` computes the same ``window_index`` with TensorFlow ops when a traced graph
does not know the size, and sums with a segment sum.
"""

from __future__ import annotations

import functools

import numpy as np

from tf_jacbp._backend import tf
from tf_jacbp.geometry import axis_taps
from tf_jacbp.toeplitz import IndexTensors


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


class WindowMaps:
    """The index maps of pooling windows over one ``(H, W)`` image, computed once in NumPy.

    ``window_index`` ``(P, S)``: input position (row-major ``(i, j)``) of slot ``s`` of window
    ``o``, or ``H W`` for a slot in the padding; ``P = H_out W_out`` windows of ``S = p_h p_w``
    slots. ``inside`` ``(P, S)`` marks the slots inside the input.
    """

    def __init__(self, height: int, width: int, pool_size: tuple, strides: tuple, padding: str):
        taps_h = axis_taps(height, pool_size[0], strides[0], padding)
        taps_w = axis_taps(width, pool_size[1], strides[1], padding)
        self.input_hw, self.output_hw = (height, width), (taps_h.shape[0], taps_w.shape[0])
        inside = (taps_h[:, None, :, None] >= 0) & (taps_w[None, :, None, :] >= 0)
        window = np.where(
            inside, taps_h[:, None, :, None] * width + taps_w[None, :, None, :], height * width
        )
        self.window_index = window.reshape(self.output_hw[0] * self.output_hw[1], -1)
        self.inside = inside.reshape(self.window_index.shape)
        # The windows tile the input (no overlap, no padding): its reshape holds them as axes.
        self.tiled = strides == pool_size and padding == "valid"
        self.tensors = IndexTensors(
            window_index=self.window_index.astype(np.int32),
            input_index=lambda: transpose_index(self.window_index, height * width).astype(np.int32),
        )

    def first_inside(self) -> np.ndarray:
        """``(P, S)``: True at each window's first slot inside the input."""
        return np.arange(self.inside.shape[1]) == np.argmax(self.inside, axis=1)[:, None]

    def averaging(self) -> np.ndarray:
        """``(P, S)``: ``1 / |S_o|`` at the slots inside the input, 0 in the padding."""
        return self.inside / self.inside.sum(axis=1, keepdims=True)

    def windows(self, x: tf.Tensor, fill: float) -> tf.Tensor:
        """``(batch, H, W, C)`` -> ``(batch, P, S, C)``, every window's inputs; padding reads
        ``fill``."""
        return _gather_windows(x, self.tensors["window_index"], fill)

    def transpose(self, v: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
        """``(..., P, S, C)`` slot values -> ``shape`` (``(..., H, W, C)``), summed per input
        position: the transpose of ``windows``, as a gather with ``input_index``. The leading
        axes (the batch, and the contract's ``V``) are folded into one."""
        channels = v.shape[-1]
        v = tf.reshape(v, [-1, v.shape[-3] * v.shape[-2], channels])  # (N, P S, C)
        v = tf.concat([v, tf.zeros_like(v[:, :1])], axis=1)
        gathered = tf.gather(v, self.tensors["input_index"], axis=1)  # (N, H W, m, C)
        return tf.reshape(tf.reduce_sum(gathered, axis=2), shape)


@functools.lru_cache(maxsize=16)
def window_maps(
    height: int, width: int, pool_size: tuple, strides: tuple, padding: str
) -> WindowMaps:
    """``WindowMaps`` for one image size and configuration, cached (the 16 most recent)."""
    return WindowMaps(height, width, pool_size, strides, padding)


def _gather_windows(x: tf.Tensor, window_index: tf.Tensor, fill: float) -> tf.Tensor:
    """``x`` ``(batch, H, W, C)`` -> ``(batch, P, S, C)`` by ``window_index``; index ``H W``
    reads ``fill``."""
    channels = x.shape[-1]
    flat = tf.reshape(x, [tf.shape(x)[0], -1, channels])
    flat = tf.concat([flat, tf.fill([tf.shape(flat)[0], 1, channels], tf.cast(fill, x.dtype))], 1)
    return tf.gather(flat, window_index, axis=1)


def _axis_taps_tf(size: tf.Tensor, kernel: int, stride: int, padding: str) -> tf.Tensor:
    """``axis_taps`` in TensorFlow ops for a size known only when the graph runs."""
    if padding == "same":
        out = (size + stride - 1) // stride
        before = tf.maximum((out - 1) * stride + kernel - size, 0) // 2
    else:
        out, before = (size - kernel) // stride + 1, 0
    taps = tf.range(out)[:, None] * stride - before + tf.range(kernel)[None, :]
    return tf.where((taps >= 0) & (taps < size), taps, -1)


class DynamicWindowMaps:
    """``WindowMaps``' maps for an image whose size a traced graph does not know: the same
    ``window_index`` from TensorFlow ops, and its transpose as a segment sum over it."""

    def __init__(self, x: tf.Tensor, pool_size: tuple, strides: tuple, padding: str):
        height, width = tf.shape(x)[1], tf.shape(x)[2]
        taps_h = _axis_taps_tf(height, pool_size[0], strides[0], padding)
        taps_w = _axis_taps_tf(width, pool_size[1], strides[1], padding)
        inside = (taps_h[:, None, :, None] >= 0) & (taps_w[None, :, None, :] >= 0)
        window = tf.where(
            inside, taps_h[:, None, :, None] * width + taps_w[None, :, None, :], height * width
        )
        slots = pool_size[0] * pool_size[1]
        self.window_index = tf.reshape(window, [-1, slots])
        self.inside = tf.reshape(inside, [-1, slots])
        self.size = height * width
        self.tiled = False

    def first_inside(self) -> tf.Tensor:
        """``(P, S)``: True at each window's first slot inside the input."""
        first = tf.argmax(tf.cast(self.inside, tf.int32), axis=1, output_type=tf.int32)
        return tf.range(self.inside.shape[1])[None, :] == first[:, None]

    def averaging(self) -> tf.Tensor:
        """``(P, S)``: ``1 / |S_o|`` at the slots inside the input, 0 in the padding."""
        inside = tf.cast(self.inside, tf.float64)
        return inside / tf.reduce_sum(inside, axis=1, keepdims=True)

    def windows(self, x: tf.Tensor, fill: float) -> tf.Tensor:
        """As ``WindowMaps.windows``."""
        return _gather_windows(x, self.window_index, fill)

    def transpose(self, v: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
        """As ``WindowMaps.transpose``: ``dx[n] = sum of v over the slots with index n``."""
        channels, slots = v.shape[-1], v.shape[-2]
        v = tf.reshape(v, [-1, tf.shape(self.window_index)[0], slots, channels])  # (N, P, S, C)
        v = tf.transpose(v, [1, 2, 0, 3])  # (P, S, N, C)
        summed = tf.math.unsorted_segment_sum(v, self.window_index, self.size + 1)[:-1]
        return tf.reshape(tf.transpose(summed, [1, 0, 2]), shape)
