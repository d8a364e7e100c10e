"""Activation functions and their Jacobians (docs/math.md, "Activations").

An elementwise activation ``a = f(z)`` has the diagonal Jacobian
``J_z f(z) = diag(f'(z_1), ..., f'(z_d))``, so its Jacobian-transpose product is the elementwise
product ``f'(z) * delta``. Softmax ``s = softmax(z)`` (over the last axis) has
``J_z s = diag(s) - s s^T`` and ``(J_z s)^T delta = s * (delta - <s, delta>)``.

Each activation is a map without parameters of the one contract
(``tf_jacbp.contract.JacobianMap``): ``forward`` and ``reference`` both use the stock ``keras.ops``
of ``keras.activations`` (the forward is not what is under test), ``vjp_input(m, z, a)`` is the
formula in ``keras.ops`` for ``V`` stacked vectors ``m`` (``(V, batch, ...)``; ``backward`` and
``jacobian_rows`` are derived from it), ``derivative`` gives ``f'(z)`` (elementwise ones),
``jacobian(z)`` the materialized matrix of each row and ``jacobian_at_positions(z)`` the matrix
``D = J_z f(z)`` of whole samples, ``(batch, P, m)`` -> ``(batch, P m, P m)``.
``elementwise.py`` has the smooth ones, ``piecewise.py`` the ones with kinks (where ``f'`` is
what autodiff gives for Keras' ops), ``softmax.py`` the softmax, and ``keras_callables.py`` the
table that maps ``keras.activations.relu`` and its kin to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tf_jacbp.activations import keras_callables
from tf_jacbp.activations.elementwise import (
    CELU,
    ELU,
    GELU,
    SELU,
    Elementwise,
    Exponential,
    Linear,
    LogSigmoid,
    Mish,
    Sigmoid,
    Softplus,
    Softsign,
    Squareplus,
    Swish,
    Tanh,
    TanhShrink,
)
from tf_jacbp.activations.piecewise import (
    HardShrink,
    HardSigmoid,
    HardSilu,
    HardTanh,
    LeakyReLU,
    ReLU,
    ReLU6,
    SoftShrink,
    SparsePlus,
    SparseSigmoid,
)
from tf_jacbp.activations.softmax import Softmax

__all__ = [
    "CELU",
    "ELU",
    "GELU",
    "SELU",
    "Elementwise",
    "Exponential",
    "HardShrink",
    "HardSigmoid",
    "HardSilu",
    "HardTanh",
    "LeakyReLU",
    "Linear",
    "LogSigmoid",
    "Mish",
    "ReLU",
    "ReLU6",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "SoftShrink",
    "Softsign",
    "SparsePlus",
    "SparseSigmoid",
    "Squareplus",
    "Swish",
    "Tanh",
    "TanhShrink",
    "deserialize",
    "get",
    "serialize",
]

_ACTIVATIONS = {
    cls.name: cls
    for cls in (
        Linear,
        ReLU,
        ReLU6,
        Sigmoid,
        Tanh,
        LeakyReLU,
        ELU,
        SELU,
        Softplus,
        Softsign,
        Exponential,
        GELU,
        Swish,
        Mish,
        HardSigmoid,
        HardSilu,
        CELU,
        HardTanh,
        LogSigmoid,
        TanhShrink,
        SoftShrink,
        HardShrink,
        SparsePlus,
        SparseSigmoid,
        Squareplus,
        Softmax,
    )
}
_ALIASES = {"silu": "swish", "hard_swish": "hard_silu", None: "linear"}


def get(
    identifier: str | Callable | None | Elementwise | Softmax, **kwargs: Any
) -> Elementwise | Softmax:
    """An activation from its name (``"relu"``, ``"softmax"``, ..., or ``None`` for linear), or
    from Keras' own function for it (``keras.activations.relu``, ``keras.ops.gelu``,
    ``tf.nn.relu``, ...: ``keras_callables``), or a tf_jacbp activation object (returned as is).

    Raises ``ValueError`` naming the unknown value and the names and functions that exist.
    """
    if isinstance(identifier, (Elementwise, Softmax)):
        return identifier
    if callable(identifier):
        known = keras_callables.lookup(identifier)
        if known is None:
            what = getattr(identifier, "__qualname__", None) or type(identifier).__name__
            raise ValueError(
                f"Unknown activation={identifier!r} ({what}): tf_jacbp has no explicit Jacobian "
                f"for this function. It accepts these functions: {keras_callables.supported()}; "
                f"and these names: {sorted(_ACTIVATIONS)} (also 'silu', 'hard_swish'). Use one "
                "of them, or a stock keras.layers.Activation layer (whose gradient is then "
                "autodiff's, not checked)."
            )
        name, defaults = known
        return get(name, **{**defaults, **kwargs})
    key = _ALIASES.get(identifier, identifier)
    if isinstance(key, str) and key in _ACTIVATIONS:
        return _ACTIVATIONS[key](**kwargs)
    raise ValueError(
        f"Unknown activation={identifier!r}. tf_jacbp has an explicit Jacobian for: "
        f"{sorted(_ACTIVATIONS)} (and 'silu' for 'swish', 'hard_swish' for 'hard_silu', None for "
        "'linear'), and accepts Keras' functions for them (keras.activations.relu, ...). Use one "
        "of these, or a stock keras.layers.Activation layer (whose gradient is then autodiff's, "
        "not checked)."
    )


def serialize(activation: Elementwise | Softmax) -> str | dict[str, Any]:
    """Name, or ``{"name": ..., **config}`` when it has arguments; ``get`` inverts it."""
    config = activation.get_config()
    return {"name": activation.name, **config} if config else activation.name


def deserialize(config: str | dict[str, Any] | None) -> Elementwise | Softmax:
    """Inverse of ``serialize``."""
    if isinstance(config, dict):
        config = dict(config)
        return get(config.pop("name"), **config)
    return get(config)
