"""The one small base class of tf_jacbp: a layer as Jacobian-transpose products.

A tf_jacbp layer is a map ``y = F(x; p_1, ..., p_k)`` that provides (``tf_jacbp.contract``)

(a) ``forward(x, *params) -> y``, its forward computation;
(b) ``reference(x, *params) -> y``, the same map in stock ops, differentiated by autodiff (the
    witness: it must not share the code under test);
(c) ``vjp_input(m, x, y, *params)`` and ``vjp_params(m, x, y, *params, sum_batch)``: the
    products ``(J_x F)^T m`` and ``(J_p F)^T m`` with a stack of ``V`` vectors ``m``, and
    optionally ``squared_norms`` (the per-sample squared norms of the parameter products).

Training's ``backward``, Algorithm 1's ``per_example_backward`` and ``jacobian_rows``, DP-SGD's
``per_example_squared_norms`` and the materialized ``jacobian(x)`` are derived from (c), once.

A map that also depends on values it does not differentiate (Dropout's mask in training) takes
them after the parameters, ``forward(x, *params, *constants)`` and so on, and ``call`` passes them
to ``route`` as ``constants``; ``vjp_params`` still returns one product per parameter.

``call`` hands (a)-(c) to ``tf_jacbp.route.route``: (c) gives the backward pass training applies,
(b) what ``tf_jacbp.reference_mode()`` runs instead. What (c) needs from the forward pass (``x``,
``y``, the parameters, and ``z`` when an activation is fused) reaches it through the custom
gradient's closure; a layer keeps no per-call state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from keras import ops

from tf_jacbp import activations, backend
from tf_jacbp._backend import keras
from tf_jacbp.contract import JacobianMap, squared_norms_of
from tf_jacbp.route import JacobianOp, route

Tensor = Any  # a tensor of Keras' backend

__all__ = ["JacobianLayer", "JacobianMap", "JacobianOp", "Jacobians", "as_float_tensor", "route"]


class Jacobians(NamedTuple):
    """A layer's materialized Jacobians at one sample (``JacobianLayer.jacobian``)."""

    input: Any
    parameters: Any


def _dtype_of(x: Any, default: Any) -> Any:
    """The dtype the parameters are cast to at input ``x``: ``x``'s, or ``default`` (the compute
    dtype) for integer ids (``Embedding``, whose ids ``_jacobian_batch`` keeps integers)."""
    dtype = (x[0] if isinstance(x, (list, tuple)) else x).dtype
    return dtype if _is_float(dtype) else default


def _is_float(dtype: Any) -> bool:
    return keras.backend.is_float_dtype(keras.backend.standardize_dtype(dtype))


def _identity_rows(y: Tensor) -> Tensor:
    """``M = I`` as rows at the output ``y`` ``(batch, *shape)``: ``(batch, size, *shape)``."""
    size = int(np_prod(y.shape[1:]))
    eye = ops.reshape(ops.eye(size, dtype=y.dtype), (1, size, *y.shape[1:]))
    return ops.tile(eye, (ops.shape(y)[0], 1, *([1] * (len(y.shape) - 1))))


def _as_matrix(r: Tensor, single: bool) -> Tensor:
    """Rows ``(batch, k, *x_shape)`` as ``(batch, k, size(x))``, or its one sample."""
    matrix = ops.reshape(r, (ops.shape(r)[0], r.shape[1], -1))
    return matrix[0] if single else matrix


def _built_rank(layer: keras.layers.Layer) -> int | None:
    """The rank of the (first) input shape the layer was built for; else, for a layer that fixes
    the rank of one sample without a build shape (a stateless layer built at construction, one
    built without a shape), its ``sample_rank + 1``; else None."""
    shapes = getattr(layer, "_build_shapes_dict", None)
    if shapes:
        shape = next(iter(shapes.values()))
        if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
            shape = shape[0]
        if shape is not None:
            return len(shape)
    sample_rank = getattr(layer, "sample_rank", None)
    return None if sample_rank is None else sample_rank + 1


def np_prod(shape: Any) -> int:
    size = 1
    for d in shape:
        size *= int(d)
    return size


def as_float_tensor(x: object, default_dtype: str) -> Tensor:
    """``x`` as a tensor: floating inputs keep their dtype, others get ``default_dtype``.

    The teaching accessors use it, so that a float64 NumPy array gives float64 Jacobians.
    """
    x = ops.convert_to_tensor(x)
    return x if _is_float(x.dtype) else ops.cast(x, default_dtype)


def standardize_input(x: object, dtype: str, name: str) -> object:
    """One input of a tf_jacbp layer: integer and bool tensors or arrays cast to ``dtype`` (stock
    Keras layers compute with them the same way), keeping the Keras mask the input carries (its
    ``_keras_mask``, as Keras' own input cast keeps it); a ``SparseTensor`` or ``RaggedTensor`` is
    an error that names the conversion (the Jacobian formulas are dense)."""
    backend.refuse_sparse_input(x, name)
    if isinstance(x, keras.KerasTensor) or x is None:
        return x
    mask = getattr(x, "_keras_mask", None)  # a Keras mask the input carries
    x = ops.convert_to_tensor(x)
    if isinstance(x, keras.Variable) or hasattr(x, "assign"):
        # keras.ops.convert_to_tensor returns a variable as is: read its value, or the custom
        # gradient captures the variable and TensorFlow refuses its grad_fn.
        x = ops.copy(x)
    kind = keras.backend.standardize_dtype(x.dtype)
    if not (kind == "bool" or "int" in kind):
        return x
    cast = ops.cast(x, dtype)
    if mask is not None:  # the cast is a new tensor: it carries the mask on, as Keras' own cast
        cast._keras_mask = mask
    return cast


class JacobianLayer(keras.layers.Layer, JacobianMap):
    """Base class of tf_jacbp layers: the contract of ``tf_jacbp.contract`` as a Keras layer.

    A subclass creates its weights in ``build`` as usual, lists those the formulas differentiate
    in ``jacobian_parameters()`` (in theta order: kernel, then bias) and implements ``forward``,
    ``reference``, ``vjp_input``, ``vjp_params`` and optionally ``squared_norms``.
    ``backward``, ``per_example_backward``, ``per_example_squared_norms`` and ``jacobian_rows``
    are derived from them (``tf_jacbp.contract.JacobianMap``), and so are the materialized
    Jacobians ``jacobian(x)`` (``input_jacobian``, ``parameter_jacobian``). ``call`` reads the
    weights into tensors of the compute dtype and hands everything to ``route``.

    Example (a layer ``y = x * s`` with a learned scale ``s`` of shape ``(d,)``):

        class Scale(tf_jacbp.layers.JacobianLayer):
            def build(self, input_shape):
                self.s = self.add_weight(shape=(input_shape[-1],), initializer="ones")

            def jacobian_parameters(self):
                return [self.s]

            def forward(self, x, s):
                return x * s

            def reference(self, x, s):
                return keras.ops.multiply(x, s)

            def vjp_input(self, m, x, y, s):
                # J_x y = diag(s): (V, batch, d) -> (V, batch, d)
                return m * s

            def vjp_params(self, m, x, y, s, sum_batch=True):
                # J_s y = diag(x): per sample m_i * x_i, summed over the batch or not
                return [keras.ops.einsum("vbd,bd->vd" if sum_batch else "vbd,bd->vbd", m, x)]
    """

    # The rank of one sample (no batch axis) where the layer fixes it without being built for a
    # shape (a stateless layer, built at construction): the materialized Jacobians then tell one
    # sample from a batch. None: only the build shape tells (an unbuilt layer takes a batch).
    sample_rank: int | None = None

    def jacobian_parameters(self) -> list[keras.Variable]:
        """The variables the backward pass differentiates, in theta order. Default: none."""
        return []

    def jacobian_ops(self, training: bool = False) -> list[tuple[JacobianOp, list[Tensor]]]:
        """The maps this layer applies in order, each with its parameter tensors.

        Algorithm 1 walks these (``tf_jacbp.jacobian``). Default: the layer itself. A layer with
        a fused activation returns ``[(self, params), (activation, [])]``. ``training`` selects
        the map of ``call(..., training=training)`` for layers whose map depends on it
        (``BatchNormalization``, ``Dropout``); they raise where that map has no per-sample
        Jacobian.
        """
        return [(self, self.read_parameters())]

    def jacobian_factors(self, x: Tensor) -> dict[str, Tensor]:
        """(d) The named matrices of this layer's Jacobians at one sample ``x`` (no batch axis).

        ``tf_jacbp.jacobian.layer_jacobians`` collects them (Algorithm 1, step 2).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement jacobian_factors(x) for layer_jacobians."
        )

    def read_parameters(self) -> list[Tensor]:
        """The values of ``jacobian_parameters()`` as tensors of the compute dtype."""
        return [ops.cast(v, self.compute_dtype) for v in self.jacobian_parameters()]

    def jacobian(self, x: Any) -> Jacobians:
        """The layer's Jacobians at ``x``, one sample or a batch (derived from the contract).

        ``input``: ``J_x a`` of the whole call ``a = f(F(x))`` (a fused activation included),
        ``(out_size, in_size)`` for one sample, a list of those for several inputs; ``parameters``:
        ``J_theta z`` of the map ``F`` before a fused activation (the paper's ``[I (x) a^T | I]``
        for Dense), ``(out_size(z), theta_size)`` with columns in theta order (each parameter in
        ``Vec`` order), or None for a layer without parameters. A batch gets a leading axis.
        Both come from ``jacobian_rows`` with the identity as the rows ``M``.
        """
        return Jacobians(self.input_jacobian(x), self.parameter_jacobian(x))

    def input_jacobian(self, x: Any) -> Any:
        """``J_x a`` of the whole call at ``x`` (``jacobian(x).input``)."""
        xs, single = self._jacobian_batch(x)
        records, a = [], xs
        for op, params in self.jacobian_ops(False):
            params = [ops.cast(p, _dtype_of(a, self.compute_dtype)) for p in params]
            y = op.forward(a, *params)
            records.append((op, a, y, params))
            a = y
        m = _identity_rows(a)
        for op, a_in, y, params in reversed(records):
            m, _ = op.jacobian_rows(m, a_in, y, *params)
        if isinstance(m, list):
            return [_as_matrix(r, single) for r in m]
        return _as_matrix(m, single)

    def parameter_jacobian(self, x: Any) -> Tensor:
        """``J_theta z`` of the map before a fused activation at ``x``
        (``jacobian(x).parameters``): ``(out_size, theta_size)``, columns in theta order."""
        xs, single = self._jacobian_batch(x)
        op, params = self.jacobian_ops(False)[0]
        if not params:
            return None
        params = [ops.cast(p, _dtype_of(xs, self.compute_dtype)) for p in params]
        z = op.forward(xs, *params)
        _, blocks = op.jacobian_rows(_identity_rows(z), xs, z, *params)
        theta = ops.concatenate(blocks, axis=-1)
        return theta[0] if single else theta

    def _jacobian_batch(self, x: Any) -> tuple[Any, bool]:
        """``x`` as a float batch, and whether it was one sample (its rank below the rank the
        layer was built for; an unbuilt layer is built for a batch of ``x``)."""
        several = isinstance(x, (list, tuple))
        if getattr(self, "takes_integer_ids", False):  # ids stay integers (float16: up to 2048)
            xs = [ops.convert_to_tensor(t) for t in (x if several else [x])]
        else:
            xs = [as_float_tensor(t, self.compute_dtype) for t in (x if several else [x])]
        built = _built_rank(self)
        if built is None:
            single = False
            if not self.built:
                self.build([t.shape for t in xs] if several else xs[0].shape)
        else:
            if len(xs[0].shape) not in (built - 1, built):
                raise ValueError(
                    f"{type(self).__name__} '{self.name}': the Jacobians take one sample of rank "
                    f"{built - 1} or a batch of them (rank {built}), as the layer was built for "
                    f"inputs of rank {built}; got x of shape {tuple(xs[0].shape)}."
                )
            single = len(xs[0].shape) == built - 1
        if single:
            xs = [t[None] for t in xs]
        if not self.built:  # a layer that knows a sample's rank without a build shape
            self.build([t.shape for t in xs] if several else xs[0].shape)
        return (xs if several else xs[0]), single

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Keras' ``__call__`` after ``standardize_input`` on every input tensor."""
        inputs = keras.tree.map_structure(
            lambda x: standardize_input(x, self.compute_dtype, self.name), inputs
        )
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs: Tensor) -> Tensor:
        """``y = F(inputs; params)`` by ``route``: its backward pass is ``backward``."""
        return route(self, inputs, self.read_parameters())


def build_at_construction(layer: keras.layers.Layer, stateless_class: type) -> None:
    """Mark a stateless layer built in its ``__init__``, as Keras does for its stateless layers,
    unless a subclass overrides ``build`` (Keras then runs that ``build`` at the first call).

    ``stateless_class`` is the tf_jacbp class whose ``__init__`` calls this: its own ``build``
    (or the one it inherits) is the one that needs no call."""
    if type(layer).build is stateless_class.build:
        layer.built = True


# Keras' weight-layer arguments that tf_jacbp refuses: the paper's Jacobians are those of the
# full-precision W and b (Dense, the convolutions, Embedding).
_UNSUPPORTED = {
    "lora_rank": "LoRA adds two low-rank matrices to W",
    "lora_alpha": "LoRA adds two low-rank matrices to W",
    "quantization_config": "quantization replaces W by integers and scales",
}


def refuse_unsupported(owner: str, kwargs: dict[str, Any]) -> None:
    """Pop Keras' LoRA and quantization arguments (``lora_rank``, ``lora_alpha``,
    ``quantization_config``) from ``kwargs``; any that is not None is a ``ValueError`` naming it
    and the fix (tf_jacbp's formulas differentiate the full-precision weights).

    Args:
        owner: the layer class's name (``"Dense"``), for the message and the stock layer to use.
        kwargs: the layer's ``**kwargs``, changed in place.
    """
    for name, why in _UNSUPPORTED.items():
        value = kwargs.pop(name, None)
        if value is not None:
            raise ValueError(
                f"{owner}: {name}={value!r} is not supported: {why}, and tf_jacbp's explicit "
                f"Jacobians are those of the full-precision weights. Remove {name}, or use the "
                f"stock keras.layers.{owner} (its gradient is then autodiff's, not checked)."
            )


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

    def call(self, inputs: Tensor) -> Tensor:
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


def patch_product_squared_norms(a: Tensor, d: Tensor) -> Tensor:
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
        gram_a = ops.einsum("bpm,bqm->bpq", a, a)  # (batch, P, P)
        gram_d = ops.einsum("bpf,bqf->bpq", d, d)
        return ops.sum(gram_a * gram_d, axis=(1, 2))
    return squared_norms_of(ops.einsum("bpm,bpf->bmf", a, d))  # (batch, M, F)
