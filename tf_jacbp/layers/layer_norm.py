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

import numpy as np

from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import as_float_tensor, squared_norms
from tf_jacbp.layers.normalization import _Normalization
from tf_jacbp.layout import vec_index
from tf_jacbp.route import route


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
        """The normalized axes as sorted non-negative indices for inputs of ``rank``, checked."""
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
                "over axes 1 and up (e.g. axis=-1)."
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
        # As Keras after build: the axes as a sorted list (in the sign they were given).
        self.axis = sorted(self.axis) if isinstance(self.axis, list) else [self.axis]
        if self.has_gamma:
            self.gamma = self._weight("gamma", shape)
        if self.has_beta:
            self.beta = self._weight("beta", shape)
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={a: input_shape[a] for a in axes})

    # Shapes: x is (batch, ...); gamma, beta have the shape of the normalized axes and are
    # reshaped to broadcast against x (1 on the other axes).

    def _split(self, x: tf.Tensor, params: tuple) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        """``(gamma, beta)`` reshaped to broadcast against ``x``, None for those that do not
        exist."""
        rank = x.shape.rank
        axes = self.normalized_axes(rank)
        shape = [x.shape[a] if a in axes else 1 for a in range(rank)]
        params = list(params)
        gamma = tf.reshape(params.pop(0), shape) if self.has_gamma else None
        beta = tf.reshape(params.pop(0), shape) if self.has_beta else None
        return gamma, beta

    def _statistics(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(xhat, s, u)``: ``xhat = (x - mu) / s``, ``s = sqrt(sigma^2 + eps)`` (kept dims),
        ``u = x / s`` (the rms_scaling map's normalized input)."""
        axes = self.normalized_axes(x.shape.rank)
        mean = tf.reduce_mean(x, axis=axes, keepdims=True)
        centered = x - mean
        s = tf.sqrt(tf.reduce_mean(tf.square(centered), axis=axes, keepdims=True) + self.epsilon)
        return centered / s, s, x / s

    def forward(self, x: tf.Tensor, *params: tf.Tensor) -> tf.Tensor:
        """``y = gamma * xhat + beta`` (``rms_scaling``: ``gamma * x / s``), shape of ``x``."""
        gamma, beta = self._split(x, params)
        xhat, _, u = self._statistics(x)
        y = u if self.rms_scaling else xhat
        y = y if gamma is None else gamma * y
        return y if beta is None else y + beta

    def reference(self, x: tf.Tensor, *params: tf.Tensor) -> tf.Tensor:
        """Stock ops: ``tf.nn.moments`` and ``tf.nn.batch_normalization`` over the normalized
        axes (``rms_scaling``: ``tf.math.reduce_variance`` and ``tf.math.rsqrt``)."""
        axes = self.normalized_axes(x.shape.rank)
        gamma, beta = self._split(x, params)
        if self.rms_scaling:
            variance = tf.math.reduce_variance(x, axis=axes, keepdims=True)
            y = x * tf.math.rsqrt(variance + self.epsilon)
            return y if gamma is None else y * gamma
        mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
        return tf.nn.batch_normalization(x, mean, variance, beta, gamma, self.epsilon)

    def _input_gradient(self, dy: tf.Tensor, x: tf.Tensor, gamma: tf.Tensor | None) -> tf.Tensor:
        """``dx = (1/s) (g - mean(g) - xhat mean(g * xhat))``, ``g = gamma * delta``
        (``rms_scaling``: ``(1/s) (g - xhat mean(g * u))``), means over the normalized axes."""
        axes = self.normalized_axes(x.shape.rank)
        xhat, s, u = self._statistics(x)
        g = dy if gamma is None else gamma * dy
        if self.rms_scaling:
            return (g - xhat * tf.reduce_mean(g * u, axis=axes, keepdims=True)) / s
        mean_g = tf.reduce_mean(g, axis=axes, keepdims=True)
        return (g - mean_g - xhat * tf.reduce_mean(g * xhat, axis=axes, keepdims=True)) / s

    def _parameter_gradients(
        self, dy: tf.Tensor, x: tf.Tensor, per_example: bool
    ) -> list[tf.Tensor]:
        """``[dgamma, dbeta] = [sum delta * xhat, sum delta]`` (``rms_scaling``: ``delta * u``)
        over the axes not normalized: the batch too, or not (``per_example``: a leading batch
        axis)."""
        rank = x.shape.rank
        axes = self.normalized_axes(rank)
        summed = [a for a in range(1 if per_example else 0, rank) if a not in axes]
        grads = []
        if self.has_gamma:
            xhat, _, u = self._statistics(x)
            grads.append(tf.reduce_sum(dy * (u if self.rms_scaling else xhat), axis=summed))
        if self.has_beta:
            grads.append(tf.reduce_sum(dy, axis=summed))
        return grads

    def backward(self, dy, x, y, *params):
        """``(J_x y)^T delta`` and ``[dgamma, dbeta]`` summed over the batch (module
        docstring)."""
        gamma, _ = self._split(x, params)
        return self._input_gradient(dy, x, gamma), self._parameter_gradients(dy, x, False)

    def per_example_backward(self, dy, x, y, *params):
        """``backward`` per sample: ``dgamma_i = sum delta_i * xhat_i``, ``dbeta_i = sum
        delta_i`` over the positions not normalized, shape ``(batch, *gamma.shape)``."""
        gamma, _ = self._split(x, params)
        return self._input_gradient(dy, x, gamma), self._parameter_gradients(dy, x, True)

    def per_example_squared_norms(self, dy, x, y, *params):
        """``[||dgamma_i||^2, ||dbeta_i||^2]``, each ``(batch,)``: the per-example gradients
        have the size of ``gamma`` only, so they are formed (no input gradient)."""
        return [squared_norms(g) for g in self._parameter_gradients(dy, x, True)]

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        """``y`` by ``route``, in float32 at least, cast to the compute dtype."""
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = tf.cast(inputs, dtype)
        y = route(self, x, [tf.cast(p, dtype) for p in self.read_parameters()])
        return tf.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    # (d) Materialized Jacobians.

    def _grouped(self, sample_shape: tuple) -> tuple[list[int], np.ndarray, int, int]:
        """The permutation that puts a sample's normalized axes last, ``(perm, order, G, n)``:
        after ``transpose(x_i, perm)`` and a reshape to ``(G, n)``, row ``g`` holds the ``n``
        entries normalized together; ``order[k]`` is the row-major position in ``x_i`` of entry
        ``k`` of that ``(G, n)`` layout."""
        rank = len(sample_shape) + 1
        axes = [a - 1 for a in self.normalized_axes(rank)]
        others = [a for a in range(rank - 1) if a not in axes]
        perm = others + axes
        n = int(np.prod([sample_shape[a] for a in axes]))
        size = int(np.prod(sample_shape))
        order = np.transpose(np.arange(size).reshape(sample_shape), perm).reshape(-1)
        return perm, order, size // n, n

    def input_jacobian(self, x: Any) -> tf.Tensor:
        """``J_x y`` of each sample, from the formula
        ``diag(gamma) (1/s) (I - (1/n) 1 1^T - (1/n) xhat xhat^T)`` per normalized group
        (``rms_scaling``: ``diag(gamma) (1/s) (I - (1/n) u xhat^T)``).

        ``x``: ``(batch, ...)`` -> ``(batch, size, size)``, ``size`` the entries of one sample,
        rows and columns in the row-major order of the sample. Entries of different groups (other
        positions of the axes not normalized) do not interact: those blocks are zero.
        """
        x = as_float_tensor(x, self.statistics_dtype)
        if not self.built:  # gamma and beta are created for this input shape, as a call would
            self.build((None, *x.shape[1:]))
        params = [tf.cast(p, x.dtype) for p in self.read_parameters()]
        sample_shape = tuple(x.shape[1:])
        perm, order, groups, n = self._grouped(sample_shape)
        batch = int(x.shape[0])
        v = tf.reshape(tf.transpose(x, [0] + [p + 1 for p in perm]), [batch, groups, n])
        mean = tf.reduce_mean(v, axis=-1, keepdims=True)
        s = tf.sqrt(tf.reduce_mean(tf.square(v - mean), axis=-1, keepdims=True) + self.epsilon)
        xhat = (v - mean) / s
        left = v / s if self.rms_scaling else xhat
        eye = tf.eye(n, dtype=x.dtype)
        block = eye - left[..., :, None] * xhat[..., None, :] / n
        if not self.rms_scaling:
            block -= 1.0 / n
        block /= s[..., None]  # (batch, G, n, n)
        if self.has_gamma:
            block *= tf.reshape(params[0], [n, 1])  # diag(gamma) on the left: row k times gamma_k
        full = tf.einsum("bgkl,gh->bgkhl", block, tf.eye(groups, dtype=x.dtype))
        full = tf.reshape(full, [batch, groups * n, groups * n])
        back = np.argsort(order)  # row-major position -> position in the (G, n) layout
        return tf.gather(tf.gather(full, back, axis=1), back, axis=2)

    def jacobian_factors(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        """One sample ``x`` (no batch axis, ``size`` entries, row-major):
        ``{"J_x y": (size, size), "[diag(xhat) | I]": (size, |theta|)}``.

        ``J_gamma y`` has ``xhat_k`` in row ``k``, column ``c(k)`` (the entry of ``gamma`` that
        scales entry ``k``), ``J_beta y`` a 1 there; for a sample ``(d,)`` these are literally
        ``diag(xhat)`` and ``I``, for ``(T, d)`` one such block of rows per position. Columns are
        in ``Vec`` order of ``gamma``'s shape. Without ``scale`` (``center``) the block and its
        key part are left out; with ``rms_scaling`` the block is ``diag(x / s)``.
        """
        x = as_float_tensor(x, self.statistics_dtype)
        factors = {"J_x y": self.input_jacobian(x[None])[0]}  # (builds the layer if needed)
        if not self.jacobian_parameters():
            return factors
        sample_shape = tuple(x.shape)
        perm, order, groups, n = self._grouped(sample_shape)
        v = tf.reshape(tf.transpose(x, perm), [groups, n])
        mean = tf.reduce_mean(v, axis=-1, keepdims=True)
        s = tf.sqrt(tf.reduce_mean(tf.square(v - mean), axis=-1, keepdims=True) + self.epsilon)
        eye = tf.eye(n, dtype=x.dtype)
        blocks, names = [], []
        if self.has_gamma:
            scaled = v / s if self.rms_scaling else (v - mean) / s
            blocks.append(tf.reshape(scaled[..., None] * eye, [groups * n, n]))
            names.append("diag(x / s)" if self.rms_scaling else "diag(xhat)")
        if self.has_beta:
            blocks.append(tf.reshape(tf.broadcast_to(eye, [groups, n, n]), [groups * n, n]))
            names.append("I")
        back = np.argsort(order)
        # Columns: gamma's row-major index c -> its Vec position, vec_index(shape)[c].
        shape = tuple(self.jacobian_parameters()[0].shape)
        columns = np.argsort(vec_index(shape).reshape(-1))
        blocks = [tf.gather(tf.gather(b, back, axis=0), columns, axis=1) for b in blocks]
        factors[f"[{' | '.join(names)}]"] = tf.concat(blocks, axis=-1)
        return factors
