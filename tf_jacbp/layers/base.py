"""The one small base class of tf_jacbp: a layer as a Jacobian-transpose product.

A tf_jacbp layer is a map ``y = F(x; p_1, ..., p_k)`` that provides

(a) ``forward(x, *params) -> y``, its forward computation;
(b) ``reference(x, *params) -> y``, the same map in stock TensorFlow ops, differentiated by
    autodiff (the witness: it must not share the code under test);
(c) ``backward(dy, x, y, *params) -> (dx, [dp_1, ..., dp_k])``, the Jacobian-transpose products
    ``dx = (J_x F)^T dy`` and ``dp_i = (J_{p_i} F)^T dy`` (each shaped like its tensor);
(d) materialized Jacobians for inspection (``input_jacobian``, ``parameter_jacobian``: see each
    layer).

A map that also depends on values it does not differentiate (Dropout's mask in training) takes
them after the parameters, ``forward(x, *params, *constants)`` and so on, and ``call`` passes them
to ``route`` as ``constants``; ``backward`` still returns one gradient per parameter.

``call`` hands (a)-(c) to ``tf_jacbp.route.route``: (c) is the backward pass training applies,
(b) what ``tf_jacbp.reference_mode()`` runs instead. What (c) needs from the forward pass (``x``,
``y``, the parameters, and ``z`` when an activation is fused) reaches it through the custom
gradient's closure; a layer keeps no per-call state.
"""

from __future__ import annotations

from typing import Any

from tf_jacbp import activations
from tf_jacbp._backend import keras, tf
from tf_jacbp.layout import vec_parameter_batch
from tf_jacbp.route import JacobianOp, route

__all__ = ["JacobianLayer", "JacobianOp", "as_float_tensor", "route"]


def as_float_tensor(x: object, default_dtype: str) -> tf.Tensor:
    """``x`` as a tensor: floating inputs keep their dtype, others get ``default_dtype``.

    The teaching accessors use it, so that a float64 NumPy array gives float64 Jacobians.
    """
    x = tf.convert_to_tensor(x)
    return x if x.dtype.is_floating else tf.cast(x, default_dtype)


def standardize_input(x: object, dtype: str, name: str) -> object:
    """One input of a tf_jacbp layer: integer and bool tensors or arrays cast to ``dtype`` (stock
    Keras layers compute with them the same way); a ``SparseTensor`` or ``RaggedTensor`` is an
    error that names the conversion (the Jacobian formulas are dense)."""
    if isinstance(x, tf.SparseTensor | tf.RaggedTensor):
        raise TypeError(
            f"Layer '{name}' got a {type(x).__name__} input; tf_jacbp layers take dense tensors "
            "(their Jacobians are dense formulas). Convert it first: tf.sparse.to_dense(x) for "
            "a SparseTensor, x.to_tensor() for a RaggedTensor (in the model or the input pipeline)."
        )
    if isinstance(x, keras.KerasTensor) or x is None:
        return x
    x = tf.convert_to_tensor(x)
    return tf.cast(x, dtype) if x.dtype.is_integer or x.dtype.is_bool else x


class JacobianLayer(keras.layers.Layer):
    """Base class of tf_jacbp layers: (a) forward, (b) reference, (c) backward, (d) Jacobians.

    A subclass creates its weights in ``build`` as usual, lists those the formulas differentiate
    in ``jacobian_parameters()`` (in theta order: kernel, then bias) and implements ``forward``,
    ``reference`` and ``backward`` (see the module docstring). ``call`` reads the weights into
    tensors of the compute dtype and hands everything to ``route``.

    Example (a layer ``y = x * s`` with a learned scale ``s`` of shape ``(d,)``):

        class Scale(tf_jacbp.layers.JacobianLayer):
            def build(self, input_shape):
                self.s = self.add_weight(shape=(input_shape[-1],), initializer="ones")

            def jacobian_parameters(self):
                return [self.s]

            def forward(self, x, s):
                return x * s

            def reference(self, x, s):
                return tf.multiply(x, s)

            def backward(self, dy, x, y, s):
                # J_x y = diag(s), J_s y = diag(x): both are diagonal.
                return dy * s, [tf.reduce_sum(dy * x, axis=0)]
    """

    def jacobian_parameters(self) -> list[keras.Variable]:
        """The variables the backward pass differentiates, in theta order. Default: none."""
        return []

    def forward(self, x: tf.Tensor, *params: tf.Tensor) -> tf.Tensor:
        """(a) The forward computation, ``y = F(x; params)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, *params).")

    def reference(self, x: tf.Tensor, *params: tf.Tensor) -> tf.Tensor:
        """(b) The same map in stock TensorFlow ops, for autodiff."""
        raise NotImplementedError(f"{type(self).__name__} must implement reference(x, *params).")

    def backward(
        self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor, *params: tf.Tensor
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """(c) ``((J_x F)^T dy, [(J_p F)^T dy for p in params])``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement backward(dy, x, y, *params)."
        )

    def per_example_backward(
        self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor, *params: tf.Tensor
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """``backward`` without the sum over the batch: each ``dp`` gets a leading batch axis.

        Sample ``i``'s parameter gradient is ``(J_p F(x_i))^T dy_i``. This default maps
        ``backward`` over batches of one (``tf.vectorized_map``); layers override it with the
        structured formula (Dense: the outer products ``a_i delta_i^T``).
        """
        if not params:
            return self.backward(dy, x, y)

        def one(args):
            dy_i, x_i, y_i = (t[None] for t in args)
            dx_i, dps = self.backward(dy_i, x_i, y_i, *params)
            return dx_i[0], dps

        return tf.vectorized_map(one, (dy, x, y))

    def per_example_squared_norms(
        self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor, *params: tf.Tensor
    ) -> list[tf.Tensor]:
        """``[||(J_p F(x_i))^T dy_i||^2 for p in params]``, each ``(batch,)``: the squared norm of
        each sample's gradient for each parameter.

        This default forms the per-example gradients (``per_example_backward``) and squares them:
        correct for every layer, and the fallback of layers without a cheaper formula. Layers
        override it with a formula that never forms them (Dense: ``||a_i||^2 ||delta_i||^2``).
        """
        _, grads = self.per_example_backward(dy, x, y, *params)
        return [squared_norms(g) for g in grads]

    def jacobian_rows(
        self, m: tf.Tensor, x: tf.Tensor, y: tf.Tensor, *params: tf.Tensor
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Rows of Algorithm 1's chain: ``(M J_x F, [M J_p F for p in params])`` per sample.

        ``M`` is ``(batch, k, *y_shape)``: ``k`` row vectors per sample (the rows of
        ``J_y z[L]``). Returns ``(batch, k, *x_shape)`` and, per parameter, ``(batch, k, size)``
        with columns in ``Vec`` order. This default stacks the ``k`` rows into the batch and
        calls ``per_example_backward``; layers override it with the structured product
        (Dense: ``M [I (x) a^T | I] = [M (x) a^T | M]``).
        """
        batch, k = tf.shape(m)[0], tf.shape(m)[1]
        rows = tf.reshape(m, tf.concat([[batch * k], tf.shape(m)[2:]], 0))
        dx, dps = self.per_example_backward(
            rows, tf.repeat(x, k, axis=0), tf.repeat(y, k, axis=0), *params
        )
        dx = tf.reshape(dx, tf.concat([[batch, k], tf.shape(x)[1:]], 0))
        return dx, [tf.reshape(vec_parameter_batch(g), [batch, k, -1]) for g in dps]

    def jacobian_ops(self, training: bool = False) -> list[tuple[JacobianOp, list[tf.Tensor]]]:
        """The maps this layer applies in order, each with its parameter tensors.

        Algorithm 1 walks these (``tf_jacbp.jacobian``). Default: the layer itself. A layer with
        a fused activation returns ``[(self, params), (activation, [])]``. ``training`` selects
        the map of ``call(..., training=training)`` for layers whose map depends on it
        (``BatchNormalization``, ``Dropout``); they raise where that map has no per-sample
        Jacobian.
        """
        return [(self, self.read_parameters())]

    def jacobian_factors(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        """(d) The named matrices of this layer's Jacobians at one sample ``x`` (no batch axis).

        ``tf_jacbp.jacobian.layer_jacobians`` collects them (Algorithm 1, step 2).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement jacobian_factors(x) for layer_jacobians."
        )

    def read_parameters(self) -> list[tf.Tensor]:
        """The values of ``jacobian_parameters()`` as tensors of the compute dtype."""
        return [
            tf.cast(tf.convert_to_tensor(v), self.compute_dtype) for v in self.jacobian_parameters()
        ]

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Keras' ``__call__`` after ``standardize_input`` on every input tensor."""
        inputs = keras.tree.map_structure(
            lambda x: standardize_input(x, self.compute_dtype, self.name), inputs
        )
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        """``y = F(inputs; params)`` by ``route``: its backward pass is ``backward``."""
        return route(self, inputs, self.read_parameters())


_WEIGHT_OPTIONS = {
    "initializer": keras.initializers,
    "regularizer": keras.regularizers,
    "constraint": keras.constraints,
}


class _KernelBiasLayer(JacobianLayer):
    """A ``JacobianLayer`` with a kernel and an optional bias, configured as Keras' layers are:
    ``kernel_initializer``, ``bias_initializer``, ``kernel_regularizer``, ``bias_regularizer``,
    ``kernel_constraint``, ``bias_constraint`` (Dense and Conv2D)."""

    def set_weight_options(self, **options: Any) -> None:
        """Store each ``<kernel|bias>_<initializer|regularizer|constraint>`` via Keras' ``get``."""
        for name, value in options.items():
            setattr(self, name, _WEIGHT_OPTIONS[name.split("_", 1)[1]].get(value))

    def add_kernel_and_bias(self, kernel_shape: tuple, bias_shape: tuple | None) -> None:
        """Create ``self.kernel`` and, unless ``bias_shape`` is None, ``self.bias`` (else None)."""
        self.kernel, self.bias = self._weight("kernel", kernel_shape), None
        if bias_shape is not None:
            self.bias = self._weight("bias", bias_shape)

    def _weight(self, name: str, shape: tuple) -> keras.Variable:
        options = {kind: getattr(self, f"{name}_{kind}") for kind in _WEIGHT_OPTIONS}
        return self.add_weight(name=name, shape=shape, **options)

    def jacobian_parameters(self) -> list[keras.Variable]:
        """``[kernel, bias]`` (theta order), or ``[kernel]`` without a bias."""
        return [self.kernel] + ([self.bias] if self.bias is not None else [])

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        """``a = f(z)``, ``z = forward(inputs, kernel, bias)``, on one route: the backward pass
        applies ``D = J_z f(z)`` (``self.activation.backward``), then ``backward``. TensorFlow can
        then fuse the forward's product, bias and activation into one kernel."""
        activation = None if type(self.activation) is activations.Linear else self.activation
        return route(self, inputs, self.read_parameters(), activation=activation)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _KernelBiasLayer:
        """The layer of a ``get_config`` dict: its serialized ``activation`` deserialized."""
        config = dict(config)
        config["activation"] = activations.deserialize(config["activation"])
        return cls(**config)

    def weight_options_config(self) -> dict[str, Any]:
        """The six weight options, serialized for ``get_config``."""
        return {
            f"{name}_{kind}": module.serialize(getattr(self, f"{name}_{kind}"))
            for name in ("kernel", "bias")
            for kind, module in _WEIGHT_OPTIONS.items()
        }


# Issue 16: squared norms of per-example gradients without forming them (Dense, Conv2D use these).


def squared_norms(g: tf.Tensor) -> tf.Tensor:
    """``||g_i||^2`` for each row ``g_i`` of ``g`` ``(batch, ...)``: ``(batch,)``."""
    return tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1)


def patch_product_squared_norms(a: tf.Tensor, d: tf.Tensor) -> tf.Tensor:
    """``||A_i^T D_i||_F^2`` for each sample, ``A`` ``(batch, P, M)``, ``D`` ``(batch, P, F)``.

    ``A_i^T D_i`` (``M x F``) is sample ``i``'s kernel gradient when ``A_i`` holds the ``P``
    inputs a weight matrix is applied to (a convolution's patches, a sequence's positions) and
    ``D_i`` their ``delta`` rows. Two exact forms, the cheaper chosen from the static shapes:

    * Gram: ``||A^T D||_F^2 = tr(D^T A A^T D) = <A A^T, D D^T>``, sums over ``P x P`` Gram
      matrices: about ``P^2 (M + F)`` multiply-adds per sample.
    * outer: form ``A^T D`` (``M F`` entries, one sample's gradient of this parameter only) and
      square it: about ``P M F``.

    The Gram form wins when positions are few, ``P (M + F) < M F``.
    """
    positions, m, f = a.shape[1], a.shape[2], d.shape[2]
    if None not in (positions, m, f) and positions * (m + f) < m * f:
        gram_a = tf.matmul(a, a, transpose_b=True)  # (batch, P, P)
        gram_d = tf.matmul(d, d, transpose_b=True)
        return tf.reduce_sum(gram_a * gram_d, axis=[1, 2])
    return squared_norms(tf.matmul(a, d, transpose_a=True))  # (batch, M, F)
