"""Label checks for the Table 1 losses, and how a bad label stops a step in every mode.

``_guard_labels`` checks the labels a loss receives (``_guard_unit_interval`` for values in
``[0, 1]``) and returns a ``_Guard``, which finishes the loss value. Eagerly (on JAX: values, not
tracers; ``run_eagerly=True``) a bad label raises ``ValueError``; in a TensorFlow graph an
assertion (``tf_jacbp.backend.assert_before``) is a control dependency of the loss's gradient.
In a step compiled with XLA, which cannot stop itself (TensorFlow compiles assertions away,
``jax.jit`` has none), the loss value is NaN at the bad positions and its gradient zero; in the
step of a model given to ``tf_jacbp.hooks.attach`` (``fit``, ``evaluate``, ``*_on_batch`` under
``jit_compile``, Keras' default on JAX) the loss also records the bad label
(``tf_jacbp.hooks.report_bad_input``): that step's optimizer update is skipped, and right after
it the loop raises (``InvalidArgumentError`` on TensorFlow, ``ValueError`` on JAX) naming the
loss, the rule and the value. The values are computed with ``keras.ops``; the assertion, the
record and the error type come from ``tf_jacbp.backend``.
"""

from __future__ import annotations

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

    Eagerly a failing check raises ``ValueError``. In a TensorFlow graph it becomes an assertion
    (``backend.assert_before``) that the returned labels and the final ``where`` depend on (an
    ``InvalidArgumentError`` when the step runs, before any gradient exists). Under XLA (and
    ``jax.jit``) no assertion runs: ``_Guard.finish``'s NaN value and zero gradient remain, and
    in an attached model's step ``tf_jacbp.hooks.report_bad_input`` skips the update and raises
    right after the step.
    """
    name = type(loss).__name__
    if backend.executing_eagerly(ok, y):
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
    hooks.report_bad_input(
        loss,
        loss._bad_label_record,
        all_ok,
        first_bad,
        count,
        f"{name}: y_true must hold {rule}; found y_true",
    )
    return _Guard(y, ok, all_ok)


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
