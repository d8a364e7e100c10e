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

from tf_jacbp import activations
from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import (
    _KernelBiasLayer,
    as_float_tensor,
    patch_product_squared_norms,
    squared_norms,
)

# Keras' Dense arguments that tf_jacbp refuses: the paper's Jacobians are those of W and b.
_UNSUPPORTED = {
    "lora_rank": "LoRA adds two low-rank matrices to W",
    "lora_alpha": "LoRA adds two low-rank matrices to W",
    "quantization_config": "quantization replaces W by integers and scales",
}


def refuse_unsupported(owner: str, kwargs: dict[str, Any]) -> None:
    """Pop Keras' LoRA and quantization arguments from ``kwargs``; any that is not None is a
    ``ValueError`` naming it (tf_jacbp's formulas differentiate the full-precision weights)."""
    for name, why in _UNSUPPORTED.items():
        value = kwargs.pop(name, None)
        if value is not None:
            raise ValueError(
                f"{owner}: {name}={value!r} is not supported: {why}, and tf_jacbp's explicit "
                f"Jacobians are those of the full-precision weights. Remove {name}, or use the "
                f"stock keras.layers.{owner} (its gradient is then autodiff's, not checked)."
            )


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
        self._sample_rank = len(input_shape) - 1

    def forward(self, a: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None = None) -> tf.Tensor:
        """``Z = A W + b``: ``(batch, ..., n)`` -> ``(batch, ..., m)``, positions as rows."""
        if a.shape.rank == 2:
            z = tf.matmul(a, kernel)
        else:
            rows = tf.matmul(tf.reshape(a, [-1, kernel.shape[0]]), kernel)
            z = tf.reshape(rows, tf.concat([tf.shape(a)[:-1], [kernel.shape[1]]], 0))
        return z + bias if bias is not None else z

    def reference(
        self, a: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None = None
    ) -> tf.Tensor:
        z = tf.matmul(a, kernel) if a.shape.rank == 2 else tf.tensordot(a, kernel, [[-1], [0]])
        return tf.nn.bias_add(z, bias) if bias is not None else z

    def backward(self, dz, a, z, kernel, bias=None):
        """``dA = Delta W^T``; ``dW = A^T Delta`` (sum of ``a delta^T`` over the batch and the
        positions: ``A``, ``Delta`` with one row per sample and position); ``db = sum Delta``."""
        dx = tf.matmul(dz, kernel, transpose_b=True)
        if a.shape.rank != 2:
            a, dz = tf.reshape(a, [-1, kernel.shape[0]]), tf.reshape(dz, [-1, kernel.shape[1]])
        grads = [tf.matmul(a, dz, transpose_a=True)]
        if bias is not None:
            grads.append(tf.reduce_sum(dz, axis=0))
        return dx, grads

    def per_example_backward(self, dz, a, z, kernel, bias=None):
        """``backward`` per sample: ``dW_i = a_i delta_i^T`` ``(batch, n, m)``,
        ``db_i = delta_i``. At ``P`` positions: ``dW_i = A_i^T Delta_i``, ``db_i = Delta_i^T 1``."""
        dx = tf.matmul(dz, kernel, transpose_b=True)
        if a.shape.rank == 2:
            grads = [tf.einsum("bi,bj->bij", a, dz)]  # measured faster than a broadcast product
            return dx, grads + ([dz] if bias is not None else [])
        a, dz = _positions(a), _positions(dz)  # (batch, P, n), (batch, P, m)
        grads = [tf.einsum("bpi,bpj->bij", a, dz)]
        return dx, grads + ([tf.reduce_sum(dz, axis=1)] if bias is not None else [])

    def per_example_squared_norms(self, dz, a, z, kernel, bias=None):
        """Squared norms of each sample's ``dW_i = a_i delta_i^T`` and ``db_i = delta_i``,
        without forming them: ``||a_i delta_i^T||_F^2 = ||a_i||^2 ||delta_i||^2``, ``(batch,)``.

        Inputs of rank above 2 (``(batch, T, n)``, the kernel applied at ``T`` positions):
        ``dW_i = A_i^T Delta_i`` (``patch_product_squared_norms``: Gram or outer form) and
        ``db_i = Delta_i^T 1``.
        """
        if a.shape.rank == 2:
            delta_squared = tf.reduce_sum(tf.square(dz), axis=1)
            norms = [tf.reduce_sum(tf.square(a), axis=1) * delta_squared]
            return norms + ([delta_squared] if bias is not None else [])
        a, dz = _positions(a), _positions(dz)
        norms = [patch_product_squared_norms(a, dz)]
        return norms + ([squared_norms(tf.reduce_sum(dz, axis=1))] if bias is not None else [])

    def jacobian_rows(self, m, a, z, kernel, bias=None):
        """``M W^T`` and ``M [I (x) a^T | I] = [M (x) a^T | M]`` for ``M`` ``(batch, k, m)``.

        Entry ``(j, i)`` of ``M (x) a^T``'s row is ``M_j a_i`` at ``Vec`` position ``j n + i``.
        At ``P`` positions (``M`` ``(batch, k, ..., m)``), row ``r`` of the kernel block is
        ``Vec(A_i^T M_r)`` (``M_r`` as a ``P x m`` matrix) and of the bias block ``M_r^T 1``.
        """
        batch, k = tf.shape(m)[0], tf.shape(m)[1]
        dx = tf.matmul(m, kernel, transpose_b=True)
        if a.shape.rank == 2:
            blocks = [tf.reshape(m[..., :, None] * a[:, None, None, :], [batch, k, -1])]
            return dx, blocks + ([m] if bias is not None else [])
        rows = tf.reshape(m, [batch, k, -1, kernel.shape[1]])  # (batch, k, P, m)
        blocks = [tf.reshape(tf.einsum("bpi,bkpj->bkji", _positions(a), rows), [batch, k, -1])]
        return dx, blocks + ([tf.reduce_sum(rows, axis=2)] if bias is not None else [])

    def jacobian_ops(self, training: bool = False) -> list:
        """``z = W^T a + b``, then ``a_out = f(z)``."""
        return [(self, self.read_parameters()), (self.activation, [])]

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], self.units)

    def _sample_rank_of(self, a: tf.Tensor, method: str) -> bool:
        """Whether ``a`` is one sample (True) or a batch (False) of the input this layer was
        built for (unbuilt: samples are vectors ``(n,)``)."""
        rank = getattr(self, "_sample_rank", 1)
        if a.shape.rank not in (rank, rank + 1):
            raise ValueError(
                f"Dense.{method}: a must be one sample of rank {rank} or a batch of them (rank "
                f"{rank + 1}), as the layer was built for inputs of rank {rank + 1}; got a of "
                f"shape {tuple(a.shape)}."
            )
        return a.shape.rank == rank

    def _batch_parameter_jacobian(self, a: tf.Tensor) -> tf.Tensor:
        """``(batch, ..., n)`` -> ``(batch, P m, n m [+ m])``: position ``p``'s ``m`` rows are
        ``[I_m (x) a_p^T | I_m]``."""
        m = self.units
        a = _positions(a if a.shape.rank > 1 else a[None])  # (batch, P, n)
        batch, positions, n = a.shape
        eye = tf.eye(m, dtype=a.dtype)
        # Row j of I_m (x) a^T holds a^T in column block j: eye[j, k] * a[i] at k * n + i.
        kron = tf.reshape(eye[:, :, None] * a[:, :, None, None, :], [batch, positions * m, m * n])
        if not self.use_bias:
            return kron
        eye = tf.tile(eye[None], [batch, positions, 1])
        return tf.concat([kron, eye], axis=-1)

    def parameter_jacobian(self, a: Any) -> tf.Tensor:
        """``J_{W,b} z = [I_m (x) a^T | I_m]`` (without ``| I_m`` when ``use_bias=False``).

        ``a``: ``(n,)`` -> ``(m, n m + m)``; ``(batch, n)`` -> ``(batch, m, n m + m)``. Columns
        are in theta order: ``Vec(W)`` (column-major) then ``b``. For a layer built on
        ``(batch, ..., n)``, one sample ``(..., n)`` of ``P`` positions gives ``(P m, n m + m)``,
        the rows of position ``p`` (row-major, like ``z``) being ``[I_m (x) a_p^T | I_m]``; a
        batch of them gets a leading axis.
        """
        a = as_float_tensor(a, self.compute_dtype)
        if self._sample_rank_of(a, "parameter_jacobian"):
            return self._batch_parameter_jacobian(a[None])[0]
        return self._batch_parameter_jacobian(a)

    def _batch_input_jacobian(self, a: tf.Tensor) -> tf.Tensor:
        """``(batch, ..., n)`` -> ``D (I_P (x) W^T)``, ``(batch, P m, P n)``."""
        params = [tf.cast(p, a.dtype) for p in self.read_parameters()]
        z = _positions(self.forward(a, *params))  # (batch, P, m)
        return tf.matmul(_activation_matrix(self.activation, z), _kron_eye(z.shape[1], params[0]))

    def input_jacobian(self, a: Any) -> tf.Tensor:
        """``J_a f(W^T a + b) = D W^T`` with ``D = J_z f(z)``: ``(n,)`` -> ``(m, n)``,
        ``(batch, n)`` -> ``(batch, m, n)``.

        For a layer built on ``(batch, ..., n)``: one sample of ``P`` positions gives
        ``D (I_P (x) W^T)``, ``(P m, P n)``, rows and columns row-major (``D`` is diagonal, or
        block diagonal with one softmax block per position); a batch gets a leading axis.
        """
        a = as_float_tensor(a, self.compute_dtype)
        if self._sample_rank_of(a, "input_jacobian"):
            return self._batch_input_jacobian(a[None])[0]
        return self._batch_input_jacobian(a)

    def jacobian_factors(self, a: tf.Tensor) -> dict[str, tf.Tensor]:
        """``{"W^T": (m, n), "[I (x) a^T | I]": (m, n m + m)}`` at one sample ``a`` (``(n,)``).

        A sample of ``P`` positions (``(..., n)``): ``{"I_P (x) W^T": (P m, P n),
        "[I (x) a^T | I]": (P m, n m + m)}`` (position ``p``'s rows ``[I_m (x) a_p^T | I_m]``).
        """
        kernel = tf.cast(self.read_parameters()[0], a.dtype)
        jacobian = self._batch_parameter_jacobian(a[None])[0]
        if a.shape.rank == 1:
            return {"W^T": tf.transpose(kernel), "[I (x) a^T | I]": jacobian}
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


def _positions(t: tf.Tensor) -> tf.Tensor:
    """``(batch, ..., d)`` -> ``(batch, P, d)``: each sample's positions as rows (row-major)."""
    return tf.reshape(t, [tf.shape(t)[0], -1, t.shape[-1]])


def _kron_eye(positions: int, kernel: tf.Tensor) -> tf.Tensor:
    """``I_P (x) W^T``: ``(P m, P n)`` for ``W`` ``(n, m)``, the input Jacobian of ``z`` at ``P``
    positions (``W^T`` itself for ``P = 1``)."""
    n, m = kernel.shape
    eye = tf.eye(positions, dtype=kernel.dtype)
    blocks = eye[:, None, :, None] * tf.transpose(kernel)[None, :, None, :]  # (P, m, P', n)
    return tf.reshape(blocks, [positions * m, positions * n])


def _activation_matrix(activation: Any, z: tf.Tensor) -> tf.Tensor:
    """``D = J_z f(z)`` for each sample of ``z`` ``(batch, P, m)``: ``(batch, P m, P m)``.

    Elementwise: ``diag(f'(z))``. Softmax acts on the last axis: one block
    ``diag(s_p) - s_p s_p^T`` per position, zero between positions.
    """
    batch, positions, m = z.shape
    if not isinstance(activation, activations.Softmax):
        return activation.jacobian(tf.reshape(z, [batch, positions * m]))
    blocks = activation.jacobian(z)  # (batch, P, m, m)
    eye = tf.eye(positions, dtype=z.dtype)
    d = eye[None, :, None, :, None] * blocks[:, :, :, None, :]  # (batch, P, m, P', m')
    return tf.reshape(d, [batch, positions * m, positions * m])
