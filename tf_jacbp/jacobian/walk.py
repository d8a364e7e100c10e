"""Algorithm 1's two passes over a model: ``forward`` records each map, ``walk`` goes back.

``forward`` runs the model map by map (a layer's ``jacobian_ops``: e.g. Dense, then its
activation) and keeps a ``Record`` of each: ``y = op(x; params)``. ``walk`` starts from rows ``M``
at the output and moves them back through each map, ``M <- M J_x``, collecting each parameter's
block ``M J_p``. With ``step=jacobian_rows`` the rows are ``M = I`` (step 2, ``J_theta z[L]``);
with ``step=per_example_rows`` they are ``delta[L]`` per sample (step 6, per-example gradients);
``tf_jacbp.jacobian.norms`` passes a step that returns squared norms instead of gradients.
``output_delta`` runs the forward pass and reads ``delta[L]_i = grad_{z[L]_i} l_i`` off the loss,
where every per-example computation starts.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

from tf_jacbp._backend import keras, tf
from tf_jacbp.jacobian.graph import graph, parameter_variables
from tf_jacbp.jacobian.inputs import check_x, check_y, loss_function
from tf_jacbp.layers.base import JacobianLayer


@dataclasses.dataclass
class Record:
    """One map applied in the forward pass: ``y = op(x; params)``, from tensor keys to a key."""

    layer: JacobianLayer
    op: Any
    params: list[tf.Tensor]
    inputs: list[Any]
    output: Any
    x: tf.Tensor | list[tf.Tensor]
    y: tf.Tensor
    call: int  # how many times the layer was called before (shared layers)


def forward(
    model: keras.Model, x: Any, training: bool = False, owner: str = "tf_jacbp.jacobian"
) -> tuple[list[Record], tf.Tensor, Any]:
    """Run the model map by map (a layer's ``jacobian_ops``, e.g. Dense then its activation),
    recording each map with its input and output. Returns ``(records, z[L], key of z[L])``.

    ``x`` is checked against the model's input shape (``check_x``; errors name ``owner``)."""
    nodes, input_key, output_key = graph(model)
    first = nodes[0].layer  # integer ids stay integers (float16 holds them only up to 2048)
    dtype = None if getattr(first, "takes_integer_ids", False) else first.compute_dtype
    values = {input_key: check_x(model, x, dtype, owner)}
    records, calls = [], collections.Counter()
    for node in nodes:
        call, calls[id(node.layer)] = calls[id(node.layer)], calls[id(node.layer)] + 1
        keys, a = node.inputs, [values[key] for key in node.inputs]
        a = a if len(a) > 1 else a[0]
        ops = node.layer.jacobian_ops(training)
        for j, (op, params) in enumerate(ops):
            out = node.output if j == len(ops) - 1 else (node.output, j)
            y = op.forward(a, *params)
            records.append(Record(node.layer, op, params, keys, out, a, y, call))
            keys, a = [out], y
        values[node.output] = a
    return records, values[output_key], output_key


def jacobian_rows(
    op: Any, m: tf.Tensor, x: tf.Tensor | list[tf.Tensor], y: tf.Tensor, params: list[tf.Tensor]
) -> tuple:
    """``(M J_x, [M J_p])`` for one op; parameter-free activations use their ``backward``."""
    if hasattr(op, "jacobian_rows"):
        return op.jacobian_rows(m, x, y, *params)
    dx, _ = op.backward(m, x[:, None], y[:, None])  # diag(f'(z)) or softmax's, per row of M
    return dx, []


def per_example_rows(
    op: Any, delta: tf.Tensor, x: tf.Tensor | list[tf.Tensor], y: tf.Tensor, params: list[tf.Tensor]
) -> tuple:
    """``((J_x)^T delta_i, [(J_p)^T delta_i])`` for each sample ``i``, parameter gradients with a
    leading batch axis and the parameter's own shape; activations are diagonal per sample."""
    if hasattr(op, "per_example_backward"):
        return op.per_example_backward(delta, x, y, *params)
    return op.backward(delta, x, y)


def walk(
    model: keras.Model,
    records: list[Record],
    output_key: Any,
    m: tf.Tensor,
    step: Callable = jacobian_rows,
) -> list[tuple]:
    """Algorithm 1 from the output: ``[(variable, M J_p)]`` in theta order (step 2).

    ``M`` starts at the output and moves back through each map (``M <- M J_x``). Where a tensor
    feeds several maps (a skip connection), the rows arriving from each are added: that is the
    chain rule for a sum of paths. A layer called several times adds its blocks. ``step`` is
    ``jacobian_rows`` (``M``: ``(batch, k, ...)`` rows, blocks in ``Vec`` order) or
    ``per_example_rows`` (``M``: one ``delta`` per sample, step 6, gradients in each parameter's
    shape). Every map of a Sequential or functional model lies on a path to its output, so every
    map receives rows.
    """
    rows_at = {output_key: m}
    blocks: dict[int, tf.Tensor] = {}
    for r in reversed(records):
        dx, rows = step(r.op, rows_at.pop(r.output), r.x, r.y, r.params)
        for key, d in zip(r.inputs, dx if isinstance(r.x, list) else [dx], strict=True):
            rows_at[key] = rows_at[key] + d if key in rows_at else d
        for v, g in zip(r.layer.jacobian_parameters() if r.params else [], rows, strict=True):
            blocks[id(v)] = blocks[id(v)] + g if id(v) in blocks else g
    return [(v, blocks[id(v)]) for v in parameter_variables(model)]


def output_delta(
    model: keras.Model,
    x: Any,
    y: Any,
    loss: Any,
    training: bool,
    owner: str = "tf_jacbp.jacobian",
) -> tuple[list[Record], Any, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The forward records and, per sample, the loss ``l_i`` and ``delta[L]_i = grad_{z[L]_i} l_i``.

    The start of every per-example computation: ``per_example_gradients`` and
    ``squared_gradient_norms`` walk back from the ``delta[L]`` returned here. ``l_i`` is the
    loss's per-sample value (``Loss.call``, before any reduction), summed over any axes past the
    batch axis.

    Args:
        model: a Sequential or functional model of tf_jacbp layers.
        x, y: a batch of inputs ``(batch, *input_shape)`` and labels or targets.
        loss: a Keras loss (object, name or per-sample function); ``None``: the compiled loss.
        training: the layers' training-mode maps (as for ``per_example_gradients``).
        owner: the function the user called, named by the errors about ``x`` and ``y``.

    Returns:
        ``(records, output_key, z[L], l, delta[L])``: the ``walk`` records of the forward pass,
        the key of the output tensor, the output ``(batch, *output_shape)``, ``l`` ``(batch,)``
        and ``delta[L]`` ``(batch, *output_shape)`` in the output's dtype.
    """
    per_sample, dtype = loss_function(model, loss)
    records, out, output_key = forward(model, x, training, owner)
    if out.shape[0] is not None:  # a traced batch of unknown size is not checked
        y = check_y(y, int(out.shape[0]), owner)
    y = tf.cast(tf.convert_to_tensor(y), dtype or out.dtype)
    with tf.GradientTape() as tape:  # only to read delta[L] off the loss (Table 1 for ours)
        tape.watch(out)
        # A new tensor: in a graph stock Keras' cross entropies read the logits off the Softmax
        # or Sigmoid op that made their y_pred, which cuts the loss off from ``out`` (no
        # delta). On this tensor they compute what they compute eagerly, on probabilities.
        out_cast = tf.identity(tf.cast(out, dtype) if dtype else out)
        values = per_sample(y, out_cast)
        if values.shape.rank == 0:
            raise ValueError(
                f"The loss {loss!r} returned one value for the whole batch; per-example gradients "
                "need one value per sample. Pass a keras.losses.Loss (its call gives per-sample "
                "values) or a function returning shape (batch,)."
            )
        if values.shape.rank > 1:
            values = tf.reduce_sum(values, axis=list(range(1, values.shape.rank)))
        total = tf.reduce_sum(values)
    delta = tf.cast(tape.gradient(total, out), out.dtype)
    return records, output_key, out, values, delta
