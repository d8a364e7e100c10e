"""The index maps of ``T(K)`` for an image size known only when a traced graph runs.

Keras' ``fit`` traces its step with ``reduce_retracing=True``: after a second image size it
traces once more with the spatial sizes unknown (``keras.Input((None, None, C))``), and a
``tf.function`` with an ``input_signature`` of unknown size does the same. ``ConvIndex``
(``tf_jacbp.toeplitz``) computes its maps in NumPy for one static size, so it cannot serve that
trace. ``DynamicConvIndex`` computes the very same maps with TensorFlow ops from the runtime
sizes ``H, W`` (``tf.shape(x)``), entry for entry (``tests/test_toeplitz.py`` compares them with
the static maps exactly), and multiplies through ``ToeplitzProducts``, the code ``ConvIndex``
runs: ``T(K)^T`` is still materialized dense by the two row gathers, then multiplied.

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

XLA: ``jit_compile=True`` compiles one program per concrete input shape, where these maps are
constants of the compiled program; the products compile and agree with the static route
(``tests/layers/test_conv.py``). XLA ignores ``tf.debugging.Assert`` (TensorFlow logs "Ignoring
Assert operator"), so under XLA neither run-time check runs: a size over budget is computed
anyway (or fails as an allocation error), and a "valid" window longer than the input gives an
empty output instead of an error. Measured on TensorFlow 2.21.
"""

from __future__ import annotations

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


class DynamicConvIndex(ToeplitzProducts):
    """``ConvIndex``'s maps of ``T(K)`` computed with TensorFlow ops for runtime sizes.

    ``height``, ``width``: int32 scalar tensors (``tf.shape(x)[1:3]``); ``channels`` and the
    kernel ``(kh, kw, C, F)`` static, as the configuration. ``input_shape``, ``output_shape``
    and ``shape`` hold tensors where the size enters. ``budget``: the byte budget the dense
    ``T`` is asserted against when ``transpose_matrix`` runs (None: no check); ``owner`` and
    ``setting`` name the layer and the setting to raise in that message.
    """

    def __init__(
        self,
        height: tf.Tensor,
        width: tf.Tensor,
        kernel_shape: tuple[int, int, int, int],
        strides: tuple[int, int],
        padding: str,
        dilation_rate: tuple[int, int],
        budget: int | None = None,
        owner: str = "DynamicConvIndex",
        setting: str = "tf_jacbp.toeplitz.set_budget_bytes(...)",
    ):
        kh, kw, channels, filters = kernel_shape
        height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
        self.input_shape = (height, width, channels)
        self.kernel_shape = tuple(kernel_shape)
        self.strides, self.padding, self.dilation_rate = strides, padding, dilation_rate
        self.budget, self.owner, self.setting = budget, owner, setting
        self.taps_h, *pad_h = axis_taps(height, kh, strides[0], padding, dilation_rate[0])
        self.taps_w, *pad_w = axis_taps(width, kw, strides[1], padding, dilation_rate[1])
        self.paddings = (tuple(pad_h), tuple(pad_w))
        self.output_shape = (tf.shape(self.taps_h)[0], tf.shape(self.taps_w)[0], filters)
        self.shape = (
            self.output_shape[0] * self.output_shape[1] * filters,
            height * width * channels,
        )
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
            f"{self.owner}: for this batch's image size the dense Toeplitz matrix T(K) is over "
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
        gathers. For a sequence (``H = 1``) the first gather and the inverse taps alone are as
        large as ``T``, so guarding only the last gather (as for an image, whose first is small)
        would let them allocate first."""
        with tf.control_dependencies(self.guard(kernel.dtype)):
            self.index_map("kernel_rows")
            self.index_map("block_rows")
            return super().transpose_matrix(kernel)

    def _inverse(self, axis: int) -> tf.Tensor:
        """``inverse_taps`` along ``axis`` (0: height, 1: width), ``(size, out)``."""
        taps, (before, _) = (self.taps_h, self.taps_w)[axis], self.paddings[axis]
        kernel_size = self.kernel_shape[axis]
        return inverse_taps(
            self.input_shape[axis],
            tf.shape(taps)[0],
            kernel_size,
            self.strides[axis],
            before,
            self.dilation_rate[axis],
        )

    def _kernel_rows(self) -> tf.Tensor:
        """``(kh C W + 1) W_out``: for block row ``(p, c, j')`` and output column ``j`` the row
        ``(p kw + q) C + c`` of ``K`` as ``(M, F)``, ``q`` the tap reading ``j'``, else ``M``."""
        kh, kw, channels, _ = self.kernel_shape
        entries = kh * kw * channels
        q = self._inverse(1)[None, None]  # (1, 1, W, W_out)
        p = tf.range(kh)[:, None, None, None]
        c = tf.range(channels)[None, :, None, None]
        rows = tf.where(q >= 0, (p * kw + q) * channels + c, entries)  # (kh, C, W, W_out)
        rows = tf.reshape(rows, [-1, self.output_shape[1]])
        zero_block = tf.fill([1, self.output_shape[1]], entries)
        return tf.reshape(tf.concat([rows, zero_block], axis=0), [-1])

    def _block_rows(self) -> tf.Tensor:
        """``H W C H_out``: for row ``(i', j', c)`` of ``T^T`` and output row ``i`` the block row
        ``(p C + c) W + j'``, ``p`` the tap reading ``i'``, else ``kh C W`` (the zero block)."""
        kh, _, channels, _ = self.kernel_shape
        width = self.input_shape[1]
        p = self._inverse(0)[:, None, None, :]  # (H, 1, 1, H_out)
        c = tf.range(channels)[None, None, :, None]
        j_in = tf.range(width)[None, :, None, None]
        rows = tf.where(p >= 0, (p * channels + c) * width + j_in, kh * channels * width)
        return tf.reshape(rows, [-1])

    def _storage_patch_index(self, padding_reads: tf.Tensor) -> tf.Tensor:
        """``(kh, kw, C, H_out, W_out)``: the input position ``(i' W + j') C + c`` that entry
        ``(p, q, c)`` reads at output position ``(i, j)``, or ``padding_reads``."""
        _, width, channels = self.input_shape
        in_i = tf.transpose(self.taps_h)[:, None, None, :, None]
        in_j = tf.transpose(self.taps_w)[None, :, None, None, :]
        c = tf.range(channels)[None, None, :, None, None]
        return tf.where(
            (in_i >= 0) & (in_j >= 0), (in_i * width + in_j) * channels + c, padding_reads
        )

    def _patch_index(self) -> tf.Tensor:
        """``(M, P)``: ``ConvIndex.patch_index``, rows in ``Vec`` order ``m = p + kh (q + kw c)``
        (the storage axes ``(p, q, c)`` reversed), padding reading ``N``."""
        index = tf.transpose(self._storage_patch_index(self.shape[1]), [2, 1, 0, 3, 4])
        return tf.reshape(index, [self._entries(), -1])

    def _stored_patch_index(self) -> tf.Tensor:
        """``(M + 1, P)``: ``ConvIndex.stored_patch_index``, rows in storage order ``(p, q, c)``,
        padding reading ``N + 1``, a last row reading ``N`` (the tied bias' constant 1)."""
        index = tf.reshape(self._storage_patch_index(self.shape[1] + 1), [self._entries(), -1])
        ones = tf.fill([1, tf.shape(index)[1]], self.shape[1])
        return tf.concat([index, ones], axis=0)

    def _entries(self) -> int:
        kh, kw, channels, _ = self.kernel_shape
        return kh * kw * channels
