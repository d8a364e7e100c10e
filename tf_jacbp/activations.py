"""Activation functions and their Jacobians (docs/math.md, "Activations").

An elementwise activation ``a = f(z)`` has the diagonal Jacobian
``J_z f(z) = diag(f'(z_1), ..., f'(z_d))``, so its Jacobian-transpose product is the elementwise
product ``f'(z) * delta``. Softmax ``s = softmax(z)`` (over the last axis) has
``J_z s = diag(s) - s s^T`` and ``(J_z s)^T delta = s * (delta - <s, delta>)``.

Each activation is a ``JacobianOp`` without parameters: ``forward`` and ``reference`` both use the
stock TensorFlow function (the forward is not what is under test), ``backward`` is the formula,
``derivative`` gives ``f'(z)`` and ``jacobian`` the materialized matrix.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from tf_jacbp._backend import tf


class Elementwise:
    """An elementwise activation ``a = f(z)`` with ``J_z f(z) = diag(f'(z))``.

    Subclasses set ``name`` and implement ``reference(z)`` (stock TensorFlow) and
    ``derivative(z, a)`` (``f'(z)``, given ``z`` and ``a = f(z)``).
    """

    name = ""

    def get_config(self) -> dict[str, Any]:
        """Arguments that rebuild this activation with ``get(config)``."""
        return {}

    def reference(self, z: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def derivative(self, z: tf.Tensor, a: tf.Tensor) -> tf.Tensor:
        """``f'(z)``, same shape as ``z``."""
        raise NotImplementedError

    def forward(self, z: tf.Tensor) -> tf.Tensor:
        """``a = f(z)``, any shape."""
        return self.reference(z)

    def backward(self, dy: tf.Tensor, z: tf.Tensor, a: tf.Tensor) -> tuple[tf.Tensor, list]:
        """``(J_z f)^T delta = diag(f'(z)) delta = f'(z) * delta``."""
        return self.derivative(z, a) * dy, []

    def jacobian(self, z: tf.Tensor) -> tf.Tensor:
        """``J_z f(z) = diag(f'(z))``: ``(d,)`` -> ``(d, d)``, or ``(batch, d)`` ->
        ``(batch, d, d)``."""
        z = tf.convert_to_tensor(z)
        return tf.linalg.diag(self.derivative(z, self.forward(z)))


class Linear(Elementwise):
    """``f(z) = z``, ``f'(z) = 1``."""

    name = "linear"

    def reference(self, z):
        return tf.identity(z)

    def derivative(self, z, a):
        return tf.ones_like(z)


def _check_number(value: Any, name: str, owner: str, allow_none: bool = False) -> float | None:
    """``value`` as a float, finite and ``>= 0`` (or None if ``allow_none``); a ValueError naming
    ``name`` otherwise (Keras' ReLU raises for None and negative values, not for the rest)."""
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        what = "a finite number >= 0" + (" or None" if allow_none else "")
        raise ValueError(f"{owner}: {name} must be {what}, got {name}={value!r}.")
    return float(value)


class ReLU(Elementwise):
    """Keras' ReLU, with threshold ``t``, ``negative_slope`` ``s`` and ``max_value`` ``M``:

        f(z) = min(z, M)      if z > t        (no ``min`` without ``M``)
        f(z) = 0              if z == t
        f(z) = s (z - t)      if z < t

    (``z == t`` gives 0, as ``keras.activations.relu``: its ``z > t``.)
    ``f'(z)`` is ``[t < z <= M]``
    above, ``s`` below the threshold: a 0/1 diagonal for the plain ReLU (paper, Section 3.4). At
    the kinks ``f'`` is what autodiff gives for Keras' own ops: ``f'(t) = 0`` (but ``s`` for the
    leaky case ``t = 0``, no ``M``, ``tf.nn.leaky_relu``), ``f'(M) = 1`` (but ``0`` for ``M = 6,
    t = 0``, ``tf.nn.relu6``).

    Args (validated as Keras does, and also for non-numbers): ``max_value`` None or >= 0,
    ``negative_slope`` >= 0, ``threshold`` >= 0, all finite.
    """

    name = "relu"

    def __init__(
        self, max_value: float | None = None, negative_slope: float = 0.0, threshold: float = 0.0
    ):
        self.max_value = _check_number(max_value, "max_value", "ReLU", allow_none=True)
        self.negative_slope = _check_number(negative_slope, "negative_slope", "ReLU")
        self.threshold = _check_number(threshold, "threshold", "ReLU")

    def get_config(self):
        return {
            "max_value": self.max_value,
            "negative_slope": self.negative_slope,
            "threshold": self.threshold,
        }

    def _plain(self) -> bool:
        return self.max_value is None and self.negative_slope == 0 and self.threshold == 0

    def _leaky(self) -> bool:
        """Keras' ``tf.nn.leaky_relu`` case: a slope, no threshold, no maximum."""
        return self.max_value is None and self.negative_slope != 0 and self.threshold == 0

    def _relu6(self) -> bool:
        """Keras' ``tf.nn.relu6`` case: ``M = 6``, no threshold."""
        return self.max_value == 6 and self.threshold == 0

    def reference(self, z):
        """Keras' composition of stock ops (``keras.activations.relu``), exact in float64."""
        if self._plain():
            return tf.nn.relu(z)
        s, t = self.negative_slope, tf.cast(self.threshold, z.dtype)
        if self._leaky():  # not tf.nn.leaky_relu: its slope is a float32 attribute
            return tf.where(z > 0, z, s * z)
        if self._relu6():
            a = tf.nn.relu6(z)
        else:
            a = tf.where(z > t, z, tf.zeros_like(z))
            if self.max_value is not None:
                a = tf.minimum(a, tf.cast(self.max_value, z.dtype))
        return a - s * tf.nn.relu(t - z) if s != 0 else a

    def backward(self, dy: tf.Tensor, z: tf.Tensor, a: tf.Tensor) -> tuple[tf.Tensor, list]:
        """``f'(z) * delta``. The plain ReLU reads its 0/1 diagonal from ``a = max(z, 0)`` alone:
        ``f'(z) = [z > 0] = sign(a)``, one op (so a layer's forward can fuse ``z`` into its
        matmul, ``tf_jacbp.route``). A NaN ``z`` gives a NaN gradient."""
        if self._plain():
            return tf.sign(a) * dy, []
        return super().backward(dy, z, a)

    def derivative(self, z, a):
        if self._plain():
            return tf.cast(z > 0, z.dtype)  # a cast, not tf.where: the cheaper op on the hot path
        one, zero = tf.ones_like(z), tf.zeros_like(z)
        below = self.negative_slope * one
        if self._leaky():
            return tf.where(z > 0, one, below)
        if self._relu6():
            above = tf.where(z < 6, one, zero)
        elif self.max_value is not None:
            above = tf.where(z <= self.max_value, one, zero)
        else:
            above = one
        return tf.where(z > self.threshold, above, tf.where(z < self.threshold, below, zero))


class Sigmoid(Elementwise):
    """``f(z) = 1 / (1 + e^{-z})``, ``f'(z) = a (1 - a)``."""

    name = "sigmoid"

    def reference(self, z):
        return tf.math.sigmoid(z)

    def derivative(self, z, a):
        return a * (1 - a)


class Tanh(Elementwise):
    """``f(z) = tanh(z)``, ``f'(z) = 1 - a^2``."""

    name = "tanh"

    def reference(self, z):
        return tf.math.tanh(z)

    def derivative(self, z, a):
        return 1 - a * a


class LeakyReLU(Elementwise):
    """``f(z) = z`` for ``z > 0``, else ``negative_slope * z``; ``f'`` is ``1`` or the slope."""

    name = "leaky_relu"

    def __init__(self, negative_slope: float = 0.2):
        self.negative_slope = _check_number(negative_slope, "negative_slope", "LeakyReLU")

    def get_config(self):
        return {"negative_slope": self.negative_slope}

    def reference(self, z):
        # Not tf.nn.leaky_relu: its slope is a float32 attribute, off by 1e-8 in float64.
        return tf.where(z > 0, z, self.negative_slope * z)

    def derivative(self, z, a):
        return tf.where(z > 0, tf.ones_like(z), self.negative_slope * tf.ones_like(z))


class ELU(Elementwise):
    """``f(z) = z`` for ``z > 0``, else ``alpha (e^z - 1)``; ``f'`` is ``1`` or ``a + alpha``."""

    name = "elu"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def get_config(self):
        return {"alpha": self.alpha}

    def reference(self, z):
        if self.alpha == 1.0:
            return tf.nn.elu(z)
        return tf.where(z > 0, z, self.alpha * tf.math.expm1(z))

    def derivative(self, z, a):
        return tf.where(z > 0, tf.ones_like(z), a + self.alpha)


class Softplus(Elementwise):
    """``f(z) = log(1 + e^z)``, ``f'(z) = sigmoid(z)``."""

    name = "softplus"

    def reference(self, z):
        return tf.math.softplus(z)

    def derivative(self, z, a):
        return tf.math.sigmoid(z)


class GELU(Elementwise):
    """``f(z) = z Phi(z)``; ``f'(z) = Phi(z) + z phi(z)`` (exact), or the tanh approximation's."""

    name = "gelu"

    def __init__(self, approximate: bool = False):
        self.approximate = bool(approximate)

    def get_config(self):
        return {"approximate": self.approximate}

    def reference(self, z):
        # Not tf.nn.gelu: it rounds its constants through float32, off by 1e-9 in float64.
        if self.approximate:
            c = math.sqrt(2 / math.pi)
            return 0.5 * z * (1 + tf.math.tanh(c * (z + 0.044715 * z**3)))
        return 0.5 * z * tf.math.erfc(-z / math.sqrt(2))

    def derivative(self, z, a):
        if self.approximate:
            c = math.sqrt(2 / math.pi)
            t = tf.math.tanh(c * (z + 0.044715 * z**3))
            return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
        cdf = 0.5 * (1 + tf.math.erf(z / math.sqrt(2)))
        pdf = tf.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return cdf + z * pdf


class Swish(Elementwise):
    """``f(z) = z sigmoid(z)``; ``f'(z) = s (1 + z (1 - s))`` with ``s = sigmoid(z)``."""

    name = "swish"

    def reference(self, z):
        return tf.nn.silu(z)

    def derivative(self, z, a):
        s = tf.math.sigmoid(z)
        return s * (1 + z * (1 - s))


class Softmax:
    """``s = softmax(z)`` over the last axis; ``J_z s = diag(s) - s s^T`` (not diagonal)."""

    name = "softmax"

    def get_config(self) -> dict[str, Any]:
        return {}

    def reference(self, z: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(z, axis=-1)

    def forward(self, z: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(z, axis=-1)

    def backward(self, dy: tf.Tensor, z: tf.Tensor, s: tf.Tensor) -> tuple[tf.Tensor, list]:
        """``(diag(s) - s s^T) delta = s * (delta - <s, delta>)`` (the matrix is symmetric)."""
        return s * (dy - tf.reduce_sum(dy * s, axis=-1, keepdims=True)), []

    def jacobian(self, z: tf.Tensor) -> tf.Tensor:
        """``diag(s) - s s^T``: ``(d,)`` -> ``(d, d)``, or ``(batch, d)`` -> ``(batch, d, d)``."""
        s = self.forward(tf.convert_to_tensor(z))
        return tf.linalg.diag(s) - s[..., :, None] * s[..., None, :]


_ACTIVATIONS = {
    cls.name: cls
    for cls in (Linear, ReLU, Sigmoid, Tanh, LeakyReLU, ELU, Softplus, GELU, Swish, Softmax)
}
_ALIASES = {"silu": "swish", None: "linear"}


def get(identifier: str | None | Elementwise | Softmax, **kwargs: Any) -> Elementwise | Softmax:
    """An activation from its name (``"relu"``, ``"softmax"``, ..., or ``None`` for linear).

    Raises ``ValueError`` naming the unknown value and the names that exist.
    """
    if isinstance(identifier, (Elementwise, Softmax)):
        return identifier
    key = _ALIASES.get(identifier, identifier)
    if isinstance(key, str) and key in _ACTIVATIONS:
        return _ACTIVATIONS[key](**kwargs)
    raise ValueError(
        f"Unknown activation={identifier!r}. tf_jacbp has an explicit Jacobian for: "
        f"{sorted(_ACTIVATIONS)} (and 'silu' for 'swish', None for 'linear'). "
        "Use one of these names, or a stock keras.layers.Activation layer (whose gradient is "
        "then autodiff's, not checked)."
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
