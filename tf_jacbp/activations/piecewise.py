"""Piecewise linear activations: the ReLU family and the hard sigmoid / hard SiLU.

``J_z f(z) = diag(f'(z))`` as for every elementwise activation (``elementwise.Elementwise``).
These functions have kinks, and at a kink ``f'`` is a choice: each class takes the value that
TensorFlow's autodiff gives for the ops Keras composes (``keras.activations.<name>``), so that
float64 gradients equal stock Keras' exactly, ties included. Each docstring states the choice.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from keras import ops

from tf_jacbp.activations.elementwise import Elementwise


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

    Rounding, as Keras: the test ``z > t`` and the clip at ``M`` use ``t`` and ``M`` cast through
    float32 (``t_32``, ``M_32``: Keras' ``ops.cast`` of a Python float), the negative part
    ``s relu(t - z)`` the exact ``t``. So ``f'(z) = [z > t_32] [z <= M_32] + s [z < t]``, and at a
    ``t`` or ``M`` float32 cannot hold (``t = 0.2``) values and derivatives still equal stock
    Keras' in float64, also between ``t`` and ``t_32``.

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
        """The case Keras hands to ``keras.ops.leaky_relu``: a slope, no threshold, no maximum."""
        return self.max_value is None and self.negative_slope != 0 and self.threshold == 0

    def _relu6(self) -> bool:
        """The case Keras hands to ``keras.ops.relu6``: ``M = 6``, no threshold."""
        return self.max_value == 6 and self.threshold == 0

    def reference(self, z):
        """Keras' composition of stock ops (``keras.activations.relu``), exact in float64."""
        if self._plain():
            return ops.relu(z)
        s = self.negative_slope
        if self._leaky():  # not ops.leaky_relu: TensorFlow's slope is a float32 attribute
            return ops.where(z > 0, z, s * z)
        if self._relu6():
            a = ops.relu6(z)
        else:  # Keras casts t and M through float32 (TensorFlow's cast of a Python float)
            a = ops.where(z > ops.cast(self.threshold, z.dtype), z, ops.zeros_like(z))
            if self.max_value is not None:
                a = ops.minimum(a, ops.cast(self.max_value, z.dtype))
        return a - s * ops.relu(-z + self.threshold) if s != 0 else a  # t exact, as Keras

    def vjp_input(self, m: Any, z: Any, a: Any) -> Any:
        """``f'(z) * m``, ``(V, batch, ...)``. The plain ReLU reads its 0/1 diagonal from
        ``a = max(z, 0)`` alone: ``f'(z) = [z > 0] = sign(a)``, one op (so a layer's forward can
        fuse ``z`` into its matmul, ``tf_jacbp.route``). A NaN ``z`` gives a NaN gradient."""
        if self._plain():
            return ops.sign(a) * m
        return super().vjp_input(m, z, a)

    def derivative(self, z, a):
        if self._plain():
            return ops.cast(z > 0, z.dtype)  # a cast, not a where: the cheaper op on the hot path
        one, zero = ops.ones_like(z), ops.zeros_like(z)
        below = self.negative_slope * one
        if self._leaky():
            return ops.where(z > 0, one, below)
        if self._relu6():
            above = ops.where(z < 6, one, zero)
        elif self.max_value is not None:  # M_32, as the reference (and Keras) clips
            above = ops.where(z <= ops.cast(self.max_value, z.dtype), one, zero)
        else:
            above = one
        upper = ops.where(z > ops.cast(self.threshold, z.dtype), above, zero)  # t_32
        if self.negative_slope == 0:
            return upper
        return upper + ops.where(z < self.threshold, below, zero)  # the exact t


class LeakyReLU(Elementwise):
    """``f(z) = z`` for ``z > 0``, else ``negative_slope * z``; ``f'`` is ``1`` or the slope."""

    name = "leaky_relu"

    def __init__(self, negative_slope: float = 0.2):
        self.negative_slope = _check_number(negative_slope, "negative_slope", "LeakyReLU")

    def get_config(self):
        return {"negative_slope": self.negative_slope}

    def reference(self, z):
        # Not ops.leaky_relu: TensorFlow's slope is a float32 attribute, off by 1e-8 in float64.
        return ops.where(z > 0, z, self.negative_slope * z)

    def derivative(self, z, a):
        return ops.where(z > 0, ops.ones_like(z), self.negative_slope * ops.ones_like(z))


class ReLU6(ReLU):
    """``f(z) = min(max(z, 0), 6)`` (``tf.nn.relu6``); ``f'(z) = [0 < z < 6]``: 0 at both kinks,
    as TensorFlow's ``Relu6Grad``. The same map as ``ReLU(max_value=6)``."""

    name = "relu6"

    def __init__(self):
        super().__init__(max_value=6.0)

    def get_config(self):
        return {}


class HardSigmoid(Elementwise):
    """``f(z) = relu6(z + 3) / 6`` (Keras 3's definition: 0 for ``z <= -3``, 1 for ``z >= 3``,
    ``z / 6 + 1/2`` between); ``f'(z) = [0 < u < 6] / 6`` with ``u = z + 3`` rounded as
    TensorFlow rounds it.

    At the kinks ``z = -3`` and ``z = 3`` the derivative is 0 (``Relu6Grad`` of ``u``); because the
    condition is on the rounded ``u``, the float64 number just below 3 (where ``u`` rounds to 6)
    has derivative 0 too, as autodiff gives.
    """

    name = "hard_sigmoid"

    def reference(self, z):
        return ops.relu6(z + 3) / 6

    def derivative(self, z, a):
        u = z + 3
        inside = ops.logical_and(u > 0, u < 6)
        return ops.where(inside, ops.full_like(z, 1 / 6), ops.zeros_like(z))


class HardSilu(Elementwise):
    """``f(z) = z hard_sigmoid(z)`` (also called hard swish); the product rule gives
    ``f'(z) = hard_sigmoid(z) + z hard_sigmoid'(z)``, that is ``(2 z + 3) / 6`` on ``(-3, 3)``,
    0 below and 1 above, with ``hard_sigmoid'`` as ``HardSigmoid`` chooses it at the kinks
    (so ``f'(-3) = 0``, ``f'(3) = 1``)."""

    name = "hard_silu"

    def reference(self, z):
        return z * HardSigmoid().reference(z)

    def derivative(self, z, a):
        h = ops.relu6(z + 3) / 6
        return h + z * HardSigmoid().derivative(z, h)


def _indicator(condition: Any, z: Any) -> Any:
    """``[condition]`` as 0/1 of ``z``'s dtype."""
    return ops.cast(condition, z.dtype)


class HardTanh(Elementwise):
    """``f(z) = clip(z, -1, 1)`` (``tf.clip_by_value``); ``f'(z) = [-1 <= z <= 1]``: 1 at both
    kinks, as TensorFlow's clip gradient (it stops only strictly outside the interval)."""

    name = "hard_tanh"

    def reference(self, z):
        return ops.clip(z, -1.0, 1.0)

    def derivative(self, z, a):
        return _indicator(ops.logical_and(z >= -1, z <= 1), z)


class SoftShrink(Elementwise):
    """``f(z) = z - t`` for ``z > t``, ``z + t`` for ``z < -t``, else 0 (``t = threshold``);
    ``f'(z) = [|z| > t]``: 0 at ``z = +-t`` (the middle branch of Keras' ``where``)."""

    name = "soft_shrink"

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def get_config(self):
        return {"threshold": self.threshold}

    def reference(self, z):
        t = self.threshold
        return ops.where(z > t, z - t, ops.where(z < -t, z + t, ops.zeros_like(z)))

    def derivative(self, z, a):
        t = self.threshold
        return _indicator(ops.logical_or(z > t, z < -t), z)


class HardShrink(Elementwise):
    """``f(z) = z`` for ``|z| > t``, else 0 (``t = threshold``); ``f'(z) = [|z| > t]``: 0 at
    ``z = +-t``."""

    name = "hard_shrink"

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def get_config(self):
        return {"threshold": self.threshold}

    def reference(self, z):
        return ops.where(ops.abs(z) > self.threshold, z, ops.zeros_like(z))

    def derivative(self, z, a):
        return _indicator(ops.abs(z) > self.threshold, z)


class SparsePlus(Elementwise):
    """``f(z) = 0`` for ``z <= -1``, ``(z + 1)^2 / 4`` for ``-1 < z < 1``, ``z`` for ``z >= 1``;
    ``f'(z)`` is 0, ``(z + 1) / 2``, 1 on the same pieces (continuous: 0 at -1, 1 at 1)."""

    name = "sparse_plus"

    def reference(self, z):
        zero = ops.zeros_like(z)
        return ops.where(z <= -1, zero, ops.where(z < 1, (1 / 4) * ops.power(z + 1, 2), z))

    def derivative(self, z, a):
        zero, one = ops.zeros_like(z), ops.ones_like(z)
        return ops.where(z <= -1, zero, ops.where(z < 1, (z + 1) / 2, one))


class SparseSigmoid(Elementwise):
    """``f(z) = 0`` for ``z <= -1``, ``(z + 1) / 2`` for ``-1 < z < 1``, 1 for ``z >= 1``;
    ``f'(z) = [-1 < z < 1] / 2``: 0 at both kinks (Keras' outer branches are closed)."""

    name = "sparse_sigmoid"

    def reference(self, z):
        zero, one = ops.zeros_like(z), ops.ones_like(z)
        return ops.where(z <= -1, zero, ops.where(z >= 1, one, 0.5 * (z + 1)))

    def derivative(self, z, a):
        return 0.5 * _indicator(ops.logical_and(z > -1, z < 1), z)
