"""BatchNormalization's training maps, as small maps of the contract (docs/batchnorm.md).

``BatchNormalization.call(..., training=True)`` routes one of these instead of the layer's own
inference map; ``BatchNormalization.training_map(masked)`` returns it. Per channel ``c`` (the last
axis) the ``N`` entries of the batch and its positions form one vector ``x``:

* ``BatchStatistics``: ``y = gamma (x - mu 1) / s + beta 1`` with ``mu``, ``s = sqrt(sigma^2 +
  eps)`` of the batch, ``J_x y = (gamma / s) (I - (1/N) 1 1^T - (1/N) xhat xhat^T)``;
* ``MaskedBatchStatistics``: the same with Keras' masked moments (the mask is a constant of the
  map, after the parameters), ``J_x y`` of ``tf_jacbp.layers.batch_moments``.

Both couple the samples: sample ``i``'s output depends on every sample through ``mu`` and
``sigma^2``. ``vjp_input`` is the product with the whole batch map's Jacobian (each of the ``V``
vectors spans the batch), and ``vjp_params`` exists only summed over the batch
(``sum_batch=False`` raises: there is no per-sample Jacobian), so training's derived ``backward``
works and Algorithm 1's per-sample products refuse.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp import numerics
from tf_jacbp.contract import JacobianMap
from tf_jacbp.layers.batch_moments import masked_input_product, masked_moments

__all__ = ["BatchStatistics", "MaskedBatchStatistics", "affine", "affine_parameter_products"]


def affine(xhat: Any, gamma: Any | None, beta: Any | None) -> Any:
    """``y = gamma * xhat + beta`` (without the factors that are None)."""
    y = xhat if gamma is None else gamma * xhat
    return y if beta is None else y + beta


def affine_parameter_products(
    m: Any, xhat: Any, scale: bool, center: bool, axes: tuple[int, ...]
) -> list:
    """``[(J_gamma y)^T m, (J_beta y)^T m] = [sum m * xhat, sum m]`` over ``axes`` of ``m``, for
    ``y = gamma * xhat + beta`` (``gamma`` if ``scale``, ``beta`` if ``center``)."""
    grads = [ops.sum(m * xhat, axis=axes)] if scale else []
    return grads + ([ops.sum(m, axis=axes)] if center else [])


class _BatchMap(JacobianMap):
    """A training map of ``BatchNormalization``: ``epsilon`` and which of ``gamma`` (``scale``),
    ``beta`` (``center``) the positional parameters hold; ``name`` names it in errors."""

    def __init__(self, epsilon: float, scale: bool, center: bool, name: str | None = None):
        self.epsilon = float(epsilon)
        self.scale = bool(scale)
        self.center = bool(center)
        self.name = name or type(self).__name__

    def split(self, params: Any) -> tuple[Any | None, Any | None]:
        """``(gamma, beta)`` from the positional parameters, None for those turned off."""
        params = list(params)
        gamma = params.pop(0) if self.scale else None
        beta = params.pop(0) if self.center else None
        return gamma, beta

    def moments(self, x: Any, *constants: Any) -> tuple[Any, Any]:
        """``(mu, sigma^2)`` per channel, ``(C,)`` each (what the moving statistics follow)."""
        raise NotImplementedError

    def normalized(self, x: Any, *constants: Any) -> tuple[Any, Any]:
        """``(xhat, s)``: ``xhat = (x - mu) / s``, ``s = sqrt(sigma^2 + eps)`` per channel."""
        mean, variance = self.moments(x, *constants)
        s = ops.sqrt(variance + self.epsilon)
        return (x - mean) / s, s

    def _params_and_constants(self, args: tuple) -> tuple[list, list]:
        count = int(self.scale) + int(self.center)
        return list(args[:count]), list(args[count:])

    def forward(self, x: Any, *args: Any) -> Any:
        """``y = gamma (x - mu) / s + beta`` with the batch statistics of each channel."""
        params, constants = self._params_and_constants(args)
        return affine(self.normalized(x, *constants)[0], *self.split(params))

    def reference(self, x: Any, *args: Any) -> Any:
        """The same map in stock ops: the moments, then ``keras.ops.batch_normalization``."""
        params, constants = self._params_and_constants(args)
        mean, variance = self.reference_moments(x, *constants)
        gamma, beta = self.split(params)
        return ops.batch_normalization(
            x, mean, variance, axis=-1, offset=beta, scale=gamma, epsilon=self.epsilon
        )

    def reference_moments(self, x: Any, *constants: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def vjp_params(self, m: Any, x: Any, y: Any, *args: Any, sum_batch: bool = True) -> list:
        """``[sum m * xhat, sum m]`` per channel over the batch and its positions, ``(V, C)``
        each. ``sum_batch=False`` raises: the map couples the samples."""
        if not sum_batch:
            raise ValueError(
                f"{self.name}: the training map of BatchNormalization has no per-sample parameter "
                "products (vjp_params(sum_batch=False)): each sample's output depends on the whole "
                "batch through the batch mean mu and variance sigma^2. Use the inference map "
                "(training=False, the moving statistics) for per-example gradients."
            )
        params, constants = self._params_and_constants(args)
        xhat, _ = self.normalized(x, *constants)
        axes = tuple(range(1, len(m.shape) - 1))  # all but V and the channel
        return affine_parameter_products(m, xhat, self.scale, self.center, axes)


class BatchStatistics(_BatchMap):
    """Training: ``y = gamma (x - mu) / s + beta``, ``mu``, ``sigma^2`` (biased) of each channel
    over the batch and positions; ``forward(x, *params)``."""

    def moments(self, x: Any) -> tuple[Any, Any]:
        """``(mu, sigma^2)`` of each channel over all axes but the last, ``sigma^2`` biased."""
        axes = tuple(range(len(x.shape) - 1))
        mean = numerics.mean(x, axis=axes)
        return mean, numerics.mean(ops.square(x - mean), axis=axes)

    def reference_moments(self, x: Any) -> tuple[Any, Any]:
        """``keras.ops.moments`` over all axes but the last."""
        return ops.moments(x, axes=list(range(len(x.shape) - 1)))

    def vjp_input(self, m: Any, x: Any, y: Any, *params: Any) -> Any:
        """``J^T m = (gamma / s) (m - mean(m) 1 - mean(m * xhat) xhat)`` per channel, the means
        over the channel's ``N`` entries of the batch (``J`` is symmetric): ``(V, batch, ...,
        C)`` -> the same shape, each ``v`` on its own."""
        gamma, _ = self.split(params)
        xhat, s = self.normalized(x)
        axes = tuple(range(1, len(m.shape) - 1))
        mean_m = numerics.mean(m, axis=axes, keepdims=True)
        mean_m_xhat = numerics.mean(m * xhat, axis=axes, keepdims=True)
        return (m - mean_m - xhat * mean_m_xhat) * ((1.0 / s) if gamma is None else (gamma / s))


class MaskedBatchStatistics(_BatchMap):
    """Training with a Keras mask: ``forward(x, *params, mask)``, ``mask`` ``(batch, ...)``, the
    statistics over the unmasked entries as Keras takes them (``batch_moments``), ``y`` at every
    entry."""

    def moments(self, x: Any, mask: Any) -> tuple[Any, Any]:
        """Keras' masked ``(mu, sigma^2)`` per channel (``batch_moments.masked_moments``)."""
        return masked_moments(x, mask)[:2]

    def reference_moments(self, x: Any, mask: Any) -> tuple[Any, Any]:
        """Keras' masked moments (the forward's: they are the definition being matched)."""
        return masked_moments(x, mask)[:2]

    def vjp_input(self, m: Any, x: Any, y: Any, *args: Any) -> Any:
        """``J^T m`` of ``batch_moments`` per channel (``masked_input_product``)."""
        params, (mask,) = self._params_and_constants(args)
        gamma, _ = self.split(params)
        return masked_input_product(m, x, mask, gamma, self.epsilon)
