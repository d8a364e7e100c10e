"""The base of the layers that multiply by a materialized Toeplitz matrix ``T(K)`` (docs/math.md,
Lemmas 2-3): ``ToeplitzConv`` (``Conv2D``, ``Conv1D``, ``Conv3D``; ``tf_jacbp.layers.conv``)
multiplies by ``T(K)`` of its own convolution, ``Conv2DTranspose``
(``tf_jacbp.layers.conv_transpose``) by the transpose of ``T(K)`` of the convolution from its
output's shape to its input's.

What they share is written here once: the Keras arguments and their checks, the index maps of
``T(K)`` for each input size (``tf_jacbp.toeplitz.ConvIndex``, built once per static size and
kept, each under the memory guard, or ``tf_jacbp.toeplitz_dynamic.DynamicConvIndex`` when the
size is known only when the graph runs), ``T(K)`` built from the kernel, and the weights. The
formulas of each layer (its forward pass and Jacobians) stay in its own module.

``data_format="channels_first"``: the formulas are written once, channels_last. A channels_first
input ``(batch, C, *spatial)`` is permuted to ``(batch, *spatial, C)`` where the contract enters
(``forward``, ``vjp_input``, ``vjp_params``, ``squared_norms``; ``m`` ``(V, batch, F, *o)``
likewise), the channels_last products are taken, and their results are permuted back where it
exits. A permutation ``P`` of the entries is linear, so the map the layer computes is
``z' = P_out z(P_in^T x')`` and its Jacobians are ``P_out J P_in^T``: every product and every
Jacobian is over the row-major ``vec`` of the sample *as the layer sees it* (channels_first:
``vec`` of ``(C, *spatial)``), which is what ``tf_jacbp.layout`` and ``jacobian_rows`` promise.
The index maps, ``route_for``, ``index_for``, ``toeplitz_index`` and ``conv_index`` are those
of the channels_last convolution (of one group, for a grouped ``ToeplitzConv``).
"""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp import activations, geometry, toeplitz
from tf_jacbp._backend import keras
from tf_jacbp.layers.base import _KernelBiasLayer, refuse_unsupported
from tf_jacbp.toeplitz_budget import check_budget
from tf_jacbp.toeplitz_dynamic import DynamicConvIndex
from tf_jacbp.toeplitz_implicit import ImplicitConv, check_route, choose_route

Tensor = Any  # a tensor of Keras' backend


class _ToeplitzIndexed(_KernelBiasLayer):
    """A layer that multiplies by the Toeplitz matrix ``T(K)`` of a convolution (or by its
    transpose): the arguments, the index maps of ``T(K)`` for each input size and the memory
    guard, written once for ``ToeplitzConv`` (``T(K)`` of the layer's own convolution) and
    ``Conv2DTranspose`` (``T(K)`` of the convolution from its output's shape to its input's).

    ``rank`` spatial axes (1, 2 or 3); a sequence (rank 1) is read as an image ``(1, T)`` of
    height 1 (``_image_geometry``; ``view_rank`` is the rank ``T(K)``'s index sees, at least 2).
    A subclass gives three small hooks: the kernel variable's shape (``_kernel_shape``; ``T(K)``'s
    convolution reads it as ``(k_1, ..., k_view_rank, C_in, C_out)``), the
    convolution's ``ConvIndex`` for one static size (``_static_index``) and its
    ``DynamicConvIndex`` for a size known only when the graph runs (``_dynamic_index``).
    """

    rank = 2
    paddings = geometry.PADDINGS

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, ...],
        strides: int | tuple[int, ...],
        padding: str,
        data_format: str | None,
        dilation_rate: int | tuple[int, ...],
        activation: Any,
        use_bias: bool,
        kernel_initializer: Any,
        bias_initializer: Any,
        kernel_regularizer: Any,
        bias_regularizer: Any,
        activity_regularizer: Any,
        kernel_constraint: Any,
        bias_constraint: Any,
        toeplitz_budget_bytes: int | None,
        toeplitz: str = "auto",
        **kwargs: Any,
    ):
        owner = type(self).__name__
        refuse_unsupported(owner, kwargs)
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if isinstance(filters, bool) or not isinstance(filters, int) or filters <= 0:
            raise ValueError(
                f"{owner}: filters must be a positive integer (the number of output channels), "
                f"got filters={filters!r}."
            )
        self.filters = filters
        self.kernel_size = geometry.as_tuple(kernel_size, self.rank, "kernel_size", owner)
        self.strides = geometry.as_tuple(strides, self.rank, "strides", owner)
        self.dilation_rate = geometry.as_tuple(dilation_rate, self.rank, "dilation_rate", owner)
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                f"{owner}: strides > 1 together with dilation_rate > 1 is not supported (as in "
                f"Keras), got strides={self.strides} and dilation_rate={self.dilation_rate}. Set "
                "one of them to 1."
            )
        self.padding = geometry.check_padding(padding, owner, self.paddings)
        self.data_format = geometry.check_data_format(data_format, owner, self.rank)
        self.groups = 1
        self.activation = activations.get(activation)
        self.use_bias = use_bias
        self.toeplitz_budget_bytes = (
            None
            if toeplitz_budget_bytes is None
            else check_budget(toeplitz_budget_bytes, f"{owner}(toeplitz_budget_bytes=...)")
        )
        self.set_weight_options(
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
        )
        self.toeplitz = check_route(toeplitz, owner)
        self.conv_index: toeplitz.ConvIndex | None = None
        self.sparse_toeplitz = False
        kernel_size, strides, dilation = self._image_geometry()
        self.implicit = ImplicitConv(kernel_size, strides, self.padding, dilation)

    def _kernel_shape(self, channels: int) -> tuple[int, ...]:
        """The kernel variable's shape for ``channels`` input channels."""
        raise NotImplementedError

    def _bias_shape(self, input_shape: tuple) -> tuple[int, ...]:
        """The bias variable's shape (``build``, after ``conv_index`` is set): one bias per
        filter, ``(F,)``."""
        return (self.filters,)

    def _size_fixed_by_weights(self) -> bool:
        """Whether a weight's shape depends on the input's spatial size (then ``build`` fixes
        it in the ``input_spec``). Default: no."""
        return False

    def _static_index(self, spatial: tuple[int, ...], owner: str) -> toeplitz.ConvIndex:
        """The ``ConvIndex`` of ``T(K)`` for inputs of static spatial size ``spatial`` (the
        layer's rank), after the checks that the size fits the layer."""
        raise NotImplementedError

    def _dynamic_index(self, x: Tensor) -> DynamicConvIndex:
        """The ``DynamicConvIndex`` of ``T(K)`` for the image batch ``x`` of unknown size."""
        raise NotImplementedError

    @property
    def view_rank(self) -> int:
        """The number of spatial axes of the view ``T(K)``'s index reads: ``max(rank, 2)``."""
        return max(self.rank, 2)

    @property
    def _lead(self) -> tuple[int, ...]:
        """The unit sizes put before the layer's own axes in the view (``(1,)`` for rank 1)."""
        return (1,) * (self.view_rank - self.rank)

    def _image_geometry(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(kernel_size, strides, dilation_rate)`` of the view, ``view_rank`` entries each."""
        lead = self._lead
        return lead + self.kernel_size, lead + self.strides, lead + self.dilation_rate

    def _conv_kernel_shape(self) -> tuple[int, ...]:
        """``(k_1, ..., C_in, C_out)``: the kernel as ``T(K)``'s convolution reads it."""
        return self._lead + self._kernel_shape(self._channels)

    def _budget_setting(self) -> str:
        """How to change the memory budget, for the guard's messages."""
        return (
            f"{type(self).__name__}(..., toeplitz_budget_bytes=...) or "
            "tf_jacbp.toeplitz.set_budget_bytes(...)"
        )

    def _conv_index(self, sizes: tuple[int, ...], owner: str) -> toeplitz.ConvIndex:
        """``ConvIndex`` of ``T(K)``'s convolution on an image ``(*sizes, C_in)``."""
        kernel_shape = self._conv_kernel_shape()
        _, strides, dilation = self._image_geometry()
        image = (*sizes, kernel_shape[-2])
        return toeplitz.conv_index(kernel_shape, image, strides, self.padding, dilation, owner)

    def _dynamic_conv_index(self, *sizes: Tensor) -> DynamicConvIndex:
        """``_conv_index`` for sizes known when the graph runs (``tf_jacbp.toeplitz_dynamic``)."""
        _, strides, dilation = self._image_geometry()
        return DynamicConvIndex(
            sizes,
            self._conv_kernel_shape(),
            strides,
            self.padding,
            dilation,
            budget=self._budget,
            owner=f"{type(self).__name__} {self.name}",  # no quotes: Assert escapes them
            setting=self._budget_setting(),
        )

    def build(self, input_shape: tuple) -> None:
        owner = f"{type(self).__name__} '{self.name}'"
        last = self._shape_last(input_shape)
        *spatial, channels = geometry.spatial_shape(last, self.rank, owner, True)
        self._check_channels(channels, input_shape, owner)
        self._channels = channels
        self._budget = (
            toeplitz.get_budget_bytes()
            if self.toeplitz_budget_bytes is None
            else self.toeplitz_budget_bytes
        )
        self._indices: dict[tuple[int, ...], tuple[toeplitz.ConvIndex, bool]] = {}
        self._routes: dict[tuple[int, ...], str] = {}
        if None not in spatial:  # the usual case: one size, its T(K) guarded now
            self.conv_index, self.sparse_toeplitz = self.toeplitz_index((None, *spatial, channels))
        self.add_kernel_and_bias(
            self._kernel_shape(channels), self._bias_shape(input_shape) if self.use_bias else None
        )
        # As Keras' convolutions, inputs of any spatial size are accepted (one T(K) per size),
        # unless the weights fix it (an untied bias).
        fixed = self._size_fixed_by_weights()
        first = self.data_format == "channels_first"
        axes = {i + 1 + first: n for i, n in enumerate(spatial) if n is not None and fixed}
        axes[1 if first else -1] = channels
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2, axes=axes)

    def _check_channels(self, channels: int, input_shape: tuple, owner: str) -> None:
        """A check of the input's channel count at build (``ToeplitzConv``: ``groups``
        divides it). Default: none."""

    # --- the layout: channels_first permuted to channels_last and back (module docstring) ------

    def _shape_last(self, shape: tuple) -> tuple:
        """A static shape in the layer's layout as channels_last (``(batch, C, *s)`` ->
        ``(batch, *s, C)``; channels_last as it is)."""
        shape = tuple(shape)
        if self.data_format == "channels_last" or len(shape) < 2:
            return shape
        return tuple(shape[a] for a in geometry.channels_last_axes(len(shape)))

    def _shape_layout(self, shape: tuple) -> tuple:
        """A channels_last static shape in the layer's layout (the inverse of
        ``_shape_last``)."""
        shape = tuple(shape)
        if self.data_format == "channels_last":
            return shape
        return tuple(shape[a] for a in geometry.channels_first_axes(len(shape)))

    def _last(self, t: Tensor, lead: int = 1) -> Tensor:
        """``t`` (``lead`` leading axes, then the layer's layout) as channels_last."""
        if self.data_format == "channels_last":
            return t
        return ops.transpose(t, geometry.channels_last_axes(len(t.shape), lead))

    def _layout(self, t: Tensor, lead: int = 1) -> Tensor:
        """A channels_last ``t`` (``lead`` leading axes) in the layer's layout."""
        if self.data_format == "channels_last":
            return t
        return ops.transpose(t, geometry.channels_first_axes(len(t.shape), lead))

    def _untied(self) -> bool:
        return getattr(self, "bias_mode", "tied") == "untied"

    def _bias_last(self, bias: Tensor | None, lead: int = 0) -> Tensor | None:
        """The bias as the channels_last formulas read it: an untied bias has the output's
        shape, ``(F, *o)`` channels_first, ``(*o, F)`` channels_last; a tied one is ``(F,)``."""
        if bias is None or not self._untied():
            return bias
        return self._last(bias, lead)

    def _bias_layout(self, grad: Tensor, lead: int) -> Tensor:
        """The inverse of ``_bias_last`` for a bias product with ``lead`` leading axes."""
        return self._layout(grad, lead) if self._untied() else grad

    def _matrix_layout(self, t: Tensor, out_shape: tuple, in_shape: tuple) -> Tensor:
        """A matrix ``(R, N)`` over the channels_last ``vec``s of one output ``out_shape`` and
        one input ``in_shape`` (``(*spatial, channels)`` each), over the layer's layout:
        channels_first, its rows and columns permuted (``geometry.channels_first_order``)."""
        if self.data_format == "channels_last":
            return t
        rows = geometry.channels_first_order(out_shape)
        columns = geometry.channels_first_order(in_shape)
        return ops.take(ops.take(t, rows, axis=0), columns, axis=1)

    # --- the contract, in the layer's layout; the channels_last products are the subclass's ---

    def forward(self, x: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
        """The layer's map in its layout: ``_forward`` of the channels_last input, permuted
        back (channels_first: ``z' = P_out z(P_in^T x')``, module docstring)."""
        return self._layout(self._forward(self._last(x), kernel, self._bias_last(bias)))

    def vjp_input(self, m, x, y, kernel, bias=None):
        """``(J_x z)^T m`` in the layer's layout, ``(V, batch, *y.shape[1:])`` ->
        ``(V, batch, *x.shape[1:])``: ``P_in (J^T (P_out^T m))``, the channels_last
        ``_vjp_input``."""
        dx = self._vjp_input(self._last(m, 2), self._last(x), kernel)
        return self._layout(dx, 2)

    def vjp_params(self, m, x, y, kernel, bias=None, sum_batch=True):
        """``(J_{Vec(K), b} z)^T m``, ``(V, *p.shape)`` each or ``(V, batch, *p.shape)``
        without ``sum_batch``: the channels_last ``_vjp_params`` of ``P_out^T m`` (``K`` and a
        tied ``b`` do not depend on the layout; an untied bias' product is permuted back)."""
        grads = self._vjp_params(
            self._last(m, 2), self._last(x), kernel, self._bias_last(bias), sum_batch
        )
        if len(grads) > 1:
            grads[1] = self._bias_layout(grads[1], 1 if sum_batch else 2)
        return grads

    def squared_norms(self, m, x, y, kernel, bias=None):
        """Per-sample squared norms of the parameter products, ``(batch,)`` each: those of the
        channels_last ``_squared_norms`` (a permutation keeps norms)."""
        return self._squared_norms(self._last(m, 2), self._last(x), kernel, self._bias_last(bias))

    def _forward(self, x: Tensor, kernel: Tensor, bias: Tensor | None) -> Tensor:
        """The forward pass on a channels_last batch."""
        raise NotImplementedError

    def _vjp_input(self, m: Tensor, x: Tensor, kernel: Tensor) -> Tensor:
        """``vjp_input`` on channels_last ``m`` and ``x``."""
        raise NotImplementedError

    def _vjp_params(self, m, x, kernel, bias, sum_batch) -> list:
        """``vjp_params`` on channels_last ``m``, ``x`` (and an untied bias' shape)."""
        raise NotImplementedError

    def _squared_norms(self, m, x, kernel, bias) -> list:
        """``squared_norms`` on channels_last ``m`` and ``x``."""
        raise NotImplementedError

    def toeplitz_index(self, input_shape: tuple) -> tuple[toeplitz.ConvIndex, bool]:
        """``(ConvIndex, sparse)`` for inputs of static shape ``(batch, *spatial, C)`` (the layer's
        own rank, or the image view; channels_last whatever the layer's ``data_format``; for a
        grouped ``ToeplitzConv`` the ``T(K)`` of one group): the index maps of ``T(K)`` for that
        size and whether the memory guard keeps ``T`` sparse (``tf_jacbp.toeplitz.use_sparse``).
        Built on first use for each size and kept. For ``Conv2DTranspose`` ``T(K)`` is the
        convolution's from the output's shape ``(H_out, W_out, F)`` to ``(H, W, C)``: its
        ``input_shape`` is the output's, its ``output_shape`` the input's.

        Raises a ValueError when a spatial size is not known statically (``index_for(x)`` serves
        that case, with the maps computed when the graph runs), or when the size does not fit the
        layer (a window larger than a ``"valid"`` input; for ``Conv2DTranspose`` an
        ``output_padding`` from whose output size no convolution maps back to ``(H, W)``).
        """
        owner = f"{type(self).__name__} '{self.name}'"
        spatial = tuple(input_shape[1:-1])[-self.rank :]
        if any(n is None for n in spatial):
            raise ValueError(
                f"{owner}: toeplitz_index builds the NumPy index maps of T(K) for one static "
                f"size, got input shape {tuple(input_shape)}. For a size known only when the "
                "graph runs, index_for(x) computes the same maps with TensorFlow ops."
            )
        spatial = tuple(int(n) for n in spatial)
        if spatial not in self._indices:
            index = self._static_index(spatial, owner)
            route = choose_route(self.toeplitz, index, self.compute_dtype, self._budget)
            sparse = route == "materialize" and toeplitz.use_sparse(
                index, self.compute_dtype, self._budget, owner, self._budget_setting()
            )
            if sparse:  # the sparse product has no XLA kernel
                self.supports_jit = False
            self._indices[spatial] = (index, sparse)
            self._routes[spatial] = route
        return self._indices[spatial]

    def route_for(self, x: Tensor) -> str:
        """``"materialize"`` or ``"implicit"``: how ``T(K)`` is applied to the image batch ``x``
        (the view). A static size takes the route chosen when its index was built
        (``tf_jacbp.toeplitz_implicit.choose_route``: ``toeplitz="auto"`` materializes a ``T(K)``
        that fits and is cheaper); a size unknown when traced is implicit unless the layer was
        made with ``toeplitz="materialize"``."""
        if None not in tuple(x.shape[1:-1]):
            self.toeplitz_index(x.shape)
            return self._routes[tuple(int(n) for n in x.shape[1:-1])[-self.rank :]]
        return "materialize" if self.toeplitz == "materialize" else "implicit"

    def plain_index(self, x: Tensor) -> toeplitz.ToeplitzProducts:
        """The index maps of ``T(K)`` for the image batch ``x`` without the memory guard of the
        dense ``T``: the implicit route reads only the shapes and the patch maps (``M P``
        entries, not ``R N``)."""
        if None not in tuple(x.shape[1:-1]):
            owner = f"{type(self).__name__} '{self.name}'"
            return self._static_index(tuple(int(n) for n in x.shape[1:-1])[-self.rank :], owner)
        return self._dynamic_index(x)

    def view_kernel(self, kernel: Tensor) -> Tensor:
        """``K`` as the view's convolution reads it: ``(*lead, *K.shape)`` (``(1, k, C, F)`` for
        ``Conv1D``; no copy)."""
        return ops.reshape(kernel, self._lead + tuple(kernel.shape)) if self._lead else kernel

    def index_for(self, x: Tensor) -> tuple[toeplitz.ToeplitzProducts, bool]:
        """``(index, sparse)`` for the image batch ``x`` ``(batch, *spatial, C)`` (the view):
        ``toeplitz_index`` when the spatial sizes are static (the guarded, cached NumPy maps),
        else a ``tf_jacbp.toeplitz_dynamic.DynamicConvIndex`` computing the same maps from
        ``x``'s run-time shape when the graph runs (dense ``T``, its memory guard asserted then; for
        ``Conv2DTranspose`` also the check that the convolution maps back to ``(H, W)``)."""
        if None not in tuple(x.shape[1:-1]):
            return self.toeplitz_index(x.shape)
        return self._dynamic_index(x), False

    def build_toeplitz(self, kernel: Tensor, input_shape: tuple | Tensor | None = None) -> Tensor:
        """``T(K)^T`` dense, or ``T(K)`` sparse over the memory budget, for inputs of shape
        ``input_shape`` (``toeplitz_index``; default: the size built for), or for the image batch
        given instead (``index_for``: any size, known or not when traced).

        With ``N`` input and ``R`` output entries: for a convolution (``z = T(K) vec(x)``)
        ``T(K)^T`` is ``(N, R)`` and ``T(K)`` ``(R, N)``; for ``Conv2DTranspose``
        (``y = T(K)^T vec(x)``) ``T(K)^T`` is ``(R, N)`` and ``T(K)`` ``(N, R)``.
        """
        if ops.is_tensor(input_shape):
            index, sparse = self.index_for(input_shape)
        else:
            index, sparse = self._index_or_built(input_shape)
        return index.sparse_matrix(kernel) if sparse else index.transpose_matrix(kernel)

    def _index_or_built(self, input_shape: tuple | None) -> tuple[toeplitz.ConvIndex, bool]:
        if input_shape is not None:
            return self.toeplitz_index(tuple(input_shape))
        if self.conv_index is None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' was built for inputs of varying size; give "
                "the input's shape (or the input) to choose the size of T(K)."
            )
        return self.conv_index, self.sparse_toeplitz

    def image(self, t: Tensor) -> Tensor:
        """A batch in the layer's layout as the channels_last view the index maps read
        (``route_for``, ``plain_index``, ``index_for``): channels_first ``(batch, C, *spatial)``
        permuted to ``(batch, *spatial, C)``, then ``_view``."""
        return self._view(self._last(t))

    def _view(self, t: Tensor) -> Tensor:
        """A channels_last batch ``(batch, *spatial, C)`` as the view ``(batch, *lead, *spatial,
        C)``: a sequence ``(batch, T, C)`` is the image ``(batch, 1, T, C)`` of height 1 (same
        ``vec``); images and volumes are their own view."""
        return t[:, None] if self.rank == 1 else t

    def jacobian_ops(self, training: bool = False) -> list:
        """The Toeplitz product (``z = T(K) vec(x) + b``; ``Conv2DTranspose``:
        ``y = T(K)^T vec(x) + b``), then ``a = f(z)``."""
        return [(self, self.read_parameters()), (self.activation, [])]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "data_format": self.data_format,
                "dilation_rate": self.dilation_rate,
                "activation": activations.serialize(self.activation),
                "use_bias": self.use_bias,
                **self.weight_options_config(),
                "toeplitz_budget_bytes": self.toeplitz_budget_bytes,
                "toeplitz": self.toeplitz,
            }
        )
        return config
