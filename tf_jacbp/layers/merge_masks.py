"""What the merge layers (``tf_jacbp.layers.merge``) share: broadcast shapes, the sum over
broadcast axes, and Keras' merge masks, in ``keras.ops``.

Broadcasting, as in ``keras.layers.Add`` and ``Multiply``: the inputs have one rank and along
each axis, the batch axis included, an input may have size 1 where the others do not. Such an
input ``x_k`` enters the map as ``R_k^T x_k``, ``R_k^T`` the 0/1 matrix that copies it along the
broadcast axes, so its Jacobian carries a factor ``R_k^T`` and its Jacobian-transpose product a
factor ``R_k``: the sum over the broadcast axes (``reduce_to``). An input of batch size 1 added
to a batch (a learned positional embedding ``(1, T, D)``) gets the sum over the batch, the
gradient of a weight shared by every sample.

Masks, as Keras' merge layers: a mask covers every axis of its input but the last, ``(batch,
...)``; ``Add`` and ``Multiply`` pass on the OR of the masks when every input has one
(``merge_mask``), and ``Multiply`` reads an input's masked entries as 1 and zeroes the output
outside the union (``unmasked_as_one``, ``union``). Masks of any dtype are read as booleans
(nonzero: kept), as ``keras.ops.logical_or`` reads them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from keras import ops

__all__ = [
    "broadcast_shape",
    "check_list_of_shapes",
    "check_masks",
    "entry_mask",
    "merge_mask",
    "products_of_others",
    "reduce_to",
    "union",
    "unmasked_as_one",
]


def broadcast_shape(shapes: Sequence[Sequence[int | None]], owner: str, verb: str) -> tuple:
    """The broadcast of same-rank shapes (``None``: unknown), batch axis included.

    Along each axis the sizes must agree or be 1 in all but one input; else a ``ValueError``
    naming ``owner`` and the shapes ("cannot be ``verb``").
    """
    out = list(shapes[0])
    for shape in shapes[1:]:
        for axis, (a, b) in enumerate(zip(out, shape, strict=True)):
            if a is None or b is None:
                out[axis] = None if 1 not in (a, b) else (a if b == 1 else b)
            elif a != b and 1 not in (a, b):
                raise ValueError(
                    f"{owner}: inputs of shapes {[tuple(s) for s in shapes]} cannot be {verb}: "
                    "each axis must match or be 1 in all but one input."
                )
            else:
                out[axis] = max(a, b)
    return tuple(out)


def reduce_to(m: Any, shape: Sequence[int | None], lead: int = 1) -> Any:
    """``R m``: ``m`` summed over the axes where ``shape`` (an input's, batch axis included) is 1
    and ``m`` is not, keeping them. ``lead`` counts ``m``'s axes before the input's own (1: the
    contract's ``V`` axis).

    ``m`` ``(V, batch, *y_shape)`` -> ``(V, *shape)``. The axes are found from static shapes (XLA
    needs them constant): an axis of ``m`` of unknown size where ``shape`` has 1 is summed (a sum
    over one entry is the identity), one where ``shape`` is unknown is not.
    """
    axes = tuple(
        lead + axis for axis, n in enumerate(shape) if n == 1 and m.shape[lead + axis] != 1
    )
    return ops.sum(m, axis=axes, keepdims=True) if axes else m


def products_of_others(xs: Sequence[Any]) -> list[Any | None]:
    """``[prod_{j != k} x_j for each k]`` (broadcast; no division, so zeros are fine), None for
    the one input of a one-input product (``J = I``)."""
    others = []
    for k in range(len(xs)):
        rest = [x for j, x in enumerate(xs) if j != k]
        others.append(functools.reduce(ops.multiply, rest) if rest else None)
    return others


def check_list_of_shapes(owner: str, input_shape: Any, minimum: int, example: str) -> list:
    """``input_shape`` as a list of shape tuples, or a ``ValueError`` unless it is a list of at
    least ``minimum`` shapes."""
    several = isinstance(input_shape, (list, tuple)) and all(
        s is not None and not isinstance(s, int) and hasattr(s, "__iter__") for s in input_shape
    )
    if not several:
        raise ValueError(
            f"{owner} must be called on a list of tensors, e.g. {example}; got a single input of "
            f"shape {input_shape}."
        )
    if len(input_shape) < minimum:
        noun = "input" if minimum == 1 else "inputs"
        raise ValueError(f"{owner} needs at least {minimum} {noun}, got {len(input_shape)}.")
    return [tuple(s) for s in input_shape]


def check_masks(inputs: Any, mask: Any) -> None:
    """Keras' checks of a merge layer's ``compute_mask`` arguments (same messages)."""
    if not isinstance(mask, (tuple, list)):
        raise ValueError(f"`mask` should be a list. Received: mask={mask}")
    if not isinstance(inputs, (tuple, list)):
        raise ValueError(f"`inputs` should be a list. Received: inputs={inputs}")
    if len(mask) != len(inputs):
        raise ValueError(
            "The lists `inputs` and `mask` should have the same length. "
            f"Received: inputs={inputs} of length {len(inputs)}, and "
            f"mask={mask} of length {len(mask)}"
        )


def merge_mask(inputs: Any, mask: Any) -> Any:
    """Keras' merge mask (``Add``, ``Multiply``): the OR of the masks when every input has one,
    else None. Masks of any dtype (nonzero: kept) and symbolic ones (a functional model's
    ``KerasTensor``) alike: ``keras.ops.logical_or``."""
    if mask is None:
        return None
    check_masks(inputs, mask)
    if any(m is None for m in mask):
        return None
    return functools.reduce(ops.logical_or, mask)


def entry_mask(mask: Any) -> Any:
    """A Keras mask ``(batch, ...)`` (every axis of its input but the last) as booleans with the
    last axis, ``(batch, ..., 1)``: it broadcasts to the input and to ``(V, batch, ...)``."""
    return ops.expand_dims(ops.cast(mask, "bool"), -1)


def unmasked_as_one(xs: Sequence[Any], masks: Sequence[Any] | None) -> list[Any]:
    """Each input with its masked entries replaced by 1 (Keras' ``Multiply``)."""
    if masks is None:
        return list(xs)
    return [
        x if m is None else ops.where(entry_mask(m), x, ops.ones_like(x))
        for x, m in zip(xs, masks, strict=True)
    ]


def union(masks: Sequence[Any] | None) -> Any | None:
    """The union of the masks as ``(batch, ..., 1)`` booleans when every input has one, else
    None (``Multiply``'s output is 0 outside it)."""
    if masks is None or any(m is None for m in masks):
        return None
    return entry_mask(functools.reduce(ops.logical_or, [ops.cast(m, "bool") for m in masks]))
