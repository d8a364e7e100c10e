"""Dropout with explicit Jacobians: a random 0/scale diagonal in training, the identity otherwise.

Training, with rate ``r`` and a keep mask ``k`` (``k_j = 1`` with probability ``1 - r``, else 0,
drawn over ``noise_shape`` and broadcast to ``x``): ``y = x * k / (1 - r)``, so

    J_x y = diag(k / (1 - r)),    (J_x y)^T delta = delta * k / (1 - r),

a diagonal of zeros and ``1 / (1 - r)``. The Jacobian route keeps the mask its forward pass drew
and the backward pass multiplies by the same one. Given the mask the map is elementwise, so
per-sample Jacobians exist; each training call draws a new mask. Inference: ``y = x``, ``J = I``.

The mask is drawn as Keras draws it: a seed from the layer's ``keras.random.SeedGenerator``
(advanced once per training call; works in graph mode and under ``jit_compile=True``), then
``tf.random.stateless_uniform(noise_shape, seed) >= r``. The reference route is
``tf.nn.experimental.stateless_dropout`` with that seed, which samples the same uniforms (the
tests check the masks agree), so both routes and ``keras.layers.Dropout`` with the same seed
state drop the same entries. Compiled with XLA, the stateless random ops give other numbers
than TensorFlow's own kernels for the same seed (measured on CPU, even with an explicit
``alg``), so an XLA-compiled call draws another mask than an eager one, exactly as
``keras.layers.Dropout`` does; two routes compiled alike draw the same mask.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import JacobianLayer, as_float_tensor, route


def _check_noise_shape(noise_shape: Any) -> tuple | None:
    """``noise_shape`` as a tuple of positive ints or None (None entries: the input's size)."""
    if noise_shape is None:
        return None
    try:
        shape = tuple(noise_shape)
    except TypeError:
        shape = ()
    if (
        isinstance(noise_shape, str)
        or not shape
        or any(
            d is not None and (isinstance(d, bool) or not isinstance(d, int) or d <= 0)
            for d in shape
        )
    ):
        raise ValueError(
            "Dropout: noise_shape must be a tuple of positive integers or None (None: the "
            f"input's size on that axis), got noise_shape={noise_shape!r}."
        )
    return shape


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Dropout(JacobianLayer):
    """Dropout, like ``keras.layers.Dropout``, with the diagonal Jacobian ``diag(k / (1 - r))``.

    Args:
        rate: ``r`` in ``[0, 1]``, the fraction of entries set to zero in training.
        noise_shape: the shape of the keep mask, broadcast to the input (e.g.
            ``(batch, 1, features)`` keeps whole time steps); None entries take the input's size.
        seed: an int seeding the layer's ``keras.random.SeedGenerator``, or None (random).

    ``call(inputs, training=None)``: training drops, anything else is the identity. Input any shape,
    output the same shape.

    ``jacobian_ops(training=True)`` returns a fresh-mask op: making it draws a new seed (advancing
    the seed generator), its ``forward`` draws the mask from that seed, and its ``backward`` and
    ``jacobian_factors`` use that mask.
    """

    def __init__(
        self, rate: float, noise_shape: Any = None, seed: int | None = None, **kwargs: Any
    ):
        super().__init__(**kwargs)
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate <= 1:
            raise ValueError(
                f"Dropout: rate must be a number between 0 and 1 (the fraction of inputs to "
                f"drop), got rate={rate!r}."
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Dropout: seed must be an integer or None, got seed={seed!r}.")
        self.rate = float(rate)
        self.noise_shape = _check_noise_shape(noise_shape)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if 0 < rate < 1 else None
        self.supports_masking = True

    def draw_seed(self) -> tf.Tensor:
        """The next seed of the generator, as Keras' dropout draws it (an int32 pair)."""
        seed = self.seed_generator.next()
        if seed.dtype == tf.int32:
            return seed
        return tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)

    def mask_shape(self, x: tf.Tensor) -> tf.Tensor:
        """``noise_shape`` with its None entries filled from ``x``'s shape."""
        if self.noise_shape is None:
            return tf.shape(x)
        return tf.stack(
            [tf.shape(x)[i] if d is None else d for i, d in enumerate(self.noise_shape)]
        )

    # (a)-(c) of the inference map, the identity.

    def forward(self, x: tf.Tensor) -> tf.Tensor:
        """Inference: ``y = x``."""
        return tf.identity(x)

    def reference(self, x: tf.Tensor) -> tf.Tensor:
        return tf.identity(x)

    def backward(self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, list]:
        """Inference: ``(J_x y)^T delta = I delta``."""
        return dy, []

    def jacobian_factors(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        """Inference, one sample ``x`` (``n`` entries): ``{"J = I": I_n}``."""
        x = as_float_tensor(x, self.compute_dtype)
        return {"J = I": tf.eye(math.prod(x.shape), dtype=x.dtype)}

    def jacobian_ops(self, training: bool = False) -> list:
        """Inference: the identity (the layer). Training: a ``_DropoutStep`` with a fresh seed,
        whose mask is drawn by its ``forward``."""
        if training and 0 < self.rate:
            return [(_DropoutStep(self), [])]
        return [(self, [])]

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if training and self.rate > 0:
            return route(_DropoutStep(self), inputs)
        return route(self, inputs)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"rate": self.rate, "noise_shape": self.noise_shape, "seed": self.seed})
        return config


class _DropoutStep:
    """One training call of a ``Dropout`` layer, for ``route``: the seed is drawn when the step is
    made (outside the custom gradient), ``forward`` draws the mask from it and keeps
    ``k / (1 - r)``, ``backward`` multiplies by that same diagonal. ``rate=1`` drops everything
    (no seed is drawn, as in Keras)."""

    def __init__(self, layer: Dropout):
        self.layer = layer
        self.seed = layer.draw_seed() if layer.rate < 1 else None
        self.diagonal: tf.Tensor | None = None

    def forward(self, x: tf.Tensor) -> tf.Tensor:
        """``y = x * k / (1 - r)``, keeping ``k / (1 - r)`` (shaped like ``noise_shape``)."""
        rate, shape = self.layer.rate, self.layer.mask_shape(x)
        if self.seed is None:
            self.diagonal = tf.zeros(shape, x.dtype)
        else:
            keep = tf.random.stateless_uniform(shape, seed=self.seed, dtype=x.dtype) >= rate
            self.diagonal = tf.cast(keep, x.dtype) * tf.constant(1 / (1 - rate), x.dtype)
        return x * self.diagonal

    def reference(self, x: tf.Tensor) -> tf.Tensor:
        if self.seed is None:
            return x * tf.zeros([], x.dtype)
        return tf.nn.experimental.stateless_dropout(
            x, self.layer.rate, self.seed, noise_shape=self.layer.mask_shape(x)
        )

    def backward(self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, list]:
        """``(J_x y)^T delta = delta * k / (1 - r)``."""
        return dy * self.diagonal, []

    def jacobian_rows(self, m: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, list]:
        """``M diag(k / (1 - r))`` for ``M`` ``(batch, k, ...)``: each row times its sample's mask
        (``tf_jacbp.jacobian``'s Algorithm 1 walk)."""
        return m * tf.expand_dims(self.diagonal, 1), []

    def jacobian_factors(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        """``{"diag(k / (1 - r))": (n, n)}`` for the first sample of the last ``forward``, shaped
        like one sample ``x``."""
        diagonal = tf.broadcast_to(self.diagonal[0], tf.shape(x))
        return {"diag(k / (1 - r))": tf.linalg.diag(tf.reshape(diagonal, [-1]))}
