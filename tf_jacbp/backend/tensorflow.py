"""The TensorFlow pieces of tf_jacbp's layers, activations and losses (``tf_jacbp.backend``).

Each section belongs to one family of maps; a function here has no ``keras.ops`` form (a
``tf.custom_gradient``, a run-time assertion, a ``SparseTensor`` product, a graph whose sizes are
known only when it runs) and says why in its docstring.
"""

from __future__ import annotations

from tf_jacbp._backend import tf

__all__: list[str] = []

# --- route: the custom gradient ------------------------------------------------------------

# --- inputs: sparse and ragged tensors -----------------------------------------------------


def refuse_sparse_input(x: object, name: str) -> None:
    """A ``TypeError`` naming the conversion if ``x`` is a ``tf.SparseTensor`` or
    ``tf.RaggedTensor``: the Jacobian formulas are dense. Sparse and ragged tensors are
    TensorFlow types, with no ``keras.ops`` test."""
    if isinstance(x, tf.SparseTensor | tf.RaggedTensor):
        raise TypeError(
            f"Layer '{name}' got a {type(x).__name__} input; tf_jacbp layers take dense tensors "
            "(their Jacobians are dense formulas). Convert it first: tf.sparse.to_dense(x) for "
            "a SparseTensor, x.to_tensor() for a RaggedTensor (in the model or the input pipeline)."
        )


__all__ += ["refuse_sparse_input"]

# --- activations and losses: label checks, assertions --------------------------------------

# --- dense, merges, normalization ----------------------------------------------------------

# --- convolutions: Toeplitz products (sparse fallback, unknown sizes) ----------------------

# --- pooling, reshaping, dropout, embedding ------------------------------------------------
