"""The factors of Algorithm 1's step 2 for one sample, as named matrices (``layer_jacobians``)."""

from __future__ import annotations

from typing import Any

from tf_jacbp import activations
from tf_jacbp._backend import keras, tf
from tf_jacbp.jacobian.graph import graph
from tf_jacbp.jacobian.inputs import input_shape
from tf_jacbp.jacobian.walk import forward
from tf_jacbp.layers.activation import Activation


def layer_jacobians(model: keras.Model, x: Any) -> dict[str, tf.Tensor]:
    """The factors of step 2 for one sample, as named matrices, in model order.

    ``x``: one input, ``input_shape`` or ``(1, *input_shape)``. Keys are
    ``"<layer>: <factor>"``: for a Dense layer ``W^T`` and ``[I (x) a^T | I]``, for its
    activation (or an Activation layer) ``D`` (block diagonal for a softmax over the channels
    of an image: one block per position), for a Conv2D its Toeplitz matrix and patch matrix,
    for pooling and flatten their selection/averaging matrices (see each layer's
    ``jacobian_factors``).
    """
    graph(model)  # validates the model before x is read against its input shape
    x = tf.convert_to_tensor(x) if not isinstance(x, tf.SparseTensor | tf.RaggedTensor) else x
    if isinstance(x, tf.Tensor) and x.shape.rank == len(input_shape(model)) - 1:
        x = x[None]
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
