"""Add: the residual sum ``y = x_1 + ... + x_n``, whose Jacobian with respect to each input is I.

For inputs of one shape, ``J_{x_k} y = I_N`` for every ``k``, so the backward pass fans the
upstream vector out unchanged: ``(J_{x_k} y)^T delta = delta``. This is how a skip connection
enters Algorithm 1: the ``delta`` reaching a tensor that feeds several layers is the sum of the
``delta`` each of them sends back (the multivariable chain rule), and ``tf_jacbp.jacobian``
adds them up in the same way.

As in ``keras.layers.Add``, an input may have size 1 along an axis where the others do not (same
rank): it is broadcast, ``x_k`` enters as ``R_k^T x_k`` with ``R_k`` the 0/1 matrix that sums the
copies, and its Jacobian is ``R_k^T``; the backward pass is ``R_k delta``, the sum of ``delta`` over
the broadcast axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import JacobianLayer, as_float_tensor, route


def _output_shape(shapes: Sequence[tuple]) -> tuple:
    """The broadcast shape of same-rank per-sample shapes (``None`` = unknown)."""
    out = list(shapes[0])
    for shape in shapes[1:]:
        for axis, (a, b) in enumerate(zip(out, shape, strict=True)):
            if a is None or b is None:
                out[axis] = None if 1 not in (a, b) else (a if b == 1 else b)
            elif a != b and 1 not in (a, b):
                raise ValueError(
                    f"Add: inputs of shapes {[tuple(s) for s in shapes]} (per sample) cannot be "
                    "added: each axis must match or be 1 in all but one input."
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
    ``(batch, *shape_k)`` -> ``(batch, *shape)``. It has no parameters.
    """

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

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        if not isinstance(inputs, (list, tuple)):
            raise ValueError("Add must be called on a list of tensors, e.g. Add()([x, shortcut]).")
        return route(self, list(inputs))

    def compute_output_shape(self, input_shape: Sequence[tuple]) -> tuple:
        return (input_shape[0][0], *_output_shape([tuple(s[1:]) for s in input_shape]))
