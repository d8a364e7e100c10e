"""Dense layer: ``z = W^T a + b``, ``a_out = f(z)`` (docs/math.md, "One layer").

Batches are rows, so the forward pass is ``Z = A W + b`` for ``A`` of shape ``(batch, n)``.
Jacobians for one sample ``a`` (``n``), kernel ``W`` (``n x m``), upstream ``delta`` (``m``):

* ``J_a z = W^T`` (``m x n``), so ``(J_a z)^T delta = W delta``.
* ``J_{W,b} z = [I_m (x) a^T | I_m]`` (``m x (n m + m)``, columns in ``Vec`` order, docs/math.md),
  so ``(J_{W,b} z)^T delta = [Vec(a delta^T); delta]``: the outer product ``a delta^T`` is the
  kernel gradient. Summed over a batch: ``dW = A^T Delta``, ``db = sum_rows Delta``.

Inputs of higher rank, ``(batch, T, n)`` or ``(batch, H, W, n)``: as in Keras, the same ``W`` and
``b`` act on the last axis at each of the ``P`` positions (``P = T`` or ``H W``). One sample is the
matrix ``A_i`` (``P x n``, positions as rows, row-major) and ``Z_i = A_i W + 1 b^T``; with
``z_i = vec(Z_i)`` row-major (position ``p``, unit ``j`` at ``p m + j``):

* ``J_a z = I_P (x) W^T`` (``P m x P n``): each position sees ``W^T``, positions do not mix;
* the rows of position ``p`` of ``J_{W,b} z`` are ``[I_m (x) a_p^T | I_m]``, so
  ``(J_{W,b} z)^T delta = [Vec(A_i^T Delta_i); Delta_i^T 1]``: the kernel gradient is the sum of the
  positions' outer products, ``A_i^T Delta_i``, and the batch sums it over samples and positions.
"""

from __future__ import annotations

import math
from typing import Any

from keras import ops

from tf_jacbp import activations
from tf_jacbp._backend import keras
from tf_jacbp.contract import squared_norms_of
from tf_jacbp.layers.base import (
    _UNSUPPORTED,
    _KernelBiasLayer,
    patch_product_squared_norms,
    refuse_unsupported,
)

Tensor = Any  # a tensor of Keras' backend

# TRANSITION: _UNSUPPORTED re-exported for the modules that still import it from here; its home
# is tf_jacbp.layers.base (as refuse_unsupported's, which Dense itself calls).
__all__ = ["Dense", "_UNSUPPORTED"]


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Dense(_KernelBiasLayer):
    """Fully connected layer with the paper's Jacobians; arguments as ``keras.layers.Dense``.

    Args:
        units: ``m``, the number of outputs (a positive integer).
        activation: a name from ``tf_jacbp.activations`` (``"relu"``, ``"softmax"``, ...) or
            ``None``. Its Jacobian ``D = J_z f(z)`` is applied after ``z``'s. It can be set
            after construction (``layer.activation = "relu"``), as on Keras' Dense: the value goes
            through ``tf_jacbp.activations.get`` (an unknown one is a ``ValueError``).
        use_bias: whether ``z`` has the bias ``b``.
        kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer,
        activity_regularizer, kernel_constraint, bias_constraint: as in Keras.

    Input ``(batch, ..., n)`` (rank at least 2), output ``(batch, ..., m)``: as in Keras, an input
    of higher rank gets the same ``W`` and ``b`` at every position of its last axis. The kernel
    ``W`` has Keras' shape ``(n, m)``. Keras' ``lora_rank``, ``lora_alpha`` and
    ``quantization_config`` are refused with a ``ValueError``.

    Example:
        >>> layer = tf_jacbp.layers.Dense(3)
        >>> layer.build((None, 4))
        >>> layer.parameter_jacobian(np.ones(4)).shape  # the paper's 3 x 15 matrix
        TensorShape([3, 15])
    """

    def __init__(
        self,
        units: int,
        activation: str | None = None,
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        kernel_constraint: Any = None,
        bias_constraint: Any = None,
        **kwargs: Any,
    ):
        refuse_unsupported("Dense", kwargs)
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units <= 0:
            raise ValueError(
                f"Dense: units must be a positive integer (the number of outputs), "
                f"got units={units!r}."
            )
        self.units = units
        self.supports_masking = True  # as Keras' Dense: a mask passes through unchanged
        self.activation = activation
        self.use_bias = use_bias
        self.set_weight_options(
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
        )

    @property
    def activation(self) -> activations.Elementwise | activations.Softmax:
        """``f``, applied after ``z`` (``tf_jacbp.activations``)."""
        return self._activation

    @activation.setter
    def activation(self, value: Any) -> None:
        self._activation = activations.get(value)

    def build(self, input_shape: tuple) -> None:
        if len(input_shape) < 2:
            raise ValueError(
                f"Dense '{self.name}' expects inputs of shape (batch, ..., features), rank at "
                f"least 2, got input shape {tuple(input_shape)}. Give the input a batch axis "
                "(x[None] for one sample)."
            )
        n = input_shape[-1]
        if n is None:
            raise ValueError(
                f"Dense '{self.name}': the last axis of the input shape {tuple(input_shape)} "
                "must be known; give keras.Input a full shape."
            )
        self.add_kernel_and_bias((n, self.units), (self.units,) if self.use_bias else None)
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: n})

    def forward(self, a: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
        """``Z = A W + b``: ``(batch, ..., n)`` -> ``(batch, ..., m)``, positions as rows."""
        z = ops.matmul(a, kernel)
        return z + bias if bias is not None else z

    def reference(self, a: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
        """Stock ops: ``keras.ops.tensordot`` over the last axis of ``a`` (``matmul`` for a
        batch of vectors), then the bias added."""
        if len(a.shape) == 2:
            z = ops.matmul(a, kernel)
        else:
            z = ops.tensordot(a, kernel, axes=[[len(a.shape) - 1], [0]])
        return ops.add(z, bias) if bias is not None else z

    def vjp_input(self, m, a, z, kernel, bias=None):
        """``(J_a z)^T m = (I_P (x) W^T)^T m``: each position's ``W m_p``,
        ``(V, batch, ..., m)`` -> ``(V, batch, ..., n)``."""
        return ops.matmul(m, ops.transpose(kernel))

    def vjp_params(self, m, a, z, kernel, bias=None, sum_batch=True):
        """``(J_{W,b} z)^T m = [Vec(A_i^T M_i); M_i^T 1]``: the kernel product is the sum of the
        positions' outer products ``a_p m_p^T``, the bias product the sum of ``m_p``.

        ``sum_batch``: ``"ri,vrj->vij"`` over every row ``r`` (sample and position), else
        ``"bpi,vbpj->vbij"`` per sample ``b`` over its positions ``p``.
        """
        n, units = kernel.shape
        if sum_batch:
            rows = ops.reshape(m, (m.shape[0], -1, units))  # (V, rows, m)
            grads = [ops.einsum("ri,vrj->vij", ops.reshape(a, (-1, n)), rows)]
            return grads + ([ops.sum(rows, axis=1)] if bias is not None else [])
        if len(a.shape) == 2:  # one position: the outer products a_i m_vi^T
            if m.shape[0] == 1:  # per-example gradients: 2x faster than "bi,vbj->vbij"
                outer = ops.einsum("bi,bj->bij", a, m[0])[None]
            else:  # rows: formed as (batch, V, m, n), the layout of their Vec (the derived
                # jacobian_rows transposes back: TensorFlow's optimizer folds the two transposes)
                by_sample = ops.transpose(m, (1, 0, 2))[:, :, :, None] * a[:, None, None, :]
                outer = ops.transpose(by_sample, (1, 0, 3, 2))
            return [outer] + ([m] if bias is not None else [])
        batch = ops.shape(a)[0]
        rows = ops.reshape(m, (m.shape[0], batch, -1, units))  # (V, batch, P, m)
        grads = [ops.einsum("bpi,vbpj->vbij", ops.reshape(a, (batch, -1, n)), rows)]
        return grads + ([ops.sum(rows, axis=2)] if bias is not None else [])

    def squared_norms(self, m, a, z, kernel, bias=None):
        """Squared norms of each sample's ``dW_i = a_i delta_i^T`` and ``db_i = delta_i``
        (``delta = m[0]``) without forming them: ``||a_i delta_i^T||_F^2 = ||a_i||^2
        ||delta_i||^2``, ``(batch,)``. At ``P`` positions ``dW_i = A_i^T Delta_i``
        (``patch_product_squared_norms``: Gram or outer form) and ``db_i = Delta_i^T 1``."""
        delta = m[0]
        if len(a.shape) == 2:
            delta_squared = ops.sum(ops.square(delta), axis=1)
            norms = [ops.sum(ops.square(a), axis=1) * delta_squared]
            return norms + ([delta_squared] if bias is not None else [])
        a, delta = _positions(a), _positions(delta)
        norms = [patch_product_squared_norms(a, delta)]
        return norms + ([squared_norms_of(ops.sum(delta, axis=1))] if bias is not None else [])

    def jacobian_ops(self, training: bool = False) -> list:
        """``z = W^T a + b``, then ``a_out = f(z)``."""
        return [(self, self.read_parameters()), (self.activation, [])]

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], self.units)

    def jacobian_factors(self, a: Tensor) -> dict[str, Tensor]:
        """``{"W^T": (m, n), "[I (x) a^T | I]": (m, n m + m)}`` at one sample ``a`` (``(n,)``).

        A sample of ``P`` positions (``(..., n)``): ``{"I_P (x) W^T": (P m, P n),
        "[I (x) a^T | I]": (P m, n m + m)}`` (position ``p``'s rows ``[I_m (x) a_p^T | I_m]``).
        """
        kernel = ops.cast(self.read_parameters()[0], a.dtype)
        jacobian = self.parameter_jacobian(a)
        if len(a.shape) == 1:
            return {"W^T": ops.transpose(kernel), "[I (x) a^T | I]": jacobian}
        positions = math.prod(a.shape[:-1])
        return {"I_P (x) W^T": _kron_eye(positions, kernel), "[I (x) a^T | I]": jacobian}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "activation": activations.serialize(self.activation),
                "use_bias": self.use_bias,
                **self.weight_options_config(),
            }
        )
        return config


def _positions(t: Tensor) -> Tensor:
    """``(batch, ..., d)`` -> ``(batch, P, d)``: each sample's positions as rows (row-major)."""
    return ops.reshape(t, (ops.shape(t)[0], -1, t.shape[-1]))


def _kron_eye(positions: int, kernel: Tensor) -> Tensor:
    """``I_P (x) W^T``: ``(P m, P n)`` for ``W`` ``(n, m)``, the input Jacobian of ``z`` at ``P``
    positions (``W^T`` itself for ``P = 1``)."""
    n, m = kernel.shape
    eye = ops.eye(positions, dtype=kernel.dtype)
    blocks = eye[:, None, :, None] * ops.transpose(kernel)[None, :, None, :]  # (P, m, P', n)
    return ops.reshape(blocks, (positions * m, positions * n))
