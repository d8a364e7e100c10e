"""Embedding: ``Y = S(x) E``, the rows of the embedding matrix that the ids select.

One sample is ``P`` integer ids ``x_1, ..., x_P`` (any shape; positions in row-major order), the
embedding matrix ``E`` is ``V x D`` (``V = input_dim``, ``D = output_dim``) and ``S(x)`` is the
``P x V`` selection matrix with ``S[p, x_p] = 1`` and zeros elsewhere, so row ``p`` of
``Y = S(x) E`` (``P x D``) is row ``x_p`` of ``E``. This is a bias-free Dense layer (docs/math.md,
"One layer") applied at each position to the one-hot vector ``s_p = e_{x_p}``, with ``W = E``:

* ``J_E y``: the rows of position ``p`` are ``[I_D (x) s_p^T]`` (columns in ``Vec(E)`` order,
  column-major: ``E[v, d]`` at ``d V + v``), so ``(J_E y)^T m = Vec(S(x)^T M)`` for ``m``
  (``M``: ``P x D``). The product ``S(x)^T M`` adds row ``p`` of ``M`` into row ``x_p``: a
  scatter-add (``keras.ops.segment_sum``), ``O(P D)``; ``S(x)`` is never formed. ``vjp_params``
  does it for the ``K`` stacked vectors of every sample in one scatter-add, into ``K V`` rows
  (summed over the batch) or ``K batch V`` rows (per sample).
* There is no input Jacobian: the ids are integers (as real numbers the map is piecewise
  constant, ``J_x y = 0``), and ``vjp_input`` returns zeros for them.
* Sample ``i``'s gradient ``g_i = S(x_i)^T Delta_i`` has
  ``||g_i||^2 = sum over distinct ids v of ||sum_{p: x_p = v} delta_p||^2``, which
  ``squared_norms`` computes by sorting each sample's ids, ``O(P log P + P D)``, without the
  ``V x D`` gradients.

Ids: as stock Keras (``keras.ops.take``), a negative id ``-V <= x_p < 0`` counts from the end,
row ``x_p + V``, eagerly, in a graph and under XLA. An id outside ``[-V, V)`` is an error
eagerly; in a compiled step it cannot stop the step (see the class docstring for each backend).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from keras import ops

from tf_jacbp import backend, hooks
from tf_jacbp._backend import keras
from tf_jacbp.layers.base import JacobianLayer, refuse_unsupported

Tensor = Any  # a tensor of Keras' backend


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"Embedding: {name} must be a positive integer, got {name}={value!r} "
            f"(of type {type(value).__name__})."
        )
    return value


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Embedding(JacobianLayer):
    """Integer ids to rows of ``E``, ``Y = S(x) E``; arguments as ``keras.layers.Embedding``.

    Args:
        input_dim: ``V``, the vocabulary size: ids lie in ``[0, V)``.
        output_dim: ``D``, the size of each embedding vector.
        embeddings_initializer, embeddings_regularizer, embeddings_constraint,
        activity_regularizer: as in Keras.
        mask_zero: whether id 0 is padding: ``compute_mask`` gives ``x != 0``, as Keras.
        weights: optional initial ``E`` (``(V, D)``, or a list holding it), as Keras.

    Input: ids ``(batch, ...)`` of any rank, integer (other dtypes are cast to int32, as Keras
    does). Output ``(batch, ..., D)`` in the compute dtype. A negative id ``-V <= x < 0`` selects
    row ``x + V``, as stock Keras, eagerly, in a graph and under XLA. An id outside
    ``[-V, V)`` is an error naming the layer and the id: eagerly (``InvalidArgumentError`` on
    TensorFlow, ``ValueError`` on JAX) and in a TensorFlow graph. In a compiled step:

    * TensorFlow under XLA (``jit_compile=True``) compiles assertions away and XLA's gather
      clamps the id (after the wrap), as for stock Keras: check ids in the input pipeline when
      compiling with XLA;
    * JAX (``jax.jit``, Keras' default there) reads a row of NaN for it, on both routes (stock
      Keras clamps silently), so the output and the loss are NaN; in the step of an attached
      model (``tf_jacbp.hooks.attach``) the step also applies no update and ``fit``,
      ``evaluate`` and ``*_on_batch`` raise ``ValueError`` naming the layer and the id right
      after it (``tf_jacbp.hooks.report_bad_input``).

    Keras' deprecated
    ``input_length`` gives Keras' warning and is ignored; ``lora_rank``, ``lora_alpha`` and
    ``quantization_config`` are refused with a ``ValueError``.

    Example:
        >>> layer = tf_jacbp.layers.Embedding(5, 2)
        >>> layer(np.array([[0, 3, 3]])).shape
        TensorShape([1, 3, 2])
        >>> layer.selection_matrix(np.array([0, 3, 3])).shape  # S(x): 3 positions x 5 ids
        TensorShape([3, 5])
    """

    # The ids are integers: tf_jacbp.jacobian keeps them so (float16 holds integers only to 2048).
    takes_integer_ids = True
    # One sample of a layer built without an input shape is a sequence of ids (the Jacobians).
    sample_rank = 1

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        embeddings_initializer: Any = "uniform",
        embeddings_regularizer: Any = None,
        embeddings_constraint: Any = None,
        mask_zero: bool = False,
        weights: Any = None,
        **kwargs: Any,
    ):
        refuse_unsupported("Embedding", kwargs)
        if kwargs.pop("input_length", None) is not None:
            warnings.warn("Argument `input_length` is deprecated. Just remove it.", stacklevel=2)
        super().__init__(**kwargs)
        self.input_dim = _positive_int(input_dim, "input_dim")
        self.output_dim = _positive_int(output_dim, "output_dim")
        if not isinstance(mask_zero, bool):
            raise ValueError(
                f"Embedding: mask_zero must be True or False, got mask_zero={mask_zero!r}."
            )
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.embeddings_constraint = keras.constraints.get(embeddings_constraint)
        self.mask_zero = mask_zero
        self.supports_masking = mask_zero
        self.autocast = False
        if weights is not None:
            self.build()
            self.set_weights(weights if isinstance(weights, list) else [weights])

    def build(self, input_shape: tuple | None = None) -> None:
        if self.built:
            return
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.input_dim, self.output_dim),
            initializer=self.embeddings_initializer,
            regularizer=self.embeddings_regularizer,
            constraint=self.embeddings_constraint,
        )
        self.built = True

    def jacobian_parameters(self) -> list[keras.Variable]:
        """``[E]``."""
        return [self.embeddings]

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Keras' ``__call__`` with the ids kept as integers (other tf_jacbp layers cast integer
        inputs to floats); sparse and ragged ids are refused as by every tf_jacbp layer."""
        backend.refuse_sparse_input(inputs, self.name)  # dense ids only, naming the fix
        return keras.layers.Layer.__call__(self, inputs, *args, **kwargs)

    def call(self, inputs: Tensor) -> Tensor:
        """``Y = S(x) E`` by the route; first, in an attached model's step traced by
        ``jax.jit``, an id out of range is recorded (``backend.bad_id_check``,
        ``tf_jacbp.hooks.report_bad_input``), here because the route's custom gradient traces
        ``forward`` apart from the step."""
        check = backend.bad_id_check(self, self._as_ids(inputs), self.input_dim)
        if check is not None:
            hooks.report_bad_input(self, *check, f"{self._id_message()} Found id")
        return super().call(inputs)

    def _as_ids(self, x: Tensor) -> Tensor:
        """``x`` as an integer tensor: int32 unless int32 or int64, as Keras."""
        x = ops.convert_to_tensor(x)
        if keras.backend.standardize_dtype(x.dtype) not in ("int32", "int64"):
            x = ops.cast(x, "int32")
        return x

    def _id_message(self) -> str:
        return (
            f"Embedding '{self.name}': every id must lie in [-input_dim, input_dim) = "
            f"[-{self.input_dim}, {self.input_dim}) (ids are rows of the embeddings; a negative "
            "id counts from the end, as in Keras); check the vocabulary size your ids come from "
            "against input_dim."
        )

    def ids(self, x: Tensor) -> Tensor:
        """``x`` as row numbers of ``E``: integer ids (int32 unless int32 or int64, as Keras),
        each checked to lie in ``[-V, V)`` (``backend.checked_ids``: an error eagerly, an
        assertion in a TensorFlow graph; none in a compiled step), a negative id ``x`` becoming
        ``x + V`` as in stock Keras' ``ops.take``."""
        x = backend.checked_ids(self._as_ids(x), self.input_dim, self._id_message())
        return ops.where(x < 0, x + self.input_dim, x)

    def forward(self, x: Tensor, embeddings: Tensor) -> Tensor:
        """``Y = S(x) E``: row ``x_p`` of ``E`` at each position, ``(batch, ...)`` ->
        ``(batch, ..., D)``. (``backend.gather_rows``, not ``keras.ops.take``: ``take`` would
        wrap the wrapped ids again, and under XLA an id below ``-V`` would read another row than
        stock's.)"""
        return backend.gather_rows(embeddings, self.ids(x))

    def reference(self, x: Tensor, embeddings: Tensor) -> Tensor:
        """``Y = S(x) E`` as written: the one-hot rows ``S(x)`` (``keras.ops.one_hot``) times
        ``E`` (``keras.ops.matmul``), whose autodiff gradient ``S(x)^T M`` is a dense matrix
        product, independent of ``vjp_params``' scatter-add (a gather's gradient on TensorFlow
        is ``IndexedSlices``, which gradient comparisons cannot read as arrays). It forms the
        ``batch P x V`` selection, so it is for checking, not for large vocabularies. An id out
        of range reads what ``forward`` reads (``gather_rows`` of a column of zeros adds 0, or
        NaN where ``forward`` reads NaN), not the zero row of its one-hot."""
        ids = self.ids(x)
        rows = ops.matmul(ops.one_hot(ids, self.input_dim, dtype=embeddings.dtype), embeddings)
        return rows + backend.gather_rows(ops.zeros((self.input_dim, 1), embeddings.dtype), ids)

    def vjp_input(self, m: Tensor, x: Tensor, y: Tensor, embeddings: Tensor) -> Any:
        """No input Jacobian (integer ids): zeros ``(K, batch, ...)`` of the ids' dtype."""
        return ops.zeros((ops.shape(m)[0], *ops.shape(x)), dtype=x.dtype)

    def vjp_params(
        self, m: Tensor, x: Tensor, y: Tensor, embeddings: Tensor, sum_batch=True
    ) -> list[Tensor]:
        """``(J_E y)^T m = S(x_i)^T M_i`` for each of the ``K`` stacked vectors (``M_i``: ``m[k,
        i]`` as ``P x D``): one scatter-add (``segment_sum``) of every row of ``m``.

        ``sum_batch``: sample ``i``'s id ``x_p`` of vector ``k`` goes to row ``k V + x_p``,
        ``(K, V, D)``; else to row ``(k batch + i) V + x_p``, ``(K, batch, V, D)``.
        """
        vocabulary, d = self.input_dim, self.output_dim
        k, batch = ops.shape(m)[0], ops.shape(m)[1]
        ids = ops.reshape(self.ids(x), (1, batch, -1))  # (1, batch, P)
        vectors = ops.reshape(ops.arange(k, dtype=ids.dtype), (-1, 1, 1))
        if sum_batch:
            segments, shape = ids + vocabulary * vectors, (k, vocabulary, d)
        else:
            samples = ops.reshape(ops.arange(batch, dtype=ids.dtype), (1, -1, 1))
            segments = ids + vocabulary * (samples + batch * vectors)
            shape = (k, batch, vocabulary, d)
        rows = ops.segment_sum(
            ops.reshape(m, (-1, d)),
            ops.reshape(segments, (-1,)),
            num_segments=math.prod(shape[:-1]),
        )
        return [ops.reshape(rows, shape)]

    def squared_norms(self, m: Tensor, x: Tensor, y: Tensor, embeddings: Tensor) -> list[Tensor]:
        """``||S(x_i)^T Delta_i||^2 = sum_v ||sum_{p: x_p = v} delta_p||^2`` (``delta = m[0]``),
        ``(batch,)``, without the ``V x D`` gradients.

        Each sample's ids are sorted (static shapes, so XLA compiles it); the ``delta`` rows of
        equal ids become neighbours, a cumulative sum of "the id changed" numbers the groups
        ``0, 1, ...`` within the sample, and one scatter-add into ``batch P`` rows sums each
        group: ``O(P log P + P D)`` per sample, independent of ``V``.
        """
        batch = ops.shape(m)[1]
        ids = ops.reshape(self.ids(x), (batch, -1))
        rows = ops.reshape(m[0], (batch, -1, self.output_dim))
        positions = ops.shape(ids)[1]
        order = ops.argsort(ids, axis=1)
        ids = ops.take_along_axis(ids, order, axis=1)
        rows = ops.take_along_axis(rows, order[:, :, None], axis=1)
        changed = ops.cast(ops.not_equal(ids[:, 1:], ids[:, :-1]), "int32")
        group = ops.cumsum(ops.pad(changed, ((0, 0), (1, 0))), axis=1)  # 0, 0, 1, 2, 2, ...
        segments = group + positions * ops.arange(batch, dtype="int32")[:, None]
        sums = ops.segment_sum(
            ops.reshape(rows, (-1, self.output_dim)),
            ops.reshape(segments, (-1,)),
            num_segments=batch * positions,
        )
        return [ops.sum(ops.reshape(ops.square(sums), (batch, -1)), axis=1)]

    def selection_matrix(self, x: Any) -> Tensor:
        """``S(x)``: one sample of ``P`` ids (any shape) -> ``(P, V)``, ``S[p, x_p] = 1``."""
        ids = self.ids(ops.reshape(ops.convert_to_tensor(x), (-1,)))
        return ops.one_hot(ids, self.input_dim, dtype=self.compute_dtype)

    def jacobian_factors(self, x: Tensor) -> dict[str, Tensor]:
        """``{"S(x)": (P, V), "[I (x) s^T]": (P D, V D)}`` at one sample of ``P`` ids: ``S(x)``
        and ``J_E y`` (``parameter_jacobian``, the rows of position ``p`` being
        ``[I_D (x) s_p^T]``, columns in ``Vec(E)`` order)."""
        return {"S(x)": self.selection_matrix(x), "[I (x) s^T]": self.parameter_jacobian(x)}

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        """``inputs != 0`` with ``mask_zero=True`` (id 0 is padding), else None; as Keras."""
        if not self.mask_zero:
            return None
        return keras.ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape, self.output_dim)

    def compute_output_spec(self, inputs: Any) -> keras.KerasTensor:
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype=self.compute_dtype)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "input_dim": self.input_dim,
                "output_dim": self.output_dim,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
                "embeddings_constraint": keras.constraints.serialize(self.embeddings_constraint),
                "mask_zero": self.mask_zero,
            }
        )
        return config
