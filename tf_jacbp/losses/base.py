"""What the Table 1 losses share: the fused map, Keras' rank matching, argument checks,
the constructors, the cross entropies' ``call`` with Keras' label smoothing, and Keras'
probability clip.

``_fused`` gives a per-position loss, shape ``y_pred.shape[:-1]``, through a ``Table1Map``:
a map of the contract (``tf_jacbp.contract``) whose product is the formula ``grad_z l`` (shape
``y_pred.shape``) scaled per position by the vectors that reach the loss (the upstream gradient
of the reduction in training); in ``reference_mode()`` a stock-op reference is differentiated by
autodiff. Everything is written in ``keras.ops``; the bad-label record comes from
``tf_jacbp.backend``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keras import ops

from tf_jacbp import backend
from tf_jacbp._backend import keras
from tf_jacbp.contract import JacobianMap
from tf_jacbp.losses.labels import _guard_unit_interval
from tf_jacbp.route import route

# ``f(y, z)``: labels first, then the predictions, as the losses' formulas are written.
LabelFunction = Callable[[Any, Any], Any]
Tensor = Any


class Table1Map(JacobianMap):
    """The per-position loss ``l = value(y, z)`` as a map of ``z`` (``y_pred``), the labels
    ``y`` a constant (no gradient flows to them); Table 1's ``grad_z l = gradient(y, z)``.

    Shapes: ``z`` and ``y`` ``(batch, ..., d)``, ``l`` ``(batch, ...)``: one value per position.
    """

    def __init__(self, value: LabelFunction, gradient: LabelFunction, reference: LabelFunction):
        self.value, self.gradient, self.stock = value, gradient, reference

    def forward(self, z: Any, y: Any) -> Any:
        """``l = value(y, z)``: ``(batch, ..., d)`` -> ``(batch, ...)``."""
        return self.value(y, z)

    def reference(self, z: Any, y: Any) -> Any:
        """The same loss in stock ops (autodiff differentiates it)."""
        return self.stock(y, z)

    def vjp_input(self, m: Any, z: Any, loss: Any, y: Any) -> Any:
        """``(J_z l)^T m``: each position's scalar ``m[v, ...]`` times its row ``grad_z l``,
        ``m[..., None] * gradient(y, z)``: ``m`` ``(V, *loss.shape)`` (``loss = l``, one value per
        position) -> ``(V, *z.shape)``."""
        return ops.expand_dims(ops.cast(m, z.dtype), -1) * self.gradient(y, z)


def _fused(
    y: Tensor,
    z: Tensor,
    value: LabelFunction,
    gradient: LabelFunction,
    reference: LabelFunction,
) -> Tensor:
    """Per-position loss ``value(y, z)``, shape ``z.shape[:-1]``, whose backward pass is
    ``gradient(y, z)``, shape ``z.shape``: ``grad_z L = u[..., None] * gradient(y, z)`` for the
    upstream ``u`` (shape ``z.shape[:-1]``, one scalar per position, from the reduction).

    One ``route`` like every layer's (``Table1Map``): ``y`` is a constant, and in
    ``reference_mode()`` ``reference(y, z)`` is differentiated by autodiff.
    """
    return route(Table1Map(value, gradient, reference), z, constants=[y])


def _match_ranks(y_true: Tensor, y_pred: Tensor) -> tuple[Tensor, Tensor]:
    """Keras' rank matching of ``y_true`` and ``y_pred`` (``squeeze_or_expand_to_same_rank``).

    When the ranks differ by one and the larger tensor's last axis is 1, that axis is squeezed,
    except that a rank-1 partner is expanded instead: ``(batch,)`` with ``(batch, 1)`` gives two
    ``(batch, 1)``; ``(batch, T)`` labels with ``(batch, T, 1)`` predictions give two
    ``(batch, T)`` (the loss then reduces over ``T``, exactly as stock Keras does).
    """
    true_rank, pred_rank = ops.ndim(y_true), ops.ndim(y_pred)
    if true_rank == pred_rank + 1 and y_true.shape[-1] == 1:
        if pred_rank == 1:
            y_pred = ops.expand_dims(y_pred, -1)
        else:
            y_true = ops.squeeze(y_true, -1)
    elif pred_rank == true_rank + 1 and y_pred.shape[-1] == 1:
        if true_rank == 1:
            y_true = ops.expand_dims(y_true, -1)
        else:
            y_pred = ops.squeeze(y_pred, -1)
    return y_true, y_pred


def _check_axis(axis: int, name: str) -> None:
    if axis != -1:
        raise ValueError(
            f"{name}: tf_jacbp supports axis=-1 only (classes on the last axis), got axis={axis}."
        )


def _compatible(a: tuple, b: tuple) -> bool:
    """Whether two static shapes (``None`` for a size unknown at trace time) can be equal."""
    if len(a) != len(b):
        return False
    return all(i is None or j is None or i == j for i, j in zip(a, b, strict=True))


def _check_same_shape(y: Tensor, p: Tensor, name: str, hint: str) -> None:
    if ops.ndim(y) is not None and ops.ndim(p) is not None:
        if not _compatible(tuple(y.shape), tuple(p.shape)):
            raise ValueError(
                f"{name}: y_true has shape {tuple(y.shape)} but y_pred has shape "
                f"{tuple(p.shape)}; they must match. {hint}"
            )


class _Table1Loss(keras.losses.Loss):
    """Shared constructor of the Table 1 losses (``from_logits``, ``reduction``, ``name``)."""

    def __init__(
        self,
        from_logits: bool = False,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = None,
        dtype: Any = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        # A bad label seen under XLA (``labels._report_after_xla_step``). Made here, not when
        # first needed: a variable created while a step function traces makes it trace twice.
        self._bad_label_record = backend.label_record()

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "from_logits": self.from_logits}


class _SmoothedLoss(_Table1Loss):
    """A Table 1 cross entropy on labels in ``[0, 1]``, with Keras' ``label_smoothing`` in
    ``[0, 1]`` and ``axis=-1`` only (``BinaryCrossentropy``, ``CategoricalCrossentropy``).

    ``call`` matches ranks as Keras does, checks that ``y_true`` has ``y_pred``'s shape (else a
    ``ValueError`` ending in ``shape_hint``) and its labels (``_guard_unit_interval``), smooths
    them (``smooth``) and sends them with ``y_pred`` down one ``_fused`` route: ``on_logits`` with
    ``from_logits=True``, else ``on_probabilities``, each ``(value, gradient, reference)`` of
    ``_fused``. A subclass names those, its ``default_name`` and ``classes``.
    """

    default_name: str
    shape_hint: str
    on_logits: tuple[Callable, Callable, Callable]
    on_probabilities: tuple[Callable, Callable, Callable]

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = None,
        dtype: Any = None,
    ):
        super().__init__(from_logits, reduction, name or self.default_name, dtype)
        owner = type(self).__name__
        _check_axis(axis, owner)
        if not 0 <= label_smoothing <= 1:
            raise ValueError(
                f"{owner}: label_smoothing must be in [0, 1], "
                f"got label_smoothing={label_smoothing}."
            )
        self.label_smoothing = float(label_smoothing)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}

    def classes(self, y_pred: Tensor) -> Any:
        """``d`` of the smoothing ``a / d``: how many values one label spreads ``a`` over."""
        raise NotImplementedError(f"{type(self).__name__} must implement classes(y_pred).")

    def smooth(self, y: Tensor, classes: Any) -> Tensor:
        """Keras' label smoothing ``y (1 - a) + a / d``, ``a = label_smoothing``,
        ``d = classes``; ``y`` any shape."""
        return y * (1 - self.label_smoothing) + self.label_smoothing / classes

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        """The loss per position, shape ``y_pred.shape[:-1]`` (class docstring)."""
        y_true, y_pred = _match_ranks(y_true, y_pred)
        _check_same_shape(y_true, y_pred, type(self).__name__, self.shape_hint)
        guard = _guard_unit_interval(y_true, self, ops.ndim(y_pred) - 1)
        y = guard.y
        if self.label_smoothing:
            y = self.smooth(y, self.classes(y_pred))
        value, gradient, reference = self.on_logits if self.from_logits else self.on_probabilities
        return guard.finish(_fused(y, y_pred, value, gradient, reference))


def _clip_mask(p: Tensor) -> tuple[Tensor, Tensor]:
    """``(clip(p, eps, 1 - eps), inside)``: Keras' clip and where autodiff of it passes (1) or
    stops (0) the gradient (``p`` outside ``[eps, 1 - eps]``)."""
    eps = keras.config.epsilon()
    inside = ops.cast(ops.logical_and(p >= eps, p <= 1 - eps), p.dtype)
    return ops.clip(p, eps, 1 - eps), inside
