"""Embedding: ``Y = S(x) E``, the rows of the embedding matrix that the ids select.

One sample is ``P`` integer ids ``x_1, ..., x_P`` (any shape; positions in row-major order), the
embedding matrix ``E`` is ``V x D`` (``V = input_dim``, ``D = output_dim``) and ``S(x)`` is the
``P x V`` selection matrix with ``S[p, x_p] = 1`` and zeros elsewhere, so row ``p`` of
``Y = S(x) E`` (``P x D``) is row ``x_p`` of ``E``. This is a bias-free Dense layer (docs/math.md,
"One layer") applied at each position to the one-hot vector ``s_p = e_{x_p}``, with ``W = E``:

* ``J_E y``: the rows of position ``p`` are ``[I_D (x) s_p^T]`` (columns in ``Vec(E)`` order,
  column-major: ``E[v, d]`` at ``d V + v``), so ``(J_E y)^T delta = Vec(S(x)^T Delta)``. The
  product ``S(x)^T Delta`` adds row ``p`` of ``Delta`` into row ``x_p``: a scatter-add
  (``tf.math.unsorted_segment_sum``), ``O(P D)``; ``S(x)`` is never formed.
* There is no input Jacobian: the ids are integers (as real numbers the map is piecewise
  constant, ``J_x y = 0``), and the backward pass returns zeros for them.
* Sample ``i``'s gradient ``g_i = S(x_i)^T Delta_i`` has
  ``||g_i||^2 = sum over distinct ids v of ||sum_{p: x_p = v} delta_p||^2``, which
  ``per_example_squared_norms`` computes by sorting each sample's ids, ``O(P log P + P D)``,
  without the ``V x D`` gradients.
"""

from __future__ import annotations

import warnings
from typing import Any

from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import JacobianLayer, standardize_input
from tf_jacbp.layers.dense import refuse_unsupported


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
    does). Output ``(batch, ..., D)`` in the compute dtype. An id outside ``[0, V)`` is an
    ``InvalidArgumentError`` naming the layer, eagerly and in graph mode; under XLA
    (``jit_compile=True``) TensorFlow compiles assertions away and XLA's gather clamps the id, as
    for stock Keras: check ids in the input pipeline when compiling with XLA. Keras' deprecated
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
        if input_shape is not None:
            self._sample_rank = len(input_shape) - 1
        self.built = True

    def jacobian_parameters(self) -> list[keras.Variable]:
        """``[E]``."""
        return [self.embeddings]

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Keras' ``__call__`` with the ids kept as integers (other tf_jacbp layers cast integer
        inputs to floats); sparse and ragged ids are refused as by every tf_jacbp layer."""
        if isinstance(inputs, tf.SparseTensor | tf.RaggedTensor):
            standardize_input(inputs, self.compute_dtype, self.name)  # raises, naming the fix
        return keras.layers.Layer.__call__(self, inputs, *args, **kwargs)

    def ids(self, x: tf.Tensor) -> tf.Tensor:
        """``x`` as integer ids (int32 unless int32 or int64, as Keras), each checked to lie in
        ``[0, input_dim)`` (an assertion the result depends on; compiled away under XLA)."""
        if x.dtype not in (tf.int32, tf.int64):
            x = tf.cast(x, tf.int32)
        message = (
            f"Embedding '{self.name}': every id must lie in [0, input_dim) = [0, "
            f"{self.input_dim}) (an id outside has no row of the embeddings); check the "
            "vocabulary size your ids come from against input_dim."
        )
        checks = [
            tf.debugging.assert_non_negative(x, message=message),
            tf.debugging.assert_less(x, tf.cast(self.input_dim, x.dtype), message=message),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(x)

    def forward(self, x: tf.Tensor, embeddings: tf.Tensor) -> tf.Tensor:
        """``Y = S(x) E``: row ``x_p`` of ``E`` at each position, ``(batch, ...)`` ->
        ``(batch, ..., D)``."""
        return tf.gather(embeddings, self.ids(x))

    def reference(self, x: tf.Tensor, embeddings: tf.Tensor) -> tf.Tensor:
        """``Y = S(x) E`` by ``tf.gather_nd``, whose autodiff gradient is a dense ``scatter_nd``
        (``tf.gather``'s is ``IndexedSlices``, which gradient comparisons cannot read as arrays;
        the indices keep rank 3 so that TensorFlow does not pick ``IndexedSlices`` either)."""
        ids = self.ids(x)
        rows = tf.gather_nd(embeddings, tf.reshape(ids, [1, -1, 1]))  # (1, batch P, D)
        return tf.reshape(rows, tf.concat([tf.shape(ids), [self.output_dim]], 0))

    def backward(
        self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor, embeddings: tf.Tensor
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """``dE = S^T Delta`` over the batch: each row of ``Delta`` added into the row of its id
        (a scatter-add); zeros for the ids."""
        rows = tf.reshape(dy, [-1, self.output_dim])
        ids = tf.reshape(self.ids(x), [-1])
        return tf.zeros_like(x), [tf.math.unsorted_segment_sum(rows, ids, self.input_dim)]

    def per_example_backward(
        self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor, embeddings: tf.Tensor
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """``g_i = S(x_i)^T Delta_i`` for each sample, ``(batch, V, D)``: one scatter-add into
        ``batch V`` rows, sample ``i``'s id ``v`` going to row ``i V + v``."""
        batch = tf.shape(dy)[0]
        ids = tf.reshape(self.ids(x), [batch, -1])
        segments = ids + self.input_dim * tf.range(batch, dtype=ids.dtype)[:, None]
        rows = tf.reshape(dy, [-1, self.output_dim])
        g = tf.math.unsorted_segment_sum(rows, tf.reshape(segments, [-1]), batch * self.input_dim)
        return tf.zeros_like(x), [tf.reshape(g, [batch, self.input_dim, self.output_dim])]

    def per_example_squared_norms(
        self, dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor, embeddings: tf.Tensor
    ) -> list[tf.Tensor]:
        """``||S(x_i)^T Delta_i||^2 = sum_v ||sum_{p: x_p = v} delta_p||^2``, ``(batch,)``,
        without the ``V x D`` gradients.

        Each sample's ids are sorted (a stable sort, static shapes, so XLA compiles it); the
        ``delta`` rows of equal ids become neighbours, a cumulative sum of "the id changed"
        numbers the groups ``0, 1, ...`` within the sample, and one scatter-add into
        ``batch P`` rows sums each group: ``O(P log P + P D)`` per sample, independent of ``V``.
        """
        batch = tf.shape(dy)[0]
        ids = tf.reshape(self.ids(x), [batch, -1])
        rows = tf.reshape(dy, [batch, -1, self.output_dim])
        positions = tf.shape(ids)[1]
        order = tf.argsort(ids, axis=1, stable=True)
        ids, rows = tf.gather(ids, order, batch_dims=1), tf.gather(rows, order, batch_dims=1)
        changed = tf.cast(tf.not_equal(ids[:, 1:], ids[:, :-1]), tf.int32)
        group = tf.cumsum(tf.pad(changed, [[0, 0], [1, 0]]), axis=1)  # 0, 0, 1, 2, 2, ...
        segments = group + positions * tf.range(batch)[:, None]
        sums = tf.math.unsorted_segment_sum(
            tf.reshape(rows, [-1, self.output_dim]),
            tf.reshape(segments, [-1]),
            batch * positions,
        )
        return [tf.reduce_sum(tf.reshape(tf.square(sums), [batch, -1]), axis=1)]

    def jacobian_rows(
        self, m: tf.Tensor, x: tf.Tensor, y: tf.Tensor, embeddings: tf.Tensor
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """``M [I_D (x) s_p^T]``: row ``r`` (``M_r`` as a ``P x D`` matrix) becomes
        ``Vec(S(x)^T M_r)``, ``(batch, k, V D)``; zeros ``(batch, k, ...)`` for the ids."""
        batch, k = tf.shape(m)[0], tf.shape(m)[1]
        v, d = self.input_dim, self.output_dim
        ids = tf.reshape(self.ids(x), [batch, 1, -1])
        segments = ids + v * tf.reshape(tf.range(batch * k, dtype=ids.dtype), [batch, k, 1])
        g = tf.math.unsorted_segment_sum(
            tf.reshape(m, [-1, d]), tf.reshape(segments, [-1]), batch * k * v
        )
        g = tf.transpose(tf.reshape(g, [batch, k, v, d]), [0, 1, 3, 2])  # Vec: E[v, d] at d V + v
        dx = tf.zeros(tf.concat([[batch, k], tf.shape(x)[1:]], 0), x.dtype)
        return dx, [tf.reshape(g, [batch, k, v * d])]

    def selection_matrix(self, x: Any) -> tf.Tensor:
        """``S(x)``: one sample of ``P`` ids (any shape) -> ``(P, V)``, ``S[p, x_p] = 1``."""
        ids = self.ids(tf.reshape(tf.convert_to_tensor(x), [-1]))
        return tf.one_hot(ids, self.input_dim, dtype=self.compute_dtype)

    def parameter_jacobian(self, x: Any) -> tf.Tensor:
        """``J_E y``: one sample of ``P`` ids -> ``(P D, V D)``, the rows of position ``p``
        (row-major, like ``y``) being ``[I_D (x) s_p^T]``; a batch of samples -> ``(batch, P D,
        V D)``. Columns in ``Vec(E)`` order.

        A sample has the rank of the ids the layer was built for without the batch axis (rank 1
        if the layer was built without an input shape).
        """
        x = tf.convert_to_tensor(x)
        rank = getattr(self, "_sample_rank", 1)
        if x.shape.rank not in (rank, rank + 1):
            raise ValueError(
                f"Embedding.parameter_jacobian: x must be one sample of ids of rank {rank} or a "
                f"batch of them (rank {rank + 1}), got x of shape {tuple(x.shape)}."
            )
        if x.shape.rank == rank:
            return self._sample_parameter_jacobian(x)
        return tf.stack([self._sample_parameter_jacobian(sample) for sample in x])

    def _sample_parameter_jacobian(self, x: tf.Tensor) -> tf.Tensor:
        s = self.selection_matrix(x)  # (P, V)
        positions, d = s.shape[0], self.output_dim
        eye = tf.eye(d, dtype=s.dtype)
        # Row (p, j) holds s_p^T in column block j: eye[j, k] * s[p, v] at k V + v.
        kron = eye[None, :, :, None] * s[:, None, None, :]  # (P, D, D, V)
        return tf.reshape(kron, [positions * d, d * self.input_dim])

    def jacobian_factors(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        """``{"S(x)": (P, V), "[I (x) s^T]": (P D, V D)}`` at one sample of ``P`` ids."""
        return {"S(x)": self.selection_matrix(x), "[I (x) s^T]": self._sample_parameter_jacobian(x)}

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
