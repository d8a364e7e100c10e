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
  is the map of ``batch_forward``, ``batch_reference`` and ``batch_backward``, which ``call``
  routes in training.
* Inference: ``y = gamma (x - m) / sqrt(v + eps) + beta`` with the moving mean ``m`` and variance
  ``v``: a diagonal ``J_x y = diag(gamma / sqrt(v + eps))`` per entry, and per sample
  ``J_{gamma,beta} y = [diag(xhat) | I]``. This is the map of the layer's own ``forward``,
  ``backward`` and ``per_example_backward``, which Algorithm 1 (``tf_jacbp.jacobian``) walks.

theta holds ``gamma`` then ``beta`` (those that exist). The moving statistics are not parameters:
they are updated as Keras updates them, ``m <- momentum m + (1 - momentum) mu`` and
``v <- momentum v + (1 - momentum) sigma^2`` (the biased variance), on every training call.

With a Keras mask (``call(..., mask=...)``, shape ``(batch, ...)``), training takes ``mu`` and
``sigma^2`` over the unmasked entries as Keras does, and its backward pass is the masked Jacobian
of ``tf_jacbp.layers.batch_moments``; inference ignores the mask. The mask passes through.
"""

from __future__ import annotations

import numbers
from typing import Any

from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import _WEIGHT_OPTIONS, JacobianLayer, as_float_tensor
from tf_jacbp.layers.batch_moments import masked_backward, masked_moments
from tf_jacbp.route import Map, route


def _channel_axes(x: tf.Tensor) -> list[int]:
    """The axes a channel's statistics reduce over: all but the last."""
    return list(range(len(x.shape) - 1))


def _sample_axes(x: tf.Tensor) -> list[int]:
    """The axes between the batch axis and the channel axis (the spatial ones; none for 2-D)."""
    return list(range(1, len(x.shape) - 1))


class _Normalization(JacobianLayer):
    """What ``BatchNormalization`` and ``LayerNormalization`` share: the weight options of
    ``gamma``, ``beta`` (and BN's moving statistics), stored and serialized as Keras stores them,
    the weights made float32 under mixed precision (not autocast), ``theta = [gamma, beta]``
    read in ``statistics_dtype``, and ``get_config``.

    A subclass lists the arguments its config holds as they are stored in ``config_arguments``,
    passes its options (``<weight>_<initializer|regularizer|constraint>``) to
    ``set_weight_options``, and sets ``self.gamma``, ``self.beta`` (None for those that do not
    exist).
    """

    config_arguments: tuple[str, ...] = ()

    def set_weight_options(self, **options: Any) -> None:
        """Store each ``<weight>_<initializer|regularizer|constraint>`` via Keras' ``get``, and
        their names in ``weight_options`` (the order ``get_config`` gives them in)."""
        self.weight_options = tuple(options)
        for name, value in options.items():
            setattr(self, name, _WEIGHT_OPTIONS[name.rsplit("_", 1)[1]].get(value))

    def get_config(self) -> dict[str, Any]:
        """Keras' config, then the ``config_arguments`` as stored, then the ``weight_options``
        serialized."""
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self.config_arguments})
        for name in self.weight_options:
            config[name] = _WEIGHT_OPTIONS[name.rsplit("_", 1)[1]].serialize(getattr(self, name))
        return config

    def _weight(self, name: str, shape: tuple, trainable: bool = True) -> keras.Variable:
        """The weight ``name`` of ``shape``, with those of its options that the layer has."""
        options = {
            k: getattr(self, f"{name}_{k}") for k in _WEIGHT_OPTIONS if hasattr(self, f"{name}_{k}")
        }
        return self.add_weight(
            name=name, shape=shape, trainable=trainable, autocast=False, **options
        )

    @property
    def statistics_dtype(self) -> str:
        """The dtype the layer computes in: float32 at least, so float32 for float16/bfloat16
        compute dtypes (as Keras)."""
        return keras.backend.result_type(self.compute_dtype, "float32")

    def jacobian_parameters(self) -> list[keras.Variable]:
        """``[gamma, beta]`` (theta order), without those that do not exist."""
        return [v for v in (self.gamma, self.beta) if v is not None]

    def read_parameters(self) -> list[tf.Tensor]:
        """``gamma``, ``beta`` as tensors of ``statistics_dtype`` (float32 under mixed
        precision)."""
        return [
            tf.cast(tf.convert_to_tensor(v), self.statistics_dtype)
            for v in self.jacobian_parameters()
        ]


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

    def split_parameters(self, params: tuple) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        """``(gamma, beta)`` from the positional parameters, ``None`` for those turned off."""
        params = list(params)
        gamma = params.pop(0) if self.scale else None
        beta = params.pop(0) if self.center else None
        return gamma, beta

    def affine(self, xhat: tf.Tensor, *params: tf.Tensor) -> tf.Tensor:
        """``y = gamma xhat + beta``."""
        gamma, beta = self.split_parameters(params)
        y = xhat if gamma is None else gamma * xhat
        return y if beta is None else y + beta

    def parameter_gradients(
        self, dy: tf.Tensor, xhat: tf.Tensor, axes: list[int]
    ) -> list[tf.Tensor]:
        """``[dgamma, dbeta] = [xhat^T delta, 1^T delta]``, summed over ``axes``."""
        grads = [tf.reduce_sum(dy * xhat, axis=axes)] if self.scale else []
        return grads + ([tf.reduce_sum(dy, axis=axes)] if self.center else [])

    def moving_statistics(self, dtype: Any = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(m, v)``, the moving mean and variance, as tensors (default ``statistics_dtype``)."""
        dtype = dtype or self.statistics_dtype
        return (
            tf.cast(tf.convert_to_tensor(self.moving_mean), dtype),
            tf.cast(tf.convert_to_tensor(self.moving_variance), dtype),
        )

    # (a)-(c) of the inference map, y = gamma (x - m) / sqrt(v + eps) + beta.

    def moving_normalized(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(xhat, 1 / sqrt(v + eps))`` with ``xhat = (x - m) / sqrt(v + eps)``, the moving
        statistics read now (they are not trainable, so reading them inside the custom gradient
        is allowed)."""
        mean, variance = self.moving_statistics(x.dtype)
        inverse = 1.0 / tf.sqrt(variance + self.epsilon)
        return (x - mean) * inverse, inverse

    def forward(self, x: tf.Tensor, *params: tf.Tensor) -> tf.Tensor:
        """Inference: ``y = gamma (x - m) / sqrt(v + eps) + beta``, any shape
        ``(batch, ..., C)``."""
        return self.affine(self.moving_normalized(x)[0], *params)

    def reference(self, x: tf.Tensor, *params: tf.Tensor) -> tf.Tensor:
        mean, variance = self.moving_statistics(x.dtype)
        gamma, beta = self.split_parameters(params)
        return tf.nn.batch_normalization(x, mean, variance, beta, gamma, self.epsilon)

    def backward(self, dy, x, y, *params):
        """Inference: ``dx = gamma / sqrt(v + eps) * delta``; ``dgamma = sum xhat * delta``,
        ``dbeta = sum delta`` over the batch and positions."""
        return self._moving_gradients(dy, x, params, _channel_axes(x))

    def per_example_backward(self, dy, x, y, *params):
        """Inference, per sample: ``dgamma_i = sum xhat_i * delta_i``, ``dbeta_i = sum delta_i``
        over the spatial positions, shape ``(batch, C)``."""
        return self._moving_gradients(dy, x, params, _sample_axes(x))

    def _moving_gradients(self, dy, x, params, axes):
        gamma, _ = self.split_parameters(params)
        xhat, inverse = self.moving_normalized(x)
        diagonal = inverse if gamma is None else gamma * inverse
        return diagonal * dy, self.parameter_gradients(dy, xhat, axes)

    # (a)-(c) of the training map, y = gamma (x - mu) / s + beta with the batch's mu and s.

    def batch_statistics(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(mu, sigma^2)`` of each channel over the batch (and positions), ``sigma^2`` biased
        (divided by ``N``)."""
        axes = _channel_axes(x)
        mean = tf.reduce_mean(x, axis=axes)
        return mean, tf.reduce_mean(tf.square(x - mean), axis=axes)

    def batch_normalized(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(xhat, s)``: ``xhat = (x - mu) / s``, ``s = sqrt(sigma^2 + eps)`` per channel."""
        mean, variance = self.batch_statistics(x)
        s = tf.sqrt(variance + self.epsilon)
        return (x - mean) / s, s

    def batch_forward(self, x: tf.Tensor, *params: tf.Tensor) -> tf.Tensor:
        """Training: ``y = gamma (x - mu) / s + beta`` with the batch statistics of each channel."""
        return self.affine(self.batch_normalized(x)[0], *params)

    def batch_reference(self, x: tf.Tensor, *params: tf.Tensor) -> tf.Tensor:
        """Training, in stock ops: ``tf.nn.moments``, then ``tf.nn.batch_normalization``."""
        mean, variance = tf.nn.moments(x, axes=_channel_axes(x))
        gamma, beta = self.split_parameters(params)
        return tf.nn.batch_normalization(x, mean, variance, beta, gamma, self.epsilon)

    def batch_backward(
        self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor, *params: tf.Tensor
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Training: ``J^T delta`` of the module docstring per channel,
        ``dx = (gamma / s) (delta - mean(delta) - xhat mean(delta * xhat))``;
        ``dgamma = sum(delta * xhat)``, ``dbeta = sum(delta)``.

        The batch statistics are computed from ``x`` again (in a compiled step TensorFlow's graph
        optimizer merges them with the forward's). This is the backward pass ``fit`` applies to a
        trainable layer in training mode.
        """
        axes = _channel_axes(x)
        gamma, _ = self.split_parameters(params)
        xhat, s = self.batch_normalized(x)
        dgamma = tf.reduce_sum(dy * xhat, axis=axes)
        n = tf.cast(tf.size(dy) // tf.shape(dy)[-1], dy.dtype)
        projected = dy - tf.reduce_mean(dy, axis=axes) - xhat * (dgamma / n)
        factor = 1.0 / s if gamma is None else gamma / s
        return factor * projected, self.parameter_gradients(dy, xhat, axes)

    # The training map with a mask (a constant of the map): tf_jacbp.layers.batch_moments.

    def masked_forward(self, x: tf.Tensor, *params_and_mask: tf.Tensor) -> tf.Tensor:
        """Training with ``mask`` (the last argument, ``(batch, ...)``): ``y = gamma (x - mu) / s
        + beta`` at every entry, ``mu``, ``s`` over the unmasked entries (Keras' masked moments)."""
        *params, mask = params_and_mask
        mean, variance, _ = masked_moments(x, mask)
        return self.affine((x - mean) / tf.sqrt(variance + self.epsilon), *params)

    def masked_reference(self, x: tf.Tensor, *params_and_mask: tf.Tensor) -> tf.Tensor:
        """Training with ``mask``, in stock ops: Keras' masked moments, then
        ``tf.nn.batch_normalization``."""
        *params, mask = params_and_mask
        mean, variance, _ = masked_moments(x, mask)
        gamma, beta = self.split_parameters(params)
        return tf.nn.batch_normalization(x, mean, variance, beta, gamma, self.epsilon)

    def masked_backward(
        self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor, *params_and_mask: tf.Tensor
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Training with ``mask``: ``dx = (gamma / s) (delta - (m/N') sum(delta) - (m/N')
        (xhat - a) sum(delta * xhat))``, sums over every entry of the channel (docs/batchnorm.md);
        ``dgamma = sum(delta * xhat)``, ``dbeta = sum(delta)``."""
        *params, mask = params_and_mask
        gamma, _ = self.split_parameters(params)
        dx, xhat = masked_backward(dy, x, mask, gamma, self.epsilon)
        return dx, self.parameter_gradients(dy, xhat, _channel_axes(x))

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
                "batch."
            )
        return [(self, self.read_parameters())]

    def call(
        self, inputs: tf.Tensor, training: bool | None = None, mask: tf.Tensor | None = None
    ) -> tf.Tensor:
        """Training (``training`` and ``trainable``): the training map, its backward pass
        ``batch_backward`` (``masked_backward`` with a ``mask`` of shape ``(batch, ...)``), then the
        moving statistics updated. Otherwise the inference map, its backward pass ``backward``."""
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                f"BatchNormalization '{self.name}': the mask must have one dimension less than "
                f"the inputs (no channel axis), got mask.shape={tuple(mask.shape)} for "
                f"inputs.shape={tuple(inputs.shape)}. Give a mask of shape "
                f"{tuple(inputs.shape[:-1])}."
            )
        x = tf.cast(inputs, self.statistics_dtype)
        params = self.read_parameters()
        if training and self.trainable and mask is not None:
            mask = tf.cast(mask, tf.bool)
            training_map = Map(self.masked_forward, self.masked_reference, self.masked_backward)
            y = route(training_map, x, params, constants=[mask])
            self.update_moving_statistics(*masked_moments(x, mask)[:2])
        elif training and self.trainable:
            training_map = Map(self.batch_forward, self.batch_reference, self.batch_backward)
            y = route(training_map, x, params)
            self.update_moving_statistics(*self.batch_statistics(x))
        else:
            y = route(self, x, params)
        return tf.cast(y, self.compute_dtype)

    def update_moving_statistics(self, mean: tf.Tensor, variance: tf.Tensor) -> None:
        """``m <- momentum m + (1 - momentum) mu``, ``v <- momentum v + (1 - momentum) sigma^2``:
        Keras' formula, with ``sigma^2`` the biased batch variance."""
        moving_mean, moving_variance = self.moving_statistics(mean.dtype)
        self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def jacobian_factors(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        """Inference, one sample ``x`` (shape ``(..., C)``, ``n`` entries, row-major):
        ``{"D": (n, n), "[diag(xhat) | I]": (n, |theta|)}``.

        ``D = diag(gamma / sqrt(v + eps))`` per entry. For a sample ``(C,)`` the parameter Jacobian
        is literally ``[diag(xhat) | I_C]``; for ``(H, W, C)`` each position contributes such a
        block of rows (``gamma_c`` and ``beta_c`` act on every position of channel ``c``). Without
        ``scale`` (``center``) the ``diag(xhat)`` (``I``) block and its key part are left out.
        """
        x = as_float_tensor(x, self.statistics_dtype)
        gamma, _ = self.split_parameters([tf.cast(p, x.dtype) for p in self.read_parameters()])
        mean, variance = self.moving_statistics(x.dtype)
        inverse = 1.0 / tf.sqrt(variance + self.epsilon)
        diagonal = tf.broadcast_to(inverse if gamma is None else gamma * inverse, tf.shape(x))
        xhat = (x - mean) * inverse
        channels = int(x.shape[-1])
        eye = tf.eye(channels, dtype=x.dtype)
        blocks, names = [], []
        if self.scale:
            blocks.append(tf.reshape(xhat[..., None] * eye, [-1, channels]))
            names.append("diag(xhat)")
        if self.center:
            blocks.append(tf.reshape(tf.broadcast_to(eye, [*x.shape, channels]), [-1, channels]))
            names.append("I")
        factors = {"D": tf.linalg.diag(tf.reshape(diagonal, [-1]))}
        if blocks:
            factors[f"[{' | '.join(names)}]"] = tf.concat(blocks, axis=-1)
        return factors

    def batch_jacobian(self, x: Any, per_channel: bool = False) -> tf.Tensor:
        """The train-mode Jacobian of the batch map ``x -> y`` at a batch ``x``, from the formula
        ``J_c = (gamma_c / s_c) (I - (1/N) 1 1^T - (1/N) xhat_c xhat_c^T)`` of each channel.

        ``x``: ``(batch, ..., C)``, ``N = batch * ...`` entries per channel. Returns ``(N C, N C)``
        with rows and columns in the row-major order of ``x`` (the channel varies fastest); entries
        of different channels are zero. With ``per_channel=True``: the ``C`` nonzero blocks
        ``(C, N, N)``, block ``c`` over the entries of channel ``c`` in row-major order.
        """
        x = as_float_tensor(x, self.statistics_dtype)
        channels = int(x.shape[-1])
        params = [tf.cast(p, x.dtype) for p in self.read_parameters()]
        xhat, s = self.batch_normalized(x)  # the statistics of a training call, per channel
        xhat = tf.transpose(tf.reshape(xhat, [-1, channels]))  # (C, N): row c, channel c
        n = tf.cast(tf.shape(xhat)[1], x.dtype)
        gamma, _ = self.split_parameters(params)
        factor = (1.0 if gamma is None else gamma) / s
        eye = tf.eye(tf.shape(xhat)[1], dtype=x.dtype)
        blocks = factor[:, None, None] * (eye - 1.0 / n - xhat[:, :, None] * xhat[:, None, :] / n)
        if per_channel:
            return blocks
        full = tf.einsum("cnm,cd->ncmd", blocks, tf.eye(channels, dtype=x.dtype))
        size = tf.size(x)
        return tf.reshape(full, [size, size])
