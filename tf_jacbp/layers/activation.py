"""Activation layers: ``a = f(z)`` with the Jacobians of ``tf_jacbp.activations``.

Elementwise ones have ``J_z f = diag(f'(z))``; ``Softmax`` has ``diag(s) - s s^T``. Each is a
map without parameters in the contract of ``tf_jacbp.contract``: ``vjp_input(m, z, a)`` is the
activation's product ``(J_z f)^T m`` for ``V`` stacked vectors ``m`` ``(V, batch, ...)``
(``f'(z) * m``, or ``s * (m - <s, m>)`` for softmax). Any input shape; the materialized
``input_jacobian`` takes one sample ``(d,)`` or a batch.

As Keras' activation layers, they have no weights and are built when constructed
(``layer.built``; a subclass that overrides ``build`` has it run at its first call), pass a
Keras mask through unchanged (``supports_masking``), and expose their arguments as attributes
(``ReLU(...).max_value``, ``LeakyReLU(...).negative_slope``, ``ELU(...).alpha``,
``Softmax(...).axis``); setting one replaces the activation.
"""

from __future__ import annotations

import warnings
from typing import Any

from keras import ops

from tf_jacbp import activations
from tf_jacbp._backend import keras
from tf_jacbp.contract import JacobianMap
from tf_jacbp.layers.base import JacobianLayer, as_float_tensor, build_at_construction
from tf_jacbp.route import route

Tensor = Any  # a tensor of Keras' backend


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Activation(JacobianLayer):
    """Applies an activation with an explicit Jacobian, like ``keras.layers.Activation``.

    Args:
        activation: a name from ``tf_jacbp.activations`` (``"relu"``, ``"relu6"``,
            ``"sigmoid"``, ``"tanh"``, ``"leaky_relu"``, ``"elu"``, ``"selu"``, ``"softplus"``,
            ``"softsign"``, ``"exponential"``, ``"gelu"``, ``"swish"``/``"silu"``, ``"mish"``,
            ``"hard_sigmoid"``, ``"hard_silu"``/``"hard_swish"``, ``"celu"``, ``"hard_tanh"``,
            ``"log_sigmoid"``, ``"tanh_shrink"``, ``"soft_shrink"``, ``"hard_shrink"``,
            ``"sparse_plus"``, ``"sparse_sigmoid"``, ``"squareplus"``, ``"softmax"``,
            ``"linear"``), Keras' function for one of them (``keras.activations.relu``,
            ``keras.ops.gelu``, ...), or a ``tf_jacbp.activations`` object.

    Example:
        >>> layer = tf_jacbp.layers.Activation(keras.activations.hard_silu, dtype="float64")
        >>> np.diag(layer.input_jacobian(np.array([-4.0, 0.0, 1.0])))  # 0 below -3, (2 z + 3) / 6
        array([0.        , 0.5       , 0.83333333])
    """

    def __init__(self, activation: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.activation = activations.get(activation)
        self.supports_masking = True
        build_at_construction(self, Activation)  # no weights: built now, as Keras' are

    def forward(self, z: Tensor) -> Tensor:
        """``a = f(z)``, any shape."""
        return self.activation.forward(z)

    def reference(self, z: Tensor) -> Tensor:
        """The activation's stock route (``tf_jacbp.activations``)."""
        return self.activation.reference(z)

    def vjp_input(self, m: Any, z: Any, a: Any) -> Any:
        """``(J_z f)^T m``: ``f'(z) * m`` (elementwise), ``s * (m - <s, m>)`` (softmax, over the
        last axis); ``m`` ``(V, batch, ...)`` -> ``(V, batch, ...)``."""
        return self.activation.vjp_input(m, z, a)

    def input_jacobian(self, z: Any) -> Any:
        """``J_z f(z)`` of each sample, flattened: one sample ``(d,)`` -> ``(d, d)``, a batch
        ``(batch, ...)`` -> ``(batch, N, N)`` with ``N`` a sample's size (the layer takes any
        shape, so a rank-1 ``z`` is read as one sample)."""
        z = as_float_tensor(z, self.compute_dtype)
        if len(z.shape) == 1:
            return super().input_jacobian(z[None])[0]
        return super().input_jacobian(z)

    def jacobian_factors(self, z: Tensor) -> dict[str, Tensor]:
        """``{"D": J_z f(z)}`` at one sample ``z`` (any shape), flattened: ``(N, N)``."""
        return {"D": super().input_jacobian(z[None])[0]}

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "activation": activations.serialize(self.activation)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Activation:
        config = dict(config)
        config["activation"] = activations.deserialize(config["activation"])
        return cls(**config)


class _Argument:
    """An argument of a layer's activation as an attribute of the layer (``ReLU.max_value``).

    Reading ``layer.<name>`` reads ``layer.activation.<name>``; setting it makes
    ``layer.activation`` anew with the new value and its other arguments, so the new value is
    checked as the constructor checks it. ``doc`` is the attribute's docstring.
    """

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer: Activation | None, owner: type | None = None) -> Any:
        if layer is None:
            return self
        return getattr(layer.activation, self.name)

    def __set__(self, layer: Activation, value: Any) -> None:
        config = {**layer.activation.get_config(), self.name: value}
        layer.activation = type(layer.activation)(**config)


class _FixedActivation(Activation):
    """An ``Activation`` whose function is fixed by the class; its arguments are its config and
    its attributes (each an ``_Argument``: reading ``layer.alpha`` reads the activation's; setting
    it makes a new activation with the new value, checked as the constructor checks it)."""

    def get_config(self) -> dict[str, Any]:
        return {**JacobianLayer.get_config(self), **self.activation.get_config()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Activation:
        return cls(**config)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class ReLU(_FixedActivation):
    """``max(z, 0)`` with Keras' ``max_value``, ``negative_slope``, ``threshold``; ``J`` is 0/1."""

    max_value = _Argument("``M``, or None (no maximum).")
    negative_slope = _Argument("``s``, the slope below the threshold.")
    threshold = _Argument("``t``, the threshold.")

    def __init__(
        self,
        max_value: float | None = None,
        negative_slope: float = 0.0,
        threshold: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(activations.ReLU(max_value, negative_slope, threshold), **kwargs)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Sigmoid(_FixedActivation):
    """``1 / (1 + e^{-z})``; ``J = diag(a (1 - a))``."""

    def __init__(self, **kwargs: Any):
        super().__init__(activations.Sigmoid(), **kwargs)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Tanh(_FixedActivation):
    """``tanh(z)``; ``J = diag(1 - a^2)``."""

    def __init__(self, **kwargs: Any):
        super().__init__(activations.Tanh(), **kwargs)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class LeakyReLU(_FixedActivation):
    """``z`` or ``negative_slope * z`` (Keras' layer default slope 0.3);
    ``J = diag(1 or slope)``."""

    negative_slope = _Argument("The slope for ``z <= 0``.")

    def __init__(self, negative_slope: float = 0.3, **kwargs: Any):
        if "alpha" in kwargs:  # Keras 2's name, which Keras 3 still accepts with a warning
            negative_slope = kwargs.pop("alpha")
            warnings.warn(
                "LeakyReLU: argument `alpha` is deprecated. Use `negative_slope` instead.",
                stacklevel=2,
            )
        super().__init__(activations.LeakyReLU(negative_slope), **kwargs)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class ELU(_FixedActivation):
    """``z`` or ``alpha (e^z - 1)``; ``J = diag(1 or a + alpha)``."""

    alpha = _Argument("``alpha`` in ``alpha (e^z - 1)``.")

    def __init__(self, alpha: float = 1.0, **kwargs: Any):
        super().__init__(activations.ELU(alpha), **kwargs)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Softplus(_FixedActivation):
    """``log(1 + e^z)``; ``J = diag(sigmoid(z))``."""

    def __init__(self, **kwargs: Any):
        super().__init__(activations.Softplus(), **kwargs)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class GELU(_FixedActivation):
    """``z Phi(z)``; ``J = diag(Phi(z) + z phi(z))`` (or the tanh approximation's)."""

    approximate = _Argument("Whether the tanh approximation is used.")

    def __init__(self, approximate: bool = False, **kwargs: Any):
        super().__init__(activations.GELU(approximate), **kwargs)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Swish(_FixedActivation):
    """``z sigmoid(z)``; ``J = diag(s (1 + z (1 - s)))`` with ``s = sigmoid(z)``."""

    def __init__(self, **kwargs: Any):
        super().__init__(activations.Swish(), **kwargs)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Softmax(_FixedActivation):
    """Softmax over the last axis; ``J = diag(s) - s s^T``.

    Args:
        axis: the last axis: ``-1``, or its non-negative index (checked against the input's rank
            when called), or a list of that one axis.

    ``call(inputs, mask=None)``: as Keras' ``Softmax``, a mask broadcastable to ``inputs`` (True
    or > 0.5: keep) sets the logits it drops to a large negative number and their outputs to 0,
    so each row is the softmax of the entries kept. The Jacobian is then ``diag(s) - s s^T`` with
    ``s`` zero on the dropped entries: the softmax's over the kept entries, zero elsewhere.
    """

    def __init__(self, axis: int | list[int] = -1, **kwargs: Any):
        single = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        if isinstance(single, bool) or not isinstance(single, int) or single < -1:
            raise ValueError(
                f"Softmax: tf_jacbp supports the last axis only (axis=-1), got axis={axis!r}. "
                "Move the axis last (e.g. with keras.layers.Permute) or use axis=-1."
            )
        super().__init__(activations.Softmax(), **kwargs)
        self._axis = axis

    @property
    def axis(self) -> int | list[int]:
        """The softmax axis, as given: the last one."""
        return self._axis

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "axis": self.axis}

    def _check_axis(self, rank: int) -> None:
        single = self.axis[0] if isinstance(self.axis, (list, tuple)) else self.axis
        if single not in (-1, rank - 1):
            raise ValueError(
                f"Softmax '{self.name}': tf_jacbp supports the last axis only, got "
                f"axis={self.axis!r} for inputs of rank {rank} (the last axis is {rank - 1}). Move "
                "the axis last (e.g. with keras.layers.Permute) or use axis=-1."
            )

    def call(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        """``softmax(inputs)``, or with ``mask`` the masked softmax (class docstring)."""
        self._check_axis(len(inputs.shape))
        if mask is None:
            return super().call(inputs)
        return route(MaskedSoftmax(), inputs, [], [_broadcastable_mask(mask, inputs, self.name)])


def _broadcastable_mask(mask: Any, inputs: Any, name: str) -> Any:
    """``mask`` as a bool tensor, checked as Keras' Softmax checks it (each axis, aligned from the
    right, is 1 or the input's; no more axes than the input)."""
    mask = ops.convert_to_tensor(mask)
    fits = len(mask.shape) <= len(inputs.shape) and all(
        m is None or i is None or m in (1, i)
        for m, i in zip(mask.shape[::-1], inputs.shape[::-1], strict=False)
    )
    if not fits:
        raise ValueError(
            f"Softmax '{name}': the mask must be broadcastable to the inputs (each axis, aligned "
            f"from the right, 1 or the input's), got inputs.shape={tuple(inputs.shape)} and "
            f"mask.shape={tuple(mask.shape)}. Give a mask of shape {tuple(inputs.shape)} or one "
            "with 1 on the axes to broadcast."
        )
    return mask if mask.dtype == "bool" else ops.greater(mask, ops.cast(0.5, mask.dtype))


def _large_negative(dtype: Any) -> float:
    """Keras' stand-in for a dropped logit: ``-1e9``, or ``-3e4`` in float16."""
    return -3e4 if dtype == "float16" else -1e9


class MaskedSoftmax(JacobianMap):
    """Keras' masked softmax over the last axis: ``s = softmax(z')`` with the dropped logits of
    ``z'`` set to a large negative number and the dropped outputs to 0; ``mask`` (booleans,
    broadcastable to ``z``) is a constant of the map.

    ``J_z s = diag(s) - s s^T`` with ``s`` zero on the dropped entries: the softmax's over the
    entries kept, zero elsewhere (a dropped logit moves nothing).
    """

    def forward(self, z: Any, mask: Any) -> Any:
        """``s``, ``(batch, ..., d)``: the softmax of the kept logits, 0 where dropped."""
        s = ops.softmax(ops.where(mask, z, ops.cast(_large_negative(z.dtype), z.dtype)), axis=-1)
        return ops.where(mask, s, ops.zeros_like(s))

    def reference(self, z: Tensor, mask: Tensor) -> Tensor:
        """Stock ops: ``keras.ops.softmax`` of the logits with the dropped ones replaced, the
        dropped outputs set to 0."""
        large_negative = ops.full_like(z, _large_negative(z.dtype))
        s = ops.softmax(ops.where(mask, z, large_negative), axis=-1)
        return ops.where(mask, s, ops.zeros_like(s))

    def vjp_input(self, m: Any, z: Any, s: Any, mask: Any) -> Any:
        """``(diag(s) - s s^T) m = s * (m - <s, m>)`` (the matrix is symmetric), ``m``
        ``(V, batch, ..., d)``; ``s`` is 0 on the dropped entries, so they get 0."""
        return s * (m - ops.sum(m * s, axis=-1, keepdims=True))
