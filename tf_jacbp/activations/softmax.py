"""Softmax over the last axis: ``s = softmax(z)``, ``J_z s = diag(s) - s s^T`` (not diagonal)."""

from __future__ import annotations

from typing import Any

from tf_jacbp._backend import tf


class Softmax:
    """``s = softmax(z)`` over the last axis; ``J_z s = diag(s) - s s^T`` (not diagonal).

    Calling the object applies it (``forward``), as ``keras.activations.softmax`` does.
    """

    name = "softmax"

    def get_config(self) -> dict[str, Any]:
        return {}

    def reference(self, z: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(z, axis=-1)

    def forward(self, z: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(z, axis=-1)

    def __call__(self, z: Any) -> tf.Tensor:
        """``softmax(z)`` over the last axis (``forward``)."""
        return self.forward(tf.convert_to_tensor(z))

    def backward(self, dy: tf.Tensor, z: tf.Tensor, s: tf.Tensor) -> tuple[tf.Tensor, list]:
        """``(diag(s) - s s^T) delta = s * (delta - <s, delta>)`` (the matrix is symmetric).

        Entries where ``s`` is exactly 0 (masked out, ``layers.Softmax(...)(z, mask=...)``) get 0:
        the formula then is the Jacobian of the softmax over the entries kept.
        """
        return s * (dy - tf.reduce_sum(dy * s, axis=-1, keepdims=True)), []

    def jacobian(self, z: tf.Tensor) -> tf.Tensor:
        """``diag(s) - s s^T``: ``(d,)`` -> ``(d, d)``, or ``(batch, d)`` -> ``(batch, d, d)``."""
        s = self.forward(tf.convert_to_tensor(z))
        return tf.linalg.diag(s) - s[..., :, None] * s[..., None, :]
