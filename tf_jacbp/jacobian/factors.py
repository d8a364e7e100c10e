"""The factors of Algorithm 1's step 2 for one sample, as named matrices (``layer_jacobians``)."""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp import activations, backend
from tf_jacbp._backend import keras
from tf_jacbp.jacobian.graph import graph
from tf_jacbp.jacobian.inputs import input_shape
from tf_jacbp.jacobian.walk import Tensor, forward
from tf_jacbp.layers.activation import Activation


def _with_batch_axis(x: Any, rank: int) -> Any:
    """``x`` with a batch axis of 1 if it is one sample (rank ``rank - 1``), else as it is: a
    sparse or non-numeric ``x`` goes on to ``check_x``, whose error names the fix."""
    if backend.dense_conversion(x, "x") is not None:
        return x
    try:
        x = ops.convert_to_tensor(x)
    except (TypeError, ValueError):
        return x
    return x[None] if len(x.shape) == rank - 1 else x


def layer_jacobians(model: keras.Model, x: Any) -> dict[str, Tensor]:
    """The factors of step 2 for one sample, as named matrices, in model order.

    ``x``: one input, ``input_shape`` or ``(1, *input_shape)``. Keys are
    ``"<layer>: <factor>"``: for a Dense layer ``W^T`` and ``[I (x) a^T | I]``, for its
    activation (or an Activation layer) ``D`` (block diagonal for a softmax over the channels
    of an image: one block per position), for a Conv2D its Toeplitz matrix and patch matrix,
    for pooling and flatten their selection/averaging matrices (see each layer's
    ``jacobian_factors``).
    """
    graph(model)  # validates the model before x is read against its input shape
    x = _with_batch_axis(x, len(input_shape(model)))
    records, _, _ = forward(model, x, owner="layer_jacobians")
    if records[0].x.shape[0] != 1:
        raise ValueError(
            f"layer_jacobians takes one sample, got a batch of {records[0].x.shape[0]}; pass "
            "x[0] or x[:1]."
        )
    factors = {}
    for r in records:
        op = r.op.activation if isinstance(r.op, Activation) else r.op
        if isinstance(op, activations.Elementwise | activations.Softmax):
            # D = J_z f(z): diag(f'(z)), or one softmax block per position (row-major z)
            named = {"D": op.jacobian_at_positions(r.x)[0]}
        else:
            named = r.op.jacobian_factors([a[0] for a in r.x] if isinstance(r.x, list) else r.x[0])
        suffix = f" (call {r.call + 1})" if r.call else ""
        for name, matrix in named.items():
            factors[f"{r.layer.name}{suffix}: {name}"] = matrix
    return factors
