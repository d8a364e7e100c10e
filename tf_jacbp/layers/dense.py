"""Dense layer: ``z = W^T a + b``, ``a_out = f(z)`` (docs/math.md, "One layer").

Batches are rows, so the forward pass is ``Z = A W + b`` for ``A`` of shape ``(batch, n)``.
Jacobians for one sample ``a`` (``n``), kernel ``W`` (``n x m``), upstream ``delta`` (``m``):

* ``J_a z = W^T`` (``m x n``), so ``(J_a z)^T delta = W delta``.
* ``J_{W,b} z = [I_m (x) a^T | I_m]`` (``m x (n m + m)``, columns in ``Vec`` order, docs/math.md),
  so ``(J_{W,b} z)^T delta = [Vec(a delta^T); delta]``: the outer product ``a delta^T`` is the
  kernel
  gradient. Summed over a batch: ``dW = A^T Delta``, ``db = sum_rows Delta``.
"""

from __future__ import annotations

from typing import Any

from tf_jacbp import activations
from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import _KernelBiasLayer, as_float_tensor


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Dense(_KernelBiasLayer):
    """Fully connected layer with the paper's Jacobians; arguments as ``keras.layers.Dense``.

    Args:
        units: ``m``, the number of outputs (a positive integer).
        activation: a name from ``tf_jacbp.activations`` (``"relu"``, ``"softmax"``, ...) or
            ``None``. Its Jacobian ``D = J_z f(z)`` is applied after ``z``'s.
        use_bias: whether ``z`` has the bias ``b``.
        kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer,
        activity_regularizer, kernel_constraint, bias_constraint: as in Keras.

    Input ``(batch, n)``, output ``(batch, m)``. The kernel ``W`` has Keras' shape ``(n, m)``.

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
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units <= 0:
            raise ValueError(
                f"Dense: units must be a positive integer (the number of outputs), "
                f"got units={units!r}."
            )
        self.units = units
        self.activation = activations.get(activation)
        self.use_bias = use_bias
        self.set_weight_options(
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
        )

    def build(self, input_shape: tuple) -> None:
        if len(input_shape) != 2:
            raise ValueError(
                f"Dense '{self.name}' expects inputs of shape (batch, features), got input "
                f"shape {tuple(input_shape)}. Put tf_jacbp.layers.Flatten() before it."
            )
        n = input_shape[-1]
        if n is None:
            raise ValueError(
                f"Dense '{self.name}': the last axis of the input shape {tuple(input_shape)} "
                "must be known; give keras.Input a full shape."
            )
        self.add_kernel_and_bias((n, self.units), (self.units,) if self.use_bias else None)
        self.input_spec = keras.layers.InputSpec(ndim=2, axes={-1: n})

    def forward(self, a: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None = None) -> tf.Tensor:
        """``Z = A W + b``: ``(batch, n)`` -> ``(batch, m)``."""
        z = tf.matmul(a, kernel)
        return z + bias if bias is not None else z

    def reference(
        self, a: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None = None
    ) -> tf.Tensor:
        z = tf.matmul(a, kernel)
        return tf.nn.bias_add(z, bias) if bias is not None else z

    def backward(self, dz, a, z, kernel, bias=None):
        """``dA = Delta W^T``; ``dW = A^T Delta`` (sum of ``a delta^T``); ``db = sum Delta``."""
        grads = [tf.matmul(a, dz, transpose_a=True)]
        if bias is not None:
            grads.append(tf.reduce_sum(dz, axis=0))
        return tf.matmul(dz, kernel, transpose_b=True), grads

    def per_example_backward(self, dz, a, z, kernel, bias=None):
        """``backward`` per sample: ``dW_i = a_i delta_i^T`` ``(batch, n, m)``,
        ``db_i = delta_i``."""
        grads = [tf.einsum("bi,bj->bij", a, dz)]  # measured faster than a broadcast product
        if bias is not None:
            grads.append(dz)
        return tf.matmul(dz, kernel, transpose_b=True), grads

    def per_example_squared_norms(self, dz, a, z, kernel, bias=None):
        """Squared norms of each sample's ``dW_i = a_i delta_i^T`` and ``db_i = delta_i``,
        without forming them: ``||a_i delta_i^T||_F^2 = ||a_i||^2 ||delta_i||^2``, ``(batch,)``.

        Inputs of rank above 2 (``(batch, T, n)``, the kernel applied at ``T`` positions):
        ``dW_i = A_i^T Delta_i`` (``patch_product_squared_norms``: Gram or outer form) and
        ``db_i = Delta_i^T 1``.
        """
        from tf_jacbp.layers.base import patch_product_squared_norms, squared_norms

        if a.shape.rank == 2:
            delta_squared = tf.reduce_sum(tf.square(dz), axis=1)
            norms = [tf.reduce_sum(tf.square(a), axis=1) * delta_squared]
            return norms + ([delta_squared] if bias is not None else [])
        batch = tf.shape(a)[0]
        a = tf.reshape(a, [batch, -1, a.shape[-1]])
        dz = tf.reshape(dz, [batch, -1, dz.shape[-1]])
        norms = [patch_product_squared_norms(a, dz)]
        return norms + ([squared_norms(tf.reduce_sum(dz, axis=1))] if bias is not None else [])

    def jacobian_rows(self, m, a, z, kernel, bias=None):
        """``M W^T`` and ``M [I (x) a^T | I] = [M (x) a^T | M]`` for ``M`` ``(batch, k, m)``.

        Entry ``(j, i)`` of ``M (x) a^T``'s row is ``M_j a_i`` at ``Vec`` position ``j n + i``.
        """
        batch, k = tf.shape(m)[0], tf.shape(m)[1]
        blocks = [tf.reshape(m[..., :, None] * a[:, None, None, :], [batch, k, -1])]
        if bias is not None:
            blocks.append(m)
        return tf.matmul(m, kernel, transpose_b=True), blocks

    def jacobian_ops(self, training: bool = False) -> list:
        """``z = W^T a + b``, then ``a_out = f(z)``."""
        return [(self, self.read_parameters()), (self.activation, [])]

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], self.units)

    def parameter_jacobian(self, a: Any) -> tf.Tensor:
        """``J_{W,b} z = [I_m (x) a^T | I_m]`` (without ``| I_m`` when ``use_bias=False``).

        ``a``: ``(n,)`` -> ``(m, n m + m)``; ``(batch, n)`` -> ``(batch, m, n m + m)``. Columns
        are in theta order: ``Vec(W)`` (column-major) then ``b``.
        """
        a = as_float_tensor(a, self.compute_dtype)
        m = self.units
        eye = tf.eye(m, dtype=a.dtype)
        # Row j of I_m (x) a^T holds a^T in column block j: eye[j, k] * a[i] at k * n + i.
        kron = eye[:, :, None] * a[..., None, None, :]
        kron = tf.reshape(kron, [*a.shape[:-1], m, m * a.shape[-1]])
        if not self.use_bias:
            return kron
        eye = tf.broadcast_to(eye, [*a.shape[:-1], m, m])
        return tf.concat([kron, eye], axis=-1)

    def input_jacobian(self, a: Any) -> tf.Tensor:
        """``J_a f(W^T a + b) = D W^T`` with ``D = J_z f(z)``: ``(batch, n)`` ->
        ``(batch, m, n)``."""
        a = as_float_tensor(a, self.compute_dtype)
        params = [tf.cast(p, a.dtype) for p in self.read_parameters()]
        d = self.activation.jacobian(self.forward(a, *params))
        return tf.matmul(d, tf.transpose(params[0]))

    def jacobian_factors(self, a: tf.Tensor) -> dict[str, tf.Tensor]:
        """``{"W^T": (m, n), "[I (x) a^T | I]": (m, n m + m)}`` at one sample ``a`` (``(n,)``)."""
        kernel = tf.cast(self.read_parameters()[0], a.dtype)
        return {"W^T": tf.transpose(kernel), "[I (x) a^T | I]": self.parameter_jacobian(a)}

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

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Dense:
        config = dict(config)
        config["activation"] = activations.deserialize(config["activation"])
        return cls(**config)
