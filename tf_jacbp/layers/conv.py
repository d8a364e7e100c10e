"""Conv2D as a Toeplitz matrix: ``z = T(K) vec(x) + b``, ``a = f(z)`` (docs/math.md, Lemmas 2-3).

By Lemma 3 a convolution is a dense layer whose weight ``W = T(K)^T`` is sparse and weight-shared,
so the Dense formulas apply. For one sample, with ``x = vec(X)`` (``N = H W C``), ``z = vec(Z)``
(``R = H_out W_out F``, ``P = H_out W_out`` positions) and an upstream ``delta`` (``R``):

* ``J_x z = T(K)`` (``R x N``, ``tf_jacbp.toeplitz``), so ``(J_x z)^T delta = T(K)^T delta``.
* ``J_{Vec(K)} z = I_F (x) X_patch``, arranged so that row ``(i, j, f)`` holds the patch of
  position ``(i, j)`` in the block of filter ``f`` (``R x kh kw C F``; ``X_patch`` is
  ``P x kh kw C``, columns in ``Vec`` order, ``ConvIndex.patches``). Its transpose times
  ``delta`` is ``Vec(X_patch^T Delta)``, ``Delta`` the ``P x F`` matrix of ``delta``: the kernel
  gradient.
* Tied bias (Keras', one per filter, ``B_f = b_f * ones``): ``J_b z`` is ``I_F`` stacked ``P`` times
  and ``(J_b z)^T delta = sum over positions of Delta``. Untied bias (the paper's ``B_i``, shape
  ``(H_out, W_out, F)``): ``J_{Vec(B)} z`` is the permutation from ``Vec`` (column-major) to the
  row-major order of ``z``, and the gradient is ``delta`` itself, reshaped.

Batches are rows: ``Z = X T(K)^T + b`` for ``X`` of shape ``(batch, N)``. The contract
(``tf_jacbp.contract``) stacks ``V`` upstream vectors per sample, ``m`` ``(V, batch, ...)``:

* ``vjp_input``: ``dX = Delta T(K)`` for the ``V batch`` rows ``Delta`` of ``m``, one product;
* ``vjp_params``: ``Vec(X_patch^T M_v)`` and the tied bias' ``1^T M_v`` from one patch product
  (``ConvIndex.kernel_products``): summed over the batch one matmul, per sample a batched one;
* ``squared_norms``: ``||X_patch,i^T Delta_i||^2`` in its Gram or outer form, never forming the
  per-sample gradients (DP-SGD's first pass).

Training's backward pass, Algorithm 1's per-example gradients and rows, and the materialized
Jacobians (``input_jacobian`` ``= D T(K)``, ``parameter_jacobian`` ``= [I_F (x) X_patch | J_b]``)
are derived from these by ``tf_jacbp.contract`` and ``tf_jacbp.layers.base``.

``T(K)`` depends on the input's spatial size. A layer built for ``keras.Input((None, None, C))``
builds one ``ConvIndex`` per static size it is called with (each under the memory guard) and
keeps them. When a traced function does not know the size (Keras' ``fit`` retraces its step with
unknown sizes after a second size; an ``input_signature`` of unknown size), ``index_for`` computes
the same maps with TensorFlow ops when the graph runs (``tf_jacbp.toeplitz_dynamic``): ``T(K)``
is still materialized dense and multiplied by the same code, its memory guard asserted at run time
(no sparse fallback; not under XLA, which drops assertions but compiles each concrete size).

The formulas above are written once, for any number of spatial axes, in ``ToeplitzConv``:
``Conv3D`` (``tf_jacbp.layers.conv3d``) applies them to volumes, ``Conv1D``
(``tf_jacbp.layers.conv1d``) to a sequence read as an image of height 1. The
arguments, the index maps per size and the memory guard are written once in ``ToeplitzConv``'s
base ``_ToeplitzIndexed`` (``tf_jacbp.layers.toeplitz_layer``), which ``Conv2DTranspose`` shares.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from keras import ops

from tf_jacbp import backend, geometry, toeplitz
from tf_jacbp._backend import keras
from tf_jacbp.contract import squared_norms_of
from tf_jacbp.layers.base import patch_product_squared_norms
from tf_jacbp.layers.toeplitz_layer import _ToeplitzIndexed
from tf_jacbp.toeplitz import static_size, toeplitz_product
from tf_jacbp.toeplitz_dynamic import DynamicConvIndex

BIAS_MODES = ("tied", "untied")

Tensor = Any  # a tensor of Keras' backend


class ToeplitzConv(_ToeplitzIndexed):
    """The convolution formulas of this module for ``rank`` spatial axes (1, 2 or 3).

    Subclasses set ``rank`` and the paddings they accept. Every Toeplitz method works on the view
    ``(batch, *spatial, C)`` of the input of at least two spatial axes (a sequence ``(batch, T,
    C)`` is the image ``(batch, 1, T, C)``) and on the kernel ``(k_1, ..., C, F)`` (a 1-D kernel
    ``(k, C, F)`` is ``(1, k, C, F)``); ``Vec`` of either is the same vector, and so are the
    row-major ``vec`` of inputs and outputs, so ``T(K)``, its index maps and every Jacobian are
    shared unchanged.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, ...],
        strides: int | tuple[int, ...] = 1,
        padding: str = "valid",
        data_format: str | None = None,
        dilation_rate: int | tuple[int, ...] = 1,
        groups: int = 1,
        activation: Any = None,
        use_bias: bool = True,
        bias: str = "tied",
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        kernel_constraint: Any = None,
        bias_constraint: Any = None,
        toeplitz_budget_bytes: int | None = None,
        toeplitz: str = "auto",
        **kwargs: Any,
    ):
        super().__init__(
            filters=filters,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            data_format=data_format,
            dilation_rate=dilation_rate,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            toeplitz_budget_bytes=toeplitz_budget_bytes,
            toeplitz=toeplitz,
            **kwargs,
        )
        owner = type(self).__name__
        if groups != 1:
            raise ValueError(
                f"{owner}: only groups=1 is supported, got groups={groups!r}. A grouped "
                "convolution's Toeplitz matrix is block diagonal and tf_jacbp does not build it; "
                f"use keras.layers.{owner} for grouped convolutions."
            )
        if bias not in BIAS_MODES:
            raise ValueError(
                f"{owner}: bias must be 'tied' (one bias per filter, as Keras) or 'untied' (one "
                f"per output entry, the paper's B_i), got bias={bias!r}."
            )
        self.groups = groups
        self.bias_mode = bias

    def _kernel_shape(self, channels: int) -> tuple[int, ...]:
        """Keras' ``(*kernel_size, C, F)``."""
        return (*self.kernel_size, channels, self.filters)

    def _bias_shape(self, input_shape: tuple) -> tuple[int, ...]:
        """Tied: ``(F,)``; untied: the output's shape ``(*spatial_out, F)``, so the input's
        spatial size must be known."""
        if self.bias_mode == "tied":
            return (self.filters,)
        if self.conv_index is None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}': bias='untied' has one bias per output "
                f"entry, so it needs the input's spatial size, got input shape "
                f"{tuple(input_shape)}. Give keras.Input the full shape, or use bias='tied' (one "
                "bias per filter) for inputs of varying size."
            )
        return self.conv_index.output_shape[len(self._lead) :]

    def _static_index(self, spatial: tuple[int, ...], owner: str) -> toeplitz.ConvIndex:
        """The window must fit (``geometry.check_window_fits``); then the layer's convolution on
        the image view."""
        geometry.check_window_fits(
            (*spatial, self._channels),
            self.kernel_size,
            self.padding,
            owner,
            "kernel_size",
            self.dilation_rate,
        )
        return self._conv_index(self._lead + spatial, owner)

    def _dynamic_index(self, x: Tensor) -> DynamicConvIndex:
        return self._dynamic_conv_index(*ops.shape(x)[1:-1])

    def _size_fixed_by_weights(self) -> bool:
        """An untied bias has one entry per output entry: its shape fixes the input's size."""
        return self.use_bias and self.bias_mode == "untied"

    def forward(self, x: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
        """``Z = X T(K)^T + b``: ``(batch, *spatial, C)`` -> ``(batch, *spatial_out, F)``, with
        ``T(K)`` applied as ``route_for`` says: formed for ``x``'s size (``build_toeplitz``;
        dense, or sparse over budget) and multiplied, or applied as the convolution
        (``ImplicitConv.apply``). Under ``toeplitz="auto"`` a batch with a NaN or an infinity
        takes the convolution, so that it stays in its receptive field as in stock Keras (a
        dense ``T(K)`` multiplies it by every zero of its column: ``0 * NaN = NaN`` in every
        output of its sample)."""
        image = self.image(x)
        if self.route_for(image) == "implicit":
            return self._implicit_forward(image, kernel, bias)
        if self.toeplitz == "auto":
            return ops.cond(
                ops.all(ops.isfinite(image)),
                lambda: self._materialized_forward(image, kernel, bias),
                lambda: self._implicit_forward(image, kernel, bias),
            )
        return self._materialized_forward(image, kernel, bias)

    def _layer_shape(self, z: Tensor) -> Tensor:
        """The view's ``(batch, *lead, *spatial_out, F)`` as the layer's (lead axes dropped)."""
        return z[:, 0] if self._lead else z

    def _implicit_forward(self, image: Tensor, kernel: Tensor, bias: Tensor | None) -> Tensor:
        z = self._layer_shape(self.implicit.apply(image, self.view_kernel(kernel)))
        return z if bias is None else z + bias

    def _materialized_forward(self, image: Tensor, kernel: Tensor, bias: Tensor | None) -> Tensor:
        index, _ = self.index_for(image)
        rows = ops.reshape(image, (-1, index.shape[1]))
        z = toeplitz_product(rows, self.build_toeplitz(kernel, image))
        if bias is not None:
            # Lemma 3's b = vec(B) (row-major, like z): tied, b_f repeated at every position.
            positions = index.shape[0] // self.filters
            b = ops.tile(bias, (positions,)) if self.bias_mode == "tied" else ops.reshape(bias, -1)
            z = backend.bias_add(z, b)  # fused into the matmul by TensorFlow's graph optimizer
        return ops.reshape(z, (-1, *index.output_shape[len(self._lead) :]))

    def vjp_input(self, m, x, y, kernel, bias=None):
        """``(J_x z)^T m = T(K)^T m`` for each of the ``V`` vectors of each sample,
        ``(V, batch, *spatial_out, F)`` -> ``(V, batch, *spatial, C)``: the rows
        ``Delta T(K)`` of one product, or the transposed convolution of the ``V batch`` rows
        (``ImplicitConv.apply_transpose``; under ``"auto"`` also for rows with a NaN or an
        infinity, as ``forward``)."""
        image = self.image(x)
        route = self.route_for(image)
        if route == "implicit":
            return self._implicit_vjp_input(m, x, image, kernel)
        if self.toeplitz == "auto":
            return ops.cond(
                ops.all(ops.isfinite(m)),
                lambda: self._materialized_vjp_input(m, x, image, kernel),
                lambda: self._implicit_vjp_input(m, x, image, kernel),
            )
        return self._materialized_vjp_input(m, x, image, kernel)

    def _implicit_vjp_input(self, m: Tensor, x: Tensor, image: Tensor, kernel: Tensor) -> Tensor:
        out = self.compute_output_shape(tuple(x.shape))[1:]
        rows = ops.reshape(m, (-1, *self._lead, *(static_size(m, 2 + a) for a in range(len(out)))))
        sizes = tuple(static_size(image, 1 + a) for a in range(len(image.shape) - 2))
        dx = self.implicit.apply_transpose(rows, self.view_kernel(kernel), sizes)
        return ops.reshape(dx, (static_size(m, 0), *ops.shape(x)))

    def _materialized_vjp_input(self, m: Tensor, x: Tensor, image: Tensor, kernel: Tensor):
        index, _ = self.index_for(image)
        rows = ops.reshape(m, (-1, index.shape[0]))  # (V batch, R)
        dx = toeplitz_product(rows, self.build_toeplitz(kernel, image), transpose=True)
        return ops.reshape(dx, (static_size(m, 0), *ops.shape(x)))

    def vjp_params(self, m, x, y, kernel, bias=None, sum_batch=True):
        """``(J_{Vec(K), b} z)^T m``: the kernel product ``Vec(X_patch^T M_v)`` and the tied
        bias' ``1^T M_v`` (``M_v`` the ``P x F`` matrix of vector ``v``) from one patch product
        (``ConvIndex.kernel_products``), summed over the batch or per sample; an untied bias'
        product is ``m`` itself (``J_{Vec(B)} z`` is a permutation), summed or not. On the
        implicit route one vector summed over the batch is the filter gradient
        (``ImplicitConv.kernel_gradient``) and the tied bias ``m`` summed over the batch and
        positions.

        Shapes ``(V, *p.shape)`` each, or ``(V, batch, *p.shape)`` without ``sum_batch``.
        """
        image = self.image(x)
        stacks = static_size(m, 0)
        if self.route_for(image) == "implicit" and sum_batch and stacks == 1:
            delta = ops.reshape(m[0], (-1, *self._lead, *ops.shape(m)[2:]))
            grads = [self.implicit.kernel_gradient(image, delta, self._conv_kernel_shape())]
            grads = [ops.reshape(grads[0], (1, *kernel.shape))]
            if bias is None:
                return grads
            axes = tuple(range(1, len(m.shape) - 1)) if self.bias_mode == "tied" else 1
            return [*grads, ops.sum(m, axis=axes)]
        index = self.plain_index(image) if self.route_for(image) == "implicit" else None
        if index is None:
            index, _ = self.index_for(image)
        products = index.kernel_products(image, m, sum_batch)  # (V, [batch,] M + 1, F)
        lead = (stacks,) if sum_batch else (stacks, static_size(x, 0))
        grads = [ops.reshape(products[..., :-1, :], (*lead, *kernel.shape))]
        if bias is None:
            return grads
        if self.bias_mode == "tied":
            return [*grads, products[..., -1, :]]
        untied = ops.sum(m, axis=1) if sum_batch else m
        return [*grads, ops.reshape(untied, (*lead, *bias.shape))]

    def squared_norms(self, m, x, y, kernel, bias=None):
        """Squared norms of each sample's ``dK_i = X_patch,i^T Delta_i`` and ``db_i``, ``(batch,)``,
        ``Delta_i`` the ``P x F`` matrix of ``m[0, i]``.

        ``X_patch,i`` (``P x M``, ``M = kh kw C``) is read as ``kh kw`` shifted (strided,
        dilated) views of the padded input, one per kernel tap. ``||X_patch,i^T Delta_i||_F^2``
        then takes the cheaper exact form (``patch_product_squared_norms``): the Gram form
        ``<X_patch,i X_patch,i^T, Delta_i Delta_i^T>`` (``P x P`` over output positions) when
        ``P (M + F) < M F``, else the ``M x F`` products of this layer alone, one per tap and
        sample. Tied bias: ``||1^T Delta_i||^2`` (``Delta_i`` summed over positions); untied:
        ``||Delta_i||^2``.
        """
        x = self.image(x)
        index = self.plain_index(x)
        *sizes, channels = index.input_shape
        out = index.output_shape[:-1]
        kernel_size, strides, dilation = self._image_geometry()
        dynamic = isinstance(index, DynamicConvIndex)  # P unknown when traced: outer form
        if dynamic:
            pads = index.paddings
        else:
            pads = [
                geometry.padding_amounts(n, k, s, self.padding, d)
                for n, k, s, d in zip(sizes, kernel_size, strides, dilation, strict=True)
            ]
        x = ops.pad(x, [(0, 0), *(tuple(p) for p in pads), (0, 0)])
        views = [  # one strided, dilated view of the padded input per kernel tap
            x[
                (
                    slice(None),
                    *(
                        slice(p * d, p * d + (n - 1) * s + 1, s)
                        for p, n, s, d in zip(tap, out, strides, dilation, strict=True)
                    ),
                )
            ]
            for tap in itertools.product(*(range(k) for k in kernel_size))
        ]
        batch, taps, positions = static_size(x, 0), len(views), math.prod(out)
        views = ops.reshape(ops.stack(views, axis=1), (batch, taps, positions, channels))
        delta = ops.reshape(m[0], (batch, positions, self.filters))
        entries, f = taps * channels, self.filters
        if not dynamic and positions * (entries + f) < entries * f:  # Gram form, X_patch,i P x M
            patches = ops.reshape(ops.transpose(views, (0, 2, 1, 3)), (batch, positions, entries))
            norms = [patch_product_squared_norms(patches, delta)]
        elif channels == 1:  # outer form: (taps x P) (P x F) per sample
            norms = [squared_norms_of(ops.matmul(views[..., 0], delta))]
        else:  # outer form: (C x P) (P x F) per tap and sample
            products = ops.matmul(ops.swapaxes(views, -1, -2), delta[:, None])  # adj_x folded
            norms = [squared_norms_of(products)]
        if bias is not None:
            tied = self.bias_mode == "tied"
            norms.append(squared_norms_of(ops.sum(delta, axis=1) if tied else delta))
        return norms

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        sizes = [
            None if n is None else geometry.output_size(n, k, s, self.padding, d)
            for n, k, s, d in zip(
                input_shape[1:-1], self.kernel_size, self.strides, self.dilation_rate, strict=True
            )
        ]
        return (input_shape[0], *sizes, self.filters)

    def toeplitz_matrix(self, input_shape: tuple | None = None) -> Tensor:
        """``T(K)`` ``(R, N)`` for the current kernel, dense (``tf_jacbp.toeplitz.conv_matrix``).

        ``input_shape`` ``(H, W, C)`` defaults to the one the layer was built for (required
        when it was built for inputs of varying size).
        """
        kernel = self.read_parameters()[0]
        if input_shape is None:
            shape = self._index_or_built(None)[0].input_shape
        else:
            shape = self._lead + tuple(input_shape)
        kernel_size, strides, dilation = self._image_geometry()
        return toeplitz.conv_matrix(
            ops.reshape(kernel, (*kernel_size, *kernel.shape[-2:])),
            shape,
            strides,
            self.padding,
            dilation,
            budget_bytes=self.toeplitz_budget_bytes,
        )

    def jacobian_factors(self, x: Tensor) -> dict[str, Tensor]:
        """``{"T(K)": (R, N), "[I (x) X_patch | J_b]": (R, |K| + |b|)}`` at one sample ``x``
        ``(*spatial, C)`` (Lemmas 2-3: the input and the parameter Jacobian of ``z``)."""
        t = ops.cast(self.toeplitz_matrix(tuple(x.shape)), x.dtype)
        return {"T(K)": t, "[I (x) X_patch | J_b]": self.parameter_jacobian(x)}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "groups": self.groups, "bias": self.bias_mode}

    def reference(self, x: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
        """``keras.ops.conv`` (the stock convolution, differentiated by autodiff), then the
        bias added (tied ``(F,)`` broadcast over positions, untied its own shape). ``"causal"``
        is Keras' padding: ``(k - 1) d`` zeros before, then ``"valid"``."""
        padding = self.padding
        if padding == "causal":
            left = (self.kernel_size[0] - 1) * self.dilation_rate[0]
            x, padding = ops.pad(x, [(0, 0), (left, 0), (0, 0)]), "valid"
        z = ops.conv(
            x, kernel, strides=self.strides, padding=padding, dilation_rate=self.dilation_rate
        )
        return z if bias is None else z + bias


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Conv2D(ToeplitzConv):
    """2-D convolution that multiplies by its materialized Toeplitz matrix ``T(K)``.

    Arguments as ``keras.layers.Conv2D`` (channels_last, ``groups=1``), plus ``bias`` and
    ``toeplitz_budget_bytes``.

    Args:
        filters: ``F``, the number of output channels (a positive integer).
        kernel_size: ``(kh, kw)`` or one int for both.
        strides: ``(s_h, s_w)`` or one int, >= 1.
        padding: ``"valid"`` or ``"same"`` (TensorFlow's rule, ``tf_jacbp.geometry.same_padding``).
        data_format: ``None`` or ``"channels_last"``; ``"channels_first"`` is an error.
        dilation_rate: ``(d_h, d_w)`` or one int, >= 1. As in Keras, ``strides > 1`` together with
            ``dilation_rate > 1`` is an error (the reference route cannot differentiate it on CPU).
        groups: must be 1.
        activation: a name from ``tf_jacbp.activations`` or ``None``; its Jacobian ``D`` follows.
        use_bias: whether ``z`` has a bias.
        bias: ``"tied"`` (Keras': shape ``(F,)``, one per filter) or ``"untied"`` (the paper's
            ``B_i`` of Lemma 3: shape ``(H_out, W_out, F)``, one per output entry).
        kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer,
        activity_regularizer, kernel_constraint, bias_constraint: as in Keras.
        toeplitz_budget_bytes: the memory budget for ``T(K)`` (default: the process-wide
            ``tf_jacbp.toeplitz.get_budget_bytes()`` when the layer is built). A dense ``T`` over
            budget is replaced by a sparse matrix (TensorFlow's sparse-dense product; not
            XLA-compatible, so not usable under ``jit_compile=True``); a sparse one over budget is
            a ValueError, which states the sizes and this setting.

    Keras' ``lora_rank``, ``lora_alpha`` and ``quantization_config`` are refused with a
    ValueError naming them.

    Input ``(batch, H, W, C)``, output ``(batch, H_out, W_out, F)``; the kernel ``K`` has Keras'
    shape ``(kh, kw, C, F)``. ``C`` must be known. With ``H, W`` known (``keras.Input((28, 28,
    1))``) ``T(K)`` is built and guarded at build; with ``keras.Input((None, None, C))`` it is
    built for each static size the layer is called with (``toeplitz_index``, guarded and cached).
    A traced function of unknown size (``model.fit`` after a second size, since Keras relaxes its
    step to unknown sizes; a traced function with such an ``input_signature``) computes the index
    maps when it runs (``index_for``): ``T(K)`` stays dense, and the memory guard is a run-time
    assertion that the dense ``T`` of each batch fits the budget (an InvalidArgumentError naming
    the size and the budget; XLA skips it). ``bias="untied"`` needs a known size.

    Example:
        >>> layer = tf_jacbp.layers.Conv2D(1, 2, use_bias=False)
        >>> layer.build((None, 3, 3, 1))
        >>> layer.toeplitz_matrix().shape  # Lemma 2's 4 x 9 matrix
        TensorShape([4, 9])
    """

    rank = 2
    paddings = geometry.PADDINGS
