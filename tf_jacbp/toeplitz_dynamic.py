"""The index maps of ``T(K)`` for an input size known only when a traced graph runs.

Keras' ``fit`` traces its step with ``reduce_retracing=True``: after a second image size it
traces once more with the spatial sizes unknown (``keras.Input((None, None, C))``), and a
``tf.function`` with an ``input_signature`` of unknown size does the same. ``ConvIndex``
(``tf_jacbp.toeplitz``) computes its maps in NumPy for one static size, so it cannot serve that
trace. ``DynamicConvIndex`` computes the very same maps, for any number of spatial axes, with
TensorFlow ops from the runtime sizes (``tf.shape(x)[1:-1]``), entry for entry
(``tests/test_toeplitz.py`` compares them with the static maps exactly), and multiplies through
``ToeplitzProducts``, the code ``ConvIndex`` runs: ``T(K)^T`` is still materialized dense by the
two row gathers, then multiplied.

The maps, along one axis with ``out`` outputs, stride ``s``, dilation ``d``, ``k`` taps and
``pad_before`` (``tf_jacbp.geometry``; "same" and "causal" need the size, so they are tensors):

* taps: ``taps[o, t] = o s - pad_before + t d``, or -1 outside ``[0, size)``;
* the inverse: for input ``i'`` and output ``o``, the tap ``t = (i' - o s + pad_before) / d``
  when that is an integer in ``[0, k)``, else -1;
* ``kernel_rows``, ``block_rows``, ``patch_index``, ``stored_patch_index``: the formulas of
  ``ConvIndex.block_index``, ``patch_index`` and ``stored_patch_index`` applied to these.

The memory guard cannot run at trace time: ``transpose_matrix`` first asserts, when the graph
runs, that the dense ``T`` (``R N`` entries) fits the layer's budget, an InvalidArgumentError
naming the size and the budget otherwise; there is no sparse fallback on this route. A "valid"
window longer than the input is likewise a run-time InvalidArgumentError.

This graph of unknown sizes stays TensorFlow (``tf.shape``, ``tf.debugging.Assert``, control
dependencies): it is the backend-specific part of the index, kept in this module.

XLA: ``jit_compile=True`` compiles one program per concrete input shape, where these maps are
constants of the compiled program; the products compile and agree with the static route
(``tests/layers/test_conv.py``). XLA ignores ``tf.debugging.Assert`` (TensorFlow logs "Ignoring
Assert operator"), so under XLA neither run-time check runs: a size over budget is computed
anyway (or fails as an allocation error), and a "valid" window longer than the input gives an
empty output instead of an error. Measured on TensorFlow 2.21.
"""

from __future__ import annotations

import math
from typing import Any

from tf_jacbp._backend import tf
from tf_jacbp.toeplitz import ToeplitzProducts


def axis_taps(
    size: tf.Tensor, kernel_size: int, stride: int, padding: str, dilation: int = 1
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``tf_jacbp.geometry.axis_taps`` with TensorFlow ops for a runtime ``size`` (int32 scalar).

    Returns ``(taps, pad_before, pad_after)``: ``taps`` ``(out, k)`` as ``geometry.axis_taps``,
    the padding as ``geometry.padding_amounts``. A "valid" axis shorter than the dilated kernel
    asserts. ``inverse_taps`` gives the inverse map, ``(size, out)``, which the dense ``T`` needs.
    """
    extent = (kernel_size - 1) * dilation + 1
    checks = []
    if padding == "valid":
        out = (size - extent) // stride + 1
        before = after = tf.zeros([], tf.int32)
        message = (
            f"a kernel spanning {extent} (kernel_size {kernel_size}, dilation_rate {dilation}) "
            "is longer than an input axis, so padding valid has no output; use padding "
            "same, a smaller kernel_size or a larger input. Input size:"
        )
        checks.append(tf.debugging.Assert(size >= extent, [message, size]))
    else:
        out = (size + stride - 1) // stride
        if padding == "same":
            total = tf.maximum((out - 1) * stride + extent - size, 0)
            before, after = total // 2, total - total // 2
        else:  # causal
            before, after = tf.constant((kernel_size - 1) * dilation), tf.zeros([], tf.int32)
    with tf.control_dependencies(checks):
        outputs = tf.identity(out)
    taps = _starts(outputs, stride, before)[:, None] + tf.range(kernel_size)[None, :] * dilation
    return tf.where((taps >= 0) & (taps < size), taps, -1), before, after


def _starts(outputs: tf.Tensor, stride: int, before: tf.Tensor) -> tf.Tensor:
    """``(out,)``: the first input each output reads, ``o s - pad_before``."""
    return tf.range(outputs) * stride - before


def inverse_taps(
    size: tf.Tensor,
    outputs: tf.Tensor,
    kernel_size: int,
    stride: int,
    before: tf.Tensor,
    dilation: int = 1,
) -> tf.Tensor:
    """``(size, out)``: for input ``i'`` and output ``o`` the tap ``t = (i' - o s + pad_before)
    / d`` when that is an integer in ``[0, k)``, else -1 (``tf_jacbp.toeplitz._inverse_taps``).

    ``size x out`` entries, about as many as the dense ``T`` has per channel pair along this
    axis: ``DynamicConvIndex`` builds it only after its memory guard has passed."""
    offset = tf.range(size)[:, None] - _starts(outputs, stride, before)[None, :]
    tap = offset // dilation
    valid = (offset >= 0) & (offset % dilation == 0) & (tap < kernel_size)
    return tf.where(valid, tap, -1)


def _place(t: tf.Tensor, ndim: int, axes: tuple[int, ...]) -> tf.Tensor:
    """``t`` (one axis per entry of ``axes``, increasing) viewed with ``ndim`` axes, its own at
    ``axes`` and size 1 elsewhere, for broadcasting."""
    shape = [1] * ndim
    for i, axis in enumerate(axes):
        shape[axis] = tf.shape(t)[i]
    return tf.reshape(t, tf.stack(shape))


class DynamicConvIndex(ToeplitzProducts):
    """``ConvIndex``'s maps of ``T(K)`` computed with TensorFlow ops for runtime sizes, ``n``
    spatial axes.

    ``DynamicConvIndex(sizes, kernel_shape, strides, padding, dilation_rate, budget, owner,
    setting)``, or for an image ``DynamicConvIndex(height, width, kernel_shape, ...)``:
    ``sizes`` the ``n`` spatial sizes as int32 scalar tensors (``tf.shape(x)[1:-1]``); the
    kernel ``(k_1, ..., k_n, C, F)``, strides and dilation (``n`` ints) static, as the
    configuration. ``input_shape``, ``output_shape`` and ``shape`` hold tensors where the size
    enters. ``budget``: the byte budget the dense ``T`` is asserted against when
    ``transpose_matrix`` runs (None: no check); ``owner`` and ``setting`` name the layer and the
    setting to raise in that message.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        if isinstance(args[0], list | tuple):
            sizes, rest = tuple(args[0]), args[1:]
        else:  # (height, width, kernel_shape, ...)
            sizes, rest = tuple(args[:2]), args[2:]
        self._configure(sizes, *rest, **kwargs)

    def _configure(
        self,
        sizes: tuple[tf.Tensor, ...],
        kernel_shape: tuple[int, ...],
        strides: tuple[int, ...],
        padding: str,
        dilation_rate: tuple[int, ...],
        budget: int | None = None,
        owner: str = "DynamicConvIndex",
        setting: str = "tf_jacbp.toeplitz.set_budget_bytes(...)",
    ) -> None:
        channels, filters = kernel_shape[-2:]
        sizes = tuple(tf.cast(n, tf.int32) for n in sizes)
        if len(sizes) != len(kernel_shape) - 2:
            raise ValueError(
                f"{owner}: {len(sizes)} spatial sizes for a kernel of shape {kernel_shape} "
                f"with {len(kernel_shape) - 2} spatial axes; give one size per spatial axis."
            )
        self.rank = len(sizes)
        self.input_shape = (*sizes, channels)
        self.kernel_shape = tuple(kernel_shape)
        self.strides, self.padding, self.dilation_rate = strides, padding, dilation_rate
        self.budget, self.owner, self.setting = budget, owner, setting
        taps, paddings = [], []
        for size, k, stride, dilation in zip(
            sizes, kernel_shape[:-2], strides, dilation_rate, strict=True
        ):
            axis, *pad = axis_taps(size, k, stride, padding, dilation)
            taps.append(axis)
            paddings.append(tuple(pad))
        self.taps, self.paddings = tuple(taps), tuple(paddings)
        self.output_shape = (*(tf.shape(t)[0] for t in self.taps), filters)
        self.shape = (math.prod(self.output_shape), math.prod(self.input_shape))
        self._maps: dict[str, tf.Tensor] = {}

    def dense_bytes(self, dtype: Any) -> tf.Tensor:
        """Bytes of a dense ``T``, ``R N`` entries of ``dtype``, as an int64 scalar tensor."""
        rows, columns = (tf.cast(n, tf.int64) for n in self.shape)
        return rows * columns * tf.as_dtype(dtype).size

    def guard(self, dtype: Any) -> list[tf.Operation]:
        """The run-time memory guard: an assertion that the dense ``T`` fits ``budget``."""
        if self.budget is None:
            return []
        size = self.dense_bytes(dtype)
        message = (
            f"{self.owner}: for this batch's input size the dense Toeplitz matrix T(K) is over "
            f"the budget of {self.budget} bytes ({self.budget / 2**20:.1f} MiB). Raise it with "
            f"{self.setting}, or use smaller inputs (or a fixed input size, whose T is guarded "
            "when the model is built and may be kept sparse)."
        )
        shown = ["T(K) of shape (R, N) =", self.shape[0], self.shape[1], "takes bytes:", size]
        return [tf.debugging.Assert(size <= self.budget, [message, *shown], summarize=8)]

    def index_map(self, name: str) -> tf.Tensor:
        if name not in self._maps:
            self._maps[name] = getattr(self, f"_{name}")()
        return self._maps[name]

    def transpose_matrix(self, kernel: tf.Tensor) -> tf.Tensor:
        """``T(K)^T`` ``(N, R)``, dense, by ``ToeplitzProducts.transpose_matrix``, after the
        memory guard (``guard``) has passed.

        Everything of size ``T`` waits for the guard: the maps ``kernel_rows`` and
        ``block_rows`` and the inverse taps they are computed from are built inside its control
        dependencies (every op created there runs after the assertion), and so are the two
        gathers. For a sequence the first gather and the inverse taps alone are as large as
        ``T``, so guarding only the last gather (as for an image, whose first is small) would let
        them allocate first."""
        with tf.control_dependencies(self.guard(kernel.dtype)):
            self.index_map("kernel_rows")
            self.index_map("block_rows")
            return super().transpose_matrix(kernel)

    def _inverse(self, axis: int) -> tf.Tensor:
        """``inverse_taps`` along spatial ``axis``, ``(size, out)``."""
        taps, (before, _) = self.taps[axis], self.paddings[axis]
        return inverse_taps(
            self.input_shape[axis],
            tf.shape(taps)[0],
            self.kernel_shape[axis],
            self.strides[axis],
            before,
            self.dilation_rate[axis],
        )

    def _lead_taps(self) -> int:
        return math.prod(self.kernel_shape[:-3])

    def _kernel_rows(self) -> tf.Tensor:
        """``(L C W + 1) o_n``: for block row ``(l, c, j')`` and output column ``j`` the row
        ``(l k_n + q) C + c`` of ``K`` as ``(M, F)``, ``q`` the tap reading ``j'``, else ``M``
        (``ConvIndex.block_index``)."""
        kw, channels = self.kernel_shape[-3], self.kernel_shape[-2]
        q = self._inverse(self.rank - 1)[None, None]  # (1, 1, W, o_n)
        r = tf.range(self._lead_taps())[:, None, None, None]
        c = tf.range(channels)[None, :, None, None]
        rows = tf.where(q >= 0, (r * kw + q) * channels + c, self._entries())  # (L, C, W, o_n)
        rows = tf.reshape(rows, [-1, self.output_shape[-2]])
        zero_block = tf.fill([1, self.output_shape[-2]], self._entries())
        return tf.reshape(tf.concat([rows, zero_block], axis=0), [-1])

    def _block_rows(self) -> tf.Tensor:
        """``N o_1 ... o_{n-1}``: for row ``(i', j', c)`` of ``T^T`` and leading output position
        ``i`` the block row ``(l C + c) W + j'``, ``l`` the flat leading taps reading ``i'``,
        else ``L C W`` (the zero block; ``ConvIndex.block_index``)."""
        n, (width, channels) = self.rank, self.input_shape[-2:]
        ndim = 2 * n  # axes (s_1..s_{n-1}, W, C, o_1..o_{n-1})
        flat, missing = tf.zeros([], tf.int32), None
        for a in range(n - 1):
            p = _place(self._inverse(a), ndim, (a, n + 1 + a))
            flat = flat * self.kernel_shape[a] + tf.maximum(p, 0)
            missing = p < 0 if missing is None else missing | (p < 0)
        c = _place(tf.range(channels), ndim, (n,))
        j_in = _place(tf.range(width), ndim, (n - 1,))
        rows = (flat * channels + c) * width + j_in
        if missing is not None:
            rows = tf.where(missing, self._lead_taps() * channels * width, rows)
        return tf.reshape(rows, [-1])

    def _storage_patch_index(self, padding_reads: tf.Tensor) -> tf.Tensor:
        """``(k_1, ..., k_n, C, o_1, ..., o_n)``: the input position (row-major
        ``(i'_1, ..., i'_n, c)``) that entry ``(p, c)`` reads at output position ``i``, or
        ``padding_reads``."""
        n = self.rank
        ndim = 2 * n + 1
        index, missing = tf.zeros([], tf.int32), None
        for a in range(n):
            read = _place(tf.transpose(self.taps[a]), ndim, (a, n + 1 + a))
            index = index * self.input_shape[a] + read
            missing = read < 0 if missing is None else missing | (read < 0)
        index = index * self.input_shape[-1] + _place(tf.range(self.input_shape[-1]), ndim, (n,))
        return tf.where(missing, padding_reads, index)

    def _patch_index(self) -> tf.Tensor:
        """``(M, P)``: ``ConvIndex.patch_index``, rows in ``Vec`` order (the storage axes
        ``(p_1, ..., p_n, c)`` reversed), padding reading ``N``."""
        n = self.rank
        perm = [*range(n, -1, -1), *range(n + 1, 2 * n + 1)]
        index = tf.transpose(self._storage_patch_index(self.shape[1]), perm)
        return tf.reshape(index, [self._entries(), -1])

    def _stored_patch_index(self) -> tf.Tensor:
        """``(M + 1, P)``: ``ConvIndex.stored_patch_index``, rows in storage order
        ``(p_1, ..., p_n, c)``, padding reading ``N + 1``, a last row reading ``N`` (the tied
        bias' constant 1)."""
        index = tf.reshape(self._storage_patch_index(self.shape[1] + 1), [self._entries(), -1])
        ones = tf.fill([1, tf.shape(index)[1]], self.shape[1])
        return tf.concat([index, ones], axis=0)

    def _entries(self) -> int:
        return math.prod(self.kernel_shape[:-1])
