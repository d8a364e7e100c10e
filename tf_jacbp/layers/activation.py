"""Activation layers: ``a = f(z)`` with the Jacobians of ``tf_jacbp.activations``.

Elementwise ones have ``J_z f = diag(f'(z))``; ``Softmax`` has ``diag(s) - s s^T``. Any input
shape; the Jacobian accessors take ``(d,)`` or ``(batch, d)``.
"""

from __future__ import annotations

from typing import Any

from tf_jacbp import activations
from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import JacobianLayer, as_float_tensor


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Activation(JacobianLayer):
    """Applies an activation with an explicit Jacobian, like ``keras.layers.Activation``.

    Args:
        activation: a name from ``tf_jacbp.activations`` (``"relu"``, ``"sigmoid"``, ``"tanh"``,
            ``"leaky_relu"``, ``"elu"``, ``"softplus"``, ``"gelu"``, ``"swish"``, ``"softmax"``,
            ``"linear"``).
    """

    def __init__(self, activation: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.activation = activations.get(activation)

    def forward(self, z: tf.Tensor) -> tf.Tensor:
        """``a = f(z)``, any shape."""
        return self.activation.forward(z)

    def reference(self, z: tf.Tensor) -> tf.Tensor:
        return self.activation.reference(z)

    def backward(self, dy: tf.Tensor, z: tf.Tensor, a: tf.Tensor) -> tuple[tf.Tensor, list]:
        """``(J_z f)^T delta``: ``f'(z) * delta`` (elementwise), ``s * (delta - <s, delta>)``
        (softmax)."""
        return self.activation.backward(dy, z, a)

    def jacobian(self, z: Any) -> tf.Tensor:
        """``J_z f(z)``: ``(d,)`` -> ``(d, d)``, ``(batch, d)`` -> ``(batch, d, d)``."""
        return self.activation.jacobian(as_float_tensor(z, self.compute_dtype))

    def jacobian_factors(self, z: tf.Tensor) -> dict[str, tf.Tensor]:
        """``{"D": J_z f(z)}`` at one sample, flattened: ``(d, d)``."""
        return {"D": self.jacobian(tf.reshape(z, [-1]))}

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "activation": activations.serialize(self.activation)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Activation:
        config = dict(config)
        config["activation"] = activations.deserialize(config["activation"])
        return cls(**config)


class _FixedActivation(Activation):
    """An ``Activation`` whose function is fixed by the class; its arguments are its config."""

    def get_config(self) -> dict[str, Any]:
        return {**JacobianLayer.get_config(self), **self.activation.get_config()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Activation:
        return cls(**config)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class ReLU(_FixedActivation):
    """``max(z, 0)`` with Keras' ``max_value``, ``negative_slope``, ``threshold``; ``J`` is 0/1."""

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

    def __init__(self, negative_slope: float = 0.3, **kwargs: Any):
        super().__init__(activations.LeakyReLU(negative_slope), **kwargs)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class ELU(_FixedActivation):
    """``z`` or ``alpha (e^z - 1)``; ``J = diag(1 or a + alpha)``."""

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
        axis: only ``-1`` (the last axis) is supported.
    """

    def __init__(self, axis: int = -1, **kwargs: Any):
        if axis != -1:
            raise ValueError(
                f"Softmax: tf_jacbp supports axis=-1 only, got axis={axis!r}. Move the axis "
                "last (e.g. with keras.layers.Permute) or use axis=-1."
            )
        super().__init__(activations.Softmax(), **kwargs)
