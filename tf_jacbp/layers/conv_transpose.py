"""Conv2DTranspose as a Toeplitz matrix read the other way: ``y = T(K)^T vec(x) + b``, ``a = f(y)``.

A transposed convolution is the map a convolution's input gradient applies, so it multiplies by
the transpose of that convolution's Toeplitz matrix (docs/math.md, Lemmas 2-3; the derivation is
docs/conv_transpose.md). For an input ``x`` of shape ``(H, W, C)`` and a kernel ``K`` of Keras'
shape ``(kh, kw, F, C)``, let ``T(K)`` be the Toeplitz matrix (``tf_jacbp.toeplitz``) of the
convolution with the same kernel, strides, padding and dilation that maps an image of the
OUTPUT's shape ``(H_out, W_out, F)`` to one of the INPUT's shape ``(H, W, C)``: ``K`` read as a
convolution kernel ``(kh, kw, C_in = F, C_out = C)``, exactly as it is stored. Then, with
``N = H W C`` (input entries), ``R = H_out W_out F`` (output entries), ``T(K)`` is ``N x R`` and,
for one sample:

* forward: ``y = T(K)^T x + b`` (``b``: one bias per filter, repeated at every position);
* ``J_x y = T(K)^T``, so ``(J_x y)^T delta = T(K) delta``: the same matrix, read the other way;
* ``y_k = x^T T(K) e_k`` is the convolution of ``e_k`` (an image of the output's shape) paired
  with ``x``, so ``(J_{Vec(K)} y)^T delta`` is the convolution's kernel gradient with the roles of
  input and upstream gradient swapped: the patch matrix of ``delta`` times ``x`` (``vjp_params``);
* ``(J_b y)^T delta`` is ``delta`` summed over the output positions.

Batches are rows: ``Y = X T(K) + b``, ``dX = Delta T(K)^T``, ``dK`` summed over the batch in the
convolution's one patch-matrix product. The output size along each axis is Keras' (its
``compute_conv_transpose_output_shape``, ``transpose_output_size`` here), and the convolution from
that size back to the input's size must exist (``output_padding`` checked at build). ``T(K)``
depends on the input's size: one ``ConvIndex`` per static size seen, and maps computed when the
graph runs for a size unknown when traced (``index_for``), as for ``Conv2D``.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp import backend, toeplitz
from tf_jacbp._backend import keras
from tf_jacbp.contract import squared_norms_of
from tf_jacbp.layers.base import patch_product_squared_norms
from tf_jacbp.layers.toeplitz_layer import _ToeplitzIndexed
from tf_jacbp.toeplitz import static_size, toeplitz_product
from tf_jacbp.toeplitz_dynamic import DynamicConvIndex

Tensor = Any  # a tensor of Keras' backend


def transpose_output_size(
    size: int,
    kernel_size: int,
    stride: int,
    padding: str,
    output_padding: int | None = None,
    dilation: int = 1,
) -> int:
    """Keras' output size of a transposed convolution along one axis.

    With the dilated kernel ``k' = (k - 1) d + 1`` and input size ``n``:

    * ``"valid"``: ``(n - 1) s + k' + p``, ``p = output_padding`` or, if None,
      ``max(k', s) - k'`` (then ``n s + max(k' - s, 0)``);
    * ``"same"``: ``n s`` if ``output_padding`` is None, else ``(n - 1) s + (k' mod 2) + p``.
    """
    extent = (kernel_size - 1) * dilation + 1
    if padding == "valid":
        extra = max(extent, stride) - extent if output_padding is None else output_padding
        return (size - 1) * stride + extent + extra
    if output_padding is None:
        return size * stride
    return (size - 1) * stride + extent % 2 + output_padding


def check_output_padding(
    output_padding: Any, strides: tuple[int, int], owner: str
) -> tuple[int, int] | None:
    """``None`` or ``(p_h, p_w)``, each an integer with ``0 <= p < stride`` (Keras' rule); else a
    ValueError naming ``output_padding``."""
    if output_padding is None:
        return None
    pair = (output_padding,) * 2 if isinstance(output_padding, int) else output_padding
    try:
        pair = tuple(pair)
    except TypeError:
        pair = ()
    if len(pair) != 2 or any(isinstance(p, bool) or not isinstance(p, int) for p in pair):
        raise ValueError(
            f"{owner}: output_padding must be None, a non-negative integer or a pair of them "
            f"(height, width), got output_padding={output_padding!r}."
        )
    if any(p < 0 or p >= s for p, s in zip(pair, strides, strict=True)):
        raise ValueError(
            f"{owner}: each output_padding must satisfy 0 <= output_padding < strides (as in "
            f"Keras), got output_padding={output_padding!r} with strides={strides}. Use a "
            "smaller output_padding or None (the size Keras infers)."
        )
    return int(pair[0]), int(pair[1])


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Conv2DTranspose(_ToeplitzIndexed):
    """2-D transposed convolution that multiplies by the transpose of a materialized ``T(K)``.

    Arguments as ``keras.layers.Conv2DTranspose``, plus ``toeplitz_budget_bytes`` and
    ``toeplitz``.

    Args:
        filters: ``F``, the number of output channels (a positive integer).
        kernel_size: ``(kh, kw)`` or one int for both.
        strides: ``(s_h, s_w)`` or one int, >= 1.
        padding: ``"valid"`` or ``"same"``.
        output_padding: ``None`` (Keras infers the output size) or ``(p_h, p_w)`` / one int with
            ``0 <= p < stride``: the output size is then ``transpose_output_size``'s. A value for
            which no convolution maps the output's size back to the input's (``"same"`` with an
            even kernel and ``output_padding=0``; stock Keras fails there too, when called) is a
            ValueError at build.
        data_format: ``None`` (Keras' ``image_data_format()``), ``"channels_last"`` or
            ``"channels_first"`` (input ``(batch, C, H, W)``, output ``(batch, F, H_out,
            W_out)``; computed channels_last between two permutations, so every Jacobian is
            over the ``vec`` of the channels_first sample: ``tf_jacbp.layers.toeplitz_layer``).
        dilation_rate: ``(d_h, d_w)`` or one int, >= 1. As in Keras, ``strides > 1`` together with
            ``dilation_rate > 1`` is an error.
        activation: a name, Keras' own function for it (``keras.activations.relu``) or ``None``
            (``tf_jacbp.activations.get``); its Jacobian ``D`` follows.
        use_bias: whether ``y`` has a bias (one per filter, shape ``(F,)``).
        kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer,
        activity_regularizer, kernel_constraint, bias_constraint: as in Keras.
        toeplitz_budget_bytes: the memory budget for ``T(K)``, as for ``Conv2D``: over budget a
            sparse matrix (with a warning; not XLA-compatible), or a ValueError when even
            that does not fit.

    ``groups`` (not a Keras argument here either) and Keras' LoRA and quantization arguments are
    ValueErrors naming them.

    Input ``(batch, H, W, C)`` with ``C`` known; output ``(batch, H_out, W_out, F)``. Built for
    ``keras.Input((None, None, C))``, the layer builds ``T(K)`` for each size it is called with
    (``toeplitz_index``, each under the memory guard) and keeps them; a traced function of unknown
    size (``fit`` after a second size) computes the maps when it runs (``index_for``), as
    ``Conv2D`` does, with the memory guard and the ``output_padding`` check asserted then. The
    kernel has Keras' shape
    ``(kh, kw, F, C)``, so weights copy to and from ``keras.layers.Conv2DTranspose``.

    Example (the transpose of Lemma 2's ``4 x 9`` matrix: a ``2 x 2`` input to ``3 x 3``):
        >>> layer = tf_jacbp.layers.Conv2DTranspose(1, 2, use_bias=False)
        >>> layer.build((None, 2, 2, 1))
        >>> layer.toeplitz_matrix().shape
        TensorShape([9, 4])
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int],
        strides: int | tuple[int, int] = (1, 1),
        padding: str = "valid",
        output_padding: int | tuple[int, int] | None = None,
        data_format: str | None = None,
        dilation_rate: int | tuple[int, int] = (1, 1),
        activation: Any = None,
        use_bias: bool = True,
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
        owner = type(self).__name__
        if "groups" in kwargs:
            raise ValueError(
                f"{owner}: groups is not supported, got groups={kwargs['groups']!r}. Neither "
                "keras.layers.Conv2DTranspose nor tf_jacbp builds grouped transposed "
                "convolutions; remove the argument (or split the channels and concatenate)."
            )
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
        self.output_padding = check_output_padding(output_padding, self.strides, owner)

    def _kernel_shape(self, channels: int) -> tuple[int, ...]:
        """Keras' ``(kh, kw, F, C)``, which ``T(K)``'s convolution reads as it is stored:
        ``(kh, kw, C_in = F, C_out = C)``."""
        return (*self.kernel_size, self.filters, channels)

    def _output_sizes(self, sizes: tuple) -> list[Any]:
        """``[H_out, W_out]`` for ``sizes = (H, W)`` (ints, None, or scalar tensors)."""
        paddings = self.output_padding or (None, None)
        return [
            None if n is None else transpose_output_size(n, k, s, self.padding, p, d)
            for n, k, s, p, d in zip(
                sizes, self.kernel_size, self.strides, paddings, self.dilation_rate, strict=True
            )
        ]

    def _static_index(self, spatial: tuple[int, ...], owner: str) -> toeplitz.ConvIndex:
        """The convolution read the other way: from the output's shape to the input's. A
        ValueError when it does not map the output's size back to ``spatial``
        (``output_padding``)."""
        out_h, out_w = self._output_sizes(spatial)
        index = self._conv_index((out_h, out_w), owner)
        if index.output_shape[:2] != spatial:
            raise ValueError(
                f"{owner}: with output_padding={self.output_padding}, the output would be "
                f"{out_h} x {out_w}, but a convolution (kernel_size={self.kernel_size}, "
                f"strides={self.strides}, padding={self.padding!r}, dilation_rate="
                f"{self.dilation_rate}) of that size gives {index.output_shape[:2]}, not the "
                f"input's {spatial}, so there is no transposed convolution. Use "
                "output_padding=None or another output_padding (with padding='same' and an "
                "even kernel, output_padding >= 1)."
            )
        return index

    def _dynamic_index(self, x: Tensor) -> DynamicConvIndex:
        """The same convolution from the output's size (``transpose_output_size`` of the runtime
        ``H, W``), with the check that it maps back to ``(H, W)`` asserted when the graph runs."""
        height, width = ops.shape(x)[1], ops.shape(x)[2]
        index = self._dynamic_conv_index(*self._output_sizes((height, width)))
        maps_back = ops.all(ops.stack(index.output_shape[:2]) == ops.stack([height, width]))
        message = (
            f"{type(self).__name__} {self.name}: with output_padding={self.output_padding} no "
            "convolution maps the output's size back to the input's, so there is no transposed "
            "convolution; use output_padding=None. Input size:"
        )
        (rows,) = backend.assert_before(maps_back, [message, height, width], index.shape[0])
        index.shape = (rows, index.shape[1])
        return index

    def _forward(self, x: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
        """``Y = X T(K) + b``: ``(batch, H, W, C)`` -> ``(batch, H_out, W_out, F)``; per sample
        ``y = T(K)^T x + b``, ``T(K)`` formed for ``x``'s size (``build_toeplitz``) or applied
        as the transposed convolution (``ImplicitConv.apply_transpose``), as ``route_for``
        says; under ``toeplitz="auto"`` a batch with a NaN or an infinity takes the transposed
        convolution (so it stays local, as in stock Keras)."""
        if self.route_for(x) == "implicit":
            return self._implicit_forward(x, kernel, bias)
        if self.toeplitz == "auto":
            return ops.cond(
                ops.all(ops.isfinite(x)),
                lambda: self._materialized_forward(x, kernel, bias),
                lambda: self._implicit_forward(x, kernel, bias),
            )
        return self._materialized_forward(x, kernel, bias)

    def _implicit_forward(self, x: Tensor, kernel: Tensor, bias: Tensor | None) -> Tensor:
        sizes = self._output_sizes((static_size(x, 1), static_size(x, 2)))
        y = self.implicit.apply_transpose(x, kernel, tuple(sizes))
        return y if bias is None else y + bias

    def _materialized_forward(self, x: Tensor, kernel: Tensor, bias: Tensor | None) -> Tensor:
        index, _ = self.index_for(x)
        rows = ops.reshape(x, (-1, index.shape[0]))
        y = toeplitz_product(rows, self.build_toeplitz(kernel, x), transpose=True)
        if bias is not None:
            # b_f at every position; BiasAdd is fused into the matmul by TensorFlow's optimizer
            y = backend.bias_add(y, ops.tile(bias, (index.shape[1] // self.filters,)))
        return ops.reshape(y, (-1, *index.input_shape))

    def _vjp_input(self, m: Tensor, x: Tensor, kernel: Tensor) -> Tensor:
        """``(J_x y)^T m = T(K) m`` for each of the ``V`` vectors of each sample: the rows
        ``Delta T(K)^T``, or the convolution of the ``V batch`` rows
        (``ImplicitConv.apply``), ``(V, batch, H_out, W_out, F)`` -> ``(V, batch, H, W, C)``."""
        if self.route_for(x) == "implicit":
            return self._implicit_vjp_input(m, x, kernel)
        if self.toeplitz == "auto":
            return ops.cond(
                ops.all(ops.isfinite(m)),
                lambda: self._materialized_vjp_input(m, x, kernel),
                lambda: self._implicit_vjp_input(m, x, kernel),
            )
        return self._materialized_vjp_input(m, x, kernel)

    def _implicit_vjp_input(self, m: Tensor, x: Tensor, kernel: Tensor) -> Tensor:
        rows = ops.reshape(m, (-1, *(static_size(m, a) for a in (2, 3, 4))))
        dx = self.implicit.apply(rows, kernel)
        return ops.reshape(dx, (static_size(m, 0), *ops.shape(x)))

    def _materialized_vjp_input(self, m: Tensor, x: Tensor, kernel: Tensor) -> Tensor:
        index, _ = self.index_for(x)
        rows = ops.reshape(m, (-1, index.shape[1]))  # (V batch, R)
        dx = toeplitz_product(rows, self.build_toeplitz(kernel, x))
        return ops.reshape(dx, (static_size(m, 0), *ops.shape(x)))

    def _vjp_params(self, m, x, kernel, bias=None, sum_batch=True) -> list:
        """``(J_{Vec(K), b} y)^T m``: the convolution's kernel product with the roles swapped,
        ``m[v]`` the input of ``T``'s convolution and ``x`` its upstream vectors:
        ``dK[..., c] = M_patch,v^T x[..., c]`` (``M_patch,v`` ``(P, M)``, the patch matrix of
        ``m[v]``, ``P = H W``, ``M = kh kw F`` in ``K``'s storage order, ``stored_patches``),
        summed over the batch (one matmul ``(V, M, P batch) x (P batch, C)``) or per sample
        (``"npb,bpc->bnc"`` over the ``V M`` rows ``n``); the bias' ``m`` summed over positions.
        On the implicit route one vector summed over the batch is the convolution's filter
        gradient with the roles swapped (``ImplicitConv.kernel_gradient(m[0], x)``).

        Shapes ``(V, *p.shape)`` each, or ``(V, batch, *p.shape)`` without ``sum_batch``.
        """
        stacks, batch = static_size(m, 0), static_size(x, 0)
        implicit = self.route_for(x) == "implicit"
        if implicit and sum_batch and stacks == 1:
            grads = [self.implicit.kernel_gradient(m[0], x, tuple(kernel.shape))[None]]
            return grads + ([ops.sum(m, axis=(1, 2, 3))] if bias is not None else [])
        index = self.plain_index(x) if implicit else self.index_for(x)[0]
        patches = index.stored_patches(m, bias_row=False)  # (V, M, P, batch)
        entries = patches.shape[1]
        values = ops.reshape(x, (batch, -1, self._channels))  # (batch, P, C): T's upstream
        if sum_batch:
            rows = ops.reshape(ops.transpose(values, (1, 0, 2)), (-1, self._channels))
            products = ops.matmul(ops.reshape(patches, (stacks, entries, -1)), rows)
            grads = [ops.reshape(products, (stacks, *kernel.shape))]
            return grads + ([ops.sum(m, axis=(1, 2, 3))] if bias is not None else [])
        # The V vectors ride along with the rows (V M); moving the axis of V = 1 copies nothing.
        stacked = ops.reshape(patches, (stacks * entries, -1, batch))  # (V M, P, batch)
        products = ops.einsum("npb,bpc->bnc", stacked, values)  # (batch, V M, C)
        products = ops.transpose(ops.reshape(products, (batch, stacks, entries, -1)), (1, 0, 2, 3))
        grads = [ops.reshape(products, (stacks, batch, *kernel.shape))]
        return grads + ([ops.sum(m, axis=(2, 3))] if bias is not None else [])

    def _squared_norms(self, m, x, kernel, bias=None) -> list:
        """``[||dK_i||^2, ||db_i||^2]`` per sample, ``(batch,)`` each, without forming ``dK_i``.

        ``dK_i`` is ``DY_patch,i^T X_i`` (``M x C``; ``DY_patch,i`` the ``P x M`` patch matrix
        of ``m[0, i]``, ``X_i`` the ``P x C`` matrix of ``x_i``), so
        ``patch_product_squared_norms`` takes its cheaper exact form (Gram or outer); the bias'
        is ``||sum over positions of m[0, i]||^2``.
        """
        index = self.plain_index(x)
        patches = index.stored_patches(m[:1], bias_row=False)[0]  # (M, P, batch)
        values = ops.reshape(x, (static_size(x, 0), -1, self._channels))
        norms = [patch_product_squared_norms(ops.transpose(patches, (2, 1, 0)), values)]
        if bias is not None:
            norms.append(squared_norms_of(ops.sum(m[0], axis=(1, 2))))
        return norms

    def reference(self, x: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
        """``keras.ops.conv_transpose`` (the stock transposed convolution, differentiated by
        autodiff; its output size is Keras' rule with ``output_padding``), then the bias added.
        TensorFlow's CPU kernel has no dilation, so a dilated ``K`` is first spread out with zeros
        (``K'[p d_h, q d_w] = K[p, q]``, the kernel ``(k - 1) d + 1`` wide that dilation means),
        then used undilated (Keras' output size depends on ``(k - 1) d + 1`` only).
        channels_first: the input permuted to channels_last, the stock transposed convolution,
        the output permuted back (TensorFlow's CPU kernels take channels_last only)."""
        x = self._last(x)
        (d_h, d_w), (kh, kw, filters, channels) = self.dilation_rate, kernel.shape
        if d_h > 1 or d_w > 1:
            spread = ops.pad(
                ops.reshape(kernel, (kh, 1, kw, 1, filters, channels)),
                [(0, 0), (0, d_h - 1), (0, 0), (0, d_w - 1), (0, 0), (0, 0)],
            )
            spread = ops.reshape(spread, (kh * d_h, kw * d_w, filters, channels))
            kernel = spread[: (kh - 1) * d_h + 1, : (kw - 1) * d_w + 1]
        y = ops.conv_transpose(
            x,
            kernel,
            strides=self.strides,
            padding=self.padding,
            output_padding=self.output_padding,
        )
        return self._layout(y if bias is None else y + bias)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """``(batch, H_out, W_out, F)``, channels_first ``(batch, F, H_out, W_out)``, sizes by
        ``transpose_output_size`` (None stays None)."""
        last = self._shape_last(input_shape)
        return self._shape_layout((last[0], *self._output_sizes(tuple(last[1:3])), self.filters))

    def toeplitz_matrix(self, input_shape: tuple[int, int, int] | None = None) -> Tensor:
        """``T(K)^T`` ``(R, N)`` for the current kernel, dense: the matrix the forward pass
        multiplies by, the transpose of the convolution's ``T(K)``
        (``tf_jacbp.toeplitz.conv_matrix``, under the layer's memory budget).

        ``input_shape`` ``(H, W, C)`` (channels_first ``(C, H, W)``) defaults to the one the
        layer was built for. channels_first: rows and columns permuted to the ``vec`` of the
        channels_first output and input (``tf_jacbp.geometry.channels_first_order``).
        """
        shape = None if input_shape is None else self._shape_last((None, *input_shape))
        index, _ = self._index_or_built(shape)
        t = toeplitz.conv_matrix(
            self.read_parameters()[0],
            index.input_shape,
            self.strides,
            self.padding,
            self.dilation_rate,
            budget_bytes=self.toeplitz_budget_bytes,
        )
        return self._matrix_layout(ops.transpose(t), index.input_shape, index.output_shape)

    def jacobian_factors(self, x: Tensor) -> dict[str, Tensor]:
        """``{"T(K)^T": (R, N), "J_{Vec(K), b} y": (R, |K| + |b|)}`` at one sample ``x``
        ``(H, W, C)`` (channels_first ``(C, H, W)``): the input and the parameter Jacobian of
        ``y``."""
        t = ops.cast(self.toeplitz_matrix(tuple(x.shape)), x.dtype)
        return {"T(K)^T": t, "J_{Vec(K), b} y": self.parameter_jacobian(x)}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "output_padding": self.output_padding}
