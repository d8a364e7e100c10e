"""Softmax over the last axis: ``s = softmax(z)``, ``J_z s = diag(s) - s s^T`` (not diagonal)."""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp.activations.elementwise import _check_positions, diagonal_matrix
from tf_jacbp.contract import JacobianMap

Tensor = Any


class Softmax(JacobianMap):
    """``s = softmax(z)`` over the last axis; ``J_z s = diag(s) - s s^T`` (not diagonal).

    Calling the object applies it (``forward``), as ``keras.activations.softmax`` does. A map
    without parameters in the contract of ``tf_jacbp.contract``: ``vjp_input`` is its formula.
    """

    name = "softmax"

    def get_config(self) -> dict[str, Any]:
        return {}

    def reference(self, z: Tensor) -> Tensor:
        """``softmax(z)`` over the last axis, the stock op (autodiff differentiates it)."""
        return ops.softmax(z, axis=-1)

    def forward(self, z: Tensor) -> Tensor:
        """``s = softmax(z)`` over the last axis, any shape."""
        return ops.softmax(z, axis=-1)

    def __call__(self, z: Any) -> Tensor:
        """``softmax(z)`` over the last axis (``forward``)."""
        return self.forward(ops.convert_to_tensor(z))

    def vjp_input(self, m: Any, z: Any, s: Any) -> Any:
        """``(diag(s) - s s^T) m = s * (m - <s, m>)`` (the matrix is symmetric) for each of the
        ``V`` vectors and each position: ``m`` ``(V, batch, ..., d)``, ``s = softmax(z)``
        ``(batch, ..., d)`` -> ``(V, batch, ..., d)``.

        Entries where ``s`` is exactly 0 (masked out, ``layers.Softmax(...)(z, mask=...)``) get 0:
        the formula then is the Jacobian of the softmax over the entries kept.
        """
        return s * (m - ops.sum(m * s, axis=-1, keepdims=True))

    def jacobian(self, z: Any) -> Any:
        """``diag(s) - s s^T``: ``(d,)`` -> ``(d, d)``, or ``(batch, d)`` -> ``(batch, d, d)``
        (any leading axes: one block per row)."""
        s = self.forward(ops.convert_to_tensor(z))
        return diagonal_matrix(s) - ops.expand_dims(s, -1) * ops.expand_dims(s, -2)

    def jacobian_at_positions(self, z: Any) -> Any:
        """``D = J_z s(z)`` of each whole sample of ``z`` ``(batch, P, m)`` (or ``(batch, ...,
        m)``, positions row-major): ``(batch, P m, P m)``, block diagonal, one block
        ``diag(s_p) - s_p s_p^T`` per position ``p`` (the softmax acts on the last axis, positions
        do not mix), rows and columns in the row-major order of a sample."""
        z = ops.convert_to_tensor(z)
        _check_positions(self, z)
        m = int(z.shape[-1])
        positions = 1
        for d in z.shape[1:-1]:
            positions *= int(d)
        blocks = self.jacobian(ops.reshape(z, (-1, positions, m)))  # (batch, P, m, m)
        same = ops.cast(ops.eye(positions), "bool")[None, :, None, :, None]  # p == p'
        d = ops.where(same, blocks[:, :, :, None, :], ops.zeros((), blocks.dtype))
        return ops.reshape(d, (-1, positions * m, positions * m))  # (batch, P, m, P', m')
