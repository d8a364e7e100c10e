"""The products with ``T(K)`` and the patch matrix (``tf_jacbp.toeplitz``), in ``keras.ops``.

Written once for any source of the index maps: ``tf_jacbp.toeplitz.ConvIndex`` (NumPy, computed
once per size) and ``tf_jacbp.toeplitz_dynamic.DynamicConvIndex`` (maps computed when a traced
TensorFlow graph runs, for a size unknown when traced: ``tf_jacbp.backend.dynamic_conv_maps``),
and for any number ``n`` of spatial axes. The maps are gathered with ``ops.take``; the sparse
``T`` of the memory guard is multiplied by the backend (``tf_jacbp.backend.sparse_product``).
"""

from __future__ import annotations

import math
from typing import Any

from keras import ops

from tf_jacbp import backend

Tensor = Any


def static_size(t: Tensor, axis: int) -> int | Tensor:
    """``t.shape[axis]`` where it is known when traced, else the runtime size."""
    size = t.shape[axis]
    return int(size) if size is not None else ops.shape(t)[axis]


def toeplitz_product(rows: Tensor, t: Tensor, transpose: bool = False) -> Tensor:
    """``rows t`` (``transpose``: ``rows t^T``) for ``t`` as a layer holds it: the dense
    ``T(K)^T`` (``ToeplitzProducts.transpose_matrix``) or, kept sparse by the memory guard,
    ``T(K)`` itself (``ConvIndex.sparse_matrix``), which is then multiplied through its adjoint:
    ``rows T^T = (T rows^T)^T`` and ``rows T = (T^T rows^T)^T``.

    ``rows`` ``(n, a)``; dense ``t`` ``(a, c)`` (``(c, a)`` with ``transpose``); the result is
    ``(n, c)``. A convolution's forward pass is ``X T(K)^T`` (``transpose=False``) and its input
    product ``Delta T(K)`` (``transpose=True``); ``Conv2DTranspose`` the other way round.
    """
    if backend.is_sparse(t):  # the sparse product has no XLA kernel; the guard allows that
        return backend.sparse_product(t, rows, transpose)
    if transpose:  # rows t^T = (t rows^T)^T: transposes the rows, not the (larger) t
        return ops.transpose(ops.matmul(t, ops.transpose(rows)))
    return ops.matmul(rows, t)


class ToeplitzProducts:
    """The products with ``T(K)`` and the patch matrix, for ``n`` spatial axes.

    A subclass sets ``input_shape`` ``(s_1, ..., s_n, C)``, ``kernel_shape``
    ``(k_1, ..., k_n, C, F)``, ``output_shape`` ``(o_1, ..., o_n, F)`` and ``shape`` ``(R, N)``
    (sizes that are ints, or int32 scalar tensors), and ``index_map(name)`` returning the int32
    map ``name`` flattened as documented at ``ConvIndex.block_index``, ``patch_index`` and
    ``stored_patch_index``: ``kernel_rows`` and ``block_rows`` flattened, the patch maps
    ``(M, P)`` and ``(M + 1, P)``, ``M = k_1 ... k_n C``, ``P = o_1 ... o_n``.
    """

    input_shape: tuple
    kernel_shape: tuple[int, ...]
    output_shape: tuple
    shape: tuple

    def index_map(self, name: str) -> Tensor:
        """The int32 index map ``name`` (``kernel_rows``, ``block_rows``, ``patch_index`` or
        ``stored_patch_index``)."""
        raise NotImplementedError

    @property
    def positions(self) -> int | Tensor:
        """``P = o_1 ... o_n``: the output positions."""
        return math.prod(self.output_shape[:-1])

    def _kernel_matrix(self, kernel: Tensor) -> Tensor:
        """``(M + 1, F)``: ``K`` reshaped to ``(k_1 ... k_n C, F)`` (row ``(p_1, ..., p_n, c)``
        holds ``K[p_1, ..., p_n, c, :]``, no copy) and a zero row appended."""
        filters = self.kernel_shape[-1]
        rows = ops.reshape(kernel, (-1, filters))
        return ops.concatenate([rows, ops.zeros((1, filters), kernel.dtype)], axis=0)

    def transpose_matrix(self, kernel: Tensor) -> Tensor:
        """``T(K)^T`` ``(N, R)``, dense, built by two row gathers from ``K`` (``block_index``).

        With ``L = k_1 ... k_{n-1}`` (the taps of the leading axes, flattened to ``l``), ``W`` the
        last axis' size and ``q`` its tap: first the one-dimensional Toeplitz blocks
        ``B[l, c, j'] = (K[l, q(j', j), c, f])_{j, f}`` (zero where ``q`` is no tap),
        ``(L C W + 1, o_n F)`` ending with a zero row; then
        ``T^T[(i', j', c), (i, j, f)] = B[l(i', i), c, j'][(j, f)]`` for the leading input and
        output positions ``i'``, ``i``.
        """
        width, channels = self.input_shape[-2], self.input_shape[-1]
        lead_taps = math.prod(self.kernel_shape[:-3])
        w_out, filters = self.output_shape[-2], self.output_shape[-1]
        blocks = ops.reshape(
            ops.take(self._kernel_matrix(kernel), self.index_map("kernel_rows"), axis=0),
            (lead_taps * channels * width + 1, w_out * filters),
        )
        block_rows = self.index_map("block_rows")
        return ops.reshape(ops.take(blocks, block_rows, axis=0), (self.shape[1], self.shape[0]))

    def matrix(self, kernel: Tensor) -> Tensor:
        """``T(K)`` ``(R, N)``, dense: the transpose of ``transpose_matrix``."""
        return ops.transpose(self.transpose_matrix(kernel))

    def patches(self, x: Tensor) -> Tensor:
        """The patch matrices of a batch, transposed: ``(batch, s_1, ..., s_n, C)`` ->
        ``(M, P * batch)``.

        Column ``(o, b)`` holds the patch that output position ``o`` of sample ``b`` reads, its
        rows in ``Vec`` order within a filter (``patch_index``); padding reads zeros. For one
        sample this is ``X_patch^T`` with ``J_{Vec(K)} (T(K) vec(x)) = I_F (x) X_patch`` (Lemma 3).
        """
        columns = ops.transpose(ops.reshape(x, (-1, self.shape[1])))  # (N, batch)
        columns = ops.concatenate([columns, ops.zeros_like(columns[:1])], axis=0)
        patches = ops.take(columns, self.index_map("patch_index"), axis=0)  # (M, P, batch)
        return ops.reshape(patches, (patches.shape[0], -1))

    def stored_patches(self, images: Tensor, bias_row: bool = True) -> Tensor:
        """The patch matrices of ``V`` stacked input batches, rows in ``K``'s storage order:
        ``(V, batch, s_1, ..., s_n, C)`` (or ``(V, batch, N)``) -> ``(V, M + 1, P, batch)``.

        Entry ``[v, m, p, b]`` is the input entry that kernel row ``m = (p_1, ..., p_n, c)``
        (``K`` reshaped to ``(M, F)``, no copy) reads at output position ``p`` of input
        ``(v, b)``, zero in the padding (``stored_patch_index``); the last row ``m = M`` is the
        constant 1 that the tied bias multiplies (``J_b z = I_F`` stacked ``P`` times is the patch
        of 1). Without ``bias_row`` that row is left out: ``(V, M, P, batch)``. For one input this
        is ``[X_patch | 1]^T`` with ``J_{Vec(K)} (T(K) vec(x)) = I_F (x) X_patch`` (Lemma 3). The
        batch goes last: one gather of whole rows, and the product over samples and positions
        is one matmul ``(M + 1, P batch)`` (measured faster, per sample too, than gathering
        batch-major, which gathers along an inner axis).
        """
        stacks, batch = ops.shape(images)[0], ops.shape(images)[1]
        columns = ops.transpose(ops.reshape(images, (stacks, batch, -1)), (0, 2, 1))  # (V, N, b)
        one_and_zero = ops.broadcast_to(
            ops.convert_to_tensor([[1], [0]], images.dtype)[None], (stacks, 2, batch)
        )
        columns = ops.concatenate([columns, one_and_zero], axis=1)  # rows N (ones), N + 1 (zeros)
        index = self.index_map("stored_patch_index")
        return ops.take(columns, index if bias_row else index[:-1], axis=1)

    def kernel_products(self, x: Tensor, m: Tensor, sum_batch: bool = True) -> Tensor:
        """``(J_{Vec(K), b} z)^T m`` for ``V`` stacked upstream vectors per sample, as ``K``'s
        rows and the tied bias: ``(V, M + 1, F)``, or per sample ``(V, batch, M + 1, F)``.

        ``x`` ``(batch, s_1, ..., s_n, C)``, ``m`` ``(V, batch, o_1, ..., o_n, F)``. Per sample
        and vector the product is ``[X_patch | 1]^T M_{v, b}`` (``stored_patches``, ``M_{v, b}``
        the ``P x F`` matrix of ``m[v, b]``): rows ``(p_1, ..., p_n, c)`` are
        ``dK[p_1, ..., p_n, c, :]`` (``K`` reshaped to ``(M, F)``), row ``M`` is the tied bias'
        ``db`` (``M_{v, b}`` summed over positions). The ``V`` vectors ride along with the filters
        (``V F`` columns; moving the axis of ``V = 1`` copies nothing): summed over the batch one
        matmul ``(M + 1, P batch) x (P batch, V F)``, per sample one batched product
        ``"mpb,bpg->bmg"``.
        """
        patches = self.stored_patches(x[None])[0]  # (M + 1, P, batch)
        entries, positions = patches.shape[0], self.positions
        filters, stacks = self.kernel_shape[-1], static_size(m, 0)
        delta = ops.reshape(m, (stacks, -1, positions, filters))  # (V, batch, P, F)
        if sum_batch:
            rows = ops.reshape(ops.transpose(delta, (2, 1, 0, 3)), (-1, stacks * filters))
            products = ops.matmul(ops.reshape(patches, (entries, -1)), rows)  # (M + 1, V F)
            return ops.transpose(ops.reshape(products, (entries, stacks, filters)), (1, 0, 2))
        rows = ops.reshape(ops.transpose(delta, (1, 2, 0, 3)), (-1, positions, stacks * filters))
        products = ops.einsum("mpb,bpg->bmg", patches, rows)  # (batch, M + 1, V F)
        products = ops.reshape(products, (-1, entries, stacks, filters))
        return ops.transpose(products, (2, 0, 1, 3))

    def kernel_gradient(
        self, x: Tensor, delta: Tensor, tied_bias: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``dK = sum_b (J_{Vec(K)} T(K) vec(x_b))^T delta_b``, shaped like ``K``; with
        ``tied_bias`` also ``db = sum_b (J_b z_b)^T delta_b``, returned as ``(dK, db)``.

        ``x`` ``(batch, s_1, ..., s_n, C)``, ``delta`` ``(batch, o_1, ..., o_n, F)``:
        ``kernel_products`` for one vector per sample, ``Vec(X_patch^T Delta)`` summed over the
        batch in one matmul.
        """
        gradient = self.kernel_products(x, delta[None])[0]  # (M + 1, F)
        kernel_gradient = ops.reshape(gradient[:-1], self.kernel_shape)
        return (kernel_gradient, gradient[-1]) if tied_bias else kernel_gradient
