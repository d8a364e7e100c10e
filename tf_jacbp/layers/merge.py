"""Merge layers: ``Add``, ``Multiply`` and ``Concatenate``, maps of several inputs.

Add: the residual sum ``y = x_1 + ... + x_n``, whose Jacobian with respect to each input is I.

For inputs of one shape, ``J_{x_k} y = I_N`` for every ``k``, so the backward pass fans the
upstream vector out unchanged: ``(J_{x_k} y)^T delta = delta``. This is how a skip connection
enters Algorithm 1: the ``delta`` reaching a tensor that feeds several layers is the sum of the
``delta`` each of them sends back (the multivariable chain rule), and ``tf_jacbp.jacobian``
adds them up in the same way.

As in ``keras.layers.Add``, an input may have size 1 along an axis where the others do not (same
rank): it is broadcast, ``x_k`` enters as ``R_k^T x_k`` with ``R_k`` the 0/1 matrix that sums the
copies, and its Jacobian is ``R_k^T``; the backward pass is ``R_k delta``, the sum of ``delta`` over
the broadcast axes.

Multiply: the Hadamard product ``y = x_1 * ... * x_n``, ``J_{x_k} y = diag(prod_{j != k} x_j)``
(times ``R_k^T`` for a broadcast input), so
``(J_{x_k} y)^T delta = R_k (delta * prod_{j != k} x_j)``.

Concatenate: ``y = [x_1; ...; x_n]`` along one axis. ``J_{x_k} y`` is the 0/1 matrix that puts
each entry of ``x_k`` at its place in ``y`` (a block of an identity, when the axis is the last one
and the inputs are flat: ``J_{x_k} y = [0; I; 0]``), and ``(J_{x_k} y)^T delta`` is the slice of
``delta`` that ``x_k`` occupies: ``tf.split``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import JacobianLayer, as_float_tensor, route


def _output_shape(shapes: Sequence[tuple], owner: str = "Add", verb: str = "added") -> tuple:
    """The broadcast shape of same-rank per-sample shapes (``None`` = unknown)."""
    out = list(shapes[0])
    for shape in shapes[1:]:
        for axis, (a, b) in enumerate(zip(out, shape, strict=True)):
            if a is None or b is None:
                out[axis] = None if 1 not in (a, b) else (a if b == 1 else b)
            elif a != b and 1 not in (a, b):
                raise ValueError(
                    f"{owner}: inputs of shapes {[tuple(s) for s in shapes]} (per sample) cannot "
                    f"be {verb}: each axis must match or be 1 in all but one input."
                )
            else:
                out[axis] = max(a, b)
    return tuple(out)


def _reduce_to(delta: tf.Tensor, shape: Sequence[int | None], lead: int) -> tf.Tensor:
    """``R delta``: ``delta`` summed over the axes where the per-sample ``shape`` is 1 but
    ``delta`` is not, keeping them. ``lead`` counts ``delta``'s axes before the sample's axes.

    The axes are found from static shapes (XLA needs them constant); the identity otherwise.
    """
    axes = [lead + axis for axis, n in enumerate(shape) if n == 1 and delta.shape[lead + axis] != 1]
    return tf.reduce_sum(delta, axis=axes, keepdims=True) if axes else delta


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Add(JacobianLayer):
    """``y = x_1 + ... + x_n`` (a residual sum), like ``keras.layers.Add``; ``J_{x_k} y = I``.

    Called on a list of tensors of one rank, shapes equal or 1 along broadcast axes:
    ``(batch, *shape_k)`` -> ``(batch, *shape)``. It has no parameters. Masks, as Keras' ``Add``:
    the sum ignores them and the output carries the OR of the masks when every input has one.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.supports_masking = True

    def build(self, input_shape: Any) -> None:
        if not isinstance(input_shape, (list, tuple)) or not all(
            isinstance(s, (list, tuple)) for s in input_shape
        ):
            raise ValueError(
                f"Add must be called on a list of tensors, e.g. Add()([x, shortcut]); got a "
                f"single input of shape {input_shape}."
            )
        if len(input_shape) < 2:
            raise ValueError(f"Add needs at least 2 inputs, got {len(input_shape)}.")
        ranks = {len(s) for s in input_shape}
        if len(ranks) != 1:
            raise ValueError(
                f"Add: inputs have different ranks {[tuple(s) for s in input_shape]}; reshape "
                "them to one rank first (tf_jacbp.layers.Add broadcasts only along axes of size 1)."
            )
        _output_shape([tuple(s[1:]) for s in input_shape])
        self.built = True

    def forward(self, xs: Sequence[tf.Tensor]) -> tf.Tensor:
        """``y = x_1 + ... + x_n``."""
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return y

    def reference(self, xs: Sequence[tf.Tensor]) -> tf.Tensor:
        shape = functools.reduce(tf.broadcast_dynamic_shape, [tf.shape(x) for x in xs])
        return tf.add_n([tf.broadcast_to(x, shape) for x in xs])

    def backward(
        self, dy: tf.Tensor, xs: Sequence[tf.Tensor], y: tf.Tensor
    ) -> tuple[list[tf.Tensor], list]:
        """``(J_{x_k} y)^T delta = delta`` for each input (summed over broadcast axes)."""
        return [_reduce_to(dy, x.shape[1:], 1) for x in xs], []

    def jacobian_rows(
        self, m: tf.Tensor, xs: Sequence[tf.Tensor], y: tf.Tensor
    ) -> tuple[list[tf.Tensor], list]:
        """``M J_{x_k} y = M`` for each input: ``(batch, k, *y_shape)`` rows fan out unchanged."""
        return [_reduce_to(m, x.shape[1:], 2) for x in xs], []

    def jacobian(self, xs: Sequence[Any]) -> list[tf.Tensor]:
        """``[J_{x_1} y, ..., J_{x_n} y]`` at one sample (no batch axis): ``I_N`` for an input of
        the output's shape, the 0/1 broadcast matrix ``(N, N_k)`` otherwise."""
        xs = [as_float_tensor(x, self.compute_dtype) for x in xs]
        shape = _output_shape([tuple(x.shape) for x in xs])
        n = math.prod(shape)
        eye = tf.reshape(tf.eye(n, dtype=xs[0].dtype), [n, *shape])
        return [tf.reshape(_reduce_to(eye, x.shape, 1), [n, math.prod(x.shape)]) for x in xs]

    def jacobian_factors(self, xs: Sequence[tf.Tensor]) -> dict[str, tf.Tensor]:
        """``{"J_x1 = I": ..., "J_x2 = I": ...}`` at one sample."""
        return {f"J_x{k + 1} = I": j for k, j in enumerate(self.jacobian(xs))}

    def call(self, inputs: Sequence[tf.Tensor], mask: Any = None) -> tf.Tensor:
        """``sum_k x_k`` by ``route``; ``mask`` is accepted and, as in Keras' ``Add``, unused."""
        if not isinstance(inputs, (list, tuple)):
            raise ValueError("Add must be called on a list of tensors, e.g. Add()([x, shortcut]).")
        return route(self, list(inputs))

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        """Keras' merge mask: the OR of the masks when every input has one, else None."""
        return _merge_mask(inputs, mask)

    def compute_output_shape(self, input_shape: Sequence[tuple]) -> tuple:
        return (input_shape[0][0], *_output_shape([tuple(s[1:]) for s in input_shape]))


def _check_list_of_shapes(owner: str, input_shape: Any, minimum: int, example: str) -> None:
    """A ValueError unless ``input_shape`` is a list of at least ``minimum`` shapes."""
    if not isinstance(input_shape, (list, tuple)) or not all(
        isinstance(s, (list, tuple)) for s in input_shape
    ):
        raise ValueError(
            f"{owner} must be called on a list of tensors, e.g. {example}; got a single input of "
            f"shape {input_shape}."
        )
    if len(input_shape) < minimum:
        raise ValueError(f"{owner} needs at least {minimum} input, got {len(input_shape)}.")


def _merge_mask(inputs: Any, mask: Any) -> Any:
    """Keras' merge mask (``Add``, ``Multiply``): the OR of the masks when every input has one,
    else None."""
    if mask is None:
        return None
    _check_masks(inputs, mask)
    if any(m is None for m in mask):
        return None
    return functools.reduce(tf.logical_or, mask)


def _check_masks(inputs: Any, mask: Any) -> None:
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


def _products_of_others(xs: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """``[prod_{j != k} x_j for each k]`` (broadcast; no division, so zeros are fine)."""
    others = []
    for k in range(len(xs)):
        rest = [x for j, x in enumerate(xs) if j != k]
        others.append(functools.reduce(tf.multiply, rest) if rest else tf.ones_like(xs[k]))
    return others


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Multiply(JacobianLayer):
    """``y = x_1 * ... * x_n`` (elementwise), like ``keras.layers.Multiply``;
    ``J_{x_k} y = diag(prod_{j != k} x_j)``.

    Called on a list of tensors of one rank, shapes equal or 1 along broadcast axes:
    ``(batch, *shape_k)`` -> ``(batch, *shape)``. It has no parameters.

    Masks, as Keras: an input's masked entries count as 1 (the mask, ``(batch, ...)``, covers
    all axes but the last), and when every input has a mask the output is 0 outside their union
    and carries ``any(union, axis=-1)`` as its mask. The masks are constants of the map: the
    backward pass applies the same ``where``. ``tf_jacbp.jacobian``'s walks take the unmasked map.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.supports_masking = True

    def build(self, input_shape: Any) -> None:
        _check_list_of_shapes("Multiply", input_shape, 1, "Multiply()([x, gate])")
        ranks = {len(s) for s in input_shape}
        if len(ranks) != 1:
            raise ValueError(
                f"Multiply: inputs have different ranks {[tuple(s) for s in input_shape]}; "
                "reshape them to one rank first (tf_jacbp.layers.Multiply broadcasts only along "
                "axes of size 1)."
            )
        _output_shape([tuple(s[1:]) for s in input_shape], "Multiply", "multiplied")
        self.built = True

    def forward(self, xs: Sequence[tf.Tensor], masks: Sequence[Any] | None = None) -> tf.Tensor:
        """``y = x_1 * ... * x_n`` (masked entries read as 1, and the output 0 outside the union
        of the masks when every input has one)."""
        xs = _unmasked_as_one(xs, masks)
        y = functools.reduce(tf.multiply, xs)
        union = _union(masks, y)
        return y if union is None else tf.where(union, y, tf.zeros_like(y))

    def reference(self, xs: Sequence[tf.Tensor], masks: Sequence[Any] | None = None) -> tf.Tensor:
        xs = _unmasked_as_one(xs, masks)
        shape = functools.reduce(tf.broadcast_dynamic_shape, [tf.shape(x) for x in xs])
        y = functools.reduce(tf.math.multiply, [tf.broadcast_to(x, shape) for x in xs])
        union = _union(masks, y)
        return y if union is None else tf.where(union, y, 0.0 * y)

    def backward(
        self,
        dy: tf.Tensor,
        xs: Sequence[tf.Tensor],
        y: tf.Tensor,
        masks: Sequence[Any] | None = None,
    ) -> tuple[list[tf.Tensor], list]:
        """``(J_{x_k} y)^T delta = R_k (delta * prod_{j != k} x_j)``; with masks, ``delta`` is
        zero outside the union and each input's masked entries get zero."""
        union = _union(masks, dy)
        dy = dy if union is None else tf.where(union, dy, tf.zeros_like(dy))
        dxs = []
        for k, (x, other) in enumerate(
            zip(xs, _products_of_others(_unmasked_as_one(xs, masks)), strict=True)
        ):
            d = dy * other
            if masks is not None and masks[k] is not None:
                d = tf.where(_entry_mask(masks[k], d), d, tf.zeros_like(d))
            dxs.append(_reduce_to(d, x.shape[1:], 1))
        return dxs, []

    def jacobian_rows(
        self, m: tf.Tensor, xs: Sequence[tf.Tensor], y: tf.Tensor
    ) -> tuple[list[tf.Tensor], list]:
        """``M J_{x_k} y = M diag(prod_{j != k} x_j)`` (summed over broadcast axes), for ``M``
        ``(batch, k, *y_shape)``."""
        others = _products_of_others(xs)
        return [
            _reduce_to(m * o[:, None], x.shape[1:], 2) for x, o in zip(xs, others, strict=True)
        ], []

    def jacobian(self, xs: Sequence[Any]) -> list[tf.Tensor]:
        """``[J_{x_1} y, ..., J_{x_n} y]`` at one sample (no batch axis): ``diag(prod_{j != k}
        x_j)`` ``(N, N)``, times the 0/1 broadcast matrix for a broadcast input ``(N, N_k)``."""
        xs = [as_float_tensor(x, self.compute_dtype) for x in xs]
        shape = _output_shape([tuple(x.shape) for x in xs], "Multiply", "multiplied")
        n = math.prod(shape)
        jacobians = []
        for x, other in zip(xs, _products_of_others(xs), strict=True):
            diag = tf.linalg.diag(tf.reshape(tf.broadcast_to(other, shape), [n]))
            diag = tf.reshape(diag, [n, *shape])
            jacobians.append(tf.reshape(_reduce_to(diag, x.shape, 1), [n, math.prod(x.shape)]))
        return jacobians

    def jacobian_factors(self, xs: Sequence[tf.Tensor]) -> dict[str, tf.Tensor]:
        """``{"J_x1 = diag(x2 ... xn)": ..., ...}`` at one sample."""
        n = len(xs)
        names = [" ".join(f"x{j + 1}" for j in range(n) if j != k) or "1" for k in range(n)]
        return {
            f"J_x{k + 1} = diag({name})": j
            for k, (name, j) in enumerate(zip(names, self.jacobian(xs), strict=True))
        }

    def call(self, inputs: Sequence[tf.Tensor], mask: Any = None) -> tf.Tensor:
        if not isinstance(inputs, (list, tuple)):
            raise ValueError(
                "Multiply must be called on a list of tensors, e.g. Multiply()([x, gate])."
            )
        if mask is None or all(m is None for m in mask):
            return route(self, list(inputs))
        return route(self, list(inputs), constants=[list(mask)])

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        """Keras' merge mask: the OR of the masks when every input has one, else None."""
        return _merge_mask(inputs, mask)

    def compute_output_shape(self, input_shape: Sequence[tuple]) -> tuple:
        shape = _output_shape([tuple(s[1:]) for s in input_shape], "Multiply", "multiplied")
        return (input_shape[0][0], *shape)


def _entry_mask(mask: Any, x: tf.Tensor) -> tf.Tensor:
    """A Keras mask ``(batch, ...)`` (all axes of ``x`` but the last) broadcast to ``x``."""
    return tf.broadcast_to(tf.expand_dims(tf.cast(mask, tf.bool), -1), tf.shape(x))


def _unmasked_as_one(xs: Sequence[tf.Tensor], masks: Sequence[Any] | None) -> list[tf.Tensor]:
    """Each input with its masked entries replaced by 1 (Keras' Multiply)."""
    if masks is None:
        return list(xs)
    return [
        x if m is None else tf.where(_entry_mask(m, x), x, tf.ones_like(x))
        for x, m in zip(xs, masks, strict=True)
    ]


def _union(masks: Sequence[Any] | None, y: tf.Tensor) -> tf.Tensor | None:
    """The union of the masks broadcast to ``y`` when every input has one, else None."""
    if masks is None or any(m is None for m in masks):
        return None
    return _entry_mask(functools.reduce(tf.logical_or, [tf.cast(m, tf.bool) for m in masks]), y)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Concatenate(JacobianLayer):
    """``y = [x_1; ...; x_n]`` along ``axis``, like ``keras.layers.Concatenate``.

    Args:
        axis: the axis to concatenate along (default -1, the channels); not the batch axis.

    Inputs of one rank whose shapes agree except along ``axis``; ``J_{x_k} y`` selects the
    entries of ``x_k`` (a block of the identity) and the backward pass splits ``delta``. Masks
    are concatenated as Keras does (an input without a mask counts as unmasked). It has no
    parameters.
    """

    def __init__(self, axis: int = -1, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"Concatenate: axis must be an integer, got axis={axis!r}.")
        self.axis = axis
        self.supports_masking = True

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
                "concatenate batches outside the model (tf.concat / the input pipeline)."
            )
        return axis

    def build(self, input_shape: Any) -> None:
        _check_list_of_shapes("Concatenate", input_shape, 1, "Concatenate()([x, skip])")
        ranks = {len(s) for s in input_shape}
        axis = self._axis(len(input_shape[0]))
        rest = [[d for i, d in enumerate(s) if i not in (0, axis)] for s in input_shape]
        mismatch = len(ranks) != 1 or any(
            len({d for d in dims if d is not None}) > 1 for dims in zip(*rest, strict=True)
        )
        if mismatch:
            raise ValueError(
                "A `Concatenate` layer requires inputs with matching shapes except for the "
                f"concatenation axis. Received: input_shape={[tuple(s) for s in input_shape]} "
                f"with axis={self.axis}."
            )
        self.built = True

    def forward(self, xs: Sequence[tf.Tensor]) -> tf.Tensor:
        """``y = [x_1; ...; x_n]`` along ``axis``."""
        return tf.concat(list(xs), axis=self._axis(xs[0].shape.rank))

    def reference(self, xs: Sequence[tf.Tensor]) -> tf.Tensor:
        return keras.ops.concatenate(list(xs), axis=self.axis)

    def _split(self, t: tf.Tensor, xs: Sequence[tf.Tensor], lead: int) -> list[tf.Tensor]:
        """``t`` split along the concatenation axis into the inputs' sizes; ``lead`` counts
        ``t``'s axes before a sample's axes (1: a batch; 2: a batch of rows)."""
        axis = self._axis(xs[0].shape.rank)
        sizes = [tf.shape(x)[axis] for x in xs]
        return tf.split(t, tf.stack(sizes), axis=axis + lead - 1, num=len(xs))

    def backward(
        self, dy: tf.Tensor, xs: Sequence[tf.Tensor], y: tf.Tensor
    ) -> tuple[list[tf.Tensor], list]:
        """``(J_{x_k} y)^T delta`` = the slice of ``delta`` where ``x_k`` sits."""
        return self._split(dy, xs, 1), []

    def jacobian_rows(
        self, m: tf.Tensor, xs: Sequence[tf.Tensor], y: tf.Tensor
    ) -> tuple[list[tf.Tensor], list]:
        """``M J_{x_k} y``: the columns of ``M`` ``(batch, k, *y_shape)`` where ``x_k`` sits."""
        return self._split(m, xs, 2), []

    def jacobian(self, xs: Sequence[Any]) -> list[tf.Tensor]:
        """``[J_{x_1} y, ..., J_{x_n} y]`` at one sample (no batch axis), each ``(N, N_k)``:
        0/1, one 1 per column, in the row of ``y`` where that entry of ``x_k`` lands."""
        xs = [as_float_tensor(x, self.compute_dtype) for x in xs]
        y = self.forward([x[None] for x in xs])[0]
        n = math.prod(y.shape)
        eye = tf.reshape(tf.eye(n, dtype=y.dtype), [n, *y.shape])  # row r: e_r shaped like y
        blocks = self._split(eye, [x[None] for x in xs], 1)
        return [tf.reshape(b, [n, math.prod(x.shape)]) for b, x in zip(blocks, xs, strict=True)]

    def jacobian_factors(self, xs: Sequence[tf.Tensor]) -> dict[str, tf.Tensor]:
        """``{"J_x1 (selection)": ..., ...}`` at one sample."""
        return {f"J_x{k + 1} (selection)": j for k, j in enumerate(self.jacobian(xs))}

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        if not isinstance(inputs, (list, tuple)):
            raise ValueError(
                "Concatenate must be called on a list of tensors, e.g. Concatenate()([x, skip])."
            )
        return route(self, list(inputs))

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        """Keras' Concatenate mask: the masks concatenated (an unmasked input counts as all
        True), reduced with ``any`` over the last axis; None without masks."""
        if mask is None:
            return None
        _check_masks(inputs, mask)
        if all(m is None for m in mask):
            return None
        masks = []
        for x, m in zip(inputs, mask, strict=True):
            if m is None:
                masks.append(keras.ops.ones_like(x, dtype="bool"))
            elif len(m.shape) < len(x.shape):
                masks.append(
                    keras.ops.logical_or(
                        keras.ops.expand_dims(m, axis=-1), keras.ops.zeros_like(x, dtype="bool")
                    )
                )
            else:
                masks.append(m)
        return keras.ops.any(keras.ops.concatenate(masks, axis=self.axis), axis=-1)

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
