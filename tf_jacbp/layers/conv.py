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

``groups = G`` (Keras' grouped convolution, kernel ``(kh, kw, C/G, F)``): input channels of group
``g`` reach only the filters of group ``g``, so with the channels of each side sorted by group
``T(K)`` is block diagonal, ``diag(T(K_1), ..., T(K_G))``, ``K_g = K[..., g F/G : (g+1) F/G]``.
Every product splits the same way: the forward pass and ``dX`` are the groups' products
concatenated over the channel axis, ``dK`` their kernel products concatenated over the filter
axis, and a sample's ``||dK_i||^2`` the sum of the groups'. ``data_format="channels_first"`` is
a permutation of the input and the output entries, applied around the channels_last formulas
(``tf_jacbp.layers.toeplitz_layer``): the Jacobians are then over the channels_first ``vec``.

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
    shared unchanged. Those methods (``_forward_group``, ``_vjp_input_group``,
    ``_vjp_params_group``, ``_squared_norms_group``) see one group's channels, channels_last:
    ``_forward`` and its siblings split the channels into ``groups`` and join the products, and
    the base's contract methods permute a channels_first layout around them.
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
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise ValueError(
                f"{owner}: The number of groups must be a positive integer. Received: "
                f"groups={groups!r}. (Keras' check; groups=1 is an ungrouped convolution.)"
            )
        if filters % groups != 0:
            raise ValueError(
                f"{owner}: The number of filters must be evenly divisible by the number of "
                f"groups. Received: groups={groups}, filters={filters}. (Keras' check; use "
                "groups that divide both filters and the input's channels.)"
            )
        if bias not in BIAS_MODES:
            raise ValueError(
                f"{owner}: bias must be 'tied' (one bias per filter, as Keras) or 'untied' (one "
                f"per output entry, the paper's B_i), got bias={bias!r}."
            )
        self.groups = groups
        self.bias_mode = bias

    def _check_channels(self, channels: int, input_shape: tuple, owner: str) -> None:
        """``groups`` must divide the input's channels (Keras' check at build)."""
        if channels % self.groups != 0:
            raise ValueError(
                f"{owner}: The number of input channels must be evenly divisible by the number "
                f"of groups. Received groups={self.groups}, but the input has {channels} "
                f"channels (full input shape is {tuple(input_shape)}). (Keras' check; use "
                "groups that divide both filters and the input's channels.)"
            )

    def _kernel_shape(self, channels: int) -> tuple[int, ...]:
        """Keras' ``(*kernel_size, C / groups, F)``."""
        return (*self.kernel_size, channels // self.groups, self.filters)

    def _conv_kernel_shape(self) -> tuple[int, ...]:
        """One group's kernel as ``T(K)``'s convolution reads it:
        ``(*lead, *kernel_size, C / groups, F / groups)``."""
        groups = self.groups
        return (*self._lead, *self.kernel_size, self._channels // groups, self.filters // groups)

    def _bias_shape(self, input_shape: tuple) -> tuple[int, ...]:
        """Tied: ``(F,)``; untied: the output's shape, ``(*spatial_out, F)`` or channels_first
        ``(F, *spatial_out)``, so the input's spatial size must be known."""
        if self.bias_mode == "tied":
            return (self.filters,)
        if self.conv_index is None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}': bias='untied' has one bias per output "
                f"entry, so it needs the input's spatial size, got input shape "
                f"{tuple(input_shape)}. Give keras.Input the full shape, or use bias='tied' (one "
                "bias per filter) for inputs of varying size."
            )
        spatial_out = self.conv_index.output_shape[len(self._lead) : -1]
        return self._shape_layout((None, *spatial_out, self.filters))[1:]

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

    # --- groups: T(K) block diagonal, one block per group ------------------------------------

    def _group(self, g: int, *tensors: Tensor | None) -> list[Tensor | None]:
        """Group ``g``'s share of channels_last tensors whose last axis is the input's
        (``x``: ``C / groups`` channels) or the output's (``m``, ``K``, ``b``: ``F / groups``),
        in that order after ``x``: ``x[..., g C/G : (g+1) C/G]``, the others
        ``[..., g F/G : (g+1) F/G]``. One group: the tensors themselves."""
        if self.groups == 1:
            return list(tensors)
        sizes = [self._channels // self.groups] + [self.filters // self.groups] * 3
        return [
            None if t is None else t[..., g * n : (g + 1) * n]
            for t, n in zip(tensors, sizes, strict=False)
        ]

    def _forward(self, x: Tensor, kernel: Tensor, bias: Tensor | None) -> Tensor:
        """``z = T(K) vec(x) + b`` channels_last. With ``groups = G``, ``T(K)`` is block
        diagonal over the groups (input channels of group ``g`` reach only its ``F / G``
        filters, through ``K[..., g F/G : (g+1) F/G]``): the output is the concatenation over
        the channel axis of each group's convolution."""
        parts = []
        for g in range(self.groups):
            x_g, _, kernel_g, bias_g = self._group(g, x, None, kernel, bias)
            parts.append(self._forward_group(x_g, kernel_g, bias_g))
        return parts[0] if self.groups == 1 else ops.concatenate(parts, axis=-1)

    def _vjp_input(self, m: Tensor, x: Tensor, kernel: Tensor) -> Tensor:
        """``T(K)^T m`` channels_last: group ``g``'s input channels get its block's product
        with its filters' share of ``m``; concatenated over the channel axis."""
        parts = []
        for g in range(self.groups):
            x_g, m_g, kernel_g = self._group(g, x, m, kernel)
            parts.append(self._vjp_input_group(m_g, x_g, kernel_g))
        return parts[0] if self.groups == 1 else ops.concatenate(parts, axis=-1)

    def _vjp_params(self, m, x, kernel, bias, sum_batch) -> list:
        """Each group's kernel and bias products (its block's ``X_patch,g^T M_g``), concatenated
        over the filter axis, the last of ``K`` and ``b``: ``K``'s column ``f`` of group ``g``
        meets only that group's channels."""
        parts = []
        for g in range(self.groups):
            x_g, m_g, kernel_g, bias_g = self._group(g, x, m, kernel, bias)
            parts.append(self._vjp_params_group(m_g, x_g, kernel_g, bias_g, sum_batch))
        if self.groups == 1:
            return parts[0]
        return [ops.concatenate(list(p), axis=-1) for p in zip(*parts, strict=True)]

    def _squared_norms(self, m, x, kernel, bias) -> list:
        """Per sample ``||dK_i||^2 = sum_g ||dK_{i,g}||^2`` (the groups' blocks are disjoint
        columns of ``K``), likewise for the bias."""
        total = None
        for g in range(self.groups):
            x_g, m_g, kernel_g, bias_g = self._group(g, x, m, kernel, bias)
            norms = self._squared_norms_group(m_g, x_g, kernel_g, bias_g)
            total = norms if total is None else [a + b for a, b in zip(total, norms, strict=True)]
        return total

    # --- one group, channels_last: Lemmas 2-3 (module docstring) -------------------------------

    def _forward_group(self, x: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
        """``Z = X T(K)^T + b``: ``(batch, *spatial, C)`` -> ``(batch, *spatial_out, F)``, with
        ``T(K)`` applied as ``route_for`` says: formed for ``x``'s size (``build_toeplitz``;
        dense, or sparse over budget) and multiplied, or applied as the convolution
        (``ImplicitConv.apply``). Under ``toeplitz="auto"`` a batch with a NaN or an infinity
        takes the convolution, so that it stays in its receptive field as in stock Keras (a
        dense ``T(K)`` multiplies it by every zero of its column: ``0 * NaN = NaN`` in every
        output of its sample)."""
        image = self._view(x)
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
            positions = index.shape[0] // index.output_shape[-1]
            b = ops.tile(bias, (positions,)) if self.bias_mode == "tied" else ops.reshape(bias, -1)
            z = backend.bias_add(z, b)  # fused into the matmul by TensorFlow's graph optimizer
        return ops.reshape(z, (-1, *index.output_shape[len(self._lead) :]))

    def _vjp_input_group(self, m: Tensor, x: Tensor, kernel: Tensor) -> Tensor:
        """``(J_x z)^T m = T(K)^T m`` for each of the ``V`` vectors of each sample,
        ``(V, batch, *spatial_out, F)`` -> ``(V, batch, *spatial, C)``: the rows
        ``Delta T(K)`` of one product, or the transposed convolution of the ``V batch`` rows
        (``ImplicitConv.apply_transpose``; under ``"auto"`` also for rows with a NaN or an
        infinity, as ``forward``)."""
        image = self._view(x)
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
        out = range(2, len(m.shape))
        rows = ops.reshape(m, (-1, *self._lead, *(static_size(m, a) for a in out)))
        sizes = tuple(static_size(image, 1 + a) for a in range(len(image.shape) - 2))
        dx = self.implicit.apply_transpose(rows, self.view_kernel(kernel), sizes)
        return ops.reshape(dx, (static_size(m, 0), *ops.shape(x)))

    def _materialized_vjp_input(self, m: Tensor, x: Tensor, image: Tensor, kernel: Tensor):
        index, _ = self.index_for(image)
        rows = ops.reshape(m, (-1, index.shape[0]))  # (V batch, R)
        dx = toeplitz_product(rows, self.build_toeplitz(kernel, image), transpose=True)
        return ops.reshape(dx, (static_size(m, 0), *ops.shape(x)))

    def _vjp_params_group(self, m, x, kernel, bias=None, sum_batch=True) -> list:
        """``(J_{Vec(K), b} z)^T m``: the kernel product ``Vec(X_patch^T M_v)`` and the tied
        bias' ``1^T M_v`` (``M_v`` the ``P x F`` matrix of vector ``v``) from one patch product
        (``ConvIndex.kernel_products``), summed over the batch or per sample; an untied bias'
        product is ``m`` itself (``J_{Vec(B)} z`` is a permutation), summed or not. On the
        implicit route one vector summed over the batch is the filter gradient
        (``ImplicitConv.kernel_gradient``) and the tied bias ``m`` summed over the batch and
        positions.

        Shapes ``(V, *p.shape)`` each, or ``(V, batch, *p.shape)`` without ``sum_batch``.
        """
        image = self._view(x)
        stacks = static_size(m, 0)
        if self.route_for(image) == "implicit" and sum_batch and stacks == 1:
            delta = ops.reshape(m[0], (-1, *self._lead, *ops.shape(m)[2:]))
            kernel_shape = (*self._lead, *kernel.shape)
            grads = [self.implicit.kernel_gradient(image, delta, kernel_shape)]
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

    def _squared_norms_group(self, m, x, kernel, bias=None) -> list:
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
        x = self._view(x)
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
        f = m.shape[-1]
        if not dynamic and len(kernel_size) == 2 and max(strides) > 1:
            # strided windows: the backend's patch extraction (measured 5 ms against 29 ms
            # for the strided views of the wide CNN's second layer, batch 64)
            patches = backend.image_patches(x, kernel_size, strides, dilation)  # (b, P, M)
            positions, entries = math.prod(out), patches.shape[-1]
            delta = ops.reshape(m[0], (-1, positions, f))
            if positions * (entries + f) < entries * f:  # Gram form
                norms = [patch_product_squared_norms(patches, delta)]
            else:  # outer form: (M x P) (P x F) per sample
                norms = [squared_norms_of(ops.matmul(ops.swapaxes(patches, 1, 2), delta))]
            return self._bias_norms(norms, delta, bias)
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
        delta = ops.reshape(m[0], (batch, positions, f))
        entries = taps * channels
        if not dynamic and positions * (entries + f) < entries * f:  # Gram form, X_patch,i P x M
            patches = ops.reshape(ops.transpose(views, (0, 2, 1, 3)), (batch, positions, entries))
            norms = [patch_product_squared_norms(patches, delta)]
        elif channels == 1:  # outer form: (taps x P) (P x F) per sample
            norms = [squared_norms_of(ops.matmul(views[..., 0], delta))]
        else:  # outer form: (C x P) (P x F) per tap and sample
            products = ops.matmul(ops.swapaxes(views, -1, -2), delta[:, None])  # adj_x folded
            norms = [squared_norms_of(products)]
        return self._bias_norms(norms, delta, bias)

    def _bias_norms(self, norms: list, delta: Tensor, bias: Tensor | None) -> list:
        """``norms`` and, with a bias, its squared norms per sample from ``delta``
        ``(batch, P, F)``: tied ``||1^T Delta_i||^2``, untied ``||Delta_i||^2``."""
        if bias is not None:
            tied = self.bias_mode == "tied"
            norms.append(squared_norms_of(ops.sum(delta, axis=1) if tied else delta))
        return norms

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """Keras' output shape: ``(batch, *spatial_out, F)``, channels_first
        ``(batch, F, *spatial_out)`` (``geometry.output_size``; None stays None)."""
        last = self._shape_last(input_shape)
        sizes = [
            None if n is None else geometry.output_size(n, k, s, self.padding, d)
            for n, k, s, d in zip(
                last[1:-1], self.kernel_size, self.strides, self.dilation_rate, strict=True
            )
        ]
        return self._shape_layout((input_shape[0], *sizes, self.filters))

    def dense_kernel(self, kernel: Tensor) -> Tensor:
        """``K`` ``(*k, C / G, F)`` of ``groups = G`` as the ungrouped kernel ``(*k, C, F)`` of
        the same map: block diagonal, ``K'[..., c, f] = K[..., c - g C/G, f]`` when input
        channel ``c`` and filter ``f`` are both in group ``g``, else 0. One group: ``K``."""
        if self.groups == 1:
            return kernel
        groups, channels = self.groups, self._channels
        c, f = channels // groups, kernel.shape[-1] // groups
        rank = len(kernel.shape) - 2
        blocks = [
            ops.pad(
                kernel[..., g * f : (g + 1) * f],
                [(0, 0)] * rank + [(g * c, channels - (g + 1) * c), (0, 0)],
            )
            for g in range(groups)
        ]
        return ops.concatenate(blocks, axis=-1)

    def toeplitz_matrix(self, input_shape: tuple | None = None) -> Tensor:
        """``T(K)`` ``(R, N)`` for the current kernel, dense (``tf_jacbp.toeplitz.conv_matrix``),
        over the ``vec`` of one sample as the layer sees it: with ``groups`` the ``T`` of the
        block-diagonal kernel (``dense_kernel``), channels_first its rows and columns permuted
        (``tf_jacbp.geometry.channels_first_order``).

        ``input_shape`` (one sample, ``(H, W, C)``, channels_first ``(C, H, W)``) defaults to
        the one the layer was built for (required when it was built for inputs of varying
        size).
        """
        kernel = self.dense_kernel(self.read_parameters()[0])
        if input_shape is None:
            shape = (*self._index_or_built(None)[0].input_shape[:-1], self._channels)
        else:
            shape = self._lead + self._shape_last((None, *input_shape))[1:]
        kernel_size, strides, dilation = self._image_geometry()
        t = toeplitz.conv_matrix(
            ops.reshape(kernel, (*kernel_size, *kernel.shape[-2:])),
            shape,
            strides,
            self.padding,
            dilation,
            budget_bytes=self.toeplitz_budget_bytes,
        )
        out = toeplitz.conv_index(
            (*kernel_size, *kernel.shape[-2:]), shape, strides, self.padding, dilation
        ).output_shape
        return self._matrix_layout(t, out[len(self._lead) :], shape[len(self._lead) :])

    def jacobian_factors(self, x: Tensor) -> dict[str, Tensor]:
        """``{"T(K)": (R, N), "[I (x) X_patch | J_b]": (R, |K| + |b|)}`` at one sample ``x``
        ``(*spatial, C)`` or channels_first ``(C, *spatial)`` (Lemmas 2-3: the input and the
        parameter Jacobian of ``z``)."""
        t = ops.cast(self.toeplitz_matrix(tuple(x.shape)), x.dtype)
        return {"T(K)": t, "[I (x) X_patch | J_b]": self.parameter_jacobian(x)}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "groups": self.groups, "bias": self.bias_mode}

    def reference(self, x: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
        """``keras.ops.conv`` (the stock convolution, differentiated by autodiff; grouped when
        ``K`` has ``C / groups`` input channels, which Keras compiles with XLA on TensorFlow's
        CPU), then the bias added (tied ``(F,)`` broadcast over positions, untied its own
        shape). ``"causal"`` is Keras' padding: ``(k - 1) d`` zeros before, then ``"valid"``.
        channels_first: the input permuted to channels_last, the stock convolution, the output
        permuted back (TensorFlow's CPU kernels take channels_last only)."""
        x, bias = self._last(x), self._bias_last(bias)
        padding = self.padding
        if padding == "causal":
            left = (self.kernel_size[0] - 1) * self.dilation_rate[0]
            x, padding = ops.pad(x, [(0, 0), (left, 0), (0, 0)]), "valid"
        z = ops.conv(
            x, kernel, strides=self.strides, padding=padding, dilation_rate=self.dilation_rate
        )
        return self._layout(z if bias is None else z + bias)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Conv2D(ToeplitzConv):
    """2-D convolution that multiplies by its materialized Toeplitz matrix ``T(K)``.

    Arguments as ``keras.layers.Conv2D``, plus ``bias``, ``toeplitz_budget_bytes`` and
    ``toeplitz``.

    Args:
        filters: ``F``, the number of output channels (a positive integer).
        kernel_size: ``(kh, kw)`` or one int for both.
        strides: ``(s_h, s_w)`` or one int, >= 1.
        padding: ``"valid"`` or ``"same"`` (TensorFlow's rule, ``tf_jacbp.geometry.same_padding``).
        data_format: ``None`` (Keras' ``image_data_format()``), ``"channels_last"`` or
            ``"channels_first"``: input ``(batch, C, H, W)``, output ``(batch, F, H_out,
            W_out)``, computed channels_last between two permutations, so that every Jacobian
            (``jacobian``, ``jacobian_rows``, ``toeplitz_matrix``) is over the row-major ``vec``
            of the sample as the layer sees it, ``(C, H, W)`` (``tf_jacbp.layers.toeplitz_layer``).
        dilation_rate: ``(d_h, d_w)`` or one int, >= 1. As in Keras, ``strides > 1`` together with
            ``dilation_rate > 1`` is an error (the reference route cannot differentiate it on CPU).
        groups: ``G``, a positive integer dividing ``F`` and ``C`` (Keras' checks and messages):
            input channels ``[g C/G, (g+1) C/G)`` reach only filters ``[g F/G, (g+1) F/G)``
            through ``K[..., g F/G : (g+1) F/G]``, so ``T(K)`` is block diagonal over the groups
            and every product is taken one group at a time (``ToeplitzConv._forward``). The
            memory guard and ``toeplitz="auto"`` weigh one group's ``T(K)``.
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
    shape ``(kh, kw, C / groups, F)``. ``C`` must be known. With ``H, W`` known
    (``keras.Input((28, 28, 1))``) ``T(K)`` is built and guarded at build; with
    ``keras.Input((None, None, C))`` it is built for each static size the layer is called with
    (``toeplitz_index``, guarded and cached).
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
