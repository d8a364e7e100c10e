"""Softmax + cross entropy (Table 1, row 2): ``CategoricalCrossentropy`` and
``SparseCategoricalCrossentropy``.

With ``from_logits=True`` the backward pass is Table 1's ``grad_z l = -(y - softmax(z))``
(``-(y - sum(y) softmax(z))`` for labels that do not sum to one).

With ``from_logits=False`` the loss sees probabilities ``p`` and its backward pass is
``grad_p l``; the model's Softmax layer then applies its own Jacobian. Both losses follow Keras
exactly: ``CategoricalCrossentropy`` renormalizes each row, ``q = p / sum_i p_i``, then clips
``q`` to ``[eps, 1 - eps]`` (``eps = keras.config.epsilon()``);
``SparseCategoricalCrossentropy`` clips ``p`` first, then renormalizes (Keras takes
``softmax(log clip(p))``). For a softmax output the renormalization is the identity and its part
of ``grad_p l`` (a multiple of the all-ones vector) is annihilated by the softmax Jacobian, so the
chain still gives Table 1's ``grad_z l``. The gradient is zero where the clip is active, as
autodiff of the clip gives.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp._backend import keras
from tf_jacbp.losses.base import (
    _check_axis,
    _clip_mask,
    _compatible,
    _fused,
    _match_ranks,
    _SmoothedLoss,
    _Table1Loss,
)
from tf_jacbp.losses.labels import _guard_labels
from tf_jacbp.route import in_reference_mode

Tensor = Any

# Softmax + cross entropy on logits (Table 1, row 2).


def _softmax_cross_entropy(y: Tensor, z: Tensor) -> Tensor:
    """``-sum_i y_i log softmax(z)_i = sum(y) logsumexp(z) - <y, z>``, stable for any ``|z|``."""
    return ops.sum(y, axis=-1) * ops.logsumexp(z, axis=-1) - ops.sum(y * z, axis=-1)


def _softmax_cross_entropy_grad(y: Tensor, z: Tensor) -> Tensor:
    """Table 1: ``grad_z l = -(y - sum(y) softmax(z))``, ``-(y - yhat)`` for labels summing to 1."""
    return -(y - ops.sum(y, axis=-1, keepdims=True) * ops.softmax(z, axis=-1))


def _reference_softmax_cross_entropy(y: Tensor, z: Tensor) -> Tensor:
    return -ops.sum(y * ops.log_softmax(z, axis=-1), axis=-1)


def _one_hot_softmax_cross_entropy(y: Tensor, z: Tensor) -> Tensor:
    """Softmax + cross entropy for one-hot rows ``y`` (integer labels): ``logsumexp(z) - z_y``,
    with Table 1's ``grad_z l = -(y - softmax(z))`` as the backward pass.

    The sparse loss' Jacobian route, in fewer ops than ``_softmax_cross_entropy``: the forward
    keeps ``e = exp(z - max z)`` and ``s = sum(e)``, so that the backward's ``softmax(z) = e / s``
    (times the upstream ``u``, one scalar per position) is ``e (u / s)``: one division per
    position. ``y``, ``z``: ``(..., C)``; value ``(...)``. It is the one custom gradient not made
    by ``route``, whose backward receives only the inputs and the output: sharing ``e`` and ``s``
    between forward and backward is what saves the ops (the MLP step's parity with stock Keras).
    ``keras.ops.custom_gradient`` (``tf.custom_gradient`` on TensorFlow).
    """

    @ops.custom_gradient
    def loss(z):
        m = ops.max(z, axis=-1, keepdims=True)
        e = ops.exp(z - m)
        s = ops.sum(e, axis=-1, keepdims=True)
        value = m + ops.log(s) - ops.sum(y * z, axis=-1, keepdims=True)

        def grad(*args, upstream=None):
            if upstream is None:  # TensorFlow passes it positionally, JAX by keyword
                (upstream,) = args
            u = ops.expand_dims(ops.cast(upstream, z.dtype), -1)  # (..., 1): per position
            return ops.cast(e * (u / s) - y * u, z.dtype)

        return value[..., 0], grad

    return loss(z)


# Cross entropy on probabilities, as Keras computes it.


def _probability_cross_entropy(y: Tensor, p: Tensor) -> Tensor:
    """Keras' categorical cross entropy on probabilities: ``-sum_i y_i log clip(q)_i`` with
    ``q = p / sum_i p_i`` (rows renormalized to sum to one). ``y``, ``p``: ``(..., d)``."""
    c, _ = _clip_mask(p / ops.sum(p, axis=-1, keepdims=True))
    return -ops.sum(y * ops.log(c), axis=-1)


def _probability_cross_entropy_grad(y: Tensor, p: Tensor) -> Tensor:
    """``grad_p l = (g - <g, q>) / S`` with ``S = sum_i p_i``, ``q = p / S`` and ``g = grad_q l =
    -y / q`` (zero where the clip is active): ``J_p q = (I - q 1^T) / S``, transposed. For a
    softmax output ``S = 1`` and ``<g, q> = -sum(y)``: ``grad_p l = -y / p + sum(y)``, whose
    constant part the softmax Jacobian ``diag(p) - p p^T`` maps to zero."""
    s = ops.sum(p, axis=-1, keepdims=True)
    q = p / s
    c, inside = _clip_mask(q)
    g = -y / c * inside
    return (g - ops.sum(g * q, axis=-1, keepdims=True)) / s


def _reference_probability_cross_entropy(y: Tensor, p: Tensor) -> Tensor:
    eps = keras.config.epsilon()
    q = ops.clip(p / ops.sum(p, axis=-1, keepdims=True), eps, 1 - eps)
    return -ops.sum(y * ops.log(q), axis=-1)


def _sparse_probability_cross_entropy(y: Tensor, p: Tensor) -> Tensor:
    """Keras' sparse cross entropy on probabilities, ``-log softmax(log c)_y = log sum_i c_i -
    log c_y`` with ``c = clip(p)`` (clipped first, then renormalized). ``y`` one-hot."""
    c, _ = _clip_mask(p)
    return ops.log(ops.sum(c, axis=-1)) - ops.sum(y * ops.log(c), axis=-1)


def _sparse_probability_cross_entropy_grad(y: Tensor, p: Tensor) -> Tensor:
    """``grad_p l = (1 / sum_i c_i - y / c)``, zero where the clip is active."""
    c, inside = _clip_mask(p)
    return (1 / ops.sum(c, axis=-1, keepdims=True) - y / c) * inside


def _reference_sparse_probability_cross_entropy(y: Tensor, p: Tensor) -> Tensor:
    eps = keras.config.epsilon()
    log_c = ops.log(ops.clip(p, eps, 1 - eps))
    return -ops.sum(y * ops.log_softmax(log_c, axis=-1), axis=-1)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class CategoricalCrossentropy(_SmoothedLoss):
    """Softmax + cross entropy (Table 1, row 2) for one-hot or probability labels.

    ``y_true`` and ``y_pred`` are ``(batch, ..., d)`` (rank 2, 3 or 4 and beyond); the loss per
    position is ``-sum_i y_i log softmax(z)_i``, shape ``(batch, ...)``. With
    ``from_logits=True``, ``y_pred`` is ``z[L]`` and ``grad_z l = -(y - softmax(z))``; otherwise
    ``y_pred`` holds probabilities, renormalized per row and clipped as Keras does (see this
    module's docstring). ``label_smoothing`` ``a`` replaces ``y`` by ``(1 - a) y + a / d``.
    Labels outside ``[0, 1]`` stop the step (see "Bad labels" in ``tf_jacbp.losses``).
    """

    default_name = "categorical_crossentropy"
    shape_hint = (
        "For integer class labels use SparseCategoricalCrossentropy, or one-hot encode them with "
        "keras.utils.to_categorical."
    )
    on_logits = (
        _softmax_cross_entropy,
        _softmax_cross_entropy_grad,
        _reference_softmax_cross_entropy,
    )
    on_probabilities = (
        _probability_cross_entropy,
        _probability_cross_entropy_grad,
        _reference_probability_cross_entropy,
    )

    def classes(self, y_pred: Tensor) -> Tensor:
        """``d = y_pred.shape[-1]``, in ``y_pred``'s dtype: smoothing moves each row towards the
        uniform ``1/d``."""
        return ops.cast(ops.shape(y_pred)[-1], y_pred.dtype)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class SparseCategoricalCrossentropy(_Table1Loss):
    """Softmax + cross entropy (Table 1, row 2) for integer labels.

    ``y_pred`` is ``(batch, ..., C)``; ``y_true`` is ``(batch, ...)`` or ``(batch, ..., 1)``
    with integers in ``[0, C - 1]`` (any numeric dtype: Keras hands them over as floats). The
    labels are one-hot encoded, ``y = e_label``, and the loss per position, shape
    ``(batch, ...)``, is ``CategoricalCrossentropy``'s (with logits in fewer ops:
    ``_one_hot_softmax_cross_entropy``; on probabilities Keras' sparse form, which clips before it
    renormalizes). A label out of range or not an integer raises eagerly, stops a graph-mode
    step before any weight changes, and under XLA gives a zero gradient and a NaN loss (see "Bad
    labels" in ``tf_jacbp.losses``).
    """

    def __init__(
        self,
        from_logits: bool = False,
        ignore_class: int | None = None,
        reduction: str | None = "sum_over_batch_size",
        axis: int = -1,
        name: str = "sparse_categorical_crossentropy",
        dtype: Any = None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        _check_axis(axis, "SparseCategoricalCrossentropy")
        if ignore_class is not None:
            raise ValueError(
                f"SparseCategoricalCrossentropy: ignore_class={ignore_class!r} is not supported "
                "by tf_jacbp; pass ignore_class=None and drop those samples (or give them "
                "sample_weight=0)."
            )

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "ignore_class": None}

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        name = "SparseCategoricalCrossentropy"
        y_true, y_pred = _match_ranks(y_true, y_pred)
        if ops.ndim(y_true) == ops.ndim(y_pred) and y_true.shape[-1] == 1:
            y_true = ops.squeeze(y_true, -1)
        if ops.ndim(y_true) is not None and ops.ndim(y_true) != ops.ndim(y_pred) - 1:
            raise ValueError(
                f"{name}: y_true must hold one integer class per position, shape "
                f"{tuple(y_pred.shape[:-1])} or {(*y_pred.shape[:-1], 1)}, but has shape "
                f"{tuple(y_true.shape)} for y_pred of shape {tuple(y_pred.shape)}. For one-hot "
                "labels use CategoricalCrossentropy."
            )
        if not _compatible(tuple(y_true.shape), tuple(y_pred.shape[:-1])):
            raise ValueError(
                f"{name}: y_true has shape {tuple(y_true.shape)} but y_pred of shape "
                f"{tuple(y_pred.shape)} needs one class label per position, shape "
                f"{tuple(y_pred.shape[:-1])}."
            )
        d = y_pred.shape[-1]
        classes = ops.shape(y_pred)[-1]  # d, or a scalar tensor when d is unknown
        c = ops.cast(classes, y_true.dtype)
        ok = ops.logical_and(y_true >= 0, y_true < c)
        if keras.backend.is_float_dtype(keras.backend.standardize_dtype(y_true.dtype)):
            ok = ops.logical_and(ok, ops.floor(y_true) == y_true)
        rule = (
            f"integer class indices in [0, {d - 1}] (y_pred has {d} classes)"
            if d is not None
            else "integer class indices in [0, C - 1] (C = y_pred.shape[-1])"
        )
        guard = _guard_labels(y_true, ok, self, rule)
        labels = ops.cast(ops.where(ok, guard.y, ops.zeros_like(guard.y)), "int64")
        y = ops.one_hot(labels, classes, dtype=y_pred.dtype)
        if self.from_logits and not in_reference_mode():
            loss = _one_hot_softmax_cross_entropy(y, y_pred)
        elif self.from_logits:
            loss = _reference_softmax_cross_entropy(y, y_pred)
        else:
            loss = _fused(
                y,
                y_pred,
                _sparse_probability_cross_entropy,
                _sparse_probability_cross_entropy_grad,
                _reference_sparse_probability_cross_entropy,
            )
        return guard.finish(loss)
