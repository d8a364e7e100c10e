"""``T(K)`` applied without forming it: the same Lemma 2-3 products by the operations that compute
exactly those maps (docs/math.md, "Applying T(K) without forming it").

For a convolution of the view ``(batch, s_1, ..., s_n, C)`` (``n`` = 2 or 3; a sequence is an
image of height 1) with ``K`` ``(k_1, ..., k_n, C, F)``, strides ``st``, dilation ``d`` and
padding ``pad``, with ``vec`` row-major as everywhere (``tf_jacbp.layout``):

* ``T(K) vec(x)`` is the convolution itself (``keras.ops.conv``): entry ``(i, f)`` of both is
  ``sum_{p, c} K[p, c, f] x[i st - pad + p d, c]`` (``tf_jacbp.toeplitz``'s definition of ``T``);
* ``T(K)^T delta`` is the transposed convolution (``tf_jacbp.backend.conv_input_product``):
  entry ``(i', c)`` of ``T^T delta`` is ``sum_{(i, f)} T[(i, f), (i', c)] delta[i, f]``, the sum
  over the outputs ``i`` and taps ``p`` with ``i' = i st - pad + p d``, which is what a
  transposed convolution scatters;
* ``(J_{Vec(K)} z)^T delta = Vec(X_patch^T Delta)`` summed over the batch is the filter gradient
  (``tf_jacbp.backend.conv_kernel_product``): ``dK[p, c, f] = sum_{b, i} x_b[i st - pad + p d,
  c] delta_b[i, f]``, row ``(p, c)`` of ``X_patch^T`` times column ``f`` of ``Delta``.

``"causal"`` padding (``Conv1D``) is ``(k - 1) d`` zeros before the sequence and then
``"valid"``: the input is padded here, the transposed product cropped back.

``ROUTES`` names a layer's choice (``Conv2D(toeplitz=...)``) and ``choose_route`` resolves
``"auto"``.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp import backend

Tensor = Any

ROUTES = ("auto", "materialize", "implicit")
"""``toeplitz=`` of the Toeplitz layers: ``"materialize"`` forms ``T(K)`` from its index maps and
multiplies; ``"implicit"`` applies the same maps by convolution, transposed convolution and the
filter gradient; ``"auto"`` (the default) materializes where ``T(K)`` fits the budget and the
measured crossover (``MATERIALIZE_MAX_BYTES``) says it is faster."""

MATERIALIZE_MAX_BYTES = 256 * 2**10
"""``"auto"`` materializes only a ``T(K)`` of at most this many bytes (dense, the layer's compute
dtype): the measured crossover. One layer's training step (forward, input and kernel gradient,
batch 64, float32, two CPU cores, TensorFlow 2.21; ``benchmarks/conv_sizes.py``) takes, as a
ratio materialized / implicit: 0.65 (graph) and 0.76 (XLA) for ``T(K)`` of 7 KiB, 0.78 and 0.67
at 0.2 MiB, 1.33 and 0.73 at 0.5 MiB, 1.71 and 1.31 at 1.4 MiB, 3.1 at LeNet-5's first layer
(14 MiB) and 24 at the wide CNN's second (512 MiB). The implicit route is within 0.9-1.2x of stock
Keras' convolution at every size."""


def check_route(route: Any, owner: str) -> str:
    """``route`` if it is one of ``ROUTES``, else a ValueError naming ``toeplitz``."""
    if route not in ROUTES:
        raise ValueError(
            f"{owner}: toeplitz must be one of {ROUTES} (how T(K) is applied: formed and "
            f"multiplied, applied by convolutions, or chosen by size), got toeplitz={route!r}."
        )
    return route


def choose_route(route: str, index: Any, dtype: Any, budget: int) -> str:
    """``"materialize"`` or ``"implicit"`` for a layer's ``route`` and the ``ConvIndex`` of one
    static size: ``"auto"`` materializes when a training step with a dense ``T(K)`` fits
    ``budget`` (``ConvIndex.step_bytes``) and ``T(K)`` is at most ``MATERIALIZE_MAX_BYTES``."""
    if route != "auto":
        return route
    fits = index.step_bytes(dtype, sparse=False) <= budget
    small = index.dense_bytes(dtype) <= MATERIALIZE_MAX_BYTES
    return "materialize" if fits and small else "implicit"


class ImplicitConv:
    """The products with ``T(K)`` of one convolution, without forming it (module docstring).

    ``kernel_size``, ``strides``, ``dilation`` have ``n`` entries each (the view's rank, 2 or 3);
    ``padding`` is ``"valid"``, ``"same"`` or ``"causal"`` (along the last axis).
    """

    def __init__(
        self,
        kernel_size: tuple[int, ...],
        strides: tuple[int, ...],
        padding: str,
        dilation: tuple[int, ...],
    ):
        self.kernel_size = tuple(kernel_size)
        self.strides = tuple(strides)
        self.dilation = tuple(dilation)
        self.causal = padding == "causal"
        self.padding = "valid" if self.causal else padding
        self.left = (self.kernel_size[-1] - 1) * self.dilation[-1] if self.causal else 0

    def _padded(self, x: Tensor) -> Tensor:
        """``x`` with the causal zeros before its last spatial axis (else ``x``)."""
        if not self.causal:
            return x
        pads = [(0, 0)] * (len(x.shape) - 2) + [(self.left, 0), (0, 0)]
        return ops.pad(x, pads)

    def apply(self, x: Tensor, kernel: Tensor) -> Tensor:
        """``T(K) vec(x_b)`` for each sample: the convolution, ``(batch, *s, C)`` ->
        ``(batch, *o, F)``."""
        return ops.conv(
            self._padded(x),
            kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation,
        )

    def apply_transpose(self, delta: Tensor, kernel: Tensor, sizes: tuple) -> Tensor:
        """``T(K)^T delta_b`` for each row: the transposed convolution, ``(rows, *o, F)`` ->
        ``(rows, *sizes, C)`` (``sizes`` the input's spatial sizes, ints or scalar tensors)."""
        sizes = list(sizes)
        sizes[-1] = sizes[-1] + self.left
        dx = backend.conv_input_product(
            delta, kernel, tuple(sizes), self.strides, self.padding, self.dilation
        )
        return dx[..., self.left :, :] if self.causal else dx

    def kernel_gradient(self, x: Tensor, delta: Tensor, kernel_shape: tuple[int, ...]) -> Tensor:
        """``dK = sum_b X_patch,b^T Delta_b`` shaped like ``K`` (Lemma 3's product summed over the
        batch): ``x`` ``(batch, *s, C)``, ``delta`` ``(batch, *o, F)``."""
        return backend.conv_kernel_product(
            self._padded(x), delta, tuple(kernel_shape), self.strides, self.padding, self.dilation
        )
