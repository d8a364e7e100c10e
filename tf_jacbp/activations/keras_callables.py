"""Keras' (and TensorFlow's) own activation functions, mapped to tf_jacbp's by name.

``keras.layers.Dense(3, activation=keras.activations.relu)`` is how many Keras users write an
activation. ``tf_jacbp.activations.get`` accepts the same callables and returns the tf_jacbp
activation with the same definition (and the same default arguments: ``keras.ops.gelu`` is the
tanh approximation, ``keras.activations.gelu`` the exact one). The table holds names and
arguments only, so it imports no activation class. ``keras.activations`` and ``keras.ops`` are
named here; the backend's own functions (``tf.nn.relu``, ``tf.math.sigmoid``, ...) come from
``tf_jacbp.backend.tensorflow_activation_functions``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from tf_jacbp import backend
from tf_jacbp._backend import keras

# (module, attribute) -> (tf_jacbp name, keyword arguments). Attributes a version lacks are skipped.
_TABLE: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
for _name in (
    "linear relu relu6 leaky_relu elu selu softplus softsign silu swish gelu tanh sigmoid "
    "exponential hard_sigmoid hard_silu hard_swish mish softmax celu hard_tanh log_sigmoid "
    "tanh_shrink soft_shrink hard_shrink sparse_plus sparse_sigmoid squareplus"
).split():
    _TABLE["keras.activations", _name] = (_name, {})
for _name in (
    "relu relu6 leaky_relu elu selu softplus softsign silu swish tanh sigmoid hard_sigmoid "
    "hard_silu hard_swish softmax celu hard_tanh log_sigmoid tanh_shrink soft_shrink "
    "hard_shrink sparse_plus sparse_sigmoid squareplus"
).split():
    _TABLE["keras.ops", _name] = (_name, {})
_TABLE["keras.ops", "gelu"] = ("gelu", {"approximate": True})  # keras.ops.gelu's default
_TABLE["keras.ops", "exp"] = ("exponential", {})

_MODULES = {"keras.activations": keras.activations, "keras.ops": keras.ops}


def _present() -> list[tuple[str, Callable, str, dict[str, Any]]]:
    """``[("module.attribute", function, tf_jacbp name, kwargs)]`` for the functions that exist."""
    rows = []
    for (module, attribute), (name, kwargs) in _TABLE.items():
        function = getattr(_MODULES[module], attribute, None)
        if function is not None:
            rows.append((f"{module}.{attribute}", function, name, kwargs))
    return rows + backend.tensorflow_activation_functions()


@functools.cache
def _by_function() -> dict[Callable, tuple[str, dict[str, Any]]]:
    return {function: (name, kwargs) for _, function, name, kwargs in _present()}


def lookup(function: Callable) -> tuple[str, dict[str, Any]] | None:
    """``(name, kwargs)`` of the tf_jacbp activation equal to ``function``, or None."""
    try:
        return _by_function().get(function)
    except TypeError:  # an unhashable callable
        return None


def supported() -> str:
    """The functions ``lookup`` knows, by module: ``"keras.activations.{elu, gelu, ...};
    keras.ops.{...}; ..."``."""
    by_module: dict[str, list[str]] = {}
    for qualified, *_ in _present():
        module, attribute = qualified.rsplit(".", 1)
        by_module.setdefault(module, []).append(attribute)
    return "; ".join(f"{m}.{{{', '.join(sorted(names))}}}" for m, names in by_module.items())
