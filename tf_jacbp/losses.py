"""The losses of Table 1, with the last activation fused in (Eq. 1 and Table 1).

Shapes. ``y_pred`` has any rank ``r >= 1`` with the classes/outputs on the last axis: ``(batch,
d)``, ``(batch, T, d)`` for sequences, ``(batch, H, W, d)`` for images. Each loss reduces the last
axis only and returns one value per *position*, shape ``y_pred.shape[:-1]``; Keras' ``Loss``
then applies ``sample_weight`` (broadcast against that shape: ``(batch,)``, ``(batch, T)`` or
``(batch, H, W)``) and the ``reduction`` (``"sum_over_batch_size"`` divides by the number of
positions, which divides each row of the gradient by it). Labels have the shapes Keras accepts,
after Keras' own rank matching (``_match_ranks``).

With ``from_logits=True`` the backward pass is Table 1's ``grad_{z[L]} l`` at every position:

| loss                            | ``l(y, z)`` per position              | ``grad_z l``          |
|---------------------------------|---------------------------------------|-----------------------|
| (Sparse)CategoricalCrossentropy | ``-sum_i y_i log softmax(z)_i``       | ``-(y - softmax(z))`` |
| BinaryCrossentropy              | ``mean_i [-y log s - (1-y) log(1-s)]`` | ``-(y - s) / d``     |
| SquaredError (paper's sum)      | ``sum_i (y_i - yhat_i)^2``            | ``-2 (y - yhat)``     |
| MeanSquaredError                | ``mean_i (y_i - yhat_i)^2``           | ``-2 (y - yhat) / d`` |

(``s = sigmoid(z)``, ``d`` the size of the last axis, ``i`` runs over it; the cross-entropy row
is exact for labels that sum to one, and ``-(y - sum(y) softmax(z))`` in general.) The upstream
gradient of the reduction, ``u`` of shape ``y_pred.shape[:-1]``, scales each position's row:
``grad_{y_pred} L = u[..., None] * grad_z l``.

With ``from_logits=False`` the loss sees probabilities ``p`` and its backward pass is
``grad_p l``; the model's Softmax/Sigmoid layer then applies its own Jacobian. The cross
entropies follow Keras exactly: ``CategoricalCrossentropy`` renormalizes each row,
``q = p / sum_i p_i``, then clips ``q`` to ``[eps, 1 - eps]`` (``eps = keras.config.epsilon()``);
``SparseCategoricalCrossentropy`` clips ``p`` first, then renormalizes (Keras takes
``softmax(log clip(p))``). For a softmax output the renormalization is the identity and its part
of ``grad_p l`` (a multiple of the all-ones vector) is annihilated by the softmax Jacobian, so the
chain still gives Table 1's ``grad_z l``. The gradient is zero where the clip is active, as
autodiff of the clip gives.

Bad labels. Class labels (``SparseCategoricalCrossentropy``: integers in ``[0, C - 1]``; the other
cross entropies: values in ``[0, 1]``) are checked on every call:

* eagerly: ``ValueError`` naming the first offending value;
* in a ``tf.function`` (``model.fit`` in graph mode): a ``tf.debugging.Assert`` that is a control
  dependency of the loss's gradient, so the step stops with ``InvalidArgumentError`` naming the
  first offending label and ``C`` before the optimizer can apply anything (the trainable weights
  are left bit-identical);
* under XLA (``jit_compile=True``), which compiles assertions away (measured: TensorFlow 2.21
  runs a compiled ``tf.debugging.Assert`` and ``check_numerics`` as no-ops), the step cannot stop
  itself. It gets an exactly zero gradient with respect to ``y_pred`` (every position, not just
  the bad one) and a NaN value at the offending positions, and the label is recorded in a
  variable of the loss (``_report_after_xla_step``). The optimizer's ``apply`` in that step is
  conditional on the record (tf_jacbp wraps ``keras.optimizers.Optimizer.apply``): the step
  applies nothing, so weights, optimizer slots (momentum, Adam's moments) and step counter stay
  bit-identical. Right after the step, ``fit``, ``evaluate`` and the ``*_on_batch`` methods raise
  ``InvalidArgumentError`` naming the label and ``C`` (the last batch included). A compiled step
  called from a loop of one's own raises at its next call instead.

In graph mode the optimizer's step counter (``optimizer.iterations``) may count the stopped step:
its increment does not wait for the gradient, in stock Keras either.

Inside ``tf_jacbp.reference_mode()`` each loss computes the same value with stock TensorFlow ops
and autodiff differentiates it (the label checks are the same on both routes).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from tensorflow.python.framework.func_graph import FuncGraph
from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext

from tf_jacbp._backend import keras, tf
from tf_jacbp.route import Map, after_each_step, in_reference_mode, route


def _fused(
    y: tf.Tensor,
    z: tf.Tensor,
    value: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    gradient: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    reference: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
) -> tf.Tensor:
    """Per-position loss ``value(y, z)``, shape ``z.shape[:-1]``, whose backward pass is
    ``gradient(y, z)``, shape ``z.shape``: ``grad_z L = u[..., None] * gradient(y, z)`` for the
    upstream ``u`` (shape ``z.shape[:-1]``, one scalar per position, from the reduction).

    One ``route`` like every layer's: ``y`` is a constant (no gradient flows to it), and in
    ``reference_mode()`` ``reference(y, z)`` is differentiated by autodiff.
    """

    def backward(u: tf.Tensor, z: tf.Tensor, loss: tf.Tensor, y: tf.Tensor) -> tuple:
        return tf.cast(u, z.dtype)[..., None] * gradient(y, z), []

    table1 = Map(lambda z, y: value(y, z), lambda z, y: reference(y, z), backward)
    return route(table1, z, constants=[y])


def _match_ranks(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Keras' rank matching of ``y_true`` and ``y_pred`` (``squeeze_or_expand_to_same_rank``).

    When the ranks differ by one and the larger tensor's last axis is 1, that axis is squeezed,
    except that a rank-1 partner is expanded instead: ``(batch,)`` with ``(batch, 1)`` gives two
    ``(batch, 1)``; ``(batch, T)`` labels with ``(batch, T, 1)`` predictions give two
    ``(batch, T)`` (the loss then reduces over ``T``, exactly as stock Keras does).
    """
    true_rank, pred_rank = y_true.shape.rank, y_pred.shape.rank
    if true_rank == pred_rank + 1 and y_true.shape[-1] == 1:
        if pred_rank == 1:
            y_pred = y_pred[..., None]
        else:
            y_true = tf.squeeze(y_true, -1)
    elif pred_rank == true_rank + 1 and y_pred.shape[-1] == 1:
        if true_rank == 1:
            y_true = y_true[..., None]
        else:
            y_pred = tf.squeeze(y_pred, -1)
    return y_true, y_pred


def _check_axis(axis: int, name: str) -> None:
    if axis != -1:
        raise ValueError(
            f"{name}: tf_jacbp supports axis=-1 only (classes on the last axis), got axis={axis}."
        )


def _check_same_shape(y: tf.Tensor, p: tf.Tensor, name: str, hint: str) -> None:
    if y.shape.rank is not None and p.shape.rank is not None:
        if not y.shape.is_compatible_with(p.shape):
            raise ValueError(
                f"{name}: y_true has shape {tuple(y.shape)} but y_pred has shape "
                f"{tuple(p.shape)}; they must match. {hint}"
            )


class _Guard:
    """The outcome of a label check: the labels to use and how to finish the loss value.

    ``y`` is the labels, in a ``tf.function`` made to depend on the check's assertion; ``all_ok``
    is ``None`` when the check ran eagerly (and passed), else a boolean scalar, also made to
    depend on the assertion; ``ok`` (shape of the loss) marks the positions whose labels are good.
    """

    def __init__(self, y: tf.Tensor, ok: tf.Tensor | None, all_ok: tf.Tensor | None):
        self.y, self.ok, self.all_ok = y, ok, all_ok

    def finish(self, loss: tf.Tensor) -> tf.Tensor:
        """``loss`` if every label is good; else NaN at the bad positions, the loss elsewhere,
        and an exactly zero gradient everywhere (``tf.where``'s gradient of the branch it did
        not take is zero). The assertion is a dependency of this ``tf.where`` and of ``y``, so
        any gradient of the loss waits for it."""
        if self.all_ok is None:
            return loss
        nan = tf.constant(np.nan, loss.dtype)
        held = tf.where(self.ok, tf.stop_gradient(loss), nan)
        return tf.where(self.all_ok, loss, held)


def _guard_labels(y: tf.Tensor, ok: tf.Tensor, loss: keras.losses.Loss, rule: str) -> _Guard:
    """Check ``ok`` (good labels, shape of ``y``) and report the first offending value of ``y``
    against ``rule``, in ``loss``'s name.

    Eagerly a failing check raises ``ValueError``. In a graph it becomes a
    ``tf.debugging.Assert`` that the returned labels and the final ``tf.where`` depend on (an
    ``InvalidArgumentError`` when the step runs, before any gradient exists). Under XLA the
    assertion is compiled away: ``_Guard.finish``'s NaN value and zero gradient remain, and
    ``_report_after_xla_step`` raises before the next step.
    """
    name = type(loss).__name__
    if tf.executing_eagerly():
        good = np.asarray(ok)
        if not good.all():
            bad = np.asarray(y)[~good]
            raise ValueError(
                f"{name}: y_true must hold {rule}; found y_true = {bad.flat[0]!r} "
                f"({bad.size} offending value(s) of {good.size})."
            )
        return _Guard(y, None, None)
    flat_ok = tf.reshape(ok, [-1])
    flat_y = tf.reshape(y, [-1])
    n = tf.size(flat_ok)
    first = tf.reduce_min(tf.where(flat_ok, n, tf.range(n)))  # n when every label is good
    first_bad = tf.gather(tf.concat([flat_y, tf.zeros([1], flat_y.dtype)], 0), first)
    count = tf.reduce_sum(tf.cast(~flat_ok, tf.int32))
    all_ok = tf.reduce_all(flat_ok)
    check = tf.debugging.Assert(
        all_ok,
        [
            f"{name}: y_true must hold {rule}; found y_true =",
            first_bad,
            "(offending values:",
            count,
            "of",
            n,
            "). The step stopped before the loss's gradient was computed.",
        ],
    )
    with tf.control_dependencies([check]):
        y = tf.identity(y)
        all_ok = tf.identity(all_ok)
    _report_after_xla_step(loss, all_ok, first_bad, count, f"{name}: y_true must hold {rule}")
    return _Guard(y, ok, all_ok)


# Under XLA (``_report_after_xla_step``): the label records each traced step graph writes, and
# the losses whose records a compiled step may have written.
_records_of_graph: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_armed_losses: weakref.WeakSet = weakref.WeakSet()


def _report_after_xla_step(
    loss: keras.losses.Loss,
    all_ok: tf.Tensor,
    first_bad: tf.Tensor,
    count: tf.Tensor,
    message: str,
) -> None:
    """Under XLA, record a bad label so that nothing is updated and the loop stops after the step.

    A step compiled with XLA cannot stop itself (assertions are compiled away). It records
    ``[1, first offending value, count]`` in a variable of the loss instead, and then:

    * the optimizer's ``apply`` traced in the same step applies nothing when a record is set
      (``_no_update_after_bad_labels``): weights, optimizer slots and step counter unchanged;
    * right after the step returns to Python, ``fit``/``evaluate``/``*_on_batch`` raise
      ``InvalidArgumentError`` with the recorded value (``_raise_recorded_bad_labels``, run by
      ``tf_jacbp.route.after_each_step``) and reset the record;
    * for compiled steps called from a function of one's own, an assertion is placed in the
      calling function, ordered before the call through the variable: its next call raises.

    Does nothing outside XLA or under a ``tf.distribute`` strategy.
    """
    graph = tf.compat.v1.get_default_graph()
    if not GraphOrParentsInXlaContext(graph) or tf.distribute.has_strategy():
        return
    record = loss._bad_label_record
    seen = tf.stack([1.0, tf.cast(first_bad, tf.float64), tf.cast(count, tf.float64)])
    record.assign(tf.where(all_ok, record, seen))
    _records_of_graph.setdefault(graph, []).append(record)
    _armed_losses.add(loss)
    loss._bad_label_message = message
    outer = getattr(graph, "outer_graph", None)
    if not isinstance(outer, FuncGraph):
        return
    with outer.as_default():
        previous = record.read_value()
        with tf.control_dependencies([previous]):
            reset = record.assign(tf.zeros([3], tf.float64))
        with tf.control_dependencies([reset]):  # reported once: reset even if it raises
            check = tf.debugging.Assert(
                tf.equal(previous[0], 0.0),
                [
                    f"{message}; found y_true =",
                    previous[1],
                    "(offending values:",
                    previous[2],
                    "). The batch came in a step compiled with XLA, which cannot stop itself: that "
                    "step applied no update, and this, the next step, stopped before running.",
                ],
            )
        with tf.control_dependencies([check]):
            record.read_value()  # the next use of ``record``, the compiled step, waits for this


def _raise_recorded_bad_labels() -> None:
    """Raise ``InvalidArgumentError`` for a bad label a compiled step recorded (and reset it)."""
    for loss in list(_armed_losses):
        record = loss._bad_label_record
        flag, value, count = record.numpy()
        if flag:
            record.assign(tf.zeros([3], tf.float64))
            raise tf.errors.InvalidArgumentError(
                None,
                None,
                f"{loss._bad_label_message}; found y_true = {value:g} ({count:g} offending "
                "value(s)). The batch came in a step compiled with XLA, which cannot stop itself: "
                "that step applied no update (weights and optimizer state unchanged), and the "
                "loop stopped right after it.",
            )


def _no_update_after_bad_labels(apply: Callable) -> Callable:
    """Keras' ``Optimizer.apply`` made conditional, in a step compiled with XLA whose loss
    recorded bad labels, on no label being bad (``_report_after_xla_step``)."""

    @functools.wraps(apply)
    def apply_unless_a_label_was_bad(self, grads, trainable_variables=None):
        records, graph = None, tf.compat.v1.get_default_graph()
        while records is None and graph is not None:  # ``apply`` may run in a branch's graph
            records, graph = _records_of_graph.get(graph), getattr(graph, "outer_graph", None)
        if not records or len(grads) == 0 or (trainable_variables is None and not self.built):
            return apply(self, grads, trainable_variables)
        if not self.built:  # create the slots outside the condition, as ``apply`` would
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        good = tf.reduce_all(tf.stack([tf.equal(r[0], 0.0) for r in records]))
        tf.cond(good, lambda: apply(self, grads, trainable_variables), lambda: None)

    apply_unless_a_label_was_bad.tf_jacbp_wrapped = apply
    return apply_unless_a_label_was_bad


def _stop_keras_on_bad_labels_under_xla() -> None:
    """Wrap ``keras.optimizers.Optimizer.apply`` once and check after every Keras step."""
    apply = keras.optimizers.Optimizer.apply
    if not hasattr(apply, "tf_jacbp_wrapped"):
        keras.optimizers.Optimizer.apply = _no_update_after_bad_labels(apply)
    after_each_step(_raise_recorded_bad_labels)


_stop_keras_on_bad_labels_under_xla()


def _guard_unit_interval(y: tf.Tensor, loss: keras.losses.Loss, rank: int | None) -> _Guard:
    """Labels in ``[0, 1]`` (NaN is not); the per-position ``ok`` reduces the last axis when
    the loss has one axis less than ``y`` (``rank`` is the loss' rank)."""
    ok = (y >= 0) & (y <= 1)
    guard = _guard_labels(y, ok, loss, "values in [0, 1] (one-hot or probabilities)")
    if guard.ok is not None:
        guard.y = tf.where(ok, guard.y, tf.zeros_like(y))  # a NaN label must not reach 0 * grad
        if rank is not None and y.shape.rank == rank + 1:
            guard.ok = tf.reduce_all(guard.ok, -1)
    return guard


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
        # A bad label seen under XLA (``_report_after_xla_step``). Made here, not when first
        # needed: a variable created while a tf.function traces makes it trace twice.
        with tf.init_scope():
            self._bad_label_record = tf.Variable(
                tf.zeros([3], tf.float64), trainable=False, name="bad_label"
            )

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "from_logits": self.from_logits}


class _SmoothedLoss(_Table1Loss):
    """A Table 1 loss with Keras' ``label_smoothing`` in ``[0, 1]`` and ``axis=-1`` only."""

    def __init__(
        self,
        from_logits: bool,
        label_smoothing: float,
        axis: int,
        reduction: str | None,
        name: str,
        dtype: Any,
    ):
        super().__init__(from_logits, reduction, name, dtype)
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


# Softmax + cross entropy on logits (Table 1, row 2).


def _softmax_cross_entropy(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """``-sum_i y_i log softmax(z)_i = sum(y) logsumexp(z) - <y, z>``, stable for any ``|z|``."""
    return tf.reduce_sum(y, -1) * tf.reduce_logsumexp(z, -1) - tf.reduce_sum(y * z, -1)


def _softmax_cross_entropy_grad(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """Table 1: ``grad_z l = -(y - sum(y) softmax(z))``, ``-(y - yhat)`` for labels summing to 1."""
    return -(y - tf.reduce_sum(y, -1, keepdims=True) * tf.nn.softmax(z, -1))


def _reference_softmax_cross_entropy(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    return -tf.reduce_sum(y * tf.nn.log_softmax(z, axis=-1), axis=-1)


def _one_hot_softmax_cross_entropy(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """Softmax + cross entropy for one-hot rows ``y`` (integer labels): ``logsumexp(z) - z_y``,
    with Table 1's ``grad_z l = -(y - softmax(z))`` as the backward pass.

    The sparse loss' Jacobian route, in fewer ops than ``_softmax_cross_entropy``: the forward
    keeps ``e = exp(z - max z)`` and ``s = sum(e)``, so that the backward's ``softmax(z) = e / s``
    (times the upstream ``u``, one scalar per position) is ``e (u / s)``: one division per
    position. ``y``, ``z``: ``(..., C)``; value ``(...)``. It is the one custom gradient not made
    by ``route``, whose backward receives only the inputs and the output: sharing ``e`` and ``s``
    between forward and backward is what saves the ops (the MLP step's parity with stock Keras).
    """

    @tf.custom_gradient
    def loss(z):
        m = tf.reduce_max(z, -1, keepdims=True)
        e = tf.exp(z - m)
        s = tf.reduce_sum(e, -1, keepdims=True)
        value = m + tf.math.log(s) - tf.reduce_sum(y * z, -1, keepdims=True)

        def grad(upstream):
            u = tf.cast(upstream, z.dtype)[..., None]  # (..., 1): the divisions stay per position
            return tf.cast(e * (u / s) - y * u, z.dtype)

        return value[..., 0], grad

    return loss(z)


# Cross entropy on probabilities, as Keras computes it.


def _clip_mask(p: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(clip(p, eps, 1 - eps), inside)``: Keras' clip and where autodiff of it passes (1) or
    stops (0) the gradient (``p`` outside ``[eps, 1 - eps]``)."""
    eps = keras.config.epsilon()
    inside = tf.cast((p >= eps) & (p <= 1 - eps), p.dtype)
    return tf.clip_by_value(p, eps, 1 - eps), inside


def _probability_cross_entropy(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """Keras' categorical cross entropy on probabilities: ``-sum_i y_i log clip(q)_i`` with
    ``q = p / sum_i p_i`` (rows renormalized to sum to one). ``y``, ``p``: ``(..., d)``."""
    c, _ = _clip_mask(p / tf.reduce_sum(p, -1, keepdims=True))
    return -tf.reduce_sum(y * tf.math.log(c), -1)


def _probability_cross_entropy_grad(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """``grad_p l = (g - <g, q>) / S`` with ``S = sum_i p_i``, ``q = p / S`` and ``g = grad_q l =
    -y / q`` (zero where the clip is active): ``J_p q = (I - q 1^T) / S``, transposed. For a
    softmax output ``S = 1`` and ``<g, q> = -sum(y)``: ``grad_p l = -y / p + sum(y)``, whose
    constant part the softmax Jacobian ``diag(p) - p p^T`` maps to zero."""
    s = tf.reduce_sum(p, -1, keepdims=True)
    q = p / s
    c, inside = _clip_mask(q)
    g = -y / c * inside
    return (g - tf.reduce_sum(g * q, -1, keepdims=True)) / s


def _reference_probability_cross_entropy(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    eps = keras.config.epsilon()
    q = tf.clip_by_value(p / tf.reduce_sum(p, -1, keepdims=True), eps, 1 - eps)
    return -tf.reduce_sum(y * tf.math.log(q), -1)


def _sparse_probability_cross_entropy(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """Keras' sparse cross entropy on probabilities, ``-log softmax(log c)_y = log sum_i c_i -
    log c_y`` with ``c = clip(p)`` (clipped first, then renormalized). ``y`` one-hot."""
    c, _ = _clip_mask(p)
    return tf.math.log(tf.reduce_sum(c, -1)) - tf.reduce_sum(y * tf.math.log(c), -1)


def _sparse_probability_cross_entropy_grad(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """``grad_p l = (1 / sum_i c_i - y / c)``, zero where the clip is active."""
    c, inside = _clip_mask(p)
    return (1 / tf.reduce_sum(c, -1, keepdims=True) - y / c) * inside


def _reference_sparse_probability_cross_entropy(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    eps = keras.config.epsilon()
    log_c = tf.math.log(tf.clip_by_value(p, eps, 1 - eps))
    return -tf.reduce_sum(y * tf.nn.log_softmax(log_c, axis=-1), -1)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class CategoricalCrossentropy(_SmoothedLoss):
    """Softmax + cross entropy (Table 1, row 2) for one-hot or probability labels.

    ``y_true`` and ``y_pred`` are ``(batch, ..., d)`` (rank 2, 3 or 4 and beyond); the loss per
    position is ``-sum_i y_i log softmax(z)_i``, shape ``(batch, ...)``. With
    ``from_logits=True``, ``y_pred`` is ``z[L]`` and ``grad_z l = -(y - softmax(z))``; otherwise
    ``y_pred`` holds probabilities, renormalized per row and clipped as Keras does (see the
    module docstring). ``label_smoothing`` ``a`` replaces ``y`` by ``(1 - a) y + a / d``.
    Labels outside ``[0, 1]`` stop the step (see "Bad labels" in the module docstring).
    """

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str = "categorical_crossentropy",
        dtype: Any = None,
    ):
        super().__init__(from_logits, label_smoothing, axis, reduction, name, dtype)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        name = "CategoricalCrossentropy"
        y_true, y_pred = _match_ranks(y_true, y_pred)
        _check_same_shape(
            y_true,
            y_pred,
            name,
            "For integer class labels use SparseCategoricalCrossentropy, or one-hot encode "
            "them with keras.utils.to_categorical.",
        )
        guard = _guard_unit_interval(y_true, self, y_pred.shape.rank - 1)
        y = guard.y
        if self.label_smoothing:
            d = tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
            y = y * (1 - self.label_smoothing) + self.label_smoothing / d
        if self.from_logits:
            loss = _fused(
                y,
                y_pred,
                _softmax_cross_entropy,
                _softmax_cross_entropy_grad,
                _reference_softmax_cross_entropy,
            )
        else:
            loss = _fused(
                y,
                y_pred,
                _probability_cross_entropy,
                _probability_cross_entropy_grad,
                _reference_probability_cross_entropy,
            )
        return guard.finish(loss)


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
    labels" in the module docstring).
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

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        name = "SparseCategoricalCrossentropy"
        y_true, y_pred = _match_ranks(y_true, y_pred)
        if y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == 1:
            y_true = tf.squeeze(y_true, -1)
        if y_true.shape.rank is not None and y_true.shape.rank != y_pred.shape.rank - 1:
            raise ValueError(
                f"{name}: y_true must hold one integer class per position, shape "
                f"{tuple(y_pred.shape[:-1])} or {(*y_pred.shape[:-1], 1)}, but has shape "
                f"{tuple(y_true.shape)} for y_pred of shape {tuple(y_pred.shape)}. For one-hot "
                "labels use CategoricalCrossentropy."
            )
        if not y_true.shape.is_compatible_with(y_pred.shape[:-1]):
            raise ValueError(
                f"{name}: y_true has shape {tuple(y_true.shape)} but y_pred of shape "
                f"{tuple(y_pred.shape)} needs one class label per position, shape "
                f"{tuple(y_pred.shape[:-1])}."
            )
        d = y_pred.shape[-1]
        classes = tf.shape(y_pred)[-1] if d is None else d
        c = tf.cast(classes, y_true.dtype)
        if y_true.dtype.is_floating:
            ok = (y_true >= 0) & (y_true < c) & (tf.math.floor(y_true) == y_true)
        else:
            ok = (y_true >= 0) & (y_true < c)
        rule = (
            f"integer class indices in [0, {d - 1}] (y_pred has {d} classes)"
            if d is not None
            else "integer class indices in [0, C - 1] (C = y_pred.shape[-1])"
        )
        guard = _guard_labels(y_true, ok, self, rule)
        labels = tf.cast(tf.where(ok, guard.y, tf.zeros_like(guard.y)), tf.int32)
        y = tf.one_hot(labels, classes, dtype=y_pred.dtype)
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


# Sigmoid + binary cross entropy (Table 1, row 1).


def _sigmoid_cross_entropy(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """``mean_i [max(z,0) - z y + log(1 + e^{-|z|})]``: ``-y log s - (1-y) log(1-s)``, stable."""
    return tf.reduce_mean(tf.nn.relu(z) - z * y + tf.math.log1p(tf.exp(-tf.abs(z))), -1)


def _sigmoid_cross_entropy_grad(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """Table 1: ``grad_z l = -(y - sigmoid(z))``, divided by ``d`` for the mean over outputs."""
    return -(y - tf.math.sigmoid(z)) / tf.cast(tf.shape(z)[-1], z.dtype)


def _binary_cross_entropy(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """``mean_i [-y_i log c_i - (1 - y_i) log(1 - c_i)]``, ``c = clip(p)``."""
    c, _ = _clip_mask(p)
    return -tf.reduce_mean(y * tf.math.log(c) + (1 - y) * tf.math.log(1 - c), -1)


def _binary_cross_entropy_grad(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """``grad_p l = -(y / c - (1 - y) / (1 - c)) / d`` (zero where the clip is active)."""
    c, inside = _clip_mask(p)
    d = tf.cast(tf.shape(p)[-1], p.dtype)
    return -(y / c - (1 - y) / (1 - c)) / d * inside


def _reference_binary(y: tf.Tensor, out: tf.Tensor, from_logits: bool) -> tf.Tensor:
    if from_logits:
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=out), -1)
    eps = keras.config.epsilon()
    p = tf.clip_by_value(out, eps, 1 - eps)
    return -tf.reduce_mean(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p), -1)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class BinaryCrossentropy(_SmoothedLoss):
    """Sigmoid + binary cross entropy (Table 1, row 1), averaged over the last axis (``d``).

    ``y_true`` in ``[0, 1]`` and ``y_pred`` are ``(batch, ..., d)``; Keras' rank matching applies
    (``(batch,)`` labels with ``(batch, 1)`` predictions). The loss per position has shape
    ``(batch, ...)``. With ``from_logits=True``, ``grad_z l = -(y - sigmoid(z)) / d``.
    ``label_smoothing`` ``a`` replaces ``y`` by ``(1 - a) y + a / 2``. Labels outside ``[0, 1]``
    stop the step (see "Bad labels" in the module docstring).
    """

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str = "binary_crossentropy",
        dtype: Any = None,
    ):
        super().__init__(from_logits, label_smoothing, axis, reduction, name, dtype)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        name = "BinaryCrossentropy"
        y_true, y_pred = _match_ranks(y_true, y_pred)
        _check_same_shape(y_true, y_pred, name, "Give one label in [0, 1] per output.")
        guard = _guard_unit_interval(y_true, self, y_pred.shape.rank - 1)
        y = guard.y
        if self.label_smoothing:
            y = y * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.from_logits:
            loss = _fused(
                y,
                y_pred,
                _sigmoid_cross_entropy,
                _sigmoid_cross_entropy_grad,
                lambda y, z: _reference_binary(y, z, True),
            )
        else:
            loss = _fused(
                y,
                y_pred,
                _binary_cross_entropy,
                _binary_cross_entropy_grad,
                lambda y, p: _reference_binary(y, p, False),
            )
        return guard.finish(loss)


# Identity + squared error (Table 1, row 3).


def _squared_error(y: tf.Tensor, yhat: tf.Tensor) -> tf.Tensor:
    """``||y - yhat||^2`` over the last axis."""
    return tf.reduce_sum(tf.square(y - yhat), -1)


def _squared_error_grad(y: tf.Tensor, yhat: tf.Tensor) -> tf.Tensor:
    """Table 1: ``grad_yhat l = -2 (y - yhat)``."""
    return -2 * (y - yhat)


class _Squared(keras.losses.Loss):
    """Identity + squared error (Table 1, row 3) over the last axis; ``mean`` divides by its
    size ``d``. ``y_true``, ``y_pred``: ``(batch, ..., d)`` after Keras' rank matching; the loss
    per position has shape ``(batch, ...)``."""

    mean = False

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        name = type(self).__name__
        y_true, y_pred = _match_ranks(y_true, y_pred)
        _check_same_shape(y_true, y_pred, name, "Give one target per output.")
        if self.mean:
            scale = 1 / tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
        else:
            scale = tf.constant(1, y_pred.dtype)
        return _fused(
            y_true,
            y_pred,
            lambda y, yhat: scale * _squared_error(y, yhat),
            lambda y, yhat: scale * _squared_error_grad(y, yhat),
            lambda y, yhat: scale * tf.reduce_sum(tf.math.squared_difference(y, yhat), -1),
        )


@keras.saving.register_keras_serializable(package="tf_jacbp")
class SquaredError(_Squared):
    """The paper's ``l = ||y - yhat||^2``, a sum (not a mean) over the last axis;
    ``grad_yhat l = -2 (y - yhat)``.

    ``y_true`` and ``y_pred`` are ``(batch, ..., d)``; the loss per position, ``(batch, ...)``,
    is ``d`` times ``MeanSquaredError``'s, and the reduction then averages over the positions.
    """

    def __init__(
        self,
        reduction: str | None = "sum_over_batch_size",
        name: str = "squared_error",
        dtype: Any = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)


@keras.saving.register_keras_serializable(package="tf_jacbp")
class MeanSquaredError(_Squared):
    """Keras' ``mean_i (y_i - yhat_i)^2`` over the last axis; ``grad_yhat l = -2 (y - yhat) / d``.

    Shapes as ``SquaredError``; values equal ``keras.losses.MeanSquaredError``'s for any rank.
    """

    mean = True

    def __init__(
        self,
        reduction: str | None = "sum_over_batch_size",
        name: str = "mean_squared_error",
        dtype: Any = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
