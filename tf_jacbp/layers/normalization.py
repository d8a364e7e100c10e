"""Batch normalization with explicit Jacobians, in training and inference mode (docs/batchnorm.md).

Per channel ``c`` (the last axis), collect the ``N`` entries of ``x`` over the batch and spatial
axes in a vector ``x`` (``N = batch * H * W`` for images, ``batch`` for features). With ``1`` the
vector of ones:

* Training: ``mu = (1/N) 1^T x``, ``sigma^2 = (1/N) ||x - mu 1||^2`` (biased), ``s =
  sqrt(sigma^2 + eps)``, ``xhat = (x - mu 1) / s``, ``y = gamma xhat + beta 1``. The Jacobian of
  this batch map is symmetric,

      J_x y = (gamma / s) (I - (1/N) 1 1^T - (1/N) xhat xhat^T)      (N x N),

  so ``dx = J^T delta = (gamma / s) (delta - mean(delta) 1 - xhat mean(delta * xhat))``, and
  ``J_gamma y = xhat``, ``J_beta y = 1`` give ``dgamma = xhat^T delta``, ``dbeta = 1^T delta``.
  Channels never mix. Sample ``i``'s output depends on every sample through ``mu`` and
  ``sigma^2``, so there is no per-sample Jacobian: ``jacobian_ops(training=True)`` raises. This
  map is ``training_map()``, a ``BatchStatistics`` of ``tf_jacbp.layers.normalization_modes``,
  which ``call`` routes in training: its ``vjp_input`` is ``J^T m`` for the whole batch and its
  ``vjp_params`` exists only summed over the batch.
* Inference: ``y = gamma (x - m) / sqrt(v + eps) + beta`` with the moving mean ``m`` and variance
  ``v``: a diagonal ``J_x y = diag(gamma / sqrt(v + eps))`` per entry, and per sample
  ``J_{gamma,beta} y = [diag(xhat) | I]``. This is the map of the layer's own ``forward``,
  ``vjp_input`` and ``vjp_params``, which Algorithm 1 (``tf_jacbp.jacobian``) walks.

theta holds ``gamma`` then ``beta`` (those that exist). The moving statistics are not parameters:
they are updated as Keras updates them, ``m <- momentum m + (1 - momentum) mu`` and
``v <- momentum v + (1 - momentum) sigma^2`` (the biased variance), on every training call.

With a Keras mask (``call(..., mask=...)``, shape ``(batch, ...)``), training takes ``mu`` and
``sigma^2`` over the unmasked entries as Keras does: ``training_map(masked=True)``, a
``MaskedBatchStatistics`` whose products are those of the masked Jacobian of
``tf_jacbp.layers.batch_moments``; inference ignores the mask. The mask passes through.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from keras import ops

from tf_jacbp._backend import keras
from tf_jacbp.contract import JacobianMap
from tf_jacbp.layers.base import as_float_tensor, route
from tf_jacbp.layers.normalization_base import _Normalization
from tf_jacbp.layers.normalization_modes import (
    BatchStatistics,
    MaskedBatchStatistics,
    affine,
    affine_parameter_products,
)

__all__ = ["BatchNormalization", "_Normalization"]


@keras.saving.register_keras_serializable(package="tf_jacbp")
class BatchNormalization(_Normalization):
    """Batch normalization over the last axis, like ``keras.layers.BatchNormalization``.

    Args:
        axis: the channel axis; only the last one (``-1``, or its positive index) is supported.
        momentum: ``m <- momentum m + (1 - momentum) mu`` (and the same for ``v``).
        epsilon: ``eps`` in ``sqrt(sigma^2 + eps)``.
        center: whether ``y`` has the offset ``beta``.
        scale: whether ``y`` has the scale ``gamma``.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer, beta_regularizer, gamma_regularizer, beta_constraint,
        gamma_constraint: as in Keras.
        synchronized: must be False (each replica normalizes with its own batch statistics).

    ``call(inputs, training=None)``: training mode (batch statistics, moving statistics updated)
    iff ``training`` is truthy and the layer is ``trainable``, as in Keras; otherwise the moving
    statistics. Like Keras, float16/bfloat16 inputs are normalized in float32 and the result cast
    back; ``gamma``, ``beta`` and the statistics stay float32. ``call(inputs, training, mask)``
    accepts a Keras mask ``(batch, ...)``: in training the batch (and moving) statistics are
    taken over the unmasked entries, as Keras does; the mask passes through (``compute_mask``).
    Batch renormalization is not supported.

    Input ``(batch, ..., C)``, output the same shape.

    Example:
        >>> layer = tf_jacbp.layers.BatchNormalization(dtype="float64")
        >>> x = np.random.default_rng(0).normal(size=(4, 2))
        >>> layer.batch_jacobian(x).shape  # the train-mode Jacobian of the batch map
        TensorShape([8, 8])
    """

    config_arguments = ("axis", "momentum", "epsilon", "center", "scale", "synchronized")

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        synchronized: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if (
            isinstance(axis, bool)
            or not isinstance(axis, numbers.Integral)
            or not (axis == -1 or axis > 0)
        ):
            raise ValueError(
                f"BatchNormalization: only the last axis can be normalized, got axis={axis!r}. "
                "Use axis=-1 with channels_last inputs (move the channel axis last, e.g. with "
                "keras.layers.Permute)."
            )
        if synchronized:
            raise ValueError(
                "BatchNormalization: synchronized=True is not supported: the statistics would "
                "couple the samples of every replica, and so would the Jacobian. Use "
                "synchronized=False (each replica normalizes with its own batch statistics)."
            )
        self.axis = int(axis)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale
        self.synchronized = synchronized
        self.set_weight_options(
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
        )
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.supports_masking = True  # as Keras: the mask passes through unchanged

    def build(self, input_shape: tuple) -> None:
        rank = len(input_shape)
        if rank < 2:
            raise ValueError(
                f"BatchNormalization '{self.name}' expects inputs of shape (batch, ..., channels), "
                f"got input shape {tuple(input_shape)}."
            )
        if self.axis not in (-1, rank - 1):
            raise ValueError(
                f"BatchNormalization '{self.name}': only the last axis can be normalized, got "
                f"axis={self.axis} for inputs of rank {rank}. Use axis=-1 (move the channel axis "
                "last, e.g. with keras.layers.Permute)."
            )
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                f"BatchNormalization '{self.name}': the channel axis of the input shape "
                f"{tuple(input_shape)} must be known; give keras.Input a full shape."
            )
        if self.scale:
            self.gamma = self._weight("gamma", (channels,))
        if self.center:
            self.beta = self._weight("beta", (channels,))
        self.moving_mean = self._weight("moving_mean", (channels,), trainable=False)
        self.moving_variance = self._weight("moving_variance", (channels,), trainable=False)
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={-1: channels})

    def split_parameters(self, params: Any) -> tuple[Any | None, Any | None]:
        """``(gamma, beta)`` from the positional parameters, ``None`` for those turned off."""
        params = list(params)
        gamma = params.pop(0) if self.scale else None
        beta = params.pop(0) if self.center else None
        return gamma, beta

    def moving_statistics(self, dtype: Any = None) -> tuple[Any, Any]:
        """``(m, v)``, the moving mean and variance, as tensors (default ``statistics_dtype``)."""
        dtype = dtype or self.statistics_dtype
        return (
            ops.cast(ops.convert_to_tensor(self.moving_mean), dtype),
            ops.cast(ops.convert_to_tensor(self.moving_variance), dtype),
        )

    # The inference map, y = gamma (x - m) / sqrt(v + eps) + beta: the layer's own contract.

    def moving_normalized(self, x: Any) -> tuple[Any, Any]:
        """``(xhat, 1 / sqrt(v + eps))`` with ``xhat = (x - m) / sqrt(v + eps)``, the moving
        statistics read now (they are not trainable, so reading them inside the custom gradient
        is allowed)."""
        mean, variance = self.moving_statistics(x.dtype)
        inverse = 1.0 / ops.sqrt(variance + self.epsilon)
        return (x - mean) * inverse, inverse

    def forward(self, x: Any, *params: Any) -> Any:
        """Inference: ``y = gamma (x - m) / sqrt(v + eps) + beta``, any shape
        ``(batch, ..., C)``."""
        return affine(self.moving_normalized(x)[0], *self.split_parameters(params))

    def reference(self, x: Any, *params: Any) -> Any:
        """Inference in stock ops: ``keras.ops.batch_normalization`` with the moving
        statistics."""
        mean, variance = self.moving_statistics(x.dtype)
        gamma, beta = self.split_parameters(params)
        return ops.batch_normalization(
            x, mean, variance, axis=-1, offset=beta, scale=gamma, epsilon=self.epsilon
        )

    def vjp_input(self, m: Any, x: Any, y: Any, *params: Any) -> Any:
        """Inference: ``J_x y = diag(gamma / sqrt(v + eps))`` per entry, so ``(J_x y)^T m =
        (gamma / sqrt(v + eps)) * m``: ``(V, batch, ..., C)`` -> the same shape."""
        gamma, _ = self.split_parameters(params)
        _, inverse = self.moving_normalized(x)
        return m * (inverse if gamma is None else gamma * inverse)

    def vjp_params(self, m: Any, x: Any, y: Any, *params: Any, sum_batch: bool = True) -> list:
        """Inference: ``J_{gamma,beta} y = [diag(xhat) | I]`` per position, so the products are
        ``[sum m * xhat, sum m]`` per channel over the positions and, with ``sum_batch``, the
        batch: ``(V, C)`` each, or ``(V, batch, C)``."""
        xhat, _ = self.moving_normalized(x)
        axes = tuple(range(1 if sum_batch else 2, len(m.shape) - 1))
        return affine_parameter_products(m, xhat, self.scale, self.center, axes)

    # The training maps (tf_jacbp.layers.normalization_modes).

    def training_map(self, masked: bool = False) -> JacobianMap:
        """The map ``call(..., training=True)`` routes in a trainable layer: ``BatchStatistics``
        (the batch's ``mu``, ``sigma^2`` per channel), or with ``masked`` the
        ``MaskedBatchStatistics`` (Keras' masked moments; the mask is its constant, after the
        parameters). Both couple the samples: their ``vjp_params`` exists only summed over the
        batch. A subclass may return another map here (e.g. a planted bug)."""
        kind = MaskedBatchStatistics if masked else BatchStatistics
        return kind(self.epsilon, self.scale, self.center, name=f"{self.name} ({kind.__name__})")

    def jacobian_ops(self, training: bool = False) -> list:
        """Inference (``training=False``): the layer itself. Training: a ValueError, unless the
        layer is frozen (``trainable=False``), which runs its inference map then too (as Keras)."""
        if training and self.trainable:
            raise ValueError(
                f"BatchNormalization '{self.name}': jacobian_ops(training=True) is not defined. "
                "In training mode each sample's output depends on the whole batch through the "
                "batch mean mu and variance sigma^2, so per-sample Jacobians and per-example "
                "gradients do not exist. training=False (the default) uses the moving statistics, "
                "a per-sample map; batch_jacobian(x) gives the train-mode Jacobian of the whole "
                "batch, training_map() the train-mode map itself."
            )
        return [(self, self.read_parameters())]

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        """Training (``training`` and ``trainable``): ``training_map()`` (``training_map(True)``
        with a ``mask`` of shape ``(batch, ...)``) by ``route``, then the moving statistics
        updated. Otherwise the inference map, the layer itself."""
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                f"BatchNormalization '{self.name}': the mask must have one dimension less than "
                f"the inputs (no channel axis), got mask.shape={tuple(mask.shape)} for "
                f"inputs.shape={tuple(inputs.shape)}. Give a mask of shape "
                f"{tuple(inputs.shape[:-1])}."
            )
        x = ops.cast(inputs, self.statistics_dtype)
        params = self.read_parameters()
        if training and self.trainable:
            constants = [] if mask is None else [ops.cast(mask, "bool")]
            training_map = self.training_map(masked=mask is not None)
            y = route(training_map, x, params, constants=constants)
            self.update_moving_statistics(*training_map.moments(x, *constants))
        else:
            y = route(self, x, params)
        return ops.cast(y, self.compute_dtype)

    def update_moving_statistics(self, mean: Any, variance: Any) -> None:
        """``m <- momentum m + (1 - momentum) mu``, ``v <- momentum v + (1 - momentum) sigma^2``:
        Keras' formula, with ``sigma^2`` the biased batch variance."""
        moving_mean, moving_variance = self.moving_statistics(mean.dtype)
        self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def jacobian_factors(self, x: Any) -> dict[str, Any]:
        """Inference, one sample ``x`` (shape ``(..., C)``, ``n`` entries, row-major):
        ``{"D": (n, n), "[diag(xhat) | I]": (n, |theta|)}`` (from ``input_jacobian`` and
        ``parameter_jacobian``).

        ``D = diag(gamma / sqrt(v + eps))`` per entry. For a sample ``(C,)`` the parameter Jacobian
        is literally ``[diag(xhat) | I_C]``; for ``(H, W, C)`` each position contributes such a
        block of rows (``gamma_c`` and ``beta_c`` act on every position of channel ``c``). Without
        ``scale`` (``center``) the ``diag(xhat)`` (``I``) block and its key part are left out.
        """
        x = as_float_tensor(x, self.statistics_dtype)[None]
        factors = {"D": self.input_jacobian(x)[0]}
        names = ["diag(xhat)"] if self.scale else []
        names += ["I"] if self.center else []
        if names:
            factors[f"[{' | '.join(names)}]"] = self.parameter_jacobian(x)[0]
        return factors

    def batch_jacobian(self, x: Any, per_channel: bool = False) -> Any:
        """The train-mode Jacobian of the batch map ``x -> y`` at a batch ``x``,
        ``J_c = (gamma_c / s_c) (I - (1/N) 1 1^T - (1/N) xhat_c xhat_c^T)`` per channel, from the
        training map's ``vjp_input`` (``V = N`` vectors: ``e_n`` at every channel at once, as
        channels never mix, gives row ``n`` of every ``J_c``).

        ``x``: ``(batch, ..., C)``, ``N = batch * ...`` entries per channel. Returns ``(N C, N C)``
        with rows and columns in the row-major order of ``x`` (the channel varies fastest); entries
        of different channels are zero. With ``per_channel=True``: the ``C`` nonzero blocks
        ``(C, N, N)``, block ``c`` over the entries of channel ``c`` in row-major order.
        """
        x = as_float_tensor(x, self.statistics_dtype)
        if not self.built:
            self.build(tuple(x.shape))
        channels = int(x.shape[-1])
        entries = math.prod(int(d) for d in x.shape) // channels  # N
        params = [ops.cast(p, x.dtype) for p in self.read_parameters()]
        rows = ops.reshape(ops.eye(entries, dtype=x.dtype), (entries, *x.shape[:-1], 1))
        rows = rows * ops.ones_like(x)  # (N, *x.shape): e_n in every channel
        products = self.training_map().vjp_input(rows, x, None, *params)  # row n of each J_c
        blocks = ops.transpose(ops.reshape(products, (entries, entries, channels)), (2, 0, 1))
        if per_channel:
            return blocks
        full = ops.einsum("cnm,cd->ncmd", blocks, ops.eye(channels, dtype=x.dtype))
        size = entries * channels
        return ops.reshape(full, (size, size))
