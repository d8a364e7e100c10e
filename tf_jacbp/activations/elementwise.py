"""Smooth elementwise activations ``a = f(z)`` with ``J_z f(z) = diag(f'(z))`` (docs/math.md).

Each class gives ``reference(z)`` (the stock ops Keras' ``keras.activations.<name>`` runs, in
``keras.ops``: TensorFlow's kernels on that backend, so ``forward`` is not what is under test) and
``derivative(z, a) = f'(z)`` (the formula in ``keras.ops``, given ``z`` and ``a = f(z)``). The
contract's product (``tf_jacbp.contract``) is then ``vjp_input(m, z, a) = f'(z) * m`` for ``V``
stacked vectors ``m`` (``backward`` and the rest are derived from it), ``jacobian`` the
materialized ``diag(f'(z))`` and ``jacobian_at_positions`` the one of a whole sample. Where
TensorFlow's own gradient kernel decides a kink or an underflow (ELU and SELU at the points where
``e^z - 1`` rounds to zero), ``f'`` is what that kernel gives, so that float64 gradients equal
autodiff's of ``keras.activations``.
The piecewise linear ones (ReLU and the hard functions) are in ``piecewise.py``.

``tanh`` (of ``Tanh``, ``Mish``, ``TanhShrink`` and the approximate ``GELU``) is
``tf_jacbp.numerics.tanh``: ``keras.ops.tanh`` on TensorFlow; on JAX, where Keras computes it in
float32, float64 inputs get ``jax.numpy``'s float64 tanh, so the float64 reference route there is
that float64 computation, not stock Keras'.
"""

from __future__ import annotations

import math
from typing import Any

from keras import ops

from tf_jacbp import numerics
from tf_jacbp.contract import JacobianMap

Tensor = Any


def diagonal_matrix(d: Any) -> Any:
    """``diag(d)`` for each row: ``(..., n)`` -> ``(..., n, n)``, exactly zero off the diagonal
    (also where ``d`` is infinite or NaN: a ``where``, not a product with the identity)."""
    n = d.shape[-1] if d.shape[-1] is not None else ops.shape(d)[-1]
    eye = ops.cast(ops.eye(n), "bool")
    return ops.where(eye, ops.expand_dims(d, -2), ops.zeros((), d.dtype))


class Elementwise(JacobianMap):
    """An elementwise activation ``a = f(z)`` with ``J_z f(z) = diag(f'(z))``.

    Subclasses set ``name`` and implement ``reference(z)`` (stock ``keras.ops``) and
    ``derivative(z, a)`` (``f'(z)``, given ``z`` and ``a = f(z)``). Calling the object applies
    ``f`` (``forward``), as a ``keras.activations`` function does. A map without parameters in
    the contract of ``tf_jacbp.contract``: ``vjp_input`` is its one formula.
    """

    name = ""

    def get_config(self) -> dict[str, Any]:
        """Arguments that rebuild this activation with ``get(config)``."""
        return {}

    def reference(self, z: Tensor) -> Tensor:
        """``f(z)`` in stock ops (autodiff differentiates this route)."""
        raise NotImplementedError

    def derivative(self, z: Tensor, a: Tensor) -> Tensor:
        """``f'(z)``, same shape as ``z``."""
        raise NotImplementedError

    def forward(self, z: Tensor) -> Tensor:
        """``a = f(z)``, any shape."""
        return self.reference(z)

    def __call__(self, z: Any) -> Tensor:
        """``f(z)``, like the ``keras.activations`` function (``forward``)."""
        return self.forward(ops.convert_to_tensor(z))

    def vjp_input(self, m: Any, z: Any, a: Any) -> Any:
        """``(J_z f)^T m = diag(f'(z)) m = f'(z) * m`` for each of the ``V`` vectors:
        ``m`` ``(V, batch, ...)``, ``z`` and ``a = f(z)`` ``(batch, ...)`` -> ``(V, batch, ...)``
        (``f'(z)`` broadcasts over ``V``)."""
        return self.derivative(z, a) * m

    def jacobian(self, z: Any) -> Any:
        """``J_z f(z) = diag(f'(z))``: ``(d,)`` -> ``(d, d)``, or ``(batch, d)`` ->
        ``(batch, d, d)``."""
        z = ops.convert_to_tensor(z)
        return diagonal_matrix(self.derivative(z, self.forward(z)))

    def jacobian_at_positions(self, z: Any) -> Any:
        """``D = J_z f(z)`` of each whole sample of ``z`` ``(batch, P, m)`` (or ``(batch, ...,
        m)``, positions row-major): ``(batch, P m, P m)``, rows and columns in the row-major
        order of a sample. Elementwise: ``diag(f'(z))`` of the flattened sample."""
        z = ops.convert_to_tensor(z)
        _check_positions(self, z)
        d = self.derivative(z, self.forward(z))
        return diagonal_matrix(ops.reshape(d, (ops.shape(z)[0], -1)))


def _check_positions(activation: Any, z: Any) -> None:
    """A ValueError unless ``z`` is a batch ``(batch, ..., m)`` with every size past the batch
    axis known (``jacobian_at_positions``)."""
    if len(z.shape) < 2 or any(d is None for d in z.shape[1:]):
        raise ValueError(
            f"{type(activation).__name__}.jacobian_at_positions: z must be a batch (batch, P, m) "
            f"(or (batch, ..., m)) with known sizes past the batch axis, got z of shape "
            f"{tuple(z.shape)}. For one sample add the batch axis: z[None]."
        )


class Linear(Elementwise):
    """``f(z) = z``, ``f'(z) = 1``."""

    name = "linear"

    def reference(self, z):
        return ops.copy(z)  # a new tensor (TensorFlow's identity), not z itself

    def derivative(self, z, a):
        return ops.ones_like(z)


class Sigmoid(Elementwise):
    """``f(z) = 1 / (1 + e^{-z})``, ``f'(z) = a (1 - a)``."""

    name = "sigmoid"

    def reference(self, z):
        return ops.sigmoid(z)

    def derivative(self, z, a):
        return a * (1 - a)


class Tanh(Elementwise):
    """``f(z) = tanh(z)``, ``f'(z) = 1 - a^2``."""

    name = "tanh"

    def reference(self, z):
        return numerics.tanh(z)

    def derivative(self, z, a):
        return 1 - a * a


class ELU(Elementwise):
    """``f(z) = z`` for ``z > 0``, else ``alpha (e^z - 1)``; ``f'`` is ``1`` or ``a + alpha``."""

    name = "elu"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def get_config(self):
        return {"alpha": self.alpha}

    def reference(self, z):
        if self.alpha == 1.0:
            return ops.elu(z)
        return ops.where(z > 0, z, self.alpha * ops.expm1(z))

    def derivative(self, z, a):
        return ops.where(z > 0, ops.ones_like(z), a + self.alpha)


# SELU's constants as TensorFlow's kernel writes them (Klambauer et al., 2017).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


class SELU(Elementwise):
    """``f(z) = scale z`` for ``z > 0``, else ``scale alpha (e^z - 1)`` (``keras.ops.selu``);
    ``f'(z) = scale alpha e^z = a + scale alpha`` where ``a < 0``, else ``scale``.

    The condition is on ``a``, as in TensorFlow's gradient kernel: at ``z = 0``, and at tiny
    negative ``z`` where ``e^z - 1`` rounds to 0, ``f'`` is ``scale``.
    """

    name = "selu"

    def reference(self, z):
        return ops.selu(z)

    def derivative(self, z, a):
        return ops.where(a < 0, a + SELU_SCALE * SELU_ALPHA, SELU_SCALE * ops.ones_like(z))


class Softplus(Elementwise):
    """``f(z) = log(1 + e^z)``, ``f'(z) = sigmoid(z)``."""

    name = "softplus"

    def reference(self, z):
        return ops.softplus(z)

    def derivative(self, z, a):
        return ops.sigmoid(z)


class Softsign(Elementwise):
    """``f(z) = z / (1 + |z|)``, ``f'(z) = 1 / (1 + |z|)^2``."""

    name = "softsign"

    def reference(self, z):
        return ops.softsign(z)

    def derivative(self, z, a):
        return 1 / ops.square(1 + ops.abs(z))


class Exponential(Elementwise):
    """``f(z) = e^z``, ``f'(z) = e^z = a``."""

    name = "exponential"

    def reference(self, z):
        return ops.exp(z)

    def derivative(self, z, a):
        return a


class GELU(Elementwise):
    """``f(z) = z Phi(z)``; ``f'(z) = Phi(z) + z phi(z)`` (exact), or the tanh approximation's."""

    name = "gelu"

    def __init__(self, approximate: bool = False):
        self.approximate = bool(approximate)

    def get_config(self):
        return {"approximate": self.approximate}

    def reference(self, z):
        # Not ops.gelu (TensorFlow's gelu): it rounds its constants through float32, off by 1e-9
        # in float64.
        if self.approximate:
            c = math.sqrt(2 / math.pi)
            return 0.5 * z * (1 + numerics.tanh(c * (z + 0.044715 * z**3)))
        return 0.5 * z * ops.erfc(-z / math.sqrt(2))

    def derivative(self, z, a):
        if self.approximate:
            c = math.sqrt(2 / math.pi)
            t = numerics.tanh(c * (z + 0.044715 * z**3))
            return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
        cdf = 0.5 * (1 + ops.erf(z / math.sqrt(2)))
        pdf = ops.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return cdf + z * pdf


class Swish(Elementwise):
    """``f(z) = z sigmoid(z)`` (also called SiLU); ``f'(z) = s (1 + z (1 - s))`` with
    ``s = sigmoid(z)``."""

    name = "swish"

    def reference(self, z):
        return ops.silu(z)

    def derivative(self, z, a):
        s = ops.sigmoid(z)
        return s * (1 + z * (1 - s))


class Mish(Elementwise):
    """``f(z) = z tanh(softplus(z))``; with ``t = tanh(softplus(z))``,
    ``f'(z) = t + z (1 - t^2) sigmoid(z)`` (``softplus' = sigmoid``, ``tanh' = 1 - tanh^2``)."""

    name = "mish"

    def reference(self, z):
        return z * numerics.tanh(ops.softplus(z))

    def derivative(self, z, a):
        t = numerics.tanh(ops.softplus(z))
        return t + z * (1 - t * t) * ops.sigmoid(z)


class CELU(Elementwise):
    """``f(z) = max(z, 0) + alpha (e^{min(z, 0) / alpha} - 1)`` (Keras' composition);
    ``f'(z) = [z >= 0] + [z <= 0] e^{min(z, 0) / alpha}``.

    At ``z = 0`` this is 2, not 1: TensorFlow's gradients of ``maximum`` and ``minimum`` both pass
    a tie to ``z``, so autodiff of ``keras.activations.celu`` gives 2 there, and tf_jacbp follows
    it (elsewhere the two agree: 1 above 0, ``e^{z / alpha}`` below).
    """

    name = "celu"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def get_config(self):
        return {"alpha": self.alpha}

    def reference(self, z):
        return ops.maximum(z, 0.0) + self.alpha * ops.expm1(ops.minimum(z, 0.0) / self.alpha)

    def derivative(self, z, a):
        above = ops.cast(z >= 0, z.dtype)
        below = ops.cast(z <= 0, z.dtype) * ops.exp(ops.minimum(z, 0.0) / self.alpha)
        return above + below


class LogSigmoid(Elementwise):
    """``f(z) = log sigmoid(z) = -softplus(-z)``, ``f'(z) = 1 - sigmoid(z) = sigmoid(-z)``."""

    name = "log_sigmoid"

    def reference(self, z):
        return ops.log_sigmoid(z)

    def derivative(self, z, a):
        return ops.sigmoid(-z)


class TanhShrink(Elementwise):
    """``f(z) = z - tanh(z)``, ``f'(z) = 1 - (1 - tanh^2 z) = tanh^2 z``."""

    name = "tanh_shrink"

    def reference(self, z):
        return z - numerics.tanh(z)

    def derivative(self, z, a):
        return ops.square(numerics.tanh(z))


class Squareplus(Elementwise):
    """``f(z) = (z + sqrt(z^2 + b)) / 2``, ``f'(z) = (1 + z / sqrt(z^2 + b)) / 2``."""

    name = "squareplus"

    def __init__(self, b: float = 4):
        self.b = b

    def get_config(self):
        return {"b": self.b}

    def reference(self, z):
        return (z + ops.sqrt(ops.square(z) + ops.cast(self.b, z.dtype))) / 2

    def derivative(self, z, a):
        return (1 + z / ops.sqrt(ops.square(z) + ops.cast(self.b, z.dtype))) / 2
