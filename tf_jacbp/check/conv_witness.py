"""The witness of a convolution on the implicit route: one that shares no kernel with it.

A convolution with ``toeplitz="implicit"`` (or ``"auto"`` above the crossover,
``tf_jacbp.toeplitz_implicit``) applies ``T(K)`` by the convolution (``keras.ops.conv``), the
transposed convolution (``backend.conv_input_product``) and the filter gradient
(``backend.conv_kernel_product``). Stock autodiff of its reference route (``keras.ops.conv``)
runs those same transposed-convolution and filter-gradient kernels, so comparing the two proves
little. ``GradientCheck`` and ``tf_jacbp.testing.check_layer`` therefore compare such a layer
with one of

* ``MATERIALIZED_T``: autodiff of the product with the materialized ``T(K)``,
  ``materialized_reference``: ``Z = X T(K)^T + b`` for a convolution, ``Y = X T(K) + b`` for
  ``Conv2DTranspose``, ``T(K)^T`` gathered from ``K`` by its index maps
  (``ToeplitzProducts.transpose_matrix``: two ``ops.take``). Autodiff differentiates a matrix
  product and two gathers: no convolution kernel. Used where a training step with the dense
  float64 ``T(K)`` on the probe fits the budget (``fits_budget``);
* ``UNFOLDED_PATCHES``: where ``T(K)`` does not fit but the probe's patch matrices do
  (``patches_fit``; convolutions, not ``Conv2DTranspose``): autodiff of
  ``z_b = X_patch,b K + b`` (Lemma 3's ``J_{Vec(K)} z = I_F (x) X_patch``), the patches gathered
  from the input by ``ops.take`` (``patch_reference``): a gather and a matrix product, no
  convolution kernel (the gather's gradient is a scatter-add, not a transposed convolution);
* ``FLOAT64_FINITE_DIFFERENCES``: float64 central differences of the loss, where neither fits: the
  forward convolution only, never a gradient kernel. The layer's reference route then stays
  stock autodiff (which shares the kernels, so ``GradientCheck`` counts that record as not
  independent) and the differences run beside it: ``GradientCheck`` adds its directional finite
  differences of every variable, ``check_layer`` its check 2 (every entry of every parameter);

and say which (``STOCK_AUTODIFF`` for every other layer, whose reference route is independent
of its Jacobian formulas: stock ops against the materialized products or other code).

``ConvWitnesses`` applies the choice: inside it (``with witnesses:``, around the tracing of a
reference route) each Toeplitz layer it was given takes ``reference_for(layer)`` as its
``reference``, which decides per call, from the input's size, and records what it chose.

The budget: ``fits_budget`` compares ``ConvIndex.step_bytes`` of the dense float64 ``T(K)`` (the
measured peak of a training step with it: ``T``, its index maps as graph constants, one
sample) with the layer's ``toeplitz_budget_bytes`` or the process-wide budget, read when the
reference route is traced. The witness holds ``T(K)`` and autodiff's gradient of it, ``2 R N``
entries, for each of the routes traced (the model's dtype and its float64 twin).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from keras import ops

from tf_jacbp import toeplitz

Tensor = Any

STOCK_AUTODIFF = "stock autodiff"
"""The layer's own reference route (stock ops) differentiated by autodiff."""

MATERIALIZED_T = "materialized T(K)"
"""Autodiff of the product with ``T(K)`` formed from ``K`` by its index maps
(``materialized_reference``): a matrix product and gathers, no convolution kernel."""

UNFOLDED_PATCHES = "unfolded patches"
"""Autodiff of the product of the gathered patch matrices with ``K`` (``patch_reference``): a
gather and a matrix product, no convolution kernel and no ``T(K)``."""

FLOAT64_FINITE_DIFFERENCES = "finite differences"
"""Float64 central differences of the loss (the forward pass only)."""

PATCH_COPIES = 4
"""How many probe-sized patch arrays ``patch_reference`` holds under autodiff (the gathered
patches, their gradient, the products and theirs): what ``patches_fit`` sizes."""

ORDER = (STOCK_AUTODIFF, MATERIALIZED_T, UNFOLDED_PATCHES, FLOAT64_FINITE_DIFFERENCES)
"""The witnesses from the plainest to the one that needs most: a layer traced twice (in the
model and in its float64 twin) reports the later of its two choices (``ConvWitnesses.chosen``)."""

WITNESS_DTYPE = "float64"
"""The dtype whose dense ``T(K)`` ``fits_budget`` sizes: the float64 twin's, the larger, so that
a model and its twin make the same choice."""


def is_toeplitz_layer(layer: Any) -> bool:
    """``layer`` is one of tf_jacbp's Toeplitz layers (``Conv1D``, ``Conv2D``, ``Conv3D``,
    ``Conv2DTranspose``): it has the route switch and the index maps this module reads."""
    return all(
        hasattr(layer, name)
        for name in ("route_for", "plain_index", "image", "reference", "toeplitz", "filters")
    )


def transposes(layer: Any) -> bool:
    """``layer`` multiplies by ``T(K)`` (``Conv2DTranspose``: ``y = T(K)^T x``) rather than by
    ``T(K)^T`` (a convolution: ``z = T(K) x``)."""
    return not hasattr(layer, "bias_mode")


def supported(layer: Any) -> str | None:
    """``None`` if ``materialized_reference`` forms this layer's product, else why not (a
    ``data_format`` it does not know)."""
    if getattr(layer, "data_format", None) not in (None, "channels_last", "channels_first"):
        return f"data_format={layer.data_format!r}"
    return None


def budget_bytes(layer: Any) -> int:
    """The budget the witness's dense ``T(K)`` must fit: the layer's ``toeplitz_budget_bytes``,
    else the process-wide ``tf_jacbp.toeplitz.get_budget_bytes()`` (read now)."""
    own = getattr(layer, "toeplitz_budget_bytes", None)
    return toeplitz.get_budget_bytes() if own is None else int(own)


def _image(layer: Any, x: Tensor) -> Tensor:
    """The batch as the layer's index maps read it (``layer.image``): the channels_last view, a
    sequence as an image of height 1; ``Conv2DTranspose``'s input as it is."""
    return layer.image(x)


def fits_budget(layer: Any, x: Tensor) -> bool:
    """A training step with the dense float64 ``T(K)`` of ``x``'s size fits ``budget_bytes``
    (``ConvIndex.step_bytes``); False for a size unknown when traced."""
    image = _image(layer, x)
    if any(n is None for n in tuple(image.shape[1:])):
        return False
    index = layer.plain_index(image)
    return int(index.step_bytes(WITNESS_DTYPE, sparse=False)) <= budget_bytes(layer)


def patches_fit(layer: Any, x: Tensor) -> bool:
    """``patch_reference`` of the batch ``x`` fits ``budget_bytes``: ``PATCH_COPIES`` float64
    arrays of ``M P`` entries per sample (``M = k_1 ... k_n C / G`` patch entries, ``P`` output
    positions) and group. False for ``Conv2DTranspose`` and for a size unknown when traced."""
    image = _image(layer, x)
    if transposes(layer) or any(n is None for n in tuple(image.shape[1:])):
        return False
    index = layer.plain_index(image)
    entries = 1
    for n in index.kernel_shape[:-1]:
        entries *= int(n)
    batch = 256 if image.shape[0] is None else int(image.shape[0])
    groups = getattr(layer, "groups", 1)
    size = PATCH_COPIES * 8 * entries * int(index.positions) * batch * groups
    return size <= budget_bytes(layer)


def choose(layer: Any, x: Tensor) -> str:
    """The witness of ``layer`` on the batch ``x``: ``STOCK_AUTODIFF`` unless ``T(K)`` is applied
    implicitly there (``layer.route_for``); then ``MATERIALIZED_T`` where it fits the budget and
    the configuration is ``supported``, else ``UNFOLDED_PATCHES`` where the patches fit
    (``patches_fit``), else ``FLOAT64_FINITE_DIFFERENCES``."""
    if not is_toeplitz_layer(layer) or layer.route_for(_image(layer, x)) != "implicit":
        return STOCK_AUTODIFF
    if supported(layer) is None and fits_budget(layer, x):
        return MATERIALIZED_T
    if supported(layer) is None and patches_fit(layer, x):
        return UNFOLDED_PATCHES
    return FLOAT64_FINITE_DIFFERENCES


def _rows_product(layer: Any, index: Any, image: Tensor, kernel: Tensor, bias: Tensor | None):
    """One group's ``X T(K)^T + b`` (a convolution) or ``X T(K) + b`` (``Conv2DTranspose``) on
    the channels_last view ``image``, shaped as the layer's channels_last output."""
    t_transpose = ops.cast(index.transpose_matrix(kernel), image.dtype)  # (index N, index R)
    if transposes(layer):
        rows = ops.reshape(image, (-1, index.shape[0]))
        out = ops.matmul(rows, ops.transpose(t_transpose))  # (batch, N) @ T(K)
        if bias is not None:
            out = out + ops.tile(bias, (index.shape[1] // index.kernel_shape[-2],))
        return ops.reshape(out, (-1, *index.input_shape))
    rows = ops.reshape(image, (-1, index.shape[1]))
    out = ops.matmul(rows, t_transpose)  # (batch, N) @ T(K)^T
    if bias is not None:
        if getattr(layer, "bias_mode", "tied") == "tied":
            out = out + ops.tile(bias, (index.shape[0] // index.output_shape[-1],))
        else:
            out = out + ops.reshape(bias, (-1,))
    lead = len(getattr(layer, "_lead", ()))
    return ops.reshape(out, (-1, *index.output_shape[lead:]))


def materialized_reference(
    layer: Any, x: Tensor, kernel: Tensor, bias: Tensor | None = None
) -> Tensor:
    """The layer's map with ``T(K)`` formed, for autodiff: no convolution kernel runs.

    A convolution (``Conv1D``, ``Conv2D``, ``Conv3D``): ``Z = X T(K)^T + b`` with ``X``
    ``(batch, N)`` the rows ``vec(x_b)`` of the channels_last view (``layer.image``),
    ``T(K)^T`` ``(N, R)`` (``index.transpose_matrix(K)``, ``index = layer.plain_index(view)``)
    and ``b`` the tied bias repeated at each of the ``P`` positions or the untied one flattened;
    ``(batch, *spatial, C)`` -> ``(batch, *spatial_out, F)``. With ``groups = G`` ``T(K)`` is
    block diagonal: group ``g``'s ``C / G`` channels times the ``T`` of ``K[..., g F/G : (g+1)
    F/G]`` give its ``F / G`` filters, concatenated over the channel axis.

    ``Conv2DTranspose``: ``Y = X T(K) + b`` with ``T(K)`` the Toeplitz matrix of the convolution
    from the output's shape to the input's (``index.shape = (N_x, R_y)``): ``(batch, H, W, C)``
    -> ``(batch, H_out, W_out, F)``.

    channels_first: the input read channels_last (``layer.image``), an untied bias
    ``(F, *spatial_out)`` too, and the output moved back to ``(batch, F, *spatial_out)``.
    """
    why = supported(layer)
    if why is not None:
        raise ValueError(
            f"materialized_reference: {type(layer).__name__} '{layer.name}' with {why} is not "
            "formed here; its witness is finite differences (tf_jacbp.check.conv_witness.choose)."
        )
    return _by_group(layer, x, kernel, bias, _rows_product)


def _by_group(layer: Any, x: Tensor, kernel: Tensor, bias: Tensor | None, product: Any) -> Tensor:
    """``product(layer, index, image_g, K_g, b_g)`` for each group ``g`` of the channels_last
    view (``layer.image``), concatenated over the channel axis, then back in the layer's layout:
    what ``materialized_reference`` and ``patch_reference`` share (an untied channels_first bias
    ``(F, *spatial_out)`` read channels_last)."""
    first = getattr(layer, "data_format", None) == "channels_first"
    image = layer.image(x)
    index = layer.plain_index(image)
    if bias is not None:
        bias = ops.cast(bias, image.dtype)
        if first and len(bias.shape) > 1:  # untied, (F, *spatial_out)
            bias = ops.moveaxis(bias, 0, -1)
    groups = getattr(layer, "groups", 1)
    if groups == 1:  # Conv2DTranspose among them: its kernel's last axis is C, not F
        out = product(layer, index, image, kernel, bias)
        return ops.moveaxis(out, -1, 1) if first else out
    c, f = int(image.shape[-1]) // groups, layer.filters // groups
    parts = [
        product(
            layer,
            index,
            image[..., g * c : (g + 1) * c],
            kernel[..., g * f : (g + 1) * f],
            None if bias is None else bias[..., g * f : (g + 1) * f],
        )
        for g in range(groups)
    ]
    out = ops.concatenate(parts, axis=-1)
    return ops.moveaxis(out, -1, 1) if first else out


def _patch_product(layer: Any, index: Any, image: Tensor, kernel: Tensor, bias: Tensor | None):
    """One group's ``z_b = X_patch,b K + b`` on the channels_last view: the patches gathered
    (``index.stored_patches``, rows in ``K``'s storage order), times ``K`` as ``(M, F)``."""
    patches = index.stored_patches(image[None], bias_row=False)[0]  # (M, P, batch)
    filters = kernel.shape[-1]
    rows = ops.reshape(ops.cast(kernel, image.dtype), (-1, filters))  # (M, F)
    out = ops.einsum("mpb,mf->bpf", patches, rows)
    lead = len(getattr(layer, "_lead", ()))
    out = ops.reshape(out, (-1, *index.output_shape[lead:-1], filters))
    return out if bias is None else out + bias


def patch_reference(layer: Any, x: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
    """A convolution's map as Lemma 3 writes it per sample, for autodiff: ``z_b = X_patch,b K
    + b`` (``(P, M) x (M, F)``, the patches gathered from ``x`` by ``ops.take``; no convolution
    kernel, no ``T(K)``). ``(batch, *spatial, C)`` -> ``(batch, *spatial_out, F)``; groups one
    block each, concatenated; channels_first read and written as ``materialized_reference``."""
    return _by_group(layer, x, kernel, bias, _patch_product)


class ConvWitnesses:
    """The reference route of every Toeplitz layer in ``layers``, replaced while active
    (``with witnesses:``) by ``reference_for``'s: the stock reference, the materialized
    ``T(K)`` or (for finite differences, which run elsewhere) the stock reference again, as
    ``choose`` says for each call's input. ``chosen`` maps each layer's name to what it chose
    (the latest of ``ORDER`` over its calls and over layers of the same name, e.g. a model's and
    its float64 twin's); ``reasons`` to why, in words; ``by_policy`` (``policy``, shared when
    given) maps each layer's dtype policy name (``"float64"``, ``"mixed_float16"``) to the latest
    choice of its layers. Reentrant; patches only the instances."""

    def __init__(self, layers: Iterable[Any], by_policy: dict[str, str] | None = None):
        self.layers = [layer for layer in layers if is_toeplitz_layer(layer)]
        self.chosen: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.by_policy = {} if by_policy is None else by_policy
        self._depth = 0

    def __bool__(self) -> bool:
        return bool(self.layers)

    def record(self, layer: Any, witness: str) -> None:
        """Note ``witness`` for ``layer`` (keeping the later of ``ORDER``) and why."""
        policy = layer.dtype_policy.name
        if ORDER.index(witness) >= ORDER.index(self.by_policy.get(policy, STOCK_AUTODIFF)):
            self.by_policy[policy] = witness
        name = layer.name
        if ORDER.index(witness) < ORDER.index(self.chosen.get(name, STOCK_AUTODIFF)):
            return
        self.chosen[name] = witness
        if witness == MATERIALIZED_T:
            self.reasons[name] = "its implicit route against the materialized T(K)"
        elif witness == UNFOLDED_PATCHES:
            self.reasons[name] = (
                "its implicit route against its unfolded patches (a dense float64 T(K) is over "
                f"the budget of {budget_bytes(layer) / 2**20:.3g} MiB)"
            )
        elif witness == FLOAT64_FINITE_DIFFERENCES:
            why = supported(layer)
            if why is None:
                why = (
                    f"a training step with its dense float64 T(K) is over the budget of "
                    f"{budget_bytes(layer) / 2**20:.3g} MiB"
                )
            self.reasons[name] = f"its implicit route against finite differences ({why})"

    def reference_for(self, layer: Any) -> Any:
        """``layer.reference`` as the witness: ``(x, kernel, bias=None) -> y``."""
        stock = type(layer).reference

        def reference(x: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
            witness = choose(layer, x)
            self.record(layer, witness)
            if witness == MATERIALIZED_T:
                return materialized_reference(layer, x, kernel, bias)
            if witness == UNFOLDED_PATCHES:
                return patch_reference(layer, x, kernel, bias)
            return stock(layer, x, kernel, bias)

        return reference

    def __enter__(self) -> ConvWitnesses:
        if self._depth == 0:
            for layer in self.layers:
                object.__setattr__(layer, "reference", self.reference_for(layer))
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            for layer in self.layers:
                if "reference" in vars(layer):
                    object.__delattr__(layer, "reference")

    def needs_finite_differences(self) -> list[str]:
        """The layers whose witness is finite differences (their names)."""
        return [name for name, w in self.chosen.items() if w == FLOAT64_FINITE_DIFFERENCES]

    def witness_of(self, layer_name: str) -> str:
        """The witness ``layer_name`` was checked against (``STOCK_AUTODIFF`` if not traced or
        not a Toeplitz layer)."""
        return self.chosen.get(layer_name, STOCK_AUTODIFF)


__all__ = [
    "FLOAT64_FINITE_DIFFERENCES",
    "MATERIALIZED_T",
    "ORDER",
    "STOCK_AUTODIFF",
    "UNFOLDED_PATCHES",
    "ConvWitnesses",
    "choose",
    "fits_budget",
    "is_toeplitz_layer",
    "materialized_reference",
    "patch_reference",
    "patches_fit",
]
