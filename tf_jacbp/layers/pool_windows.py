"""The index maps of pooling windows: which inputs each window reads, and the transpose.

For an input of ``N = n_1 ... n_k`` positions (``k`` spatial axes: ``(H, W)`` for images,
``(D, H, W)`` for volumes) pooled by windows of ``S = p_1 ... p_k`` slots (the taps of
``tf_jacbp.geometry.axis_taps`` along each axis), ``window_index`` ``(P, S)`` lists, for each of
the ``P = o_1 ... o_k`` windows (row-major over the outputs), the row-major input position of
each slot (row-major over the taps), or ``N`` for a slot in the "same" padding. Gathering ``x``
(with a fill value appended at position ``N``) by it gives every window's inputs,
``(batch, P, S, C)``; the transpose of that gather, which sums each slot's value onto the input
it read, is ``J^T`` for a pooling layer's Jacobian ``J`` of entries per slot
(``tf_jacbp.layers.pooling``).

``WindowMaps`` computes the maps once in NumPy for known sizes (``window_maps`` caches one per
size and configuration) and sums by a second gather with ``transpose_index``;
``DynamicWindowMaps`` takes the same ``window_index`` from ``tf_jacbp.backend`` when a traced
graph does not know the sizes, and sums with a segment sum.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend
from tf_jacbp.geometry import axis_taps
from tf_jacbp.toeplitz import IndexTensors

Tensor = Any  # a tensor of Keras' backend


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
    """The index maps of pooling windows over one input of spatial ``sizes``, computed once in
    NumPy.

    ``window_index`` ``(P, S)``: input position (row-major over ``sizes``) of slot ``s`` of
    window ``o``, or ``N = prod(sizes)`` for a slot in the padding; ``P = prod(output_sizes)``
    windows of ``S = prod(pool_size)`` slots. ``inside`` ``(P, S)`` marks the slots inside the
    input.
    """

    def __init__(self, sizes: tuple, pool_size: tuple, strides: tuple, padding: str):
        rank = len(sizes)
        taps = [
            axis_taps(n, p, s, padding) for n, p, s in zip(sizes, pool_size, strides, strict=True)
        ]
        self.input_sizes = tuple(sizes)
        self.output_sizes = tuple(t.shape[0] for t in taps)
        inside, flat, step = True, 0, 1
        for a in reversed(range(rank)):  # taps[a] on axes a (outputs) and rank + a (slots)
            shape = [1] * (2 * rank)
            shape[a], shape[rank + a] = taps[a].shape
            tap = taps[a].reshape(shape)
            inside, flat, step = inside & (tap >= 0), flat + tap * step, step * sizes[a]
        size = math.prod(sizes)
        self.window_index = np.where(inside, flat, size).reshape(math.prod(self.output_sizes), -1)
        self.inside = np.broadcast_to(inside, np.shape(flat)).reshape(self.window_index.shape)
        # The windows tile the input (no overlap, no padding): its reshape holds them as axes.
        self.tiled = tuple(strides) == tuple(pool_size) and padding == "valid"
        self.tensors = IndexTensors(
            window_index=self.window_index.astype(np.int32),
            input_index=lambda: transpose_index(self.window_index, size).astype(np.int32),
        )

    def first_inside(self) -> np.ndarray:
        """``(P, S)``: True at each window's first slot inside the input."""
        return np.arange(self.inside.shape[1]) == np.argmax(self.inside, axis=1)[:, None]

    def averaging(self) -> np.ndarray:
        """``(P, S)``: ``1 / |S_o|`` at the slots inside the input, 0 in the padding."""
        return self.inside / self.inside.sum(axis=1, keepdims=True)

    def windows(self, x: Tensor, fill: float) -> Tensor:
        """``(batch, *sizes, C)`` -> ``(batch, P, S, C)``, every window's inputs; padding reads
        ``fill``."""
        return _gather_windows(x, self.tensors["window_index"], fill)

    def transpose(self, v: Tensor, shape: tuple) -> Tensor:
        """``(..., P, S, C)`` slot values -> ``shape`` (``(..., *sizes, C)``), summed per input
        position: the transpose of ``windows``, as a gather with ``input_index``. The leading
        axes (the batch, and the contract's ``V``) are folded into one."""
        channels = v.shape[-1]
        v = ops.reshape(v, (-1, v.shape[-3] * v.shape[-2], channels))  # (N, P S, C)
        v = ops.concatenate([v, ops.zeros_like(v[:, :1])], axis=1)
        gathered = ops.take(v, self.tensors["input_index"], axis=1)  # (N, prod(sizes), m, C)
        return ops.reshape(ops.sum(gathered, axis=2), shape)


@functools.lru_cache(maxsize=16)
def window_maps(*sizes_and_windows: Any) -> WindowMaps:
    """``WindowMaps`` for one input size and configuration, cached (the 16 most recent):
    ``window_maps(n_1, ..., n_k, pool_size, strides, padding)`` (``k`` spatial sizes, then the
    window's ``k``-tuples and the padding), e.g. ``window_maps(H, W, (2, 2), (2, 2), "valid")``."""
    *sizes, pool_size, strides, padding = sizes_and_windows
    return WindowMaps(tuple(sizes), tuple(pool_size), tuple(strides), padding)


def _gather_windows(x: Tensor, window_index: Tensor, fill: float) -> Tensor:
    """``x`` ``(batch, *sizes, C)`` -> ``(batch, P, S, C)`` by ``window_index``; index
    ``prod(sizes)`` reads ``fill``."""
    channels = x.shape[-1]
    flat = ops.reshape(x, (ops.shape(x)[0], -1, channels))
    flat = ops.concatenate([flat, ops.full_like(flat[:, :1], fill)], axis=1)
    return ops.take(flat, window_index, axis=1)


class DynamicWindowMaps:
    """``WindowMaps``' maps for an input whose sizes a traced graph does not know: the same
    ``window_index`` from ``tf_jacbp.backend.dynamic_window_index``, and its transpose as a
    segment sum over it."""

    def __init__(self, x: Tensor, pool_size: tuple, strides: tuple, padding: str):
        index, inside, size, outputs = backend.dynamic_window_index(
            x, tuple(pool_size), tuple(strides), padding
        )
        self.window_index, self.inside, self.size = index, inside, size
        self.output_sizes = outputs
        self.tiled = False

    def first_inside(self) -> Tensor:
        """``(P, S)``: True at each window's first slot inside the input."""
        first = ops.argmax(ops.cast(self.inside, "int32"), axis=1)
        return ops.expand_dims(ops.arange(self.inside.shape[1]), 0) == ops.cast(
            ops.expand_dims(first, 1), "int32"
        )

    def averaging(self) -> Tensor:
        """``(P, S)``: ``1 / |S_o|`` at the slots inside the input, 0 in the padding."""
        inside = ops.cast(self.inside, "float64")
        return inside / ops.sum(inside, axis=1, keepdims=True)

    def windows(self, x: Tensor, fill: float) -> Tensor:
        """As ``WindowMaps.windows``."""
        return _gather_windows(x, self.window_index, fill)

    def transpose(self, v: Tensor, shape: tuple) -> Tensor:
        """As ``WindowMaps.transpose``: ``dx[n] = sum of v over the slots with index n``."""
        channels, slots = v.shape[-1], v.shape[-2]
        v = ops.reshape(v, (-1, ops.shape(self.window_index)[0], slots, channels))  # (N, P, S, C)
        v = ops.transpose(v, (1, 2, 0, 3))  # (P, S, N, C)
        v = ops.reshape(v, (-1, ops.shape(v)[2], channels))  # (P S, N, C)
        segments = ops.reshape(self.window_index, (-1,))
        summed = ops.segment_sum(v, segments, num_segments=self.size + 1)[:-1]  # (size, N, C)
        return ops.reshape(ops.transpose(summed, (1, 0, 2)), shape)
