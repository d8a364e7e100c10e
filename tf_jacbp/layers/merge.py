"""Merge layers: ``Add``, ``Multiply`` and ``Concatenate``, maps of several inputs.

Each is a map ``y = F(x_1, ..., x_n)`` without parameters in the contract of
``tf_jacbp.contract``: ``vjp_input(m, xs, y)`` returns one product per input, ``m`` of shape
``(V, batch, *y.shape[1:])`` to ``(V, *x_k.shape)``.

Add: the residual sum ``y = x_1 + ... + x_n``. For inputs of one shape ``J_{x_k} y = I`` for
every ``k``, so ``(J_{x_k} y)^T m = m``: the vectors fan out unchanged. This is how a skip
connection enters Algorithm 1: the ``delta`` reaching a tensor that feeds several layers is the
sum of the ``delta`` each of them sends back (the multivariable chain rule), and
``tf_jacbp.jacobian`` adds them up in the same way.

Multiply: the Hadamard product ``y = x_1 * ... * x_n``, ``J_{x_k} y = diag(prod_{j != k} x_j)``,
so ``(J_{x_k} y)^T m = m * prod_{j != k} x_j``.

As in ``keras.layers.Add`` and ``Multiply``, an input may have size 1 along an axis where the
others do not (one rank; the batch axis included): it enters as ``R_k^T x_k`` and its product
gets the factor ``R_k``, the sum over the broadcast axes (``merge_masks.reduce_to``). A learned
``(1, T, D)`` weight added to a ``(batch, T, D)`` batch gets the sum over the batch.

Concatenate: ``y = [x_1; ...; x_n]`` along one axis. ``J_{x_k} y`` is the 0/1 matrix that puts
each entry of ``x_k`` at its place in ``y`` (a block of an identity, when the axis is the last one
and the inputs are flat: ``J_{x_k} y = [0; I; 0]``), and ``(J_{x_k} y)^T m`` is the slice of ``m``
that ``x_k`` occupies.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from keras import ops

from tf_jacbp._backend import keras
from tf_jacbp.layers.base import JacobianLayer, route
from tf_jacbp.layers.merge_masks import (
    broadcast_shape,
    check_list_of_shapes,
    check_masks,
    entry_mask,
    merge_mask,
    products_of_others,
    reduce_to,
    union,
    unmasked_as_one,
)

Tensor = Any  # a tensor of Keras' backend


def _broadcast_size(a: Any, b: Any) -> Any:
    """The broadcast of two sizes along one axis (each the other's or 1): an int when both are
    known, else a scalar tensor."""
    if isinstance(a, int) and isinstance(b, int):
        return a if b == 1 else b
    return ops.where(ops.equal(b, 1), a, b)


def _broadcast_all(xs: Sequence[Tensor]) -> list[Tensor]:
    """Each input broadcast to the inputs' common shape with ``keras.ops.broadcast_to`` (the
    reference routes' explicit copies ``R_k^T x_k``); sizes unknown at trace time included."""
    shape = functools.reduce(
        lambda a, b: [_broadcast_size(i, j) for i, j in zip(a, b, strict=True)],
        [list(ops.shape(x)) for x in xs],
    )
    return [ops.broadcast_to(x, shape) for x in xs]


class _Merge(JacobianLayer):
    """What ``Add``, ``Multiply`` and ``Concatenate`` share: masks pass (``supports_masking``),
    a list of inputs, and ``jacobian_factors`` at one sample from the materialized Jacobians."""

    example = ""  # a call, for the error message of a single input

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.supports_masking = True

    def _inputs(self, inputs: Any) -> list:
        if not isinstance(inputs, (list, tuple)):
            raise ValueError(
                f"{type(self).__name__} must be called on a list of tensors, e.g. {self.example}."
            )
        return list(inputs)

    def _jacobians_at(self, xs: Sequence[Any]) -> list:
        """``[J_{x_k} y]`` at one sample ``xs`` (no batch axis), ``(N, N_k)`` each."""
        return [j[0] for j in self.input_jacobian([x[None] for x in xs])]


class _Broadcasting(_Merge):
    """``Add`` and ``Multiply``: inputs of one rank broadcast along axes of size 1 (the batch
    axis included), and Keras' merge mask (the OR of the masks when every input has one)."""

    minimum = 1
    verb = ""  # "added", "multiplied": for the error message of shapes that do not broadcast

    def build(self, input_shape: Any) -> None:
        shapes = check_list_of_shapes(type(self).__name__, input_shape, self.minimum, self.example)
        if len({len(s) for s in shapes}) != 1:
            raise ValueError(
                f"{type(self).__name__}: inputs have different ranks {shapes}; reshape them to "
                f"one rank first (tf_jacbp.layers.{type(self).__name__} broadcasts only along "
                "axes of size 1)."
            )
        broadcast_shape(shapes, type(self).__name__, self.verb)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        """Keras' merge mask: the OR of the masks when every input has one, else None."""
        return merge_mask(inputs, mask)

    def compute_output_shape(self, input_shape: Sequence[tuple]) -> tuple:
        """The broadcast of the inputs' shapes, batch axis included."""
        return broadcast_shape([tuple(s) for s in input_shape], type(self).__name__, self.verb)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Add(_Broadcasting):
    """``y = x_1 + ... + x_n`` (a residual sum), like ``keras.layers.Add``; ``J_{x_k} y = I``.

    Called on a list of at least 2 tensors of one rank, shapes equal or 1 along broadcast axes
    (the batch axis included): ``(batch_k, *shape_k)`` -> ``(batch, *shape)``. It has no
    parameters. Masks, as Keras' ``Add``: the sum ignores them and the output carries the OR of
    the masks when every input has one.
    """

    example = "Add()([x, shortcut])"
    minimum = 2
    verb = "added"

    def forward(self, xs: Sequence[Any]) -> Any:
        """``y = x_1 + ... + x_n`` (broadcast)."""
        return functools.reduce(ops.add, xs)

    def reference(self, xs: Sequence[Tensor]) -> Tensor:
        """Stock ops: the inputs broadcast, stacked and summed."""
        return ops.sum(ops.stack(_broadcast_all(xs)), axis=0)

    def vjp_input(self, m: Any, xs: Sequence[Any], y: Any) -> list:
        """``(J_{x_k} y)^T m = R_k m``: ``m`` ``(V, batch, *y_shape)`` for each input, summed over
        its broadcast axes: ``(V, *x_k.shape)``."""
        return [reduce_to(m, x.shape) for x in xs]

    def jacobian_factors(self, xs: Sequence[Any]) -> dict[str, Any]:
        """``{"J_x1 = I": ..., "J_x2 = I": ...}`` at one sample (a broadcast input's is the 0/1
        matrix ``R_k^T``)."""
        return {f"J_x{k + 1} = I": j for k, j in enumerate(self._jacobians_at(xs))}

    def call(self, inputs: Sequence[Any], mask: Any = None) -> Any:
        """``sum_k x_k`` by ``route``; ``mask`` is accepted and, as in Keras' ``Add``, unused."""
        return route(self, self._inputs(inputs))


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Multiply(_Broadcasting):
    """``y = x_1 * ... * x_n`` (elementwise), like ``keras.layers.Multiply``;
    ``J_{x_k} y = diag(prod_{j != k} x_j)``.

    Called on a list of tensors of one rank, shapes equal or 1 along broadcast axes (the batch
    axis included): ``(batch_k, *shape_k)`` -> ``(batch, *shape)``. It has no parameters.

    Masks, as Keras: an input's masked entries count as 1 (the mask, ``(batch, ...)``, covers
    all axes but the last), and when every input has a mask the output is 0 outside their union
    and carries ``any(union, axis=-1)`` as its mask. The masks are constants of the map: the
    products apply the same ``where``. ``tf_jacbp.jacobian``'s walks take the unmasked map.
    """

    example = "Multiply()([x, gate])"
    verb = "multiplied"

    def forward(self, xs: Sequence[Any], masks: Sequence[Any] | None = None) -> Any:
        """``y = x_1 * ... * x_n`` (masked entries read as 1, and the output 0 outside the union
        of the masks when every input has one)."""
        y = functools.reduce(ops.multiply, unmasked_as_one(xs, masks))
        kept = union(masks)
        return y if kept is None else ops.where(kept, y, ops.zeros_like(y))

    def reference(self, xs: Sequence[Tensor], masks: Sequence[Any] | None = None) -> Tensor:
        """Stock ops: masked entries set to 1, the inputs broadcast and multiplied, the output
        set to 0 outside the union of the masks (when every input has one)."""
        if masks is not None:
            xs = [
                x if m is None else ops.where(ops.cast(m, "bool")[..., None], x, ops.ones_like(x))
                for x, m in zip(xs, masks, strict=True)
            ]
        y = functools.reduce(ops.multiply, _broadcast_all(xs))
        if masks is None or any(m is None for m in masks):
            return y
        kept = functools.reduce(ops.logical_or, [ops.cast(m, "bool") for m in masks])
        return ops.where(kept[..., None], y, 0.0 * y)

    def vjp_input(
        self, m: Any, xs: Sequence[Any], y: Any, masks: Sequence[Any] | None = None
    ) -> list:
        """``(J_{x_k} y)^T m = R_k (m * prod_{j != k} x_j)``, ``(V, *x_k.shape)`` per input.

        With masks: ``m`` is zero outside the union (when every input has a mask), the others'
        masked entries read as 1, and input ``k``'s masked entries get zero (they were
        replaced by the constant 1)."""
        kept = union(masks)
        if kept is not None:
            m = ops.where(kept, m, ops.zeros_like(m))
        products = []
        for k, (x, other) in enumerate(
            zip(xs, products_of_others(unmasked_as_one(xs, masks)), strict=True)
        ):
            d = m if other is None else m * other
            if masks is not None and masks[k] is not None:
                d = ops.where(entry_mask(masks[k]), d, ops.zeros_like(d))
            products.append(reduce_to(d, x.shape))
        return products

    def jacobian_factors(self, xs: Sequence[Any]) -> dict[str, Any]:
        """``{"J_x1 = diag(x2 ... xn)": ..., ...}`` at one sample."""
        n = len(xs)
        names = [" ".join(f"x{j + 1}" for j in range(n) if j != k) or "1" for k in range(n)]
        return {
            f"J_x{k + 1} = diag({name})": j
            for k, (name, j) in enumerate(zip(names, self._jacobians_at(xs), strict=True))
        }

    def call(self, inputs: Sequence[Any], mask: Any = None) -> Any:
        inputs = self._inputs(inputs)
        if mask is None or all(m is None for m in mask):
            return route(self, inputs)
        return route(self, inputs, constants=[list(mask)])


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Concatenate(_Merge):
    """``y = [x_1; ...; x_n]`` along ``axis``, like ``keras.layers.Concatenate``.

    Args:
        axis: the axis to concatenate along (default -1, the channels); not the batch axis.

    Inputs of one rank whose shapes agree except along ``axis``; ``J_{x_k} y`` selects the
    entries of ``x_k`` (a block of the identity) and its transpose's product is the slice of
    ``m`` where ``x_k`` sits. Masks are concatenated as Keras does (an input without a mask
    counts as unmasked). It has no parameters.
    """

    example = "Concatenate()([x, skip])"

    def __init__(self, axis: int = -1, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"Concatenate: axis must be an integer, got axis={axis!r}.")
        self.axis = axis

    def _axis(self, rank: int) -> int:
        """``axis`` as a positive axis of a tensor of ``rank`` (batch axis included)."""
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"Concatenate: axis={self.axis} is out of range for inputs of rank {rank} (batch "
                "axis included)."
            )
        axis = self.axis % rank
        if axis == 0:
            raise ValueError(
                f"Concatenate: axis={self.axis} is the batch axis; tf_jacbp layers map each "
                "sample on its own (per-sample Jacobians). Concatenate along another axis, or "
                "concatenate batches outside the model (keras.ops.concatenate, or in the input "
                "pipeline)."
            )
        return axis

    def build(self, input_shape: Any) -> None:
        shapes = check_list_of_shapes("Concatenate", input_shape, 1, self.example)
        axis = self._axis(len(shapes[0]))
        rest = [[d for i, d in enumerate(s) if i not in (0, axis)] for s in shapes]
        mismatch = len({len(s) for s in shapes}) != 1 or any(
            len({d for d in dims if d is not None}) > 1 for dims in zip(*rest, strict=True)
        )
        if mismatch:
            raise ValueError(
                "A `Concatenate` layer requires inputs with matching shapes except for the "
                f"concatenation axis. Received: input_shape={shapes} with axis={self.axis}."
            )

    def forward(self, xs: Sequence[Any]) -> Any:
        """``y = [x_1; ...; x_n]`` along ``axis``."""
        return ops.concatenate(list(xs), axis=self._axis(len(xs[0].shape)))

    def reference(self, xs: Sequence[Tensor]) -> Tensor:
        """Stock ops: ``keras.ops.concatenate`` along ``axis``."""
        return ops.concatenate(list(xs), axis=self.axis)

    def vjp_input(self, m: Any, xs: Sequence[Any], y: Any) -> list:
        """``(J_{x_k} y)^T m``: the slice of ``m`` ``(V, batch, *y_shape)`` where ``x_k`` sits
        along the axis, ``(V, *x_k.shape)``."""
        axis = self._axis(len(xs[0].shape)) + 1  # m's axis: after V
        before = (slice(None),) * axis
        products, start = [], 0
        for x in xs:
            size = x.shape[axis - 1]
            size = ops.shape(x)[axis - 1] if size is None else size
            products.append(m[(*before, slice(start, start + size))])
            start = start + size
        return products

    def jacobian_factors(self, xs: Sequence[Any]) -> dict[str, Any]:
        """``{"J_x1 (selection)": ..., ...}`` at one sample."""
        return {f"J_x{k + 1} (selection)": j for k, j in enumerate(self._jacobians_at(xs))}

    def call(self, inputs: Sequence[Any]) -> Any:
        return route(self, self._inputs(inputs))

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        """Keras' Concatenate mask: the masks concatenated (an unmasked input counts as all
        True), reduced with ``any`` over the last axis; None without masks."""
        if mask is None:
            return None
        check_masks(inputs, mask)
        if all(m is None for m in mask):
            return None
        masks = []
        for x, m in zip(inputs, mask, strict=True):
            if m is None:
                masks.append(ops.ones_like(x, dtype="bool"))
            elif len(m.shape) < len(x.shape):
                masks.append(
                    ops.logical_or(ops.expand_dims(m, axis=-1), ops.zeros_like(x, dtype="bool"))
                )
            else:
                masks.append(m)
        return ops.any(ops.concatenate(masks, axis=self.axis), axis=-1)

    def compute_output_shape(self, input_shape: Sequence[tuple]) -> tuple:
        axis = self._axis(len(input_shape[0]))
        out = list(input_shape[0])
        sizes = [s[axis] for s in input_shape]
        out[axis] = None if None in sizes else sum(sizes)
        for i in range(1, len(out)):  # a size known in one input is known for all
            if i != axis and out[i] is None:
                out[i] = next((s[i] for s in input_shape if s[i] is not None), None)
        return tuple(out)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["axis"] = self.axis
        return config
