"""Algorithm 1 in full: theta, ``J_theta z[L]``, per-example gradients, the factors of step 2.

For a network of tf_jacbp layers (docs/math.md, "Algorithm 1, restated"):

* ``theta = [Vec(W[1]); b[1]; ...; Vec(W[L]); b[L]]`` (``flatten_parameters``; the layout is
  ``tf_jacbp.layout``'s).
* Step 2: the block of ``J_theta z[L]`` that belongs to layer ``l``'s parameters is
  ``W[L]^T D[L-1] W[L-1]^T ... W[l+1]^T D[l] [I (x) a[l-1]^T | I]``. ``parameter_jacobian``
  evaluates this chain from the left: ``M = I`` (``n_out x n_out``) at the output, then for each
  layer, last to first, the block is ``M [I (x) a^T | I]`` (the layer's ``per_example_backward``
  applied to the ``n_out`` rows of ``M``: outer products, patch products) and ``M`` becomes
  ``M W^T`` and ``M D`` (its ``backward``). No autodiff is involved.
* Step 6: ``grad_theta l = (J_theta z[L])^T delta[L]``. ``per_example_gradients`` computes it
  for each sample without forming ``J``: the same walk with ``delta[L]`` (``n_out`` values per
  sample) in place of ``M``.

Models: ``keras.Sequential`` or functional models with one input and one output whose layers are
all ``tf_jacbp.layers.JacobianLayer``; anything else raises an error that names the layer. A
functional model may branch and merge (skips through ``tf_jacbp.layers.Add``) and call a layer
several times: the walk visits its layer calls in reverse topological order and adds the rows
that reach a tensor from each of its consumers (the chain rule for a sum of paths). Each layer
contributes its inference map unless ``training=True`` (``jacobian_ops(training)``).
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from tf_jacbp import activations
from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.activation import Activation
from tf_jacbp.layers.base import JacobianLayer
from tf_jacbp.layout import unvec_parameter, vec_parameter

# parameter_jacobian refuses to allocate more than this many bytes unless given max_bytes=...
DEFAULT_MAX_BYTES = 2**30


@dataclasses.dataclass
class _Node:
    """One call of a layer in the model's graph: the keys of its input tensors and its output."""

    layer: JacobianLayer
    inputs: list[Any]
    output: Any


def _check_layer(layer: keras.layers.Layer) -> JacobianLayer:
    if not isinstance(layer, JacobianLayer):
        raise TypeError(
            f"Layer '{layer.name}' ({type(layer).__module__}.{type(layer).__name__}) has no "
            "explicit Jacobian. Build the model from tf_jacbp.layers only (e.g. "
            "tf_jacbp.layers.Flatten instead of keras.layers.Flatten/Reshape)."
        )
    return layer


def _model_graph(model: keras.Model) -> tuple[list[_Node], Any, Any]:
    """``_graph`` of one model level, nested models still as single nodes."""
    if isinstance(model, keras.Sequential):
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        return [_Node(layer, [i], i + 1) for i, layer in enumerate(layers)], 0, len(layers)
    if not hasattr(model, "_nodes_by_depth"):
        raise TypeError(
            f"Model '{model.name}' ({type(model).__name__}) is a subclassed model; "
            "tf_jacbp.jacobian walks Sequential and functional models."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"Model '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; tf_jacbp.jacobian supports models with one input and one output."
        )
    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            if len(node.outputs) != 1:
                raise ValueError(
                    f"Layer '{node.operation.name}' has several outputs; not supported."
                )
            nodes.append(
                _Node(node.operation, [id(t) for t in node.input_tensors], id(node.outputs[0]))
            )
    return nodes, id(model.inputs[0]), id(model.outputs[0])


def _graph(model: keras.Model) -> tuple[list[_Node], Any, Any]:
    """The model's layer calls in an order that computes every input before its use.

    Returns ``(nodes, input key, output key)``; a key names a tensor of the graph. Sequential
    models are chains; functional models may branch and merge (skips through ``Add``) and call a
    layer more than once (shared weights). A nested Sequential or functional model (a model used
    as a layer) is replaced by its own layer calls, its tensors' keys prefixed by the call, as
    ``GradientCheck`` looks through nested models.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    nodes, input_key, output_key = _model_graph(model)
    if not nodes:
        raise ValueError(
            f"Model '{model.name}' has no layers, so it has no parameters and no Jacobian. Add "
            "tf_jacbp layers to it (e.g. tf_jacbp.layers.Dense) before calling tf_jacbp.jacobian."
        )
    flat = []
    for call, node in enumerate(nodes):
        if not isinstance(node.layer, keras.Model):
            flat.append(_Node(_check_layer(node.layer), node.inputs, node.output))
            continue
        inner, inner_input, inner_output = _graph(node.layer)
        if len(node.inputs) != 1:
            raise ValueError(
                f"Nested model '{node.layer.name}' is called on {len(node.inputs)} tensors; "
                "tf_jacbp.jacobian supports nested models with one input and one output."
            )
        # The nested model's input and output are the outer call's; its other tensors are new.
        keys = {inner_input: node.inputs[0], inner_output: node.output}
        for n in inner:
            inputs = [keys.get(k, ("nested", call, k)) for k in n.inputs]
            flat.append(_Node(n.layer, inputs, keys.get(n.output, ("nested", call, n.output))))
    return flat, input_key, output_key


def _flat_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """``model.layers`` with nested models replaced by their layers, depth first."""
    flat = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            flat += _flat_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            flat.append(layer)
    return flat


def _layers(model: keras.Model) -> list[JacobianLayer]:
    """The model's tf_jacbp layers, each once, in ``model.layers`` order (theta's order), nested
    models' layers in their place."""
    _graph(model)  # validates: tf_jacbp layers only, one input and one output
    layers = []
    for layer in _flat_layers(model):
        if all(layer is not seen for seen in layers):
            layers.append(layer)
    return layers


def parameter_variables(model: keras.Model) -> list[keras.Variable]:
    """The variables of theta, in theta order (layers in order, kernel then bias)."""
    return [v for layer in _layers(model) for v in layer.jacobian_parameters()]


def flatten_parameters(model: keras.Model) -> tf.Tensor:
    """``theta = [Vec(W[1]); b[1]; ...]``, shape ``(n_params,)``, ``Vec`` column-major."""
    return tf.concat(
        [vec_parameter(tf.convert_to_tensor(v)) for v in parameter_variables(model)], 0
    )


def unflatten_parameters(model: keras.Model, theta: Any, assign: bool = False) -> list[tf.Tensor]:
    """Inverse of ``flatten_parameters``: ``(n_params,)`` -> one tensor per variable.

    With ``assign=True`` the values are also written into the model's variables.
    """
    variables = parameter_variables(model)
    sizes = [int(np.prod(v.shape)) for v in variables]
    theta = tf.convert_to_tensor(theta)
    if theta.shape != (sum(sizes),):
        raise ValueError(
            f"theta must have shape ({sum(sizes)},) for this model, got {tuple(theta.shape)}."
        )
    values = [
        unvec_parameter(piece, tuple(v.shape))
        for piece, v in zip(tf.split(theta, sizes), variables, strict=True)
    ]
    if assign:
        for v, value in zip(variables, values, strict=True):
            v.assign(tf.cast(value, v.dtype))
    return values


@dataclasses.dataclass
class _Record:
    """One map applied in the forward pass: ``y = op(x; params)``, from tensor keys to a key."""

    layer: JacobianLayer
    op: Any
    params: list[tf.Tensor]
    inputs: list[Any]
    output: Any
    x: tf.Tensor | list[tf.Tensor]
    y: tf.Tensor
    call: int  # how many times the layer was called before (shared layers)


def _input_shape(model: keras.Model) -> tuple:
    """The model's input shape, batch axis first; a ValueError if the model has none yet."""
    try:
        inputs = model.inputs
    except AttributeError:
        inputs = None
    if not inputs:
        raise ValueError(
            f"Model '{model.name}' has no input shape yet, so x cannot be checked against it. "
            "Start it with keras.Input(shape), or call model.build((None, *shape)) first."
        )
    return tuple(inputs[0].shape)


def _check_x(model: keras.Model, x: Any, dtype: Any, owner: str) -> tf.Tensor:
    """``x`` as a tensor of ``dtype``, after checking it against the model's input shape.

    A batch ``(batch, *input_shape)``: the rank and every known size must match (a transposed
    image has the right number of entries and would otherwise run, silently wrong).
    """
    if isinstance(x, tf.SparseTensor | tf.RaggedTensor):
        raise TypeError(
            f"{owner}: x must be a dense array or tensor, got a {type(x).__name__}; convert it "
            "with tf.sparse.to_dense(x) or x.to_tensor()."
        )
    try:
        x = tf.convert_to_tensor(x)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{owner}: x must be a numeric array or tensor, got {type(x).__name__}."
        ) from e
    if not (x.dtype.is_floating or x.dtype.is_integer or x.dtype.is_bool):
        raise TypeError(f"{owner}: x must be numeric, got dtype {x.dtype.name}.")
    expected, got = _input_shape(model), tuple(x.shape)
    if len(got) != len(expected) or any(
        e is not None and e != g for e, g in zip(expected[1:], got[1:], strict=True)
    ):
        wanted = "(batch, " + ", ".join("?" if e is None else str(e) for e in expected[1:]) + ")"
        hint = ""
        if len(got) == len(expected) and sorted(got[1:]) == sorted(
            e for e in expected[1:] if e is not None
        ):
            hint = (
                " Its axes look permuted: images are channels_last, (batch, height, width, "
                "channels); transpose x."
            )
        elif len(got) == len(expected) - 1:
            hint = " For one sample, add the batch axis: x[None]."
        raise ValueError(
            f"{owner}: x must have shape {wanted} to match the input of model '{model.name}', "
            f"got x of shape {got}.{hint}"
        )
    return tf.cast(x, dtype) if dtype is not None and x.dtype != dtype else x


def _check_y(y: Any, batch: int, owner: str) -> tf.Tensor:
    """``y`` as a tensor with one label (or target) per sample: a ValueError otherwise."""
    if isinstance(y, tf.SparseTensor | tf.RaggedTensor):
        raise TypeError(
            f"{owner}: y must be a dense array or tensor, got a {type(y).__name__}; convert it "
            "with tf.sparse.to_dense(y) or y.to_tensor()."
        )
    y = tf.convert_to_tensor(y)
    if y.shape.rank == 0 or y.shape[0] != batch:
        raise ValueError(
            f"{owner}: y must have one label or target per sample of x (a leading axis of "
            f"{batch}), got y of shape {tuple(y.shape)} for x with {batch} samples."
        )
    return y


def _forward(
    model: keras.Model, x: Any, training: bool = False, owner: str = "tf_jacbp.jacobian"
) -> tuple[list[_Record], tf.Tensor, Any]:
    """Run the model map by map (a layer's ``jacobian_ops``, e.g. Dense then its activation),
    recording each map with its input and output. Returns ``(records, z[L], key of z[L])``.

    ``x`` is checked against the model's input shape (``_check_x``; errors name ``owner``)."""
    nodes, input_key, output_key = _graph(model)
    values = {input_key: _check_x(model, x, nodes[0].layer.compute_dtype, owner)}
    records, calls = [], collections.Counter()
    for node in nodes:
        call, calls[id(node.layer)] = calls[id(node.layer)], calls[id(node.layer)] + 1
        keys, a = node.inputs, [values[key] for key in node.inputs]
        a = a if len(a) > 1 else a[0]
        ops = node.layer.jacobian_ops(training)
        for j, (op, params) in enumerate(ops):
            out = node.output if j == len(ops) - 1 else (node.output, j)
            y = op.forward(a, *params)
            records.append(_Record(node.layer, op, params, keys, out, a, y, call))
            keys, a = [out], y
        values[node.output] = a
    return records, values[output_key], output_key


def _rows(op, m: tf.Tensor, x: tf.Tensor | list[tf.Tensor], y: tf.Tensor, params) -> tuple:
    """``(M J_x, [M J_p])`` for one op; parameter-free activations use their ``backward``."""
    if hasattr(op, "jacobian_rows"):
        return op.jacobian_rows(m, x, y, *params)
    dx, _ = op.backward(m, x[:, None], y[:, None])  # diag(f'(z)) or softmax's, per row of M
    return dx, []


def _per_example(op, delta: tf.Tensor, x: tf.Tensor | list[tf.Tensor], y: tf.Tensor, params):
    """``((J_x)^T delta_i, [(J_p)^T delta_i])`` for each sample ``i``, parameter gradients with a
    leading batch axis and the parameter's own shape; activations are diagonal per sample."""
    if hasattr(op, "per_example_backward"):
        return op.per_example_backward(delta, x, y, *params)
    return op.backward(delta, x, y)


def _walk(
    model: keras.Model,
    records: list[_Record],
    output_key: Any,
    m: tf.Tensor,
    step: Callable = _rows,
) -> list[tuple]:
    """Algorithm 1 from the output: ``[(variable, M J_p)]`` in theta order (step 2).

    ``M`` starts at the output and moves back through each map (``M <- M J_x``). Where a tensor
    feeds several maps (a skip connection), the rows arriving from each are added: that is the
    chain rule for a sum of paths. A layer called several times adds its blocks. ``step`` is
    ``_rows`` (``M``: ``(batch, k, ...)`` rows, blocks in ``Vec`` order) or ``_per_example``
    (``M``: one ``delta`` per sample, step 6, gradients in each parameter's shape). Every map of
    a Sequential or functional model lies on a path to its output, so every map receives rows.
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


def parameter_jacobian(
    model: keras.Model,
    x: Any,
    blocks: bool = False,
    max_bytes: int | None = None,
    training: bool = False,
) -> tf.Tensor | dict[str, tf.Tensor]:
    """``J_theta z[L]`` for each sample by the explicit chain of Algorithm 1, step 2.

    Args:
        model: a Sequential or functional model of tf_jacbp layers (skips through ``Add``).
        x: inputs ``(batch, *input_shape)``.
        blocks: return ``{variable path: (batch, n_out, Vec size)}`` in theta order instead.
        max_bytes: refuse (``ValueError``) if the result or the repeated activations would take
            more; default ``DEFAULT_MAX_BYTES`` (1 GiB).
        training: the layers' training-mode maps (``Dropout`` draws a mask). The default, False,
            is the inference map: ``BatchNormalization`` uses its moving statistics (in training
            mode a sample's output depends on the whole batch, and it raises).

    Returns:
        ``(batch, n_out, n_params)``, columns in theta order; ``n_out`` the flattened output size.
    """
    limit = _check_max_bytes(max_bytes)
    records, out, output_key = _forward(model, x, training, "parameter_jacobian")
    batch, n_out = int(out.shape[0]), int(np.prod(out.shape[1:]))
    n_params = sum(int(np.prod(v.shape)) for v in parameter_variables(model))
    largest = max(int(np.prod(r.y.shape[1:])) for r in records)
    needed = batch * n_out * (n_params + 2 * largest) * out.dtype.size
    if needed > limit:
        raise ValueError(
            f"parameter_jacobian needs about {needed / 2**20:.1f} MiB ({batch} samples x "
            f"{n_out} outputs x {n_params} parameters, {out.dtype.name}), more than "
            f"max_bytes={limit}. Pass fewer samples or a larger max_bytes."
        )
    # M = I at the output: one row per output unit, for every sample.
    eye = tf.reshape(tf.eye(n_out, dtype=out.dtype), [1, n_out, *out.shape[1:]])
    m = tf.tile(eye, [batch] + [1] * (len(out.shape)))
    result = {v.path: block for v, block in _walk(model, records, output_key, m)}
    return result if blocks else tf.concat(list(result.values()), axis=-1)


def _check_max_bytes(max_bytes: Any) -> float:
    """``max_bytes`` (a positive number of bytes, or None for ``DEFAULT_MAX_BYTES``) checked."""
    if max_bytes is None:
        return DEFAULT_MAX_BYTES
    if isinstance(max_bytes, bool) or not isinstance(
        max_bytes, int | float | np.integer | np.floating
    ):
        raise TypeError(
            f"parameter_jacobian: max_bytes must be a number of bytes (e.g. 2**30 for 1 GiB) or "
            f"None for the default, got max_bytes={max_bytes!r} ({type(max_bytes).__name__})."
        )
    if not max_bytes > 0:
        raise ValueError(
            f"parameter_jacobian: max_bytes must be a positive number of bytes (e.g. 2**30 for "
            f"1 GiB), got max_bytes={max_bytes!r}."
        )
    return max_bytes


def _loss_function(model: keras.Model, loss: Any):
    loss = loss if loss is not None else getattr(model, "loss", None)
    if loss is None:
        raise ValueError("per_example_gradients needs a loss: compile the model or pass loss=...")
    loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call, loss.dtype
    return loss, None


def per_example_gradients(
    model: keras.Model,
    x: Any,
    y: Any,
    loss: Any = None,
    flatten: bool = True,
    training: bool = False,
) -> tf.Tensor | list[tf.Tensor]:
    """One gradient per sample, ``grad_theta l(y_i, yhat_i)``, by Algorithm 1's step 6.

    ``delta[L]`` for each sample is the loss's gradient with respect to the output (Table 1 for
    the tf_jacbp losses); the layers' ``per_example_backward`` then exploit the structure (outer
    products, patch products) instead of forming ``J_theta z[L]``. Regularization terms are not
    per-sample and are left out.

    Args:
        model: a Sequential or functional model of tf_jacbp layers (skips through ``Add``).
        x, y: a batch of inputs and labels.
        loss: a Keras loss (object, name or per-sample function); default the compiled loss.
        flatten: ``(batch, n_params)`` in theta order; ``False``: one ``(batch, *shape)`` tensor
            per variable of ``parameter_variables(model)``.
        training: as for ``parameter_jacobian``. Per-example gradients are not defined for a
            ``BatchNormalization`` layer in training mode (samples are coupled through the batch
            statistics): it raises, and ``training=False`` uses the moving statistics.

    The batch gradient of the compiled loss with ``reduction="sum_over_batch_size"`` is the mean
    of the rows (``"sum"``: their sum).
    """
    per_sample, dtype = _loss_function(model, loss)
    records, out, output_key = _forward(model, x, training, "per_example_gradients")
    y = _check_y(y, int(out.shape[0]), "per_example_gradients")
    y = tf.cast(y, dtype or out.dtype)
    with tf.GradientTape() as tape:  # only to read delta[L] off the loss (Table 1 for ours)
        tape.watch(out)
        out_cast = tf.cast(out, dtype) if dtype else out
        total = tf.reduce_sum(per_sample(y, out_cast))
    delta = tf.cast(tape.gradient(total, out), out.dtype)
    if flatten:  # one row, delta[L]^T, per sample: the blocks come in Vec order
        rows = _walk(model, records, output_key, delta[:, None])
        return tf.concat([g[:, 0] for _, g in rows], axis=-1)
    return [g for _, g in _walk(model, records, output_key, delta, step=_per_example)]


def _activation_factor(
    op: activations.Elementwise | activations.Softmax, z: tf.Tensor
) -> tf.Tensor:
    """``D = J_z f(z)`` at one sample ``z`` (any shape, batch axis of 1), ``(d, d)``,
    ``d = size(z)``, rows and columns in the row-major order of ``z``.

    Elementwise: ``diag(f'(z))``. Softmax acts on the last axis (the channels of an image, at
    each position ``p``): ``D`` is block diagonal, one block ``diag(s_p) - s_p s_p^T`` per
    position.
    """
    if not isinstance(op, activations.Softmax):
        return op.jacobian(tf.reshape(z, [-1]))
    channels = int(z.shape[-1])
    blocks = op.jacobian(tf.reshape(z, [-1, channels]))  # (P, C, C)
    positions = int(blocks.shape[0])
    eye = tf.eye(positions, dtype=blocks.dtype)
    d = eye[:, None, :, None] * blocks[:, :, None, :]  # (P, C, P', C'): zero unless p = p'
    return tf.reshape(d, [positions * channels, positions * channels])


def layer_jacobians(model: keras.Model, x: Any) -> dict[str, tf.Tensor]:
    """The factors of step 2 for one sample, as named matrices, in model order.

    ``x``: one input, ``input_shape`` or ``(1, *input_shape)``. Keys are
    ``"<layer>: <factor>"``: for a Dense layer ``W^T`` and ``[I (x) a^T | I]``, for its
    activation (or an Activation layer) ``D`` (block diagonal for a softmax over the channels
    of an image: one block per position), for a Conv2D its Toeplitz matrix and patch matrix,
    for pooling and flatten their selection/averaging matrices (see each layer's
    ``jacobian_factors``).
    """
    _graph(model)  # validates the model before x is read against its input shape
    x = tf.convert_to_tensor(x) if not isinstance(x, tf.SparseTensor | tf.RaggedTensor) else x
    if isinstance(x, tf.Tensor) and x.shape.rank == len(_input_shape(model)) - 1:
        x = x[None]
    records, _, _ = _forward(model, x, owner="layer_jacobians")
    if records[0].x.shape[0] != 1:
        raise ValueError(
            f"layer_jacobians takes one sample, got a batch of {records[0].x.shape[0]}; pass "
            "x[0] or x[:1]."
        )
    factors = {}
    for r in records:
        op = r.op.activation if isinstance(r.op, Activation) else r.op
        if isinstance(op, activations.Elementwise | activations.Softmax):
            named = {"D": _activation_factor(op, r.x)}
        else:
            named = r.op.jacobian_factors([a[0] for a in r.x] if isinstance(r.x, list) else r.x[0])
        suffix = f" (call {r.call + 1})" if r.call else ""
        for name, matrix in named.items():
            factors[f"{r.layer.name}{suffix}: {name}"] = matrix
    return factors


# Issue 16: per-example gradient norms from the layers' norm formulas, without the gradients.


def _output_delta(
    model: keras.Model, x: Any, y: Any, loss: Any, training: bool
) -> tuple[list[_Record], Any, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The forward records and, per sample, the loss ``l_i`` and ``delta[L]_i = grad_{z[L]_i} l_i``.

    ``l_i`` is the loss's per-sample value (``Loss.call``, before any reduction), summed over any
    axes past the batch axis, as ``per_example_gradients`` defines it. Returns ``(records, key of
    z[L], z[L], l (batch,), delta[L] (batch, *output_shape))``.
    """
    per_sample, dtype = _loss_function(model, loss)
    records, out, output_key = _forward(model, x, training)
    y = tf.cast(tf.convert_to_tensor(y), dtype or out.dtype)
    with tf.GradientTape() as tape:  # only to read delta[L] off the loss (Table 1 for ours)
        tape.watch(out)
        out_cast = tf.cast(out, dtype) if dtype else out
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


def _has_norm_formula(op: Any) -> bool:
    """Whether ``op`` overrides ``JacobianLayer.per_example_squared_norms`` with its own formula."""
    method = getattr(type(op), "per_example_squared_norms", None)
    return method is not None and method is not JacobianLayer.per_example_squared_norms


def _norm_step(shared: set[int], seen: list | None = None) -> Callable:
    """A ``_walk`` step giving ``(delta_x, [||g_i(p)||^2 (batch,)])`` for each map.

    Maps with a norm formula give ``delta_x`` from their batch ``backward`` (its parameter sums
    go unused, and a compiled graph prunes them) and the squared norms from
    ``per_example_squared_norms``; maps without one square their per-example rows
    (``per_example_backward``, the fallback). The maps of a layer called more than once (ids in
    ``shared``) return their per-example rows: ``_walk`` adds the calls' rows, and the norm of
    the sum is taken afterwards (a sum of norms would be wrong). With a list ``seen``, each map
    with parameters appends ``(op, delta, x, y, params)``, the ``delta`` rows it received.
    """

    def step(op, delta, x, y, params):
        if params and seen is not None:
            seen.append((op, delta, x, y, params))
        if params and id(op) not in shared and _has_norm_formula(op):
            dx, _ = op.backward(delta, x, y, *params)
            return dx, op.per_example_squared_norms(delta, x, y, *params)
        dx, rows = _per_example(op, delta, x, y, params)
        if id(op) in shared:
            return dx, rows
        return dx, [_squared_norms(g) for g in rows]

    return step


def _squared_norms(g: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1)


def _squared_gradient_norms(
    model: keras.Model,
    records: list[_Record],
    output_key: Any,
    delta: tf.Tensor,
    deltas: list | None = None,
) -> list[tuple[keras.Variable, tf.Tensor]]:
    """``[(variable, ||g_i(variable)||^2 (batch,))]`` in theta order, from ``delta[L]``.

    With a list ``deltas``, appends ``(layer, op, delta, x, y, params)`` for each map with
    parameters, last map first: the ``delta`` rows that reached it (``tf_jacbp.privacy`` reuses
    them for the clipped sum).
    """
    calls = collections.Counter(id(r.layer) for r in records if r.params)
    shared = [r for r in records if r.params and calls[id(r.layer)] > 1]
    shared_variables = {id(v) for r in shared for v in r.layer.jacobian_parameters()}
    seen: list = []
    step = _norm_step({id(r.op) for r in shared}, seen)
    rows = _walk(model, records, output_key, delta, step=step)
    if deltas is not None:
        layers = [r.layer for r in reversed(records) if r.params]
        deltas.extend((layer, *entry) for layer, entry in zip(layers, seen, strict=True))
    return [(v, _squared_norms(g) if id(v) in shared_variables else g) for v, g in rows]


def _norms(
    model: keras.Model, x: Any, y: Any, loss: Any, per_variable: bool, training: bool
) -> tf.Tensor:
    records, output_key, _, _, delta = _output_delta(model, x, y, loss, training)
    squared = tf.stack(
        [s for _, s in _squared_gradient_norms(model, records, output_key, delta)], 1
    )
    return tf.sqrt(squared if per_variable else tf.reduce_sum(squared, axis=1))


_COMPILED_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def per_example_gradient_norms(
    model: keras.Model,
    x: Any,
    y: Any,
    loss: Any = None,
    per_variable: bool = False,
    training: bool = False,
) -> tf.Tensor:
    """``||grad_theta l(y_i, yhat_i)||_2`` for each sample, without forming the gradients.

    Sample ``i``'s gradient is the one ``per_example_gradients`` returns: the gradient of its own
    loss term ``l_i = loss(y_i, yhat_i)`` (the loss's per-sample value before the batch
    reduction, so not divided by the batch size; regularization terms are left out). The same
    walk as ``per_example_gradients`` (``delta`` moves back through each map's ``backward``) asks
    each layer for the squared norms of its parameters' per-example gradients from its factors,
    ``per_example_squared_norms``:

    * Dense: ``||a_i delta_i^T||_F^2 = ||a_i||^2 ||delta_i||^2`` and ``||delta_i||^2``;
    * Conv2D: ``||X_patch,i^T Delta_i||_F^2`` as ``<X_patch,i X_patch,i^T, Delta_i Delta_i^T>``
      or through the ``M x F`` product, whichever the shapes make cheaper;
    * a layer without its own formula (BatchNormalization, whose per-sample rows have ``C``
      entries, or a user's layer): its ``per_example_backward`` rows, squared and summed.

    A layer called several times (shared weights) gives per-example rows, added over its calls
    before the norm is taken. Called eagerly, the computation runs as a ``tf.function`` cached
    per model and arguments; inside a ``tf.function`` it is traced into the caller's graph.

    Args:
        model: a Sequential or functional model of tf_jacbp layers (skips through ``Add``).
        x, y: a batch of inputs and labels.
        loss: a Keras loss (object, name or per-sample function); default the compiled loss.
        per_variable: return the norm of each variable's block, ``(batch, n_vars)`` in the order
            of ``parameter_variables(model)``, instead of the whole gradient's ``(batch,)``.
        training: as for ``per_example_gradients`` (BatchNormalization raises in training mode).

    Returns:
        ``(batch,)``, or ``(batch, n_vars)`` with ``per_variable=True``; the whole norm is the
        square root of the sum of the squared per-variable norms.
    """
    if not tf.executing_eagerly():
        return _norms(model, x, y, loss, per_variable, training)
    key = (loss if loss is None or isinstance(loss, str) else id(loss), per_variable, training)
    functions = _COMPILED_NORMS.setdefault(model, {})
    if key not in functions:
        ref = weakref.ref(model)  # the cache must not keep the model alive
        functions[key] = tf.function(
            lambda x, y: _norms(ref(), x, y, loss, per_variable, training),
            reduce_retracing=True,
            autograph=False,  # plain Python control flow over the layers, traced once
        )
    return functions[key](x, y)
