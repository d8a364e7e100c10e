"""Dropout with explicit Jacobians: a random 0/scale diagonal in training, the identity otherwise.

Training, with rate ``r`` and a keep mask ``k`` (``k_j = 1`` with probability ``1 - r``, else 0,
drawn over ``noise_shape`` and broadcast to ``x``): ``y = x * k / (1 - r)``, so

    J_x y = diag(k / (1 - r)),    (J_x y)^T delta = delta * k / (1 - r),

a diagonal of zeros and ``1 / (1 - r)``. Each training call draws a new mask, outside the custom
gradient, and hands the diagonal ``d = k / (1 - r)`` to the layer's ``forward``, ``reference`` and
``vjp_input`` (``tf_jacbp.contract``) as a constant (not differentiated): ``y = x * d``,
``(J_x y)^T m = m * d`` for each of the ``V`` stacked vectors ``m[v]``. Given the mask the map is
elementwise, so per-sample Jacobians exist. Inference: no diagonal, ``y = x``, ``J = I``.
``jacobian_ops(training=True)`` hands Algorithm 1's walk the training map with the mask of one
drawn seed, ``DropoutMask``: the same contract, its diagonal drawn from that seed.

The mask is drawn as Keras draws it: a seed from the layer's ``keras.random.SeedGenerator``
(advanced once per training call, its state saved with the layer; works in graph mode and under
``jit_compile=True``), then ``keras.random.uniform(noise_shape, seed) >= r`` drawn from that one
seed (on TensorFlow the stateless uniforms that ``keras.layers.Dropout``'s
``stateless_dropout`` samples; the tests check the masks agree), so the layer and
``keras.layers.Dropout`` with the same seed state drop the same entries. Compiled with XLA, the
stateless random ops give other numbers than TensorFlow's own kernels for the same seed (measured
on CPU, even with an explicit ``alg``), so an XLA-compiled call draws another mask than an eager
one, exactly as ``keras.layers.Dropout`` does.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from keras import ops

from tf_jacbp._backend import keras
from tf_jacbp.contract import JacobianMap
from tf_jacbp.layers.base import JacobianLayer, as_float_tensor, build_at_construction
from tf_jacbp.route import route

Tensor = Any  # a tensor of Keras' backend

_INT32_SEED_MODULUS = 2**31 - 2  # Keras' TensorFlow backend folds int64 seeds into int32 so


class _DrawnSeed(keras.random.SeedGenerator):
    """A seed already drawn, as the ``SeedGenerator`` that ``keras.random`` draws from: its
    ``next()`` gives that seed every time and advances nothing, so every method of a training
    map draws the same mask from it (the draw from a given seed is stateless). It holds no
    state variable (``SeedGenerator.__init__`` is not run): nothing to save or advance."""

    def __init__(self, seed: Tensor):  # noqa: D107 - no state variable, unlike the base
        self._drawn = seed

    def next(self, ordered: bool = True) -> Tensor:
        """The drawn seed."""
        return self._drawn


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

    ``jacobian_ops(training=True)`` returns a ``DropoutMask``: making it draws a new seed
    (advancing the seed generator); its ``forward``, ``vjp_input`` (and so everything derived
    from the contract) and ``jacobian_factors`` all use the mask of that seed.
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
        build_at_construction(self, Dropout)  # stateless: built at construction, as Keras'

    def draw_seed(self) -> Tensor:
        """The next seed of the generator (advancing it), as Keras' dropout draws it: an int32
        pair on TensorFlow (an int64 state folded by ``floormod(seed, 2^31 - 2)``, as Keras'
        TensorFlow backend folds it); on JAX the generator's uint32 key data as it is (JAX's
        random functions take no other)."""
        seed = self.seed_generator.next()
        if keras.backend.standardize_dtype(seed.dtype) in ("int32", "uint32"):
            return seed
        return ops.cast(ops.mod(seed, _INT32_SEED_MODULUS), "int32")

    def mask_shape(self, x: Tensor) -> tuple:
        """``noise_shape`` with its None entries filled from ``x``'s shape."""
        shape = ops.shape(x)
        if self.noise_shape is None:
            return tuple(shape)
        return tuple(shape[i] if d is None else d for i, d in enumerate(self.noise_shape))

    def diagonal(self, x: Tensor, seed: Tensor | None) -> Tensor:
        """``d = k / (1 - r)``, shaped like ``noise_shape``: ``k = uniform(noise_shape, seed)
        >= r`` (``keras.random.uniform`` from the drawn ``seed``: the same ``k`` for the same
        seed); zeros for ``rate = 1`` (``seed`` None)."""
        shape = self.mask_shape(x)
        if seed is None:
            return ops.zeros(shape, x.dtype)
        uniform = keras.random.uniform(shape, dtype=x.dtype, seed=_DrawnSeed(seed))
        keep = ops.greater_equal(uniform, self.rate)
        scale = ops.convert_to_tensor(1 / (1 - self.rate), dtype=x.dtype)  # exact in float64
        return ops.cast(keep, x.dtype) * scale

    # The contract: training passes the diagonal d as a constant, inference nothing (identity).

    def forward(self, x: Tensor, diagonal: Tensor | None = None) -> Tensor:
        """Training: ``y = x * d``; inference: ``y = x``."""
        return ops.copy(x) if diagonal is None else x * diagonal

    def reference(self, x: Tensor, diagonal: Tensor | None = None) -> Tensor:
        return ops.copy(x) if diagonal is None else ops.multiply(x, diagonal)

    def vjp_input(self, m: Tensor, x: Tensor, y: Tensor, diagonal: Tensor | None = None) -> Tensor:
        """``(J_x y)^T m = diag(d) m = m * d`` (training: ``d`` ``(batch, ...)`` broadcast over
        the ``V`` axis of ``m``); ``I m`` (inference)."""
        return m if diagonal is None else m * diagonal

    def jacobian_factors(self, x: Tensor, diagonal: Tensor | None = None) -> dict[str, Tensor]:
        """One sample ``x`` (``n`` entries): ``{"J = I": I_n}`` (inference), or
        ``{"diag(k / (1 - r))": (n, n)}`` for the diagonal of a batch of one ``(1, ...)``."""
        x = as_float_tensor(x, self.compute_dtype)
        if diagonal is None:
            return {"J = I": ops.eye(math.prod(x.shape), dtype=x.dtype)}
        d = ops.broadcast_to(ops.cast(diagonal[0], x.dtype), ops.shape(x))
        return {"diag(k / (1 - r))": ops.diag(ops.reshape(d, (-1,)))}

    def jacobian_ops(self, training: bool = False) -> list:
        """Inference: the identity (the layer). Training: ``DropoutMask``, the training map with
        a seed drawn now (advancing the seed generator, as a training call does)."""
        if training and 0 < self.rate:
            return [(DropoutMask(self, self.draw_seed() if self.rate < 1 else None), [])]
        return [(self, [])]

    def call(self, inputs: Tensor, training: bool | None = None) -> Tensor:
        """Training: a mask drawn now, its diagonal passed to ``route`` as a constant."""
        if training and self.rate > 0:
            seed = self.draw_seed() if self.rate < 1 else None
            return route(self, inputs, constants=[self.diagonal(inputs, seed)])
        return route(self, inputs)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"rate": self.rate, "noise_shape": self.noise_shape, "seed": self.seed})
        return config


class DropoutMask(JacobianMap):
    """A ``Dropout`` layer's training map with the mask of one ``seed``, for Algorithm 1's walk
    (``tf_jacbp.jacobian``): the contract with the diagonal ``d`` as the constant, drawn from
    ``seed`` and the input's shape by every method (the same tensor each time: the draw is
    stateless)."""

    def __init__(self, layer: Dropout, seed: Tensor | None):
        self.layer = layer
        self.seed = seed

    @property
    def name(self) -> str:
        """The layer's name (errors of the derived methods name it)."""
        return self.layer.name

    def diagonal(self, x: Tensor) -> Tensor:
        """``d = k / (1 - r)`` of this seed for ``x``'s shape."""
        return self.layer.diagonal(x, self.seed)

    def forward(self, x: Tensor) -> Tensor:
        """``y = x * d``."""
        return self.layer.forward(x, self.diagonal(x))

    def reference(self, x: Tensor) -> Tensor:
        return self.layer.reference(x, self.diagonal(x))

    def vjp_input(self, m: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(J_x y)^T m = m * d``: ``(V, batch, ...)`` -> ``(V, batch, ...)``."""
        return self.layer.vjp_input(m, x, y, self.diagonal(x))

    def jacobian_factors(self, x: Tensor) -> dict[str, Tensor]:
        """At one sample ``x``: the diagonal a batch of one draws from ``seed``."""
        x = as_float_tensor(x, self.layer.compute_dtype)
        return self.layer.jacobian_factors(x, self.layer.diagonal(x[None], self.seed))
