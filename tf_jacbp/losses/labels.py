"""Label checks for the Table 1 losses, and how a bad label stops a step in every mode.

``_guard_labels`` checks the labels a loss receives (``_guard_unit_interval`` for values in
``[0, 1]``) and returns a ``_Guard``, which finishes the loss value. Eagerly a bad label raises
``ValueError``; in a graph an assertion (``tf_jacbp.backend.assert_before``) is a control
dependency of the loss's gradient. Under XLA, which compiles assertions away, the loss value is NaN
at the bad positions and its gradient zero; in the step of a model given to
``tf_jacbp.hooks.attach`` (``fit``, ``evaluate``, ``*_on_batch`` with ``jit_compile=True``) the
loss also records the bad label in a variable (``_report_after_xla_step``), the guarded ``apply``
of that model's optimizer (``_no_update_after_bad_labels``) applies nothing in that step, and
``_raise_recorded_bad_labels``, run after the step, raises ``InvalidArgumentError``. Importing this
module registers both with ``tf_jacbp.hooks``; Keras' classes are not touched. The values are
computed with ``keras.ops``; the assertion, the record variable, the graphs a step traces and the
error type come from ``tf_jacbp.backend``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend, hooks
from tf_jacbp._backend import keras

Tensor = Any


class _Guard:
    """The outcome of a label check: the labels to use and how to finish the loss value.

    ``y`` is the labels, in a ``tf.function`` made to depend on the check's assertion; ``all_ok``
    is ``None`` when the check ran eagerly (and passed), else a boolean scalar, also made to
    depend on the assertion; ``ok`` (shape of the loss) marks the positions whose labels are good.
    """

    def __init__(self, y: Tensor, ok: Tensor | None, all_ok: Tensor | None):
        self.y, self.ok, self.all_ok = y, ok, all_ok

    def finish(self, loss: Tensor) -> Tensor:
        """``loss`` if every label is good; else NaN at the bad positions, the loss elsewhere,
        and an exactly zero gradient everywhere (``where``'s gradient of the branch it did not
        take is zero). The assertion is a dependency of this ``where`` and of ``y``, so any
        gradient of the loss waits for it."""
        if self.all_ok is None:
            return loss
        nan = ops.convert_to_tensor(np.nan, loss.dtype)
        held = ops.where(self.ok, ops.stop_gradient(loss), nan)
        return ops.where(self.all_ok, loss, held)


def _guard_labels(y: Tensor, ok: Tensor, loss: keras.losses.Loss, rule: str) -> _Guard:
    """Check ``ok`` (good labels, shape of ``y``) and report the first offending value of ``y``
    against ``rule``, in ``loss``'s name.

    Eagerly a failing check raises ``ValueError``. In a graph it becomes an assertion
    (``backend.assert_before``) that the returned labels and the final ``where`` depend on (an
    ``InvalidArgumentError`` when the step runs, before any gradient exists). Under XLA the
    assertion is compiled away: ``_Guard.finish``'s NaN value and zero gradient remain, and
    ``_report_after_xla_step`` raises before the next step.
    """
    name = type(loss).__name__
    if backend.executing_eagerly():
        good = np.asarray(ok)
        if not good.all():
            bad = np.asarray(y)[~good]
            raise ValueError(
                f"{name}: y_true must hold {rule}; found y_true = {bad.flat[0]!r} "
                f"({bad.size} offending value(s) of {good.size})."
            )
        return _Guard(y, None, None)
    flat_ok = ops.reshape(ok, (-1,))
    flat_y = ops.reshape(y, (-1,))
    n = ops.size(flat_ok)
    # The number of good labels before the first bad one: its index, or n when all are good
    # (0 for an empty batch), where the gather below reads the zero appended to y.
    first = ops.sum(ops.cumprod(ops.cast(flat_ok, "int32")))
    first_bad = ops.take(ops.concatenate([flat_y, ops.zeros((1,), flat_y.dtype)], 0), first)
    count = ops.sum(ops.cast(ops.logical_not(flat_ok), "int32"))
    all_ok = ops.all(flat_ok)
    y, all_ok = backend.assert_before(
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
        y,
        all_ok,
    )
    _report_after_xla_step(loss, all_ok, first_bad, count, f"{name}: y_true must hold {rule}")
    return _Guard(y, ok, all_ok)


# Under XLA (``_report_after_xla_step``): the label records each traced step graph writes, and
# the losses whose records a compiled step may have written.
_records_of_graph: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_armed_losses: weakref.WeakSet = weakref.WeakSet()


def _report_after_xla_step(
    loss: keras.losses.Loss,
    all_ok: Tensor,
    first_bad: Tensor,
    count: Tensor,
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
    if step is None or not step.xla or backend.has_distribution_strategy():
        return
    record = loss._bad_label_record
    one = ops.ones((), "float64")
    seen = ops.stack([one, ops.cast(first_bad, "float64"), ops.cast(count, "float64")])
    record.assign(ops.where(all_ok, record, seen))
    graph = backend.traced_graphs()[0]
    _records_of_graph.setdefault(graph, []).append(record)
    _armed_losses.add(loss)
    loss._bad_label_message = message


def _raise_recorded_bad_labels(model: keras.Model) -> None:
    """Raise ``InvalidArgumentError`` for a bad label a compiled step of ``model`` recorded in
    one of its compiled losses (and reset the record). Other models' records are theirs."""
    compiled = keras.tree.flatten(getattr(model, "loss", None))
    for loss in [loss for loss in list(_armed_losses) if any(loss is c for c in compiled)]:
        record = loss._bad_label_record
        flag, value, count = ops.convert_to_numpy(record)
        if flag:
            record.assign(ops.zeros((3,), "float64"))
            raise backend.label_error(
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
        # ``apply`` may run in a branch's graph, inside the step's: the innermost with records
        graphs = backend.traced_graphs()
        records = next((_records_of_graph[g] for g in graphs if g in _records_of_graph), None)
        if not records or len(grads) == 0 or (trainable_variables is None and not self.built):
            return apply(self, grads, trainable_variables)
        if not self.built:  # create the slots outside the condition, as ``apply`` would
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        good = ops.all(ops.stack([ops.equal(r[0], 0.0) for r in records]))
        ops.cond(good, lambda: apply(self, grads, trainable_variables), lambda: None)

    return apply_unless_a_label_was_bad


hooks.guard_optimizer_apply(_no_update_after_bad_labels)
hooks.after_each_step(_raise_recorded_bad_labels)


def _guard_unit_interval(y: Tensor, loss: keras.losses.Loss, rank: int | None) -> _Guard:
    """Labels in ``[0, 1]`` (NaN is not); the per-position ``ok`` reduces the last axis when
    the loss has one axis less than ``y`` (``rank`` is the loss' rank)."""
    ok = ops.logical_and(y >= 0, y <= 1)
    guard = _guard_labels(y, ok, loss, "values in [0, 1] (one-hot or probabilities)")
    if guard.ok is not None:
        guard.y = ops.where(ok, guard.y, ops.zeros_like(y))  # a NaN label must not reach 0 * grad
        if rank is not None and ops.ndim(y) == rank + 1:
            guard.ok = ops.all(guard.ok, axis=-1)
    return guard
