"""The Toeplitz matrix of a convolution of any rank (docs/math.md, Lemmas 2 and 3), and its maps.

A convolution (the cross-correlation deep-learning frameworks compute: the kernel is not flipped)
is linear in its input. For a channels_last input ``x`` ``(s_1, ..., s_n, C)`` (``n`` spatial
axes: a sequence, an image ``(H, W, C)``, a volume ``(D, H, W, C)``) and a kernel ``K``
``(k_1, ..., k_n, C, F)``:

    vec(conv(x, K)) = T(K) vec(x),    T(K) of shape (o_1 ... o_n F) x (s_1 ... s_n C),

``vec`` the row-major flattening of ``tf_jacbp.layout`` (docs/math.md, "Layouts"): row ``(i, f)``
is an output position, column ``(i', c)`` an input position. With strides ``st_a``, dilation
``d_a`` and padding ``pad_a`` (``tf_jacbp.geometry.padding_before``) along each axis ``a``:

    T[(i, f), (i', c)] = K[p_1, ..., p_n, c, f]   if i'_a = i_a st_a - pad_a + p_a d_a
                                                  (0 <= p_a < k_a) for every axis a,
                       = 0                        otherwise.

Lemma 2's ``3 x 3`` input and ``2 x 2`` kernel give the ``4 x 9`` matrix of docs/math.md. The
window arithmetic is ``tf_jacbp.geometry``'s (shared with pooling), one axis at a time. The map
from entries of ``T`` to ``Vec(K)`` (column-major over ``K`` as stored) depends only on the
shapes, so ``ConvIndex`` computes it once in NumPy (``conv_index`` caches one per
configuration), and ``T`` is rebuilt from the current kernel by gathering from ``[Vec(K); 0]``,
the zero serving every structural zero; the products (``tf_jacbp.toeplitz_products``) are
``keras.ops``:

* ``ConvIndex.entry_index``: the definition, one ``Vec(K)`` position per entry of ``T``.
* ``ConvIndex.transpose_matrix``: the same map factored, ``T`` being block Toeplitz with Toeplitz
  blocks: the block of ``T^T`` for leading (all axes but the last) input and output positions
  ``i'``, ``i`` is the 1-D Toeplitz matrix, along the last axis, of the kernel slice ``p`` with
  ``i'_a = i_a st_a - pad_a + p_a d_a`` (or zero). So ``T^T`` is two gathers of whole rows:
  kernel rows into the blocks, block rows into ``T^T`` (for LeNet-5's first layer, ``T`` of
  ``4704 x 784``, 2-5 ms on two CPU cores against 70 ms for one gather per entry).
* ``ConvIndex.sparse_matrix``: only the structural nonzeros, for the memory guard.
* ``ConvIndex.patches``: the patch matrix (im2col), ``J_{Vec(K)} (T(K) vec(x))`` of Lemma 3;
  ``kernel_products`` (kernel and tied bias products for ``V`` stacked upstream vectors, summed
  over the batch or per sample) uses it with columns in ``K``'s storage order plus a row of ones.

Memory guard: ``tf_jacbp.toeplitz_budget`` (its names are re-exported here). A size known only
when a traced TensorFlow graph runs: ``tf_jacbp.toeplitz_dynamic``, its maps computed by that
graph (``tf_jacbp.backend.dynamic_conv_maps``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend
from tf_jacbp.backend import IndexTensors
from tf_jacbp.geometry import (
    PADDINGS,
    PADDINGS_1D,
    as_tuple,
    axis_taps,
    check_padding,
    check_window_fits,  # noqa: I001
)
from tf_jacbp.layout import vec_index, vec_parameter
from tf_jacbp.toeplitz_budget import (  # noqa: F401 (re-exported: the budget's names)
    DEFAULT_BUDGET_BYTES,
    GRAPH_CONSTANT_COPIES,
    SPARSE_INDEX_BYTES,
    SPARSE_STEP_BYTES_PER_NONZERO,
    STEP_OVERHEAD_BYTES,
    budget_error,
    check_budget,
    dtype_size,
    get_budget_bytes,
    set_budget_bytes,
    step_bytes,
    use_sparse,
)
from tf_jacbp.toeplitz_products import (  # noqa: F401 (re-exported)
    ToeplitzProducts,
    static_size,
    toeplitz_product,
)

Tensor = Any


def _inverse_taps(taps: np.ndarray, size: int) -> np.ndarray:
    """``(size, out)``: the tap ``t`` with ``taps[o, t] == i`` (input ``i``, output ``o``) or -1."""
    inverse = np.full((size, taps.shape[0]), -1, dtype=np.int64)
    outs, ts = np.nonzero(taps >= 0)
    inverse[taps[outs, ts], outs] = ts
    return inverse


def _place(array: np.ndarray, ndim: int, axes: Sequence[int]) -> np.ndarray:
    """``array`` (one axis per entry of ``axes``, increasing) viewed with ``ndim`` axes, its own
    at ``axes`` and size 1 elsewhere, for broadcasting."""
    shape = [1] * ndim
    for axis, size in zip(axes, array.shape, strict=True):
        shape[axis] = size
    return array.reshape(shape)


class ConvIndex(ToeplitzProducts):
    """The index maps of ``T(K)`` for one configuration, computed once in NumPy.

    Build it with ``conv_index`` (validated and cached), not directly. Shapes, ``n`` spatial
    axes: input ``(s_1, ..., s_n, C)``, kernel ``(k_1, ..., k_n, C, F)``, output
    ``(o_1, ..., o_n, F)``; ``T`` is ``R x N`` with ``R = o_1 ... o_n F`` and
    ``N = s_1 ... s_n C``; ``P = o_1 ... o_n`` output positions; ``M = k_1 ... k_n C`` entries per
    filter. ``taps[a]`` is ``tf_jacbp.geometry.axis_taps`` of axis ``a``, ``(o_a, k_a)``. The
    NumPy maps are computed on first use and kept.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        kernel_shape: tuple[int, ...],
        strides: tuple[int, ...],
        padding: str,
        dilation_rate: tuple[int, ...],
    ):
        self.input_shape = input_shape
        self.kernel_shape = kernel_shape
        self.strides = strides
        self.padding = padding
        self.dilation_rate = dilation_rate
        self.rank = len(kernel_shape) - 2
        self.taps = tuple(
            axis_taps(size, k, s, padding, d)
            for size, k, s, d in zip(
                input_shape[:-1], kernel_shape[:-2], strides, dilation_rate, strict=True
            )
        )
        self.output_shape = (*(t.shape[0] for t in self.taps), kernel_shape[-1])
        self.shape = (math.prod(self.output_shape), math.prod(input_shape))
        # Structural nonzeros: the product over axes of the valid (output, tap) pairs, x C x F.
        valid = math.prod(int((t >= 0).sum()) for t in self.taps)
        self.nnz = valid * kernel_shape[-2] * kernel_shape[-1]

    def dense_bytes(self, dtype: Any) -> int:
        """Bytes of a dense ``T``: ``R N`` entries of ``dtype``."""
        return self.shape[0] * self.shape[1] * dtype_size(dtype)

    def sparse_bytes(self, dtype: Any) -> int:
        """Bytes of a sparse ``T``: per structural nonzero its value and int64 (row, column)."""
        return self.nnz * (dtype_size(dtype) + SPARSE_INDEX_BYTES)

    def step_bytes(self, dtype: Any, sparse: bool) -> int:
        """The peak bytes a training step of one sample adds for this layer with a dense or a
        sparse ``T``: what the memory guard compares with its budget
        (``tf_jacbp.toeplitz_budget.step_bytes``)."""
        return step_bytes(self, dtype, sparse)

    @functools.cached_property
    def _sparse_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, positions)``: ``(nnz, 2)`` int64 ``(row, column)`` pairs and ``(nnz,)`` int32
        ``Vec(K)`` positions, with ``T[indices[k]] = Vec(K)[positions[k]]`` (``nonzeros``)."""
        n = self.rank
        vec = vec_index(self.kernel_shape).astype(np.int32)
        # Axes (o_1..o_n, f, p_1..p_n, c): rows (o, f) row-major, then columns increase with (p, c).
        grid = np.ix_(*(np.arange(k) for k in (*self.output_shape, *self.kernel_shape[:-1])))
        outs, f, taps, c = grid[:n], grid[n], grid[n + 1 : 2 * n + 1], grid[2 * n + 1]
        row, column, valid = np.zeros((), np.int64), np.zeros((), np.int64), True
        for a in range(n):
            read = self.taps[a][outs[a], taps[a]]
            row = row * self.output_shape[a] + outs[a]
            column = column * self.input_shape[a] + read
            valid = valid & (read >= 0)
        row, column = row * self.kernel_shape[-1] + f, column * self.input_shape[-1] + c
        full = (*self.output_shape, *self.kernel_shape[:-1])
        valid = np.broadcast_to(valid, full)
        indices = np.empty((self.nnz, 2), dtype=np.int64)
        indices[:, 0] = np.broadcast_to(row, full)[valid]
        indices[:, 1] = np.broadcast_to(column, full)[valid]
        positions = np.broadcast_to(vec[(*taps, c, f)], full)[valid]
        return indices, positions

    @property
    def nonzeros(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, cols, positions)``, each ``(nnz,)``, with
        ``T[rows[k], cols[k]] = Vec(K)[positions[k]]``.

        Sorted by row, then column (the canonical order of a sparse tensor).
        """
        indices, positions = self._sparse_arrays
        return indices[:, 0], indices[:, 1], positions

    @functools.cached_property
    def entry_index(self) -> np.ndarray:
        """``(R, N)``: the ``Vec(K)`` position of each entry of ``T``, or ``size(K)`` (the appended
        zero). The definition, for tests and teaching: training uses ``block_index``."""
        index = np.full(self.shape, math.prod(self.kernel_shape), dtype=np.int64)
        rows, cols, positions = self.nonzeros
        index[rows, cols] = positions
        return index

    @functools.cached_property
    def block_index(self) -> tuple[np.ndarray, np.ndarray]:
        """The two row-gather maps of ``transpose_matrix`` (int32). ``L = k_1 ... k_{n-1}`` taps
        of the leading axes, ``l`` their row-major flat index; ``W = s_n``, ``q`` the last axis'
        tap.

        * ``kernel_rows`` ``(L C W + 1, o_n)``: for block row ``(l, c, j')`` and output column
          ``j``, the row of ``K[l, q, c, :]`` in ``K`` reshaped to ``(M, F)`` (its storage order:
          row ``(l k_n + q) C + c``), with ``j' = j st_n - pad_before + q d_n``; or ``M`` (an
          appended zero row) where no tap ``q`` reads ``j'``. The last block row is all ``M``:
          the zero block.
        * ``block_rows`` ``(s_1, ..., s_{n-1}, W, C, o_1, ..., o_{n-1})``: for row
          ``(i', j', c)`` of ``T^T`` and leading output position ``i``, the block row
          ``(l, c, j')`` (flattened) with ``i'_a = i_a st_a - pad_a + p_a d_a`` along each leading
          axis; or ``L C W`` (the zero block row) where some ``p_a`` is no tap. With
          ``N o_1 ... o_{n-1}`` entries it is the largest map of the dense route, so it is built
          in place, in int32. For ``n = 1`` it is ``(W, C)``, a permutation.
        """
        n, (width, channels) = self.rank, self.input_shape[-2:]
        lead_k = self.kernel_shape[:-3]
        lead = math.prod(lead_k)
        kw, entries = self.kernel_shape[-3], math.prod(self.kernel_shape[:-1])
        q = _inverse_taps(self.taps[-1], width)[None, None]  # (1, 1, W, o_n)
        r = np.arange(lead)[:, None, None, None]
        c = np.arange(channels)[None, :, None, None]
        kernel_rows = np.where(q >= 0, (r * kw + np.maximum(q, 0)) * channels + c, entries)
        kernel_rows = np.concatenate(
            [kernel_rows.reshape(-1, q.shape[-1]), np.full((1, q.shape[-1]), entries)]
        ).astype(np.int32)
        # Axes (s_1..s_{n-1}, W, C, o_1..o_{n-1}).
        ndim = 2 * n
        flat, missing = np.zeros((), np.int32), np.zeros((), bool)
        for a in range(n - 1):
            p = _inverse_taps(self.taps[a], self.input_shape[a]).astype(np.int32)
            p = _place(p, ndim, (a, n + 1 + a))
            flat, missing = flat * lead_k[a] + np.maximum(p, 0), missing | (p < 0)
        c = _place(np.arange(channels, dtype=np.int32), ndim, (n,))
        j_in = _place(np.arange(width, dtype=np.int32), ndim, (n - 1,))
        block_rows = (flat * channels + c) * width + j_in
        block_rows[np.broadcast_to(missing, block_rows.shape)] = lead * channels * width
        return kernel_rows, block_rows

    @functools.cached_property
    def patch_index(self) -> np.ndarray:
        """``(M, P)`` int32: the input position (row-major ``(i'_1, ..., i'_n, c)``) kernel entry
        ``m`` reads at output position ``(i_1, ..., i_n)``, or ``N`` (the padding, an appended
        zero). Rows ``m`` in ``Vec`` order within a filter (``m = p_1 + k_1 (p_2 + ... +
        k_n c)``, column-major, ``tf_jacbp.layout``)."""
        n = self.rank
        ndim = 2 * n + 1  # axes (p_1..p_n, c, o_1..o_n)
        index, missing = np.zeros((), np.int32), np.zeros((), bool)
        for a in range(n):
            read = _place(self.taps[a].T.astype(np.int32), ndim, (a, n + 1 + a))
            index, missing = index * self.input_shape[a] + read, missing | (read < 0)
        index = index * self.input_shape[-1] + _place(
            np.arange(self.input_shape[-1], dtype=np.int32), ndim, (n,)
        )
        index = np.where(missing, self.shape[1], index).astype(np.int32)
        index = index.reshape(-1, math.prod(self.output_shape[:-1]))  # rows (p, c) row-major
        vec = vec_index(self.kernel_shape)[..., 0].reshape(-1)
        out = np.empty_like(index)
        out[vec] = index
        return out

    @functools.cached_property
    def stored_patch_index(self) -> np.ndarray:
        """``(M + 1, P)`` int32: ``patch_index`` with its rows in ``K``'s storage order
        ``(p_1, ..., p_n, c)`` (row-major, the rows of ``K`` reshaped to ``(M, F)``) instead of
        ``Vec`` order, padding reading ``N + 1`` instead of ``N``, and a last row reading ``N``:
        the constant 1 that the tied bias multiplies (``kernel_gradient``)."""
        n, positions = self.shape[1], self.patch_index.shape[1]
        vec = vec_index(self.kernel_shape)[..., 0].reshape(-1)  # storage row -> Vec row
        rows = self.patch_index[vec]
        rows[rows == n] = n + 1
        return np.concatenate([rows, np.full((1, positions), n, dtype=rows.dtype)])

    @functools.cached_property
    def _tensors(self) -> IndexTensors:
        return IndexTensors(
            kernel_rows=lambda: self.block_index[0].reshape(-1),
            block_rows=lambda: self.block_index[1].reshape(-1),
            patch_index=lambda: self.patch_index,
            stored_patch_index=lambda: self.stored_patch_index,
        )

    @functools.cached_property
    def _sparse_tensors(self) -> IndexTensors:
        return IndexTensors(
            indices=lambda: self._sparse_arrays[0], positions=lambda: self._sparse_arrays[1]
        )

    def sparse_matrix(self, kernel: Tensor) -> Tensor:
        """``T(K)`` ``(R, N)`` as a sparse tensor of its ``nnz`` structural nonzeros
        (``tf_jacbp.backend.sparse_matrix``).

        The values are gathered from ``Vec(K)`` (``nonzeros``). Not XLA-compatible.
        """
        t = self._sparse_tensors
        values = ops.take(vec_parameter(kernel), t["positions"], axis=0)
        return backend.sparse_matrix(t["indices"], values, self.shape)

    def index_map(self, name: str) -> Tensor:
        """The index map ``name`` as an int32 tensor (``IndexTensors``: a graph constant)."""
        return self._tensors[name]


def _positive_sizes(shape: Sequence[Any]) -> bool:
    return all(isinstance(n, int | np.integer) and not isinstance(n, bool) for n in shape) and all(
        n >= 1 for n in shape
    )


def validate(
    kernel_shape: Sequence[int],
    input_shape: Sequence[int],
    strides: Any,
    padding: Any,
    dilation_rate: Any,
    owner: str = "conv_matrix",
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], str, tuple[int, ...]]:
    """Check and normalize the arguments of ``conv_index``; ValueErrors name argument and fix.

    The kernel's rank fixes the number ``n >= 1`` of spatial axes: kernel ``(k_1, ..., k_n, C,
    F)``, input ``(s_1, ..., s_n, C)``, strides and dilation an int or ``n`` ints; padding
    "valid" or "same", and "causal" for ``n = 1`` or ``n = 2`` (a sequence read as an image of
    height 1, as ``Conv1D`` does)."""
    kernel_shape, input_shape = tuple(kernel_shape), tuple(input_shape)
    if len(kernel_shape) < 3 or not _positive_sizes(kernel_shape):
        raise ValueError(
            f"{owner}: kernel must have shape (k_1, ..., k_n, C_in, C_out), e.g. (kh, kw, C_in, "
            f"C_out) for 2-D, with positive sizes, got kernel shape {kernel_shape}."
        )
    n = len(kernel_shape) - 2
    if len(input_shape) != n + 1 or not _positive_sizes(input_shape):
        raise ValueError(
            f"{owner}: input_shape must be {n} known positive spatial sizes and C_in (no batch "
            f"axis), as the kernel of shape {kernel_shape} has {n} spatial axes, got "
            f"input_shape={input_shape}."
        )
    if input_shape[-1] != kernel_shape[-2]:
        raise ValueError(
            f"{owner}: the kernel reads {kernel_shape[-2]} input channels (kernel shape "
            f"{kernel_shape}) but input_shape={input_shape} has {input_shape[-1]}."
        )
    strides = as_tuple(strides, n, "strides", owner)
    dilation_rate = as_tuple(dilation_rate, n, "dilation_rate", owner)
    padding = check_padding(padding, owner, PADDINGS_1D if n <= 2 else PADDINGS)
    check_window_fits(input_shape, kernel_shape[:n], padding, owner, "kernel_size", dilation_rate)
    return (
        tuple(int(k) for k in kernel_shape),
        tuple(int(k) for k in input_shape),
        strides,
        padding,
        dilation_rate,
    )


@functools.lru_cache(maxsize=64)
def _cached_index(input_shape, kernel_shape, strides, padding, dilation_rate) -> ConvIndex:
    return ConvIndex(input_shape, kernel_shape, strides, padding, dilation_rate)


def conv_index(
    kernel_shape: Sequence[int],
    input_shape: Sequence[int],
    strides: Any = 1,
    padding: str = "valid",
    dilation_rate: Any = 1,
    owner: str = "conv_index",
) -> ConvIndex:
    """The (cached) ``ConvIndex`` of a configuration with ``n = len(kernel_shape) - 2`` spatial
    axes (1-D, 2-D, 3-D, ...), after ``validate`` (errors name ``owner``). Kernel
    ``(k_1, ..., k_n, C_in, C_out)``, input ``(s_1, ..., s_n, C_in)`` (no batch axis), strides
    and dilation an int or ``n`` ints, padding as ``conv_matrix``'s."""
    kernel_shape, input_shape, strides, padding, dilation_rate = validate(
        kernel_shape, input_shape, strides, padding, dilation_rate, owner
    )
    return _cached_index(input_shape, kernel_shape, strides, padding, dilation_rate)


def conv_matrix(
    kernel: Any,
    input_shape: Sequence[int],
    strides: Any = 1,
    padding: str = "valid",
    dilation_rate: Any = 1,
    budget_bytes: int | None = None,
) -> Tensor:
    """The dense Toeplitz matrix ``T(K)`` with ``T(K) @ vec(x) == vec(conv(x, K))``, any rank.

    Args:
        kernel: ``K``, ``(k_1, ..., k_n, C_in, C_out)`` (Keras' kernel layout; 2-D:
            ``(kh, kw, C_in, C_out)``).
        input_shape: ``(s_1, ..., s_n, C_in)`` of one channels_last input (no batch axis).
        strides, dilation_rate: an int or ``n`` ints (2-D: ``(height, width)``), all >= 1.
        padding: ``"valid"``, ``"same"`` (TensorFlow's rule) or, for ``n <= 2``, ``"causal"``
            (``(k - 1) d`` zeros before, along each axis), as in ``tf_jacbp.geometry``.
        budget_bytes: refuse a ``T`` larger than this (default ``get_budget_bytes()``).

    Returns:
        ``T(K)``, ``(o_1 ... o_n C_out, s_1 ... s_n C_in)`` in ``kernel``'s dtype; rows are output
        positions ``(i_1, ..., i_n, f)``, columns input positions ``(i'_1, ..., i'_n, c)``, both
        row-major (module docstring).

    Example (Lemma 2: a ``3 x 3`` input, the ``2 x 2`` kernel ``[[1, 2], [3, 4]]``):
        >>> conv_matrix(np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1), (3, 3, 1))[0]
        <tf.Tensor: shape=(9,), dtype=float64, numpy=array([1., 2., 0., 3., 4., 0., 0., 0., 0.])>
    """
    kernel = ops.convert_to_tensor(kernel)
    index = conv_index(kernel.shape, input_shape, strides, padding, dilation_rate, "conv_matrix")
    budget = (
        get_budget_bytes() if budget_bytes is None else check_budget(budget_bytes, "conv_matrix")
    )
    if index.dense_bytes(kernel.dtype) > budget:
        raise budget_error(
            "conv_matrix",
            index,
            kernel.dtype,
            budget,
            "conv_matrix(..., budget_bytes=...) or tf_jacbp.toeplitz.set_budget_bytes(...)",
            step=False,
        )
    return index.matrix(kernel)
