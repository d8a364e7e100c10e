"""Layer normalization with its per-sample Jacobian (docs/layernorm.md).

Each sample is normalized on its own, over the normalized axes (default: the last). Fix one
sample and one position of the other axes, and collect the ``n`` entries it normalizes in a vector
``x`` (``n = d`` for the default ``axis=-1`` and inputs ``(batch, ..., d)``). With ``1`` the
vector of ones:

    mu = (1/n) 1^T x,   sigma^2 = (1/n) ||x - mu 1||^2 (biased),   s = sqrt(sigma^2 + eps),
    xhat = (x - mu 1) / s,   y = gamma * xhat + beta            (gamma, beta: n entries each)

and its Jacobian (the batch-norm derivation of docs/batchnorm.md, over the sample's entries
instead of the batch's) is

    J_x y = diag(gamma) (1/s) (I - (1/n) 1 1^T - (1/n) xhat xhat^T)        (n x n),

so with ``g = gamma * delta``: ``dx = J^T delta = (1/s) (g - mean(g) 1 - mean(g * xhat) xhat)``,
and ``J_gamma y = diag(xhat)``, ``J_beta y = I`` give ``dgamma = sum delta * xhat``,
``dbeta = sum delta`` over the batch and the positions that are not normalized. Unlike batch
normalization this is a per-sample map: sample ``i``'s output depends on ``x_i`` only, so
Algorithm 1 and per-example gradients apply.

``rms_scaling=True`` (deprecated by Keras, kept for its configs) is Keras 3's ``y = gamma * x / s``
(not centered, no ``beta``; ``s`` from the centered variance as above): with ``u = x / s``,
``J_x y = diag(gamma) (1/s) (I - (1/n) u xhat^T)`` and ``dx = (1/s) (g - mean(g * u) xhat)``,
``dgamma = sum delta * u``.

theta holds ``gamma`` then ``beta`` (those that exist), each of the shape of the normalized axes,
``Vec``-ordered (``tf_jacbp.layout``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

from keras import ops

from tf_jacbp import numerics
from tf_jacbp._backend import keras
from tf_jacbp.layers.base import as_float_tensor, route
from tf_jacbp.layers.normalization_base import _Normalization

__all__ = ["LayerNormalization"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class LayerNormalization(_Normalization):
    """Layer normalization with explicit Jacobians; arguments as
    ``keras.layers.LayerNormalization``.

    Args:
        axis: the axis or list of axes to normalize over (default ``-1``); not the batch axis 0.
            ``gamma`` and ``beta`` have the shape of these axes.
        epsilon: ``eps`` in ``s = sqrt(sigma^2 + eps)``.
        center: whether ``y`` has the offset ``beta``.
        scale: whether ``y`` has the scale ``gamma``.
        rms_scaling: Keras 3's deprecated ``y = gamma * x / s`` (no centering, no ``beta``);
            warns as Keras does.
        beta_initializer, gamma_initializer, beta_regularizer, gamma_regularizer,
        beta_constraint, gamma_constraint: as in Keras.

    As Keras: the statistics are computed in float32 at least (float16 inputs are not cast down
    first), ``gamma``/``beta`` stay float32 under mixed precision, the output has the compute
    dtype, and a Keras mask passes through unchanged (``supports_masking``).

    Input ``(batch, ...)``, output the same shape.

    Example:
        >>> layer = tf_jacbp.layers.LayerNormalization(dtype="float64")
        >>> x = np.random.default_rng(0).normal(size=(2, 3))
        >>> layer.input_jacobian(x).shape  # one 3 x 3 Jacobian per sample
        TensorShape([2, 3, 3])
    """

    config_arguments = ("axis", "epsilon", "center", "scale", "rms_scaling")

    def __init__(
        self,
        axis: int | list[int] | tuple[int, ...] = -1,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        rms_scaling: bool = False,
        **kwargs: Any,
    ):
        if rms_scaling:
            warnings.warn(
                "LayerNormalization: rms_scaling=True is deprecated in Keras 3 (it scales the "
                "input by the variance, not the root mean square); tf_jacbp computes the same map "
                "as keras.layers.LayerNormalization(rms_scaling=True).",
                stacklevel=2,
            )
        super().__init__(**kwargs)
        if isinstance(axis, (list, tuple)) and axis and all(_is_int(a) for a in axis):
            self.axis = [int(a) for a in axis]
        elif _is_int(axis):
            self.axis = int(axis)
        else:
            raise TypeError(
                "LayerNormalization: axis must be an int or a non-empty list/tuple of ints (the "
                f"axes to normalize over, e.g. -1), got axis={axis!r}."
            )
        if (
            isinstance(epsilon, bool)
            or not isinstance(epsilon, numbers.Real)
            or not (math.isfinite(epsilon) and epsilon >= 0)
        ):
            raise ValueError(
                "LayerNormalization: epsilon must be a finite number >= 0, got "
                f"epsilon={epsilon!r}."
            )
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.rms_scaling = bool(rms_scaling)
        self.set_weight_options(
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
        )
        self.gamma = self.beta = None
        self.supports_masking = True
        self.autocast = False  # as Keras: inputs are not cast to float16 before the statistics

    @property
    def has_gamma(self) -> bool:
        """``gamma`` exists iff ``scale`` or ``rms_scaling`` (as Keras)."""
        return self.scale or self.rms_scaling

    @property
    def has_beta(self) -> bool:
        """``beta`` exists iff ``center`` and not ``rms_scaling`` (as Keras)."""
        return self.center and not self.rms_scaling

    def normalized_axes(self, rank: int) -> list[int]:
        """The normalized axes as sorted non-negative indices for inputs of ``rank``, checked.

        The axes are kept as given (as Keras keeps them): ``-1`` is the last axis of an input of
        any rank, ``1`` the second."""
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        if any(not -rank <= a < rank for a in axes):
            raise ValueError(
                f"LayerNormalization '{self.name}': axis={self.axis} is out of bounds for inputs "
                f"of rank {rank}. Give axes in [-{rank}, {rank - 1}]."
            )
        positive = sorted({a % rank for a in axes})
        if len(positive) != len(axes):
            raise ValueError(
                f"LayerNormalization '{self.name}': axis={self.axis} names an axis twice."
            )
        if 0 in positive:
            raise ValueError(
                f"LayerNormalization '{self.name}': axis={self.axis} includes the batch axis 0. "
                "tf_jacbp normalizes each sample on its own (a per-sample Jacobian); normalize "
                f"over axes 1 and up (e.g. axis=-1); here the inputs have rank {rank}."
            )
        return positive

    def build(self, input_shape: tuple) -> None:
        rank = len(input_shape)
        if rank < 2:
            raise ValueError(
                f"LayerNormalization '{self.name}' expects inputs of shape (batch, ...), got "
                f"input shape {tuple(input_shape)}."
            )
        axes = self.normalized_axes(rank)
        shape = tuple(input_shape[a] for a in axes)
        if None in shape:
            raise ValueError(
                f"LayerNormalization '{self.name}': the normalized axes {axes} of the input shape "
                f"{tuple(input_shape)} must be known; give keras.Input a full shape."
            )
        # As Keras after build: the axes as a sorted list (in the sign they were given). Like
        # Keras, no InputSpec: inputs of any rank whose normalized axes have gamma's shape are
        # accepted (check_input_shape).
        self.axis = sorted(self.axis) if isinstance(self.axis, list) else [self.axis]
        if self.has_gamma:
            self.gamma = self._weight("gamma", shape)
        if self.has_beta:
            self.beta = self._weight("beta", shape)

    def check_input_shape(self, input_shape: tuple) -> list[int]:
        """The normalized axes of inputs of ``input_shape`` (``normalized_axes``), after checking
        that their sizes are ``gamma``'s and ``beta``'s shape (sizes unknown now pass)."""
        rank = len(input_shape)
        axes = self.normalized_axes(rank)
        weights = self.jacobian_parameters()
        if weights:
            sizes = tuple(input_shape[a] for a in axes)
            expected = tuple(weights[0].shape)
            if any(s is not None and int(s) != e for s, e in zip(sizes, expected, strict=True)):
                raise ValueError(
                    f"LayerNormalization '{self.name}': the normalized axes axis={self.axis} "
                    f"(axes {axes}) of the input shape {tuple(input_shape)} have sizes {sizes}, "
                    f"but gamma and beta have shape {expected} (the layer was built for them). "
                    f"Give inputs whose axes {axes} have sizes {expected}."
                )
        return axes

    # Shapes: x is (batch, ...); gamma, beta have the shape of the normalized axes and are
    # reshaped to broadcast against x (1 on the other axes), and so against m (V, batch, ...).

    def _split(self, x: Any, params: tuple) -> tuple[Any | None, Any | None]:
        """``(gamma, beta)`` reshaped to broadcast against ``x``, None for those that do not
        exist."""
        rank = len(x.shape)
        axes = self.check_input_shape(tuple(x.shape))
        params = list(params)

        def broadcast(p: Any) -> Any:
            sizes = iter(p.shape)
            return ops.reshape(p, [int(next(sizes)) if a in axes else 1 for a in range(rank)])

        gamma = broadcast(params.pop(0)) if self.has_gamma else None
        beta = broadcast(params.pop(0)) if self.has_beta else None
        return gamma, beta

    def _statistics(self, x: Any) -> tuple[Any, Any, Any]:
        """``(xhat, s, u)``: ``xhat = (x - mu) / s``, ``s = sqrt(sigma^2 + eps)`` (kept dims),
        ``u = x / s`` (the rms_scaling map's normalized input)."""
        axes = tuple(self.normalized_axes(len(x.shape)))
        mean = numerics.mean(x, axis=axes, keepdims=True)
        centered = x - mean
        variance = numerics.mean(ops.square(centered), axis=axes, keepdims=True)
        s = ops.sqrt(variance + self.epsilon)
        return centered / s, s, x / s

    def forward(self, x: Any, *params: Any) -> Any:
        """``y = gamma * xhat + beta`` (``rms_scaling``: ``gamma * x / s``), shape of ``x``."""
        gamma, beta = self._split(x, params)
        xhat, _, u = self._statistics(x)
        y = u if self.rms_scaling else xhat
        y = y if gamma is None else gamma * y
        return y if beta is None else y + beta

    def reference(self, x: Any, *params: Any) -> Any:
        """Stock ops: ``keras.ops.moments`` over the normalized axes, then
        ``(x - mu) rsqrt(sigma^2 + eps) gamma + beta`` (``rms_scaling``: the variance, then
        ``x rsqrt(sigma^2 + eps) gamma``). The variance of ``rms_scaling`` is
        ``tf_jacbp.numerics.var``: stock ``keras.ops.var`` on TensorFlow; on JAX, where Keras
        computes it in float32, ``jax.numpy``'s float64 one for float64 inputs."""
        axes = self.normalized_axes(len(x.shape))
        gamma, beta = self._split(x, params)
        if self.rms_scaling:
            variance = numerics.var(x, axis=axes, keepdims=True)
            y = x * ops.rsqrt(variance + self.epsilon)
            return y if gamma is None else y * gamma
        mean, variance = ops.moments(x, axes=axes, keepdims=True)
        # Not keras.ops.batch_normalization: on JAX it takes 1-D statistics of one axis only.
        y = (x - mean) * ops.rsqrt(variance + self.epsilon)
        y = y if gamma is None else y * gamma
        return y if beta is None else y + beta

    def vjp_input(self, m: Any, x: Any, y: Any, *params: Any) -> Any:
        """``(J_x y)^T m = (1/s) (g - mean(g) - xhat mean(g * xhat))``, ``g = gamma * m``
        (``rms_scaling``: ``(1/s) (g - xhat mean(g * u))``), the means over the normalized axes
        of each sample and position: ``(V, batch, ...)`` -> the same shape."""
        gamma, _ = self._split(x, params)
        xhat, s, u = self._statistics(x)
        axes = tuple(a + 1 for a in self.normalized_axes(len(x.shape)))  # axes of m
        g = m if gamma is None else gamma * m
        if self.rms_scaling:
            return (g - xhat * numerics.mean(g * u, axis=axes, keepdims=True)) / s
        mean_g = numerics.mean(g, axis=axes, keepdims=True)
        return (g - mean_g - xhat * numerics.mean(g * xhat, axis=axes, keepdims=True)) / s

    def vjp_params(self, m: Any, x: Any, y: Any, *params: Any, sum_batch: bool = True) -> list:
        """``[(J_gamma y)^T m, (J_beta y)^T m] = [sum m * xhat, sum m]`` (``rms_scaling``:
        ``m * u``) over the axes that are not normalized: the batch too (``(V, *gamma.shape)``),
        or not (``sum_batch=False``: ``(V, batch, *gamma.shape)``)."""
        rank = len(x.shape)
        normalized = self.normalized_axes(rank)
        first = 1 if sum_batch else 2  # axes of m: V, batch, then x's axes 1, 2, ...
        summed = tuple(a for a in range(first, rank + 1) if a - 1 not in normalized)
        grads = []
        if self.has_gamma:
            xhat, _, u = self._statistics(x)
            grads.append(ops.sum(m * (u if self.rms_scaling else xhat), axis=summed))
        if self.has_beta:
            grads.append(ops.sum(m, axis=summed))
        return grads

    def call(self, inputs: Any) -> Any:
        """``y`` by ``route``, in float32 at least, cast to the compute dtype."""
        dtype = numerics.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        y = route(self, x, [ops.cast(p, dtype) for p in self.read_parameters()])
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """The input shape, after ``check_input_shape``."""
        self.check_input_shape(tuple(input_shape))
        return tuple(input_shape)

    def jacobian_factors(self, x: Any) -> dict[str, Any]:
        """One sample ``x`` (no batch axis, ``size`` entries, row-major):
        ``{"J_x y": (size, size), "[diag(xhat) | I]": (size, |theta|)}`` (from
        ``input_jacobian`` and ``parameter_jacobian``).

        ``J_x y = diag(gamma) (1/s) (I - (1/n) 1 1^T - (1/n) xhat xhat^T)`` per normalized group
        (``rms_scaling``: ``diag(gamma) (1/s) (I - (1/n) u xhat^T)``), zero between groups.
        ``J_gamma y`` has ``xhat_k`` in row ``k``, column ``c(k)`` (the entry of ``gamma`` that
        scales entry ``k``), ``J_beta y`` a 1 there; for a sample ``(d,)`` these are literally
        ``diag(xhat)`` and ``I``, for ``(T, d)`` one such block of rows per position. Columns are
        in ``Vec`` order of ``gamma``'s shape. Without ``scale`` (``center``) the block and its
        key part are left out; with ``rms_scaling`` the block is ``diag(x / s)``.
        """
        x = as_float_tensor(x, self.statistics_dtype)[None]
        factors = {"J_x y": self.input_jacobian(x)[0]}  # (builds the layer if needed)
        names = ["diag(x / s)" if self.rms_scaling else "diag(xhat)"] if self.has_gamma else []
        names += ["I"] if self.has_beta else []
        if names:
            factors[f"[{' | '.join(names)}]"] = self.parameter_jacobian(x)[0]
        return factors
