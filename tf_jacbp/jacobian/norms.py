"""Per-example gradient norms from the layers' norm formulas, without forming the gradients.

``squared_gradient_norms`` walks back from ``delta[L]`` (``output_delta``) through
``tf_jacbp.jacobian.walk``, asking each map for the squared norms ``||g_i(p)||^2`` of its
parameters' per-example gradients, and can hand over the ``delta`` rows that reached each map
(``tf_jacbp.privacy``'s clipped sum reuses them); ``per_example_gradient_norms`` is the
user-facing function.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend
from tf_jacbp._backend import keras
from tf_jacbp.jacobian.graph import model_layers
from tf_jacbp.jacobian.walk import Records, Tensor, loss_values, output_delta, walk


def squared_gradient_norms(
    model: keras.Model,
    records: Records,
    output_key: Any,
    delta: Tensor,
    deltas: list | None = None,
) -> list[tuple[keras.Variable, Tensor]]:
    """``[(variable, ||g_i(variable)||^2 (batch,))]`` in theta order, from ``delta[L]``.

    The walk of Algorithm 1, step 4, with each map giving the squared norms of its parameters'
    per-example gradients (``walk``'s ``"squared_norms"`` product: the contract's
    ``squared_norms`` where the map has one, else its per-example gradients squared and summed);
    a layer called more than once gives its gradients, added over its calls before the norm is
    taken.

    Args:
        model: the model ``records`` come from.
        records, output_key, delta: as ``output_delta`` returns them; ``delta`` is
            ``(batch, *output_shape)``.
        deltas: if a list, ``(layer, op, delta, x, y, params)`` is appended for each map with
            parameters, last map first: the ``delta`` rows ``(batch, *map_output_shape)`` that
            reached it (``tf_jacbp.privacy`` reuses them for the clipped sum).

    Returns:
        One ``(variable, squared norms (batch,))`` pair per variable of
        ``parameter_variables(model)``, in that order.
    """
    return walk(records, output_key, delta, "squared_norms", deltas)


def _norms(
    model: keras.Model, x: Any, y: Any, loss: Any, per_variable: bool, training: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(norms, l, z[L])``: the norms, with the per-sample loss and the output they came from."""
    records, output_key, out, values, delta = output_delta(
        model, x, y, loss, training, "per_example_gradient_norms"
    )
    squared = ops.stack(
        [s for _, s in squared_gradient_norms(model, records, output_key, delta)], 1
    )
    return ops.sqrt(squared if per_variable else ops.sum(squared, axis=1)), values, out


_COMPILED_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _read_at_trace(model: keras.Model, loss: Any) -> tuple:
    """What a traced norms function read in Python and froze: the loss (the compiled one when
    ``loss`` is None, which ``compile(loss=...)`` replaces) and each layer's maps (an activation
    set after construction is a new object). A new value means a new trace, never a stale one."""
    used = getattr(model, "loss", None) if loss is None else loss
    maps = tuple(
        (id(layer), id(getattr(layer, "activation", None)), layer.trainable)
        for layer in model_layers(model)
    )
    return (used if isinstance(used, str) else id(used), maps)


def per_example_gradient_norms(
    model: keras.Model,
    x: Any,
    y: Any,
    loss: Any = None,
    per_variable: bool = False,
    training: bool = False,
) -> Tensor:
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
    before the norm is taken. Called eagerly, the computation runs compiled (a ``tf.function``
    on TensorFlow, ``jax.jit`` on JAX, reading the variables' values at each call), cached per
    model and arguments; inside a ``tf.function`` or ``jax.jit`` it is traced into the caller's
    step.

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
    if not backend.executing_eagerly(x, y):
        return _norms(model, x, y, loss, per_variable, training)[0]
    key = (_read_at_trace(model, loss), per_variable, training)
    functions = _COMPILED_NORMS.setdefault(model, {})
    if key not in functions:
        ref = weakref.ref(model)  # the cache must not keep the model alive
        functions[key] = backend.compiled_model_function(
            lambda x, y: _norms(ref(), x, y, loss, per_variable, training),
            lambda: ref().variables,
        )
    norms, values, out = functions[key](x, y)
    if not np.all(np.isfinite(ops.convert_to_numpy(values))):
        # A compiled loss cannot stop on a bad label on JAX (its value is NaN there, its
        # gradient zero): the loss at the same output, eagerly, raises the label's error.
        loss_values(model, y, loss, out, "per_example_gradient_norms")
    return norms
