"""Label checks for the Table 1 losses, and how a bad label stops a step in every mode.

``_guard_labels`` checks the labels a loss receives (``_guard_unit_interval`` for values in
``[0, 1]``) and returns a ``_Guard``, which finishes the loss value. Eagerly a bad label raises
``ValueError``; in a graph a ``tf.debugging.Assert`` is a control dependency of the loss's
gradient. Under XLA, which compiles assertions away, the loss value is NaN at the bad positions
and its gradient zero; in the step of a model given to ``tf_jacbp.hooks.attach`` (``fit``,
``evaluate``, ``*_on_batch`` with ``jit_compile=True``) the loss also records the bad label in a
variable (``_report_after_xla_step``), the guarded ``apply`` of that model's optimizer
(``_no_update_after_bad_labels``) applies nothing in that step, and
``_raise_recorded_bad_labels``, run after the step, raises ``InvalidArgumentError``. Importing
this module registers both with ``tf_jacbp.hooks``; Keras' classes are not touched.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import numpy as np

from tf_jacbp import hooks
from tf_jacbp._backend import keras, tf


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
    # n when every label is good (the min of an empty batch is the largest int32: n = 0 too)
    first = tf.minimum(tf.reduce_min(tf.where(flat_ok, n, tf.range(n))), n)
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
    """In an attached model's step compiled with XLA, record a bad label so that nothing is
    updated and the loop stops after the step.

    A step compiled with XLA cannot stop itself (assertions are compiled away). It records
    ``[1, first offending value, count]`` in a variable of the loss instead, and then:

    * the optimizer's ``apply`` traced in the same step applies nothing when a record is set
      (``_no_update_after_bad_labels``): weights, optimizer slots and step counter unchanged;
    * right after the step returns to Python, ``fit``/``evaluate``/``*_on_batch`` raise
      ``InvalidArgumentError`` with the recorded value (``_raise_recorded_bad_labels``, run by
      ``tf_jacbp.hooks.after_each_step``) and reset the record.

    Does nothing outside such a step, and under a ``tf.distribute`` strategy. In a step compiled
    with XLA that is not an attached model's (a model ``tf_jacbp.hooks.attach`` was not given, a
    function of one's own), a bad label gives a NaN loss value there and a zero gradient, and
    nothing stops.
    """
    step = hooks.running_step()
    if step is None or not step.xla or tf.distribute.has_strategy():
        return
    record = loss._bad_label_record
    seen = tf.stack([1.0, tf.cast(first_bad, tf.float64), tf.cast(count, tf.float64)])
    record.assign(tf.where(all_ok, record, seen))
    graph = tf.compat.v1.get_default_graph()
    _records_of_graph.setdefault(graph, []).append(record)
    _armed_losses.add(loss)
    loss._bad_label_message = message


def _raise_recorded_bad_labels(model: keras.Model) -> None:
    """Raise ``InvalidArgumentError`` for a bad label a compiled step of ``model`` recorded in
    one of its compiled losses (and reset the record). Other models' records are theirs."""
    compiled = keras.tree.flatten(getattr(model, "loss", None))
    for loss in [loss for loss in list(_armed_losses) if any(loss is c for c in compiled)]:
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

    return apply_unless_a_label_was_bad


hooks.guard_optimizer_apply(_no_update_after_bad_labels)
hooks.after_each_step(_raise_recorded_bad_labels)


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
