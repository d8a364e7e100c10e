"""What ``tf_jacbp.jacobian``'s functions check of their arguments: ``x``, ``y`` and the loss.

``check_x`` compares a batch ``(batch, *input_shape)`` with the model's input shape (a transposed
image has the right number of entries and would otherwise run, silently wrong); ``check_y`` wants
one label or target per sample; ``loss_function`` resolves the loss to its per-sample values.
Each error names the function the user called (``owner``) and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keras import ops

from tf_jacbp import backend
from tf_jacbp._backend import keras
from tf_jacbp.jacobian.graph import check_no_masks

Tensor = Any  # a tensor of the backend Keras runs on


def input_shape(model: keras.Model) -> tuple:
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


def _refuse_sparse(x: Any, name: str, owner: str) -> None:
    """A TypeError naming the conversion if ``x`` is a sparse or ragged tensor of the backend."""
    conversion = backend.dense_conversion(x, name)
    if conversion is not None:
        raise TypeError(
            f"{owner}: {name} must be a dense array or tensor, got a {type(x).__name__}; "
            f"convert it with {conversion}."
        )


def check_x(model: keras.Model, x: Any, dtype: Any, owner: str) -> Tensor:
    """``x`` as a tensor of ``dtype``, after checking it against the model's input shape.

    A batch ``(batch, *input_shape)``: the rank and every known size must match (a transposed
    image has the right number of entries and would otherwise run, silently wrong).
    """
    _refuse_sparse(x, "x", owner)
    try:
        x = ops.convert_to_tensor(x)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{owner}: x must be a numeric array or tensor, got {type(x).__name__}."
        ) from e
    kind = keras.backend.standardize_dtype(x.dtype)
    if not ("float" in kind or "int" in kind or kind == "bool"):
        raise TypeError(f"{owner}: x must be numeric, got dtype {kind}.")
    expected, got = input_shape(model), tuple(x.shape)
    if len(got) != len(expected) or any(
        e is not None and e != g for e, g in zip(expected[1:], got[1:], strict=True)
    ):
        wanted = "(batch, " + ", ".join("?" if e is None else str(e) for e in expected[1:]) + ")"
        hint = ""
        if len(got) == len(expected) and sorted(got[1:]) == sorted(
            e for e in expected[1:] if e is not None
        ):
            hint = (
                " Its axes look permuted: give x in the layout of the model's input (channels_last "
                "images are (batch, height, width, channels), channels_first ones (batch, "
                "channels, height, width)); transpose x."
            )
        elif len(got) == len(expected) - 1:
            hint = " For one sample, add the batch axis: x[None]."
        raise ValueError(
            f"{owner}: x must have shape {wanted} to match the input of model '{model.name}', "
            f"got x of shape {got}.{hint}"
        )
    check_no_masks(model, owner)
    if dtype is not None and kind != keras.backend.standardize_dtype(dtype):
        return ops.cast(x, dtype)
    return x


def check_y(y: Any, batch: int, owner: str) -> Tensor:
    """``y`` as a tensor with one label (or target) per sample: a ValueError otherwise."""
    _refuse_sparse(y, "y", owner)
    y = ops.convert_to_tensor(y)
    if len(y.shape) == 0 or y.shape[0] != batch:
        raise ValueError(
            f"{owner}: y must have one label or target per sample of x (a leading axis of "
            f"{batch}), got y of shape {tuple(y.shape)} for x with {batch} samples."
        )
    return y


def loss_function(model: keras.Model, loss: Any) -> tuple[Callable, Any]:
    """``(per_sample, dtype)``: the loss as a function ``l(y, yhat)`` of per-sample values.

    ``loss`` (a Keras loss object, name or function; ``None``: the model's compiled loss) is
    resolved with ``keras.losses.get``; for a ``keras.losses.Loss`` it is its ``call`` (values
    before the batch reduction, ``(batch, ...)``) and the loss's dtype, else the function and
    ``None``. A ValueError if there is no loss.
    """
    loss = loss if loss is not None else getattr(model, "loss", None)
    if loss is None:
        raise ValueError("per_example_gradients needs a loss: compile the model or pass loss=...")
    loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call, loss.dtype
    return loss, None
