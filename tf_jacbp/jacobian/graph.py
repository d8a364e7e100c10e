"""The model as Algorithm 1 sees it: its layer calls in order, and theta.

``graph(model)`` lists a Sequential or functional model's layer calls (nested models replaced by
their own calls) in an order that computes every input before its use; ``model_layers`` and
``parameter_variables`` give theta's order, ``theta = [Vec(W[1]); b[1]; ...; Vec(W[L]); b[L]]``
(``flatten_parameters``; the layout is ``tf_jacbp.layout``'s).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp._backend import keras
from tf_jacbp.layers.base import JacobianLayer
from tf_jacbp.layout import unvec_parameter, vec_parameter


@dataclasses.dataclass
class Node:
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


def _mask_makers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers in ``layer`` (itself, or inside a nested model) that make a Keras mask."""
    makes = getattr(layer, "mask_zero", False) or isinstance(layer, keras.layers.Masking)
    found = [layer] if makes else []
    for inner in getattr(layer, "layers", []) if isinstance(layer, keras.Model) else []:
        found += _mask_makers(inner)
    return found


def check_no_masks(model: keras.Model, owner: str) -> None:
    """A ValueError if a layer of ``model`` makes a mask (``Embedding(mask_zero=True)``).

    Algorithm 1 walks each layer's map without Keras masks, so on a masked model (a masked
    pooling, a masked merge downstream) its result would differ from the model's, silently.
    """
    makers = _mask_makers(model)
    if makers:
        raise ValueError(
            f"{owner}: layer '{makers[0].name}' of model '{model.name}' makes a Keras mask "
            "(mask_zero=True or Masking), and Algorithm 1 walks each layer's map without Keras "
            "masks, so the result would not be the masked model's. Use mask_zero=False (the "
            "padding id then has its own embedding row), or take the masked model's Jacobians "
            "by autodiff (tf.GradientTape on TensorFlow, jax.jacrev on JAX)."
        )


def _model_graph(model: keras.Model) -> tuple[list[Node], Any, Any]:
    """``graph`` of one model level, nested models still as single nodes."""
    if isinstance(model, keras.Sequential):
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        return [Node(layer, [i], i + 1) for i, layer in enumerate(layers)], 0, len(layers)
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
                Node(node.operation, [id(t) for t in node.input_tensors], id(node.outputs[0]))
            )
    return nodes, id(model.inputs[0]), id(model.outputs[0])


def graph(model: keras.Model, owner: str = "tf_jacbp.jacobian") -> tuple[list[Node], Any, Any]:
    """The model's layer calls in an order that computes every input before its use.

    Returns ``(nodes, input key, output key)``; a key names a tensor of the graph. Sequential
    models are chains; functional models may branch and merge (skips through ``Add``) and call a
    layer more than once (shared weights). A nested Sequential or functional model (a model used
    as a layer) is replaced by its own layer calls, its tensors' keys prefixed by the call, as
    ``GradientCheck`` looks through nested models.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    check_no_masks(model, owner)  # before the graph: a mask adds ops (NotEqual) to it
    nodes, input_key, output_key = _model_graph(model)
    if not nodes:
        raise ValueError(
            f"Model '{model.name}' has no layers, so it has no parameters and no Jacobian. Add "
            "tf_jacbp layers to it (e.g. tf_jacbp.layers.Dense) before calling tf_jacbp.jacobian."
        )
    flat = []
    for call, node in enumerate(nodes):
        if not isinstance(node.layer, keras.Model):
            flat.append(Node(_check_layer(node.layer), node.inputs, node.output))
            continue
        inner, inner_input, inner_output = graph(node.layer)
        if len(node.inputs) != 1:
            raise ValueError(
                f"Nested model '{node.layer.name}' is called on {len(node.inputs)} tensors; "
                "tf_jacbp.jacobian supports nested models with one input and one output."
            )
        # The nested model's input and output are the outer call's; its other tensors are new.
        keys = {inner_input: node.inputs[0], inner_output: node.output}
        for n in inner:
            inputs = [keys.get(k, ("nested", call, k)) for k in n.inputs]
            flat.append(Node(n.layer, inputs, keys.get(n.output, ("nested", call, n.output))))
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


def model_layers(model: keras.Model) -> list[JacobianLayer]:
    """The model's tf_jacbp layers, each once, in ``model.layers`` order (theta's order), nested
    models' layers in their place."""
    graph(model)  # validates: tf_jacbp layers only, one input and one output
    return _layers_once(_flat_layers(model))


def _layers_once(layers: list[JacobianLayer]) -> list[JacobianLayer]:
    once = []
    for layer in layers:
        if all(layer is not seen for seen in once):
            once.append(layer)
    return once


def parameter_variables(model: keras.Model) -> list[keras.Variable]:
    """The variables of theta, in theta order (layers in order, kernel then bias)."""
    return [v for layer in model_layers(model) for v in layer.jacobian_parameters()]


def validated_variables(model: keras.Model) -> list[keras.Variable]:
    """``parameter_variables`` of a model ``graph`` has already validated (not built again)."""
    return [v for layer in _layers_once(_flat_layers(model)) for v in layer.jacobian_parameters()]


def flatten_parameters(model: keras.Model) -> Any:
    """``theta = [Vec(W[1]); b[1]; ...]``, shape ``(n_params,)``, ``Vec`` column-major."""
    return ops.concatenate([vec_parameter(v.value) for v in parameter_variables(model)], 0)


def unflatten_parameters(model: keras.Model, theta: Any, assign: bool = False) -> list[Any]:
    """Inverse of ``flatten_parameters``: ``(n_params,)`` -> one tensor per variable.

    With ``assign=True`` the values are also written into the model's variables.
    """
    variables = parameter_variables(model)
    sizes = [int(np.prod(v.shape)) for v in variables]
    theta = ops.convert_to_tensor(theta)
    if tuple(theta.shape) != (sum(sizes),):
        raise ValueError(
            f"theta must have shape ({sum(sizes)},) for this model, got {tuple(theta.shape)}."
        )
    starts = np.cumsum([0, *sizes])
    values = [
        unvec_parameter(theta[start : start + size], tuple(v.shape))
        for start, size, v in zip(starts.tolist(), sizes, variables, strict=False)
    ]
    if assign:
        for v, value in zip(variables, values, strict=True):
            v.assign(ops.cast(value, v.dtype))
    return values
