"""The Toeplitz matrix of a 2-D convolution (docs/math.md, Lemmas 2 and 3), and its index maps.

A convolution (the cross-correlation deep-learning frameworks compute: the kernel is not flipped)
is linear in its input. For a channels_last input ``x`` of shape ``(H, W, C)`` and a kernel ``K`` of
shape ``(kh, kw, C, F)``:

    vec(conv2d(x, K)) = T(K) vec(x),    T(K) of shape (H_out W_out F) x (H W C),

``vec`` being the row-major flattening of ``tf_jacbp.layout``: row ``(i, j, f)`` of ``T`` is an
output position, column ``(i', j', c)`` an input position. Entry by entry, with strides ``s``,
dilation ``d`` and the padding ``pad_top``, ``pad_left`` of ``tf_jacbp.geometry.padding_before``:

    T[(i, j, f), (i', j', c)] = K[p, q, c, f]   if i' = i s_h - pad_top + p d_h  (0 <= p < kh)
                                                and j' = j s_w - pad_left + q d_w (0 <= q < kw),
                              = 0               otherwise.

Lemma 2's ``3 x 3`` input and ``2 x 2`` kernel give the ``4 x 9`` matrix of docs/math.md.
The window arithmetic (taps, paddings, output sizes, argument checks) is
``tf_jacbp.geometry``'s, shared with the pooling layers; this module builds ``T`` from it.

The map from entries of ``T`` to entries of ``Vec(K)`` (``tf_jacbp.layout``: column-major over
the kernel as stored) depends only on the shapes, so ``ConvIndex`` computes it once in NumPy
(``conv_index`` caches one per configuration), and ``T`` is rebuilt from the current kernel by
gathering from ``[Vec(K); 0]``, the appended zero serving every structural zero of ``T``:

* ``ConvIndex.entry_index``: the definition, one ``Vec(K)`` position per entry of ``T``.
* ``ConvIndex.transpose_matrix``: the same map factored, because ``T`` is block Toeplitz with
  Toeplitz blocks. The block of ``T^T`` for input row ``i'`` and output row ``i`` is the
  one-dimensional Toeplitz matrix of kernel row ``p`` (or zero), so ``T^T`` is two gathers of
  whole rows: kernel rows ``K[p, q, c, :]`` into the blocks, then block rows into ``T^T``. For
  LeNet-5's first layer (``T`` of ``4704 x 784``) one gather per entry takes about 70 ms on two
  CPU cores, the two row gathers 2-5 ms: this is what makes a new ``T`` at every step
  affordable.
* ``ConvIndex.sparse_matrix``: only the structural nonzeros, for the memory guard.
* ``ConvIndex.patches``: the patch matrix (im2col), ``J_{Vec(K)} (T(K) vec(x))`` of Lemma 3.
  ``ConvIndex.kernel_products`` (the kernel and tied bias products for ``V`` stacked upstream
  vectors, summed over the batch or per sample) multiplies by the same matrix gathered with its
  columns in ``K``'s storage order (``stored_patches``), plus the tied bias' row of ones.

Memory guard: a budget in bytes, ``DEFAULT_BUDGET_BYTES``, changed for the whole process by
``set_budget_bytes`` or per layer by ``Conv2D(toeplitz_budget_bytes=...)``. ``conv_matrix``
compares the dense ``T`` it returns (``(H_out W_out F) (H W C)`` entries) with it. A layer
compares the peak of a whole training step (``ConvIndex.step_bytes``: ``T``, its index maps,
which a traced graph holds as constants in several copies, one sample's tensors) and, over
budget, falls back to the sparse ``T`` with a warning, or raises (``use_sparse``).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp._backend import tf
from tf_jacbp.geometry import PADDINGS_1D, as_pair, axis_taps, check_padding, check_window_fits
from tf_jacbp.layout import vec_index, vec_parameter

DEFAULT_BUDGET_BYTES = 256 * 2**20
"""The default budget, 256 MiB: a larger dense ``T(K)`` is kept sparse instead, and one whose
sparse form is larger still is an error (``set_budget_bytes``,
``Conv2D(toeplitz_budget_bytes)``)."""

# Bytes per structural nonzero of the sparse representation beyond its value: the (row, column)
# pair of int64 indices a tf.SparseTensor stores.
SPARSE_INDEX_BYTES = 16

GRAPH_CONSTANT_COPIES = 16
"""How many copies of an index map a compiled training step holds at its peak. The maps enter
traced graphs as constants (so that exported SavedModels keep them), and TensorFlow copies a
constant's bytes at each stage: the NumPy array, the graph's node, the function library, the
optimized graph, the executor's kernel. Measured on TensorFlow 2.21 (``tf.function`` gathering
with a 40 MB constant: 15 times its size at the peak of its first call)."""

SPARSE_STEP_BYTES_PER_NONZERO = 480
"""Peak bytes per structural nonzero of a training step on the sparse route, beyond the value
itself: the int64 ``(row, column)`` pairs and int32 positions as graph constants (20 bytes,
``GRAPH_CONSTANT_COPIES`` times), the copies ``tf.sparse.sparse_dense_matmul`` and its adjoint
make, and the NumPy build. Measured on TensorFlow 2.21 with ``Model.train_on_batch``, 330 to 470
bytes for sizes from 64 x 64 to 384 x 384 (the more often a step reads the maps, the more)."""

STEP_OVERHEAD_BYTES = 4 * 2**20
"""What tracing a new layer's training step costs whatever its size (measured: 1.5-2.5 MiB)."""

_budget_bytes: int | None = None


def set_budget_bytes(budget: int | None) -> None:
    """Set the process-wide Toeplitz memory budget in bytes; ``None`` restores the default.

    Layers read it when they are built; a ``Conv2D(toeplitz_budget_bytes=...)`` overrides it. The
    guard runs for each input size a layer builds ``T(K)`` for (at build, or at the first call
    with that size for inputs of varying size; as a run-time assertion on the dense ``T`` when a
    traced function does not know the size, ``tf_jacbp.toeplitz_dynamic``).
    """
    global _budget_bytes
    if budget is not None:
        check_budget(budget, "set_budget_bytes")
    _budget_bytes = budget


def get_budget_bytes() -> int:
    """The process-wide Toeplitz memory budget in bytes (``DEFAULT_BUDGET_BYTES`` unless set)."""
    return DEFAULT_BUDGET_BYTES if _budget_bytes is None else _budget_bytes


def check_budget(budget: Any, owner: str) -> int:
    """``budget`` if it is a positive integer number of bytes, else a ValueError naming it."""
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget <= 0:
        raise ValueError(
            f"{owner}: the Toeplitz budget must be a positive integer number of bytes, got "
            f"{budget!r}. For example 256 * 2**20 for 256 MiB."
        )
    return int(budget)


def _inverse_taps(taps: np.ndarray, size: int) -> np.ndarray:
    """``(size, out)``: the tap ``t`` with ``taps[o, t] == i`` (input ``i``, output ``o``) or -1."""
    inverse = np.full((size, taps.shape[0]), -1, dtype=np.int64)
    outs, ts = np.nonzero(taps >= 0)
    inverse[taps[outs, ts], outs] = ts
    return inverse


class IndexTensors:
    """Named integer index maps (NumPy, computed once) handed to TensorFlow as tensors.

    Each map is given as an array or as a function computing it, called on first use (so a
    layer holds only the maps its route reads). ``maps[name]`` is a constant of the graph being
    traced (one per graph, however often it is read), so that traced functions, custom gradients
    and exported SavedModels hold the map itself (a custom gradient that captures an eager tensor
    cannot be exported); executing eagerly, it is a tensor created once and cached.
    """

    def __init__(self, **arrays: np.ndarray | Callable[[], np.ndarray]):
        self._sources = arrays
        self.arrays: dict[str, np.ndarray] = {}
        self._eager: dict[str, tf.Tensor] = {}
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def array(self, name: str) -> np.ndarray:
        """The NumPy map ``name``, computed on first use."""
        if name not in self.arrays:
            source = self._sources[name]
            self.arrays[name] = source() if callable(source) else source
        return self.arrays[name]

    def __getitem__(self, name: str) -> tf.Tensor:
        if tf.executing_eagerly():
            cache = self._eager
        else:  # one constant per graph, however often the graph reads the map
            cache = self._graphs.setdefault(tf.compat.v1.get_default_graph(), {})
        if name not in cache:
            cache[name] = tf.constant(self.array(name))
        return cache[name]


def static_size(t: tf.Tensor, axis: int) -> int | tf.Tensor:
    """``t.shape[axis]`` where it is known when traced, else the runtime size."""
    size = t.shape[axis]
    return int(size) if size is not None else tf.shape(t)[axis]


def toeplitz_product(
    rows: tf.Tensor, t: tf.Tensor | tf.SparseTensor, transpose: bool = False
) -> tf.Tensor:
    """``rows t`` (``transpose``: ``rows t^T``) for ``t`` as a layer holds it: the dense
    ``T(K)^T`` (``ToeplitzProducts.transpose_matrix``) or, kept sparse by the memory guard,
    ``T(K)`` itself (``ConvIndex.sparse_matrix``), which is then multiplied through its adjoint:
    ``rows T^T = (T rows^T)^T`` and ``rows T = (T^T rows^T)^T``.

    ``rows`` ``(n, a)``; dense ``t`` ``(a, c)`` (``(c, a)`` with ``transpose``); the result is
    ``(n, c)``. A convolution's forward pass is ``X T(K)^T`` (``transpose=False``) and its input
    product ``Delta T(K)`` (``transpose=True``); ``Conv2DTranspose`` the other way round.
    """
    if isinstance(t, tf.SparseTensor):  # tf.sparse has no XLA kernel; the guard allows that
        product = tf.sparse.sparse_dense_matmul(t, rows, adjoint_a=transpose, adjoint_b=True)
        return tf.transpose(product)
    return tf.matmul(rows, t, transpose_b=transpose)


class ToeplitzProducts:
    """The products with ``T(K)`` and the patch matrix, written once for any source of the index
    maps: ``ConvIndex`` (NumPy, computed once per size) and
    ``tf_jacbp.toeplitz_dynamic.DynamicConvIndex`` (TensorFlow ops, for a size known only when a
    traced graph runs).

    A subclass sets ``input_shape`` ``(H, W, C)``, ``kernel_shape`` ``(kh, kw, C, F)``,
    ``output_shape`` ``(H_out, W_out, F)`` and ``shape`` ``(R, N)`` (sizes that are ints, or
    int32 scalar tensors), and ``index_map(name)`` returning the int32 map ``name`` flattened
    as documented at ``ConvIndex.block_index``, ``patch_index`` and ``stored_patch_index``:
    ``kernel_rows`` and ``block_rows`` flattened, the patch maps ``(M, P)`` and ``(M + 1, P)``.
    """

    input_shape: tuple
    kernel_shape: tuple[int, int, int, int]
    output_shape: tuple
    shape: tuple

    def index_map(self, name: str) -> tf.Tensor:
        """The int32 index map ``name`` (``kernel_rows``, ``block_rows``, ``patch_index`` or
        ``stored_patch_index``)."""
        raise NotImplementedError

    def _kernel_matrix(self, kernel: tf.Tensor) -> tf.Tensor:
        """``(M + 1, F)``: ``K`` reshaped to ``(kh kw C, F)`` (row ``(p, q, c)`` holds
        ``K[p, q, c, :]``, no copy) and a zero row appended."""
        filters = self.kernel_shape[3]
        rows = tf.reshape(kernel, [-1, filters])
        return tf.concat([rows, tf.zeros([1, filters], kernel.dtype)], axis=0)

    def transpose_matrix(self, kernel: tf.Tensor) -> tf.Tensor:
        """``T(K)^T`` ``(N, R)``, dense, built by two row gathers from ``K`` (``block_index``).

        First the one-dimensional Toeplitz blocks ``B[p, c, j'] = (K[p, q(j', j), c, f])_{j, f}``
        (zero where ``q`` is no tap), ``(kh C W + 1, W_out F)`` ending with a zero row; then
        ``T^T[(i', j', c), (i, j, f)] = B[p(i', i), c, j'][(j, f)]``.
        """
        _, width, channels = self.input_shape
        kh = self.kernel_shape[0]
        _, w_out, filters = self.output_shape
        blocks = tf.reshape(
            tf.gather(self._kernel_matrix(kernel), self.index_map("kernel_rows")),
            [kh * channels * width + 1, w_out * filters],
        )
        block_rows = self.index_map("block_rows")
        return tf.reshape(tf.gather(blocks, block_rows), [self.shape[1], self.shape[0]])

    def matrix(self, kernel: tf.Tensor) -> tf.Tensor:
        """``T(K)`` ``(R, N)``, dense: the transpose of ``transpose_matrix``."""
        return tf.transpose(self.transpose_matrix(kernel))

    def patches(self, x: tf.Tensor) -> tf.Tensor:
        """The patch matrices of a batch, transposed: ``(batch, H, W, C)`` -> ``(M, P * batch)``.

        Column ``(i, j, b)`` holds the patch that output position ``(i, j)`` of sample ``b`` reads,
        its rows in ``Vec`` order within a filter (``patch_index``); padding reads zeros. For one
        sample this is ``X_patch^T`` with ``J_{Vec(K)} (T(K) vec(x)) = I_F (x) X_patch`` (Lemma 3).
        """
        columns = tf.transpose(tf.reshape(x, [-1, self.shape[1]]))  # (N, batch)
        columns = tf.concat([columns, tf.zeros_like(columns[:1])], axis=0)
        patches = tf.gather(columns, self.index_map("patch_index"))  # (M, P, batch)
        return tf.reshape(patches, [tf.shape(patches)[0], -1])

    def stored_patches(self, images: tf.Tensor, bias_row: bool = True) -> tf.Tensor:
        """The patch matrices of ``V`` stacked image batches, rows in ``K``'s storage order:
        ``(V, batch, H, W, C)`` (or ``(V, batch, N)``) -> ``(V, M + 1, P, batch)``.

        Entry ``[v, m, p, b]`` is the input entry that kernel row ``m = (p', q', c)`` (``K``
        reshaped to ``(M, F)``, no copy) reads at output position ``p`` of image ``(v, b)``, zero
        in the padding (``stored_patch_index``); the last row ``m = M`` is the constant 1 that the
        tied bias multiplies (``J_b z = I_F`` stacked ``P`` times is the patch of 1). Without
        ``bias_row`` that row is left out: ``(V, M, P, batch)``. For one image this is
        ``[X_patch | 1]^T`` with ``J_{Vec(K)} (T(K) vec(x)) = I_F (x) X_patch`` (Lemma 3). The
        batch goes last: one gather of whole rows, and the product over samples and positions
        is one matmul ``(M + 1, P batch)`` (measured faster, per sample too, than gathering
        batch-major, which gathers along an inner axis).
        """
        stacks, batch = tf.shape(images)[0], tf.shape(images)[1]
        columns = tf.transpose(tf.reshape(images, [stacks, batch, -1]), [0, 2, 1])  # (V, N, b)
        one_and_zero = tf.broadcast_to(
            tf.constant([[1], [0]], images.dtype)[None], [stacks, 2, batch]
        )
        columns = tf.concat([columns, one_and_zero], axis=1)  # rows N (ones) and N + 1 (zeros)
        index = self.index_map("stored_patch_index")
        return tf.gather(columns, index if bias_row else index[:-1], axis=1)

    def kernel_products(self, x: tf.Tensor, m: tf.Tensor, sum_batch: bool = True) -> tf.Tensor:
        """``(J_{Vec(K), b} z)^T m`` for ``V`` stacked upstream vectors per sample, as ``K``'s
        rows and the tied bias: ``(V, M + 1, F)``, or per sample ``(V, batch, M + 1, F)``.

        ``x`` ``(batch, H, W, C)``, ``m`` ``(V, batch, H_out, W_out, F)``. Per sample and vector
        the product is ``[X_patch | 1]^T M_{v, b}`` (``stored_patches``, ``M_{v, b}`` the
        ``P x F`` matrix of ``m[v, b]``): rows ``(p, q, c)`` are ``dK[p, q, c, :]`` (``K``
        reshaped to ``(M, F)``), row ``M`` is the tied bias' ``db`` (``M_{v, b}`` summed over
        positions). The ``V`` vectors ride along with the filters (``V F`` columns; moving the
        axis of ``V = 1`` copies nothing): summed over the batch one matmul
        ``(M + 1, P batch) x (P batch, V F)``, per sample one batched product ``"mpb,bpg->bmg"``.
        """
        patches = self.stored_patches(x[None])[0]  # (M + 1, P, batch)
        entries, positions = patches.shape[0], self.output_shape[0] * self.output_shape[1]
        filters, stacks = self.kernel_shape[3], static_size(m, 0)
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
        self, x: tf.Tensor, delta: tf.Tensor, tied_bias: bool = False
    ) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
        """``dK = sum_b (J_{Vec(K)} T(K) vec(x_b))^T delta_b``, shaped like ``K``; with
        ``tied_bias`` also ``db = sum_b (J_b z_b)^T delta_b``, returned as ``(dK, db)``.

        ``x`` ``(batch, H, W, C)``, ``delta`` ``(batch, H_out, W_out, F)``: ``kernel_products``
        for one vector per sample, ``Vec(X_patch^T Delta)`` summed over the batch in one matmul.
        """
        gradient = self.kernel_products(x, delta[None])[0]  # (M + 1, F)
        kernel_gradient = tf.reshape(gradient[:-1], self.kernel_shape)
        return (kernel_gradient, gradient[-1]) if tied_bias else kernel_gradient


class ConvIndex(ToeplitzProducts):
    """The index maps of ``T(K)`` for one configuration, computed once in NumPy.

    Build it with ``conv_index`` (validated and cached), not directly. Shapes: input
    ``(H, W, C)``, kernel ``(kh, kw, C, F)``, output ``(H_out, W_out, F)``; ``T`` is ``R x N`` with
    ``R = H_out W_out F`` and ``N = H W C``; ``P = H_out W_out`` output positions; ``M = kh kw C``
    entries per filter. The NumPy maps are computed on first use and kept.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        kernel_shape: tuple[int, int, int, int],
        strides: tuple[int, int],
        padding: str,
        dilation_rate: tuple[int, int],
    ):
        self.input_shape = input_shape
        self.kernel_shape = kernel_shape
        self.strides = strides
        self.padding = padding
        self.dilation_rate = dilation_rate
        height, width, _ = input_shape
        kh, kw, _, filters = kernel_shape
        self.taps_h = axis_taps(height, kh, strides[0], padding, dilation_rate[0])
        self.taps_w = axis_taps(width, kw, strides[1], padding, dilation_rate[1])
        self.output_shape = (self.taps_h.shape[0], self.taps_w.shape[0], filters)
        self.shape = (int(np.prod(self.output_shape)), int(np.prod(input_shape)))
        # Structural nonzeros: (valid (i, p) pairs) x (valid (j, q) pairs) x C x F.
        self.nnz = int(
            (self.taps_h >= 0).sum() * (self.taps_w >= 0).sum() * kernel_shape[2] * filters
        )

    def dense_bytes(self, dtype: Any) -> int:
        """Bytes of a dense ``T``: ``R N`` entries of ``dtype``."""
        return self.shape[0] * self.shape[1] * tf.as_dtype(dtype).size

    def sparse_bytes(self, dtype: Any) -> int:
        """Bytes of a sparse ``T``: per structural nonzero its value and int64 (row, column)."""
        return self.nnz * (tf.as_dtype(dtype).size + SPARSE_INDEX_BYTES)

    def step_bytes(self, dtype: Any, sparse: bool) -> int:
        """The peak bytes a training step of one sample (forward and backward pass) adds for this
        layer with a dense or a sparse ``T``: what the memory guard compares with its budget.

        With ``s`` the bytes of ``dtype``, ``P = H_out W_out`` positions, ``M = kh kw C``:

        * ``T``: dense, ``R N s`` plus its int32 index maps ``kernel_rows`` and ``block_rows``
          (``(kh C W + 1) W_out + N H_out`` entries); sparse, ``nnz (s +``
          ``SPARSE_STEP_BYTES_PER_NONZERO)``;
        * the int32 patch maps of the kernel gradient and of ``patches`` (``(2 M + 1) P``);
        * every index map ``GRAPH_CONSTANT_COPIES`` times (graph constants) plus its NumPy array;
        * one sample's ``x``, ``z``, their gradients and patch matrix
          (``(2 (N + R) + (M + 1) P) s``), and ``STEP_OVERHEAD_BYTES``.

        Each further sample of a batch adds about its share of the last item, as for any layer.
        Measured with ``Model.train_on_batch`` (``tests/system/test_memory_guard.py``), the peak
        growth of the process stays below this.
        """
        size = tf.as_dtype(dtype).size
        _, width, channels = self.input_shape
        kh, kw, _, filters = self.kernel_shape
        rows, columns = self.shape
        positions, entries = rows // filters, kh * kw * channels
        maps = 4 * (2 * entries + 1) * positions
        if sparse:
            matrix = self.nnz * (size + SPARSE_STEP_BYTES_PER_NONZERO)
        else:
            matrix = rows * columns * size
            maps += 4 * ((kh * channels * width + 1) * self.output_shape[1])
            maps += 4 * columns * self.output_shape[0]
        one_sample = (2 * (columns + rows) + (entries + 1) * positions) * size
        return matrix + (GRAPH_CONSTANT_COPIES + 1) * maps + one_sample + STEP_OVERHEAD_BYTES

    @functools.cached_property
    def _sparse_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, positions)``: ``(nnz, 2)`` int64 ``(row, column)`` pairs and ``(nnz,)`` int32
        ``Vec(K)`` positions, with ``T[indices[k]] = Vec(K)[positions[k]]`` (``nonzeros``)."""
        _, width, channels = self.input_shape
        _, w_out, filters = self.output_shape
        vec = vec_index(self.kernel_shape).astype(np.int32)
        # Axes (i, j, f, p, q, c): rows (i, j, f) row-major, then columns increase with (p, q, c).
        i, j, f, p, q, c = np.ix_(
            *(np.arange(n) for n in (*self.output_shape, *self.kernel_shape[:3]))
        )
        in_i, in_j = self.taps_h[i, p], self.taps_w[j, q]
        valid = np.broadcast_to(
            (in_i >= 0) & (in_j >= 0), (*self.output_shape, *self.kernel_shape[:3])
        )
        indices = np.empty((self.nnz, 2), dtype=np.int64)
        indices[:, 0] = np.broadcast_to((i * w_out + j) * filters + f, valid.shape)[valid]
        indices[:, 1] = np.broadcast_to((in_i * width + in_j) * channels + c, valid.shape)[valid]
        positions = np.broadcast_to(vec[p, q, c, f], valid.shape)[valid]
        return indices, positions

    @property
    def nonzeros(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, cols, positions)``, each ``(nnz,)``, with
        ``T[rows[k], cols[k]] = Vec(K)[positions[k]]``.

        Sorted by row, then column (the canonical order of a ``tf.SparseTensor``).
        """
        indices, positions = self._sparse_arrays
        return indices[:, 0], indices[:, 1], positions

    @functools.cached_property
    def entry_index(self) -> np.ndarray:
        """``(R, N)``: the ``Vec(K)`` position of each entry of ``T``, or ``size(K)`` (the appended
        zero). The definition, for tests and teaching: training uses ``block_index``."""
        index = np.full(self.shape, int(np.prod(self.kernel_shape)), dtype=np.int64)
        rows, cols, positions = self.nonzeros
        index[rows, cols] = positions
        return index

    @functools.cached_property
    def block_index(self) -> tuple[np.ndarray, np.ndarray]:
        """The two row-gather maps of ``transpose_matrix`` (int32).

        * ``kernel_rows`` ``(kh C W + 1, W_out)``: for block row ``(p, c, j')`` and output column
          ``j``, the row of ``K[p, q, c, :]`` in ``K`` reshaped to ``(kh kw C, F)`` (its storage
          order: row ``(p kw + q) C + c``), with ``j' = j s_w - pad_left + q d_w``; or ``M`` (an
          appended zero row) where no tap ``q`` reads ``j'``. The last block row is all ``M``: the
          zero block.
        * ``block_rows`` ``(H, W, C, H_out)``: for row ``(i', j', c)`` of ``T^T`` and output row
          ``i``, the block row ``(p, c, j')`` (flattened) with ``i' = i s_h - pad_top + p d_h``; or
          ``kh C W`` (the zero block row). With ``N H_out`` entries it is the largest map of the
          dense route, so it is built in place, in int32.
        """
        height, width, channels = self.input_shape
        kh, kw = self.kernel_shape[:2]
        stored = np.arange(kh * kw * channels).reshape(kh, kw, channels)  # row of K[p, q, c, :]
        inv_h = _inverse_taps(self.taps_h, height).astype(np.int32)  # (H, H_out) -> p
        inv_w = _inverse_taps(self.taps_w, width)  # (W, W_out) -> q
        p, c = np.arange(kh)[:, None, None, None], np.arange(channels)[None, :, None, None]
        q = inv_w[None, None, :, :]
        kernel_rows = np.where(q >= 0, stored[p, np.maximum(q, 0), c], kh * kw * channels)
        kernel_rows = np.concatenate(
            [kernel_rows.reshape(-1, kernel_rows.shape[-1]), np.full((1, q.shape[-1]), stored.size)]
        ).astype(np.int32)
        p = inv_h[:, None, None, :]
        c = np.arange(channels, dtype=np.int32)[None, None, :, None]
        j_in = np.arange(width, dtype=np.int32)[None, :, None, None]
        block_rows = (np.maximum(p, 0) * channels + c) * width + j_in
        block_rows[np.broadcast_to(p < 0, block_rows.shape)] = kh * channels * width
        return kernel_rows, block_rows

    @functools.cached_property
    def patch_index(self) -> np.ndarray:
        """``(M, P)`` int32: the input position (row-major ``(i', j', c)``) kernel entry ``m``
        reads at output position ``(i, j)``, or ``N`` (the padding, an appended zero). Rows ``m``
        in ``Vec`` order within a filter (``m = p + kh (q + kw c)``, ``tf_jacbp.layout``)."""
        height, width, channels = self.input_shape
        taps_h, taps_w = self.taps_h.astype(np.int32), self.taps_w.astype(np.int32)
        in_i = taps_h.T[:, None, None, :, None]  # (kh, 1, 1, H_out, 1)
        in_j = taps_w.T[None, :, None, None, :]  # (1, kw, 1, 1, W_out)
        c = np.arange(channels, dtype=np.int32)[None, None, :, None, None]
        index = (in_i * width + in_j) * channels + c
        index[np.broadcast_to((in_i < 0) | (in_j < 0), index.shape)] = height * width * channels
        index = index.reshape(-1, self.output_shape[0] * self.output_shape[1])  # rows (p, q, c)
        vec = vec_index(self.kernel_shape)[..., 0].reshape(-1)
        out = np.empty_like(index)
        out[vec] = index
        return out

    @functools.cached_property
    def stored_patch_index(self) -> np.ndarray:
        """``(M + 1, P)`` int32: ``patch_index`` with its rows in ``K``'s storage order
        ``(p, q, c)`` (row-major, the rows of ``K`` reshaped to ``(M, F)``) instead of ``Vec``
        order, padding reading ``N + 1`` instead of ``N``, and a last row reading ``N``: the
        constant 1 that the tied bias multiplies (``kernel_gradient``)."""
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

    def sparse_matrix(self, kernel: tf.Tensor) -> tf.SparseTensor:
        """``T(K)`` ``(R, N)`` as a ``tf.SparseTensor`` of its ``nnz`` structural nonzeros.

        The values are gathered from ``Vec(K)`` (``nonzeros``). Not XLA-compatible.
        """
        t = self._sparse_tensors
        values = tf.gather(vec_parameter(kernel), t["positions"])
        return tf.SparseTensor(t["indices"], values, self.shape)

    def index_map(self, name: str) -> tf.Tensor:
        """The index map ``name`` as an int32 tensor (``IndexTensors``: a graph constant)."""
        return self._tensors[name]


def validate(
    kernel_shape: Sequence[int],
    input_shape: Sequence[int],
    strides: Any,
    padding: Any,
    dilation_rate: Any,
    owner: str = "conv_matrix",
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int], str, tuple[int, int]]:
    """Check and normalize the arguments of ``conv_index``; ValueErrors name argument and fix."""
    kernel_shape = tuple(kernel_shape)
    input_shape = tuple(input_shape)
    if len(kernel_shape) != 4 or any(
        not isinstance(n, int | np.integer) or n < 1 for n in kernel_shape
    ):
        raise ValueError(
            f"{owner}: kernel must have shape (kh, kw, C_in, C_out) with positive sizes, got "
            f"kernel shape {kernel_shape}."
        )
    if len(input_shape) != 3 or any(
        not isinstance(n, int | np.integer) or n < 1 for n in input_shape
    ):
        raise ValueError(
            f"{owner}: input_shape must be (H, W, C_in) with known positive sizes (no batch axis), "
            f"got input_shape={input_shape}."
        )
    if input_shape[2] != kernel_shape[2]:
        raise ValueError(
            f"{owner}: the kernel reads {kernel_shape[2]} input channels (kernel shape "
            f"{kernel_shape}) but input_shape={input_shape} has {input_shape[2]}."
        )
    strides = as_pair(strides, "strides", owner)
    dilation_rate = as_pair(dilation_rate, "dilation_rate", owner)
    padding = check_padding(padding, owner, PADDINGS_1D)
    check_window_fits(input_shape, kernel_shape[:2], padding, owner, "kernel_size", dilation_rate)
    return (
        tuple(int(n) for n in kernel_shape),
        tuple(int(n) for n in input_shape),
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
    strides: Any = (1, 1),
    padding: str = "valid",
    dilation_rate: Any = (1, 1),
    owner: str = "conv_index",
) -> ConvIndex:
    """The (cached) ``ConvIndex`` of a configuration, after ``validate`` (errors name ``owner``)."""
    kernel_shape, input_shape, strides, padding, dilation_rate = validate(
        kernel_shape, input_shape, strides, padding, dilation_rate, owner
    )
    return _cached_index(input_shape, kernel_shape, strides, padding, dilation_rate)


def budget_error(
    owner: str, index: ConvIndex, dtype: Any, budget: int, setting: str, step: bool = True
) -> ValueError:
    """The error for a ``T`` over budget: its sizes dense and sparse, with ``step`` (a layer's
    guard) those of a training step with it, the budget and the setting to change."""
    dense, sparse = index.dense_bytes(dtype), index.sparse_bytes(dtype)
    needs = ""
    if step:
        dense_step, sparse_step = index.step_bytes(dtype, False), index.step_bytes(dtype, True)
        needs = (
            f"; a training step with it, its index maps and one sample needs about "
            f"{dense_step / 2**20:.1f} MiB dense and {sparse_step / 2**20:.1f} MiB sparse"
        )
    return ValueError(
        f"{owner}: the Toeplitz matrix T(K) of shape {index.shape} ({tf.as_dtype(dtype).name}) "
        f"takes {dense} bytes ({dense / 2**20:.1f} MiB) dense and {sparse} bytes "
        f"({sparse / 2**20:.1f} MiB) sparse ({index.nnz} nonzeros){needs}, over the budget of "
        f"{budget} bytes ({budget / 2**20:.1f} MiB). Raise it with {setting}, or use a smaller "
        "input."
    )


def use_sparse(index: ConvIndex, dtype: Any, budget: int, owner: str, setting: str) -> bool:
    """The memory guard of a layer that multiplies by ``T(K)``: whether ``T`` must be sparse.

    False when a training step with a dense ``T`` fits ``budget`` (``ConvIndex.step_bytes``);
    True, with a warning, when only the sparse route fits (``tf.sparse.sparse_dense_matmul``:
    slower, and not XLA-compatible); a ValueError (``budget_error``, naming ``setting``) when
    neither does.
    """
    if index.step_bytes(dtype, sparse=False) <= budget:
        return False
    if index.step_bytes(dtype, sparse=True) > budget:
        raise budget_error(owner, index, dtype, budget, setting)
    warnings.warn(
        f"{owner}: a training step with a dense T(K) of shape {index.shape} needs about "
        f"{index.step_bytes(dtype, sparse=False) / 2**20:.1f} MiB, over the Toeplitz budget of "
        f"{budget / 2**20:.1f} MiB; using a sparse T instead (about "
        f"{index.step_bytes(dtype, sparse=True) / 2**20:.1f} MiB). The sparse product is slower "
        f"and cannot be compiled with XLA (jit_compile=True is turned off for the model). Raise "
        f"the budget with {setting} to keep T dense.",
        stacklevel=3,
    )
    return True


def conv_matrix(
    kernel: Any,
    input_shape: Sequence[int],
    strides: Any = (1, 1),
    padding: str = "valid",
    dilation_rate: Any = (1, 1),
    budget_bytes: int | None = None,
) -> tf.Tensor:
    """The dense Toeplitz matrix ``T(K)`` with ``T(K) @ vec(x) == vec(conv2d(x, K))``.

    Args:
        kernel: ``K``, ``(kh, kw, C_in, C_out)`` (Keras' kernel layout).
        input_shape: ``(H, W, C_in)`` of one channels_last input (no batch axis).
        strides, dilation_rate: an int or ``(height, width)``, all >= 1.
        padding: ``"valid"``, ``"same"`` (TensorFlow's rule) or ``"causal"`` (``(k - 1) d`` zeros
            before, along each axis), as in ``tf_jacbp.geometry``.
        budget_bytes: refuse a ``T`` larger than this (default ``get_budget_bytes()``).

    Returns:
        ``T(K)``, ``(H_out W_out C_out, H W C_in)`` in ``kernel``'s dtype; rows are output positions
        ``(i, j, f)``, columns input positions ``(i', j', c)``, both row-major (module docstring).

    Example (Lemma 2: a ``3 x 3`` input, the ``2 x 2`` kernel ``[[1, 2], [3, 4]]``):
        >>> conv_matrix(np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1), (3, 3, 1))[0]
        <tf.Tensor: shape=(9,), dtype=float64, numpy=array([1., 2., 0., 3., 4., 0., 0., 0., 0.])>
    """
    kernel = tf.convert_to_tensor(kernel)
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
