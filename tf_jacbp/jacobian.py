"""Algorithm 1 in full: theta, ``J_theta z[L]``, per-example gradients, the factors of step 2.

For a network of tf_jacbp layers (MATH.md, "Algorithm 1, restated"):

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

Models: ``keras.Sequential`` or functional chains whose layers are all
``tf_jacbp.layers.JacobianLayer``; anything else raises an error that names the layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tf_jacbp import activations
from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import JacobianLayer
from tf_jacbp.layout import unvec_parameter, unvec_parameter_batch, vec_parameter

# parameter_jacobian refuses to allocate more than this many bytes unless given max_bytes=...
DEFAULT_MAX_BYTES = 2**30


def _layers(model: keras.Model) -> list[JacobianLayer]:
    """The model's layers in order; they must form a chain of tf_jacbp layers."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    for layer in chain:
        if not isinstance(layer, JacobianLayer):
            raise TypeError(
                f"Layer '{layer.name}' ({type(layer).__module__}.{type(layer).__name__}) has no "
                "explicit Jacobian. Build the model from tf_jacbp.layers only (e.g. "
                "tf_jacbp.layers.Flatten instead of keras.layers.Flatten/Reshape)."
            )
    if not isinstance(model, keras.Sequential):
        previous = None
        for layer in chain:
            nodes = layer._inbound_nodes
            parents = [p.operation for node in nodes for p in node.parent_nodes]
            if (
                len(nodes) != 1
                or len(parents) != 1
                or (previous is not None and parents[0] is not previous)
            ):
                raise ValueError(
                    f"Layer '{layer.name}' does not continue a single chain of layers; "
                    "tf_jacbp.jacobian supports Sequential models and functional chains."
                )
            previous = layer
    return chain


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


def _forward(model: keras.Model, x: Any) -> tuple[list[tuple], tf.Tensor]:
    """Run the model op by op; record ``(layer, op, params, input, output)`` for each op."""
    layers = _layers(model)
    a = tf.convert_to_tensor(x, dtype=layers[0].compute_dtype if layers else None)
    records = []
    for layer in layers:
        for op, params in layer.jacobian_ops():
            y = op.forward(a, *params)
            records.append((layer, op, params, a, y))
            a = y
    return records, a


def _rows(op, m: tf.Tensor, x: tf.Tensor, y: tf.Tensor, params) -> tuple:
    """``(M J_x, [M J_p])`` for one op; parameter-free activations use their ``backward``."""
    if isinstance(op, JacobianLayer):
        return op.jacobian_rows(m, x, y, *params)
    dx, _ = op.backward(m, x[:, None], y[:, None])  # diag(f'(z)) or softmax's, per row of M
    return dx, []


def _walk(records: list[tuple], m: tf.Tensor) -> dict[keras.Variable, tf.Tensor]:
    """Algorithm 1, step 2, from the output: ``{variable: M J_p}`` in theta order."""
    blocks = []
    for layer, op, params, x, y in reversed(records):
        m, rows = _rows(op, m, x, y, params)
        if params:
            blocks = list(zip(layer.jacobian_parameters(), rows, strict=True)) + blocks
    return blocks


def parameter_jacobian(
    model: keras.Model, x: Any, blocks: bool = False, max_bytes: int | None = None
) -> tf.Tensor | dict[str, tf.Tensor]:
    """``J_theta z[L]`` for each sample by the explicit chain of Algorithm 1, step 2.

    Args:
        model: a chain of tf_jacbp layers.
        x: inputs ``(batch, *input_shape)``.
        blocks: return ``{variable path: (batch, n_out, Vec size)}`` in theta order instead.
        max_bytes: refuse (``ValueError``) if the result or the repeated activations would take
            more; default ``DEFAULT_MAX_BYTES`` (1 GiB).

    Returns:
        ``(batch, n_out, n_params)``, columns in theta order; ``n_out`` the flattened output size.
    """
    records, out = _forward(model, x)
    batch, n_out = int(out.shape[0]), int(np.prod(out.shape[1:]))
    n_params = sum(int(np.prod(v.shape)) for v in parameter_variables(model))
    largest = max(int(np.prod(r[3].shape[1:])) for r in records)
    needed = batch * n_out * (n_params + 2 * largest) * out.dtype.size
    limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    if needed > limit:
        raise ValueError(
            f"parameter_jacobian needs about {needed / 2**20:.1f} MiB ({batch} samples x "
            f"{n_out} outputs x {n_params} parameters, {out.dtype.name}), more than "
            f"max_bytes={limit}. Pass fewer samples or a larger max_bytes."
        )
    # M = I at the output: one row per output unit, for every sample.
    eye = tf.reshape(tf.eye(n_out, dtype=out.dtype), [1, n_out, *out.shape[1:]])
    m = tf.tile(eye, [batch] + [1] * (len(out.shape)))
    result = {v.path: block for v, block in _walk(records, m)}
    return result if blocks else tf.concat(list(result.values()), axis=-1)


def _loss_function(model: keras.Model, loss: Any):
    loss = loss if loss is not None else getattr(model, "loss", None)
    if loss is None:
        raise ValueError("per_example_gradients needs a loss: compile the model or pass loss=...")
    loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call, loss.dtype
    return loss, None


def per_example_gradients(
    model: keras.Model, x: Any, y: Any, loss: Any = None, flatten: bool = True
) -> tf.Tensor | list[tf.Tensor]:
    """One gradient per sample, ``grad_theta l(y_i, yhat_i)``, by Algorithm 1's step 6.

    ``delta[L]`` for each sample is the loss's gradient with respect to the output (Table 1 for
    the tf_jacbp losses); the layers' ``per_example_backward`` then exploit the structure (outer
    products, patch products) instead of forming ``J_theta z[L]``. Regularization terms are not
    per-sample and are left out.

    Args:
        model: a chain of tf_jacbp layers.
        x, y: a batch of inputs and labels.
        loss: a Keras loss (object, name or per-sample function); default the compiled loss.
        flatten: ``(batch, n_params)`` in theta order; ``False``: one ``(batch, *shape)`` tensor
            per variable of ``parameter_variables(model)``.

    The batch gradient of the compiled loss with ``reduction="sum_over_batch_size"`` is the mean
    of the rows (``"sum"``: their sum).
    """
    per_sample, dtype = _loss_function(model, loss)
    records, out = _forward(model, x)
    y = tf.cast(tf.convert_to_tensor(y), dtype or out.dtype)
    with tf.GradientTape() as tape:  # only to read delta[L] off the loss (Table 1 for ours)
        tape.watch(out)
        out_cast = tf.cast(out, dtype) if dtype else out
        total = tf.reduce_sum(per_sample(y, out_cast))
    delta = tf.cast(tape.gradient(total, out), out.dtype)
    rows = [(v, g[:, 0]) for v, g in _walk(records, delta[:, None])]  # one row: delta[L]^T
    if flatten:
        return tf.concat([g for _, g in rows], axis=-1)
    return [unvec_parameter_batch(g, tuple(v.shape)) for v, g in rows]


def layer_jacobians(model: keras.Model, x: Any) -> dict[str, tf.Tensor]:
    """The factors of step 2 for one sample, as named matrices, in model order.

    ``x``: one input, ``input_shape`` or ``(1, *input_shape)``. Keys are
    ``"<layer>: <factor>"``: for a Dense layer ``W^T`` and ``[I (x) a^T | I]``, for its
    activation (or an Activation layer) ``D``, for a Conv2D its Toeplitz matrix and patch matrix,
    for pooling and flatten their selection/averaging matrices (see each layer's
    ``jacobian_factors``).
    """
    layers = _layers(model)
    x = tf.convert_to_tensor(x, dtype=layers[0].compute_dtype if layers else None)
    if x.shape.rank == len(model.inputs[0].shape) - 1:
        x = x[None]
    if x.shape[0] != 1:
        raise ValueError(f"layer_jacobians takes one sample, got a batch of {x.shape[0]}.")
    records, _ = _forward(model, x)
    factors = {}
    for layer, op, _, a, _ in records:
        if isinstance(op, (activations.Elementwise, activations.Softmax)):
            factors[f"{layer.name}: D"] = op.jacobian(tf.reshape(a, [-1]))
        else:
            for name, matrix in op.jacobian_factors(a[0]).items():
                factors[f"{layer.name}: {name}"] = matrix
    return factors
