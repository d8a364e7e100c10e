"""Algorithm 1's two passes over a model: ``forward`` records each map, ``walk`` goes back.

``forward`` runs the model map by map (a layer's ``jacobian_ops``: e.g. Dense, then its
activation) and keeps a ``Record`` of each: ``y = op(x; params)``. ``walk`` starts from rows ``M``
at the output and moves them back through each map, ``M <- M J_x``, collecting each parameter's
block ``M J_p``: one walk, asking each map for one product (``PRODUCTS``): ``"rows"`` with
``M = I`` (step 2, ``J_theta z[L]``), ``"gradients"`` with ``delta[L]`` per sample (step 4,
per-example gradients), ``"squared_norms"`` for their squared norms (DP-SGD's first pass).
``output_delta`` runs the forward pass and reads ``delta[L]_i = grad_{z[L]_i} l_i`` off the loss,
where every per-example computation starts.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend
from tf_jacbp._backend import keras
from tf_jacbp.contract import squared_norms_of
from tf_jacbp.jacobian.graph import graph, validated_variables
from tf_jacbp.jacobian.inputs import check_x, check_y, loss_function
from tf_jacbp.layers.base import JacobianLayer

Tensor = Any  # a tensor of the backend Keras runs on


@dataclasses.dataclass
class Record:
    """One map applied in the forward pass: ``y = op(x; params)``, from tensor keys to a key."""

    layer: JacobianLayer
    op: Any
    params: list[Tensor]
    inputs: list[Any]
    output: Any
    x: Tensor | list[Tensor]
    y: Tensor
    call: int  # how many times the layer was called before (shared layers)

    @property
    def variables(self) -> list[keras.Variable]:
        """The variables of ``params`` (none for a map without parameters)."""
        return self.layer.jacobian_parameters() if self.params else []


class Records(list):
    """``forward``'s records in order, with the model's theta variables (``variables``): the
    model's graph is built and validated once per call."""

    variables: list[keras.Variable]


def forward(
    model: keras.Model, x: Any, training: bool = False, owner: str = "tf_jacbp.jacobian"
) -> tuple[Records, Tensor, Any]:
    """Run the model map by map (a layer's ``jacobian_ops``, e.g. Dense then its activation),
    recording each map with its input and output. Returns ``(records, z[L], key of z[L])``.

    ``x`` is checked against the model's input shape (``check_x``; errors name ``owner``). A
    model with float64 layers needs float64 to be float64 (on JAX: x64 enabled), else a
    RuntimeError says how to enable it (``backend.require_float64``)."""
    nodes, input_key, output_key = graph(model, owner)
    if any(dtype_name(node.layer.compute_dtype) == "float64" for node in nodes):
        backend.require_float64(f"{owner} on model '{model.name}' (float64 layers)")
    records = Records()
    records.variables = validated_variables(model)
    first = nodes[0].layer  # integer ids stay integers (float16 holds them only up to 2048)
    dtype = None if getattr(first, "takes_integer_ids", False) else first.compute_dtype
    values = {input_key: check_x(model, x, dtype, owner)}
    calls = collections.Counter()
    for node in nodes:
        call, calls[id(node.layer)] = calls[id(node.layer)], calls[id(node.layer)] + 1
        keys, a = node.inputs, [values[key] for key in node.inputs]
        a = [_autocast(t, node.layer) for t in a]  # as Keras casts a layer's inputs
        a = a if len(a) > 1 else a[0]
        ops = node.layer.jacobian_ops(training)
        for j, (op, params) in enumerate(ops):
            out = node.output if j == len(ops) - 1 else (node.output, j)
            y = op.forward(a, *params)
            records.append(Record(node.layer, op, params, keys, out, a, y, call))
            keys, a = [out], y
        values[node.output] = a
    return records, values[output_key], output_key


PRODUCTS = ("rows", "gradients", "squared_norms")
"""What ``walk`` asks each map for (the contract's derived products, ``tf_jacbp.contract``):

* ``"rows"``: ``M`` is ``(batch, k, *shape)``, ``k`` rows per sample; each map gives
  ``jacobian_rows``, parameter blocks ``(batch, k, size(p))`` in ``Vec`` order (step 2,
  ``J_theta z[L]`` when ``M = I``).
* ``"gradients"``: ``M`` is ``delta`` ``(batch, *shape)``; each map gives
  ``per_example_backward``, gradients ``(batch, *p.shape)`` (step 4, per-example gradients).
* ``"squared_norms"``: ``M`` is ``delta``; each map gives ``per_example_squared_norms``,
  ``(batch,)`` per parameter, and moves ``delta`` back with its input product only. A layer called
  more than once gives its per-example gradients instead: the calls' gradients are added and
  the norm of the sum is taken at the end (a sum of norms would be wrong).
"""


def dtype_name(dtype: Any) -> str:
    """Keras' name of ``dtype`` (``"float32"``, ``"int64"``, ...), whatever the backend's type."""
    return keras.backend.standardize_dtype(dtype)


def is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating dtype (``float16``, ``bfloat16``, ``float32``, ...)."""
    return "float" in dtype_name(dtype)


def dtype_bytes(dtype: Any) -> int:
    """The bytes of one entry of ``dtype``: 2 for ``float16`` or ``bfloat16``, 8 for ``float64``."""
    name = dtype_name(dtype)
    bits = "".join(c for c in name if c.isdigit())
    return int(bits) // 8 if bits else 1  # bool


def _autocast(t: Any, layer: Any) -> Any:
    """``t`` in ``layer``'s compute dtype if both are floating (Keras' input autocast)."""
    dtype = layer.compute_dtype
    return ops.cast(t, dtype) if is_floating(t.dtype) and is_floating(dtype) else t


def _in_float32(op: Any, delta: Any, x: Any, y: Any, params: list) -> tuple:
    """The arguments of a 16-bit map's squared norms, in float32: a norm is a sum of squares,
    which float16 rounds (and overflows) where float32 does not."""
    up = lambda t: ops.cast(t, "float32") if is_floating(t.dtype) else t  # noqa: E731
    x = [up(t) for t in x] if isinstance(x, list) else up(x)
    return op, "squared_norms", up(delta), x, up(y), [up(p) for p in params]


def _product(op: Any, product: str, m: Any, x: Any, y: Any, params: list, shared: bool) -> tuple:
    """``(M J_x, [what product asks of each parameter])`` for one map."""
    if product == "rows":
        return op.jacobian_rows(m, x, y, *params)
    if product == "gradients" or shared or not params:
        return op.per_example_backward(m, x, y, *params)
    dx = op.input_backward(m, x, y, *params)  # delta moves back; the norms need no sums
    return dx, op.per_example_squared_norms(m, x, y, *params)


def walk(
    records: Records,
    output_key: Any,
    m: Tensor,
    product: str = "rows",
    deltas: list | None = None,
) -> list[tuple[keras.Variable, Tensor]]:
    """Algorithm 1 from the output: ``[(variable, product)]`` in theta order.

    ``M`` starts at the output and moves back through each map (``M <- M J_x``), each map
    giving what ``product`` asks for (``PRODUCTS``). Where a tensor feeds several maps (a skip
    connection), the rows arriving from each are added: that is the chain rule for a sum of
    paths. A layer called several times adds its calls' products. Every map of a Sequential or
    functional model lies on a path to its output, so every map receives rows.

    Args:
        records: ``forward``'s records (with the model's theta variables).
        output_key: the key of the output tensor ``M`` starts at.
        m: ``(batch, k, *output_shape)`` rows for ``"rows"``, else ``delta[L]``
            ``(batch, *output_shape)``.
        product: one of ``PRODUCTS``.
        deltas: if a list, ``(layer, op, delta, x, y, params)`` is appended for each map with
            parameters, last map first: the rows that reached it (``tf_jacbp.privacy`` reuses
            them for the clipped sum).
    """
    if product not in PRODUCTS:
        raise ValueError(f"walk: product must be one of {PRODUCTS}, got product={product!r}.")
    calls = collections.Counter(id(r.layer) for r in records if r.params)
    shared = {id(v) for r in records if calls[id(r.layer)] > 1 for v in r.variables}
    rows_at = {output_key: m}
    blocks: dict[int, Tensor] = {}
    for r in reversed(records):
        delta = ops.cast(rows_at.pop(r.output), r.y.dtype)  # mixed precision: the map's dtype
        if r.params and deltas is not None:
            deltas.append((r.layer, r.op, delta, r.x, r.y, r.params))
        is_shared = calls[id(r.layer)] > 1
        if product == "squared_norms" and r.params and dtype_bytes(r.y.dtype) < 4:
            dx, products = _product(*_in_float32(r.op, delta, r.x, r.y, r.params), is_shared)
        else:
            dx, products = _product(r.op, product, delta, r.x, r.y, r.params, is_shared)
        for key, d in zip(r.inputs, dx if isinstance(r.x, list) else [dx], strict=True):
            rows_at[key] = rows_at[key] + ops.cast(d, rows_at[key].dtype) if key in rows_at else d
        for v, g in zip(r.variables, products, strict=True):
            g = ops.cast(g, v.dtype)  # a float16 map's products reach its float32 variables
            blocks[id(v)] = blocks[id(v)] + g if id(v) in blocks else g
    result = [(v, blocks[id(v)]) for v in records.variables]
    if product == "squared_norms":
        result = [(v, squared_norms_of(g) if id(v) in shared else g) for v, g in result]
    return result


def output_delta(
    model: keras.Model,
    x: Any,
    y: Any,
    loss: Any,
    training: bool,
    owner: str = "tf_jacbp.jacobian",
) -> tuple[list[Record], Any, Tensor, Tensor, Tensor]:
    """The forward records and, per sample, the loss ``l_i`` and ``delta[L]_i = grad_{z[L]_i} l_i``.

    The start of every per-example computation: ``per_example_gradients`` and
    ``squared_gradient_norms`` walk back from the ``delta[L]`` returned here. ``l_i`` is the
    loss's per-sample value (``Loss.call``, before any reduction), averaged over any axes past
    the batch axis (a sequence's positions), as Keras' ``sum_over_batch_size`` reduction averages
    them: then ``mean_i l_i`` is the loss ``fit`` minimizes and ``mean_i g_i`` its gradient.

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
    records, out, output_key = forward(model, x, training, owner)
    values, total = loss_values(model, y, loss, out, owner)
    # delta[L] by the backend's autodiff, of the loss alone (Table 1 for the tf_jacbp losses)
    _, (delta,) = backend.value_and_gradients(total, [out])
    return records, output_key, out, values, ops.cast(delta, out.dtype)


def loss_values(
    model: keras.Model, y: Any, loss: Any, out: Tensor, owner: str = "tf_jacbp.jacobian"
) -> tuple[Tensor, Any]:
    """``(l, total)``: the per-sample loss ``l`` ``(batch,)`` at the output ``out`` (the loss's
    values before the batch reduction, averaged over any axes past the batch axis), and
    ``total(z) = sum_i l_i(z_i)``, whose gradient at ``out`` is ``delta[L]``.

    Called eagerly, the loss's own checks of ``y`` (a label out of range) raise here.
    """
    per_sample, dtype = loss_function(model, loss)
    if out.shape[0] is not None:  # a traced batch of unknown size is not checked
        y = check_y(y, int(out.shape[0]), owner)
    y = ops.cast(ops.convert_to_tensor(y), dtype or out.dtype)

    def per_sample_values(out: Tensor) -> Tensor:
        """``l`` ``(batch,)``: the loss's values, averaged over any axes past the batch axis."""
        # A new tensor: in a graph stock Keras' cross entropies read the logits off the Softmax
        # or Sigmoid op that made their y_pred, which cuts the loss off from ``out`` (no
        # delta). On this tensor they compute what they compute eagerly, on probabilities.
        values = per_sample(y, ops.copy(ops.cast(out, dtype) if dtype else out))
        if len(values.shape) > 1:  # the mean over positions, as Keras (and Opacus) reduce
            # (a sum over a count: keras.ops.mean computes float64 in float32 on JAX)
            axes = list(range(1, len(values.shape)))
            values = ops.sum(values, axis=axes) / float(np.prod(values.shape[1:]))
        return values

    values = per_sample_values(out)
    if len(values.shape) == 0:
        raise ValueError(
            f"The loss {loss!r} returned one value for the whole batch; per-example gradients "
            "need one value per sample. Pass a keras.losses.Loss (its call gives per-sample "
            "values) or a function returning shape (batch,)."
        )
    return values, lambda o: ops.sum(per_sample_values(o))
