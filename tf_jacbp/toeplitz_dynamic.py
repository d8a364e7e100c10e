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

The graph of unknown sizes is TensorFlow's (``tf.shape``, ``tf.debugging.Assert``, control
dependencies): its maps are ``tf_jacbp.backend.dynamic_conv_maps``, and this module multiplies
through them with the ``keras.ops`` products every index shares. On JAX that function raises:
``jax.jit`` knows every size when it traces, so the static ``ConvIndex`` serves every call.

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

from tf_jacbp import backend
from tf_jacbp.toeplitz_products import ToeplitzProducts

Tensor = Any


class DynamicConvIndex(ToeplitzProducts):
    """``ConvIndex``'s maps of ``T(K)`` computed when a traced graph runs, for ``n`` spatial
    axes of run-time sizes (``tf_jacbp.backend.dynamic_conv_maps``; TensorFlow only).

    ``DynamicConvIndex(sizes, kernel_shape, strides, padding, dilation_rate, budget, owner,
    setting)``, or for an image ``DynamicConvIndex(height, width, kernel_shape, ...)``:
    ``sizes`` the ``n`` spatial sizes as int32 scalar tensors (``tf.shape(x)[1:-1]``); the
    kernel ``(k_1, ..., k_n, C, F)``, strides and dilation (``n`` ints) static, as the
    configuration. ``input_shape`` ``(s_1, ..., s_n, C)``, ``output_shape``
    ``(o_1, ..., o_n, F)`` and ``shape`` ``(R, N)`` hold tensors where a size enters;
    ``paddings`` the ``(before, after)`` padding per axis. ``budget``: the byte budget the dense
    ``T`` is asserted against when ``transpose_matrix`` runs (None: no check); ``owner`` and
    ``setting`` name the layer and the setting to raise in that message.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        if isinstance(args[0], list | tuple):
            sizes, rest = tuple(args[0]), args[1:]
        else:  # (height, width, kernel_shape, ...)
            sizes, rest = tuple(args[:2]), args[2:]
        self._configure(sizes, *rest, **kwargs)

    def _configure(
        self,
        sizes: tuple[Tensor, ...],
        kernel_shape: tuple[int, ...],
        strides: tuple[int, ...],
        padding: str,
        dilation_rate: tuple[int, ...],
        budget: int | None = None,
        owner: str = "DynamicConvIndex",
        setting: str = "tf_jacbp.toeplitz.set_budget_bytes(...)",
    ) -> None:
        if len(sizes) != len(kernel_shape) - 2:
            raise ValueError(
                f"{owner}: {len(sizes)} spatial sizes for a kernel of shape {kernel_shape} "
                f"with {len(kernel_shape) - 2} spatial axes; give one size per spatial axis."
            )
        self._maps = backend.dynamic_conv_maps(
            sizes, tuple(kernel_shape), strides, padding, dilation_rate
        )
        self.rank = len(sizes)
        self.kernel_shape = tuple(kernel_shape)
        self.strides, self.padding, self.dilation_rate = strides, padding, dilation_rate
        self.budget, self.owner, self.setting = budget, owner, setting
        self.input_shape, self.output_shape = self._maps.input_shape, self._maps.output_shape
        self.taps, self.paddings = self._maps.taps, self._maps.paddings
        self.shape = (math.prod(self.output_shape), math.prod(self.input_shape))

    def dense_bytes(self, dtype: Any) -> Tensor:
        """Bytes of a dense ``T``, ``R N`` entries of ``dtype``, as an int64 scalar tensor."""
        return self._maps.dense_bytes(dtype)

    def index_map(self, name: str) -> Tensor:
        """The int32 map ``name``, built by the graph on first use and kept."""
        return self._maps.index_map(name)

    def transpose_matrix(self, kernel: Tensor) -> Tensor:
        """``T(K)^T`` ``(N, R)``, dense, by ``ToeplitzProducts.transpose_matrix``, after the
        memory guard has passed: an assertion, when the graph runs, that the dense ``T`` fits
        ``budget``.

        Everything of size ``T`` waits for the guard: the maps ``kernel_rows`` and
        ``block_rows`` and the inverse taps they are computed from are built after the assertion
        (every op created in ``build`` depends on it), and so are the two gathers. For a
        sequence the first gather and the inverse taps alone are as large as ``T``, so guarding
        only the last gather (as for an image, whose first is small) would let them allocate
        first."""

        def build() -> Tensor:
            self.index_map("kernel_rows")
            self.index_map("block_rows")
            return super(DynamicConvIndex, self).transpose_matrix(kernel)

        if self.budget is None:
            return build()
        size = self.dense_bytes(kernel.dtype)
        message = (
            f"{self.owner}: for this batch's input size the dense Toeplitz matrix T(K) is over "
            f"the budget of {self.budget} bytes ({self.budget / 2**20:.1f} MiB). Raise it with "
            f"{self.setting}, or use smaller inputs (or a fixed input size, whose T is guarded "
            "when the model is built and may be kept sparse)."
        )
        shown = ["T(K) of shape (R, N) =", self.shape[0], self.shape[1], "takes bytes:", size]
        return self._maps.after_check(size <= self.budget, [message, *shown], build)
