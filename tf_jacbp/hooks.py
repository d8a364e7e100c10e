"""What tf_jacbp hooks into a Keras model: explicitly, and only into the models that use it.

Importing tf_jacbp changes nothing in Keras: ``keras.Model`` and ``keras.optimizers.Optimizer``
keep their own methods. ``attach(model)`` gives one model three behaviours, through attributes
of that model and of its optimizer only:

1. **Keras' cached step functions follow the route switch.** ``fit``, ``evaluate``, ``predict``
   and the ``*_on_batch`` methods cache ``model.train_function`` (``test_function``,
   ``predict_function``), and the route (``tf_jacbp.reference_mode()``) is read when a function
   is traced. On an attached model, a function made in the other mode is made again, so
   ``with reference_mode(): model.fit(...)`` after a normal ``fit`` trains the reference route.
2. **Checks after each step, and guarded updates.** After every call of the train or test
   function, each check registered with ``after_each_step`` runs on the model (it may raise to
   stop the loop right after a step); when the train function is made, the model's optimizer
   (and a ``LossScaleOptimizer``'s inner one) has its ``apply`` wrapped by each wrapper registered
   with ``guard_optimizer_apply``. While an attached model's step function runs (and is traced),
   ``running_step()`` names the model and whether Keras compiled it with XLA
   (``model.jit_compile``, ``jax.jit`` on JAX), which is how a loss or a layer knows it is inside
   one.
3. **Bad input stops a compiled step's update** (``report_bad_input``). A step compiled with
   XLA cannot stop itself: TensorFlow compiles its assertions away, and ``jax.jit`` has none. A
   check that fails there (a label out of range in ``tf_jacbp.losses``, an id out of range in
   ``tf_jacbp.layers.Embedding`` on JAX) records the first offending value; the optimizer's update
   of that step is skipped (on TensorFlow its ``apply`` runs under ``ops.cond``; on JAX the
   ``stateless_apply`` Keras' trainer calls returns the variables it was given, selected with
   ``ops.where``), so weights, optimizer slots and step counter are unchanged; and right after
   the step ``fit``/``evaluate``/``*_on_batch`` raise the error (``InvalidArgumentError`` on
   TensorFlow, ``ValueError`` on JAX) naming the owner and the value. On JAX the record travels
   out of the compiled step by ``jax.debug.callback``, read after a ``jax.effects_barrier()``, and
   a step function that raises first hands the state it was given (or returned) back to the
   model's variables, which Keras' JAX ``fit`` and ``evaluate`` hold outside them during a loop.
   Reading a record waits for the step: an attached model whose step holds such a check runs
   its steps one at a time (no asynchronous dispatch ahead), on both backends.

``GradientCheck`` (``set_model``), ``tf_jacbp.privacy``'s DP models and the builders of
``tf_jacbp.models`` attach the models they get; any other model of tf_jacbp layers can be
attached by hand, once, before ``fit`` (attaching again does nothing). A model that is not
attached trains exactly as before, with two differences: a cached step function keeps the route
it was traced with, and in a compiled step a bad label gives a NaN loss and a zero gradient for
that step (a bad Embedding id on JAX a NaN row, so a NaN loss), instead of stopping ``fit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend
from tf_jacbp._backend import keras
from tf_jacbp.route import in_reference_mode

__all__ = [
    "after_each_step",
    "attach",
    "attached",
    "guard_optimizer_apply",
    "report_bad_input",
    "running_step",
]

_after_step: list[Callable[[keras.Model], None]] = []
_apply_guards: list[Callable[[Callable], Callable]] = []

# The mode each function Keras made was made in (weak keys: a function dies with its model).
_made_in: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_JAX = keras.backend.backend() == "jax"


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """The attached model whose step function is running, and whether it runs under XLA. Each
    call of a step function has its own ``Step`` (compared by identity): on JAX it keys what
    the step traced (``tf_jacbp.backend.traced_graphs``)."""

    model: keras.Model
    xla: bool


# A process-wide stack, not a thread-local: tf.distribute traces each replica's function in a
# thread of its own, and those threads must see the step the caller runs.
_lock = threading.Lock()
_running: list[Step] = []


def after_each_step(check: Callable[[keras.Model], None]) -> None:
    """Run ``check(model)`` after every call of an attached model's ``train_function`` and
    ``test_function`` (``fit``, ``evaluate``, ``*_on_batch``); it may raise to stop the loop
    right after a step. Registering the same check twice registers it once."""
    if check not in _after_step:
        _after_step.append(check)


def guard_optimizer_apply(wrapper: Callable[[Callable], Callable]) -> None:
    """Wrap the ``apply`` of every attached model's optimizer with ``wrapper(apply)``, which
    returns a function ``(grads, trainable_variables=None)``. Registered once."""
    if wrapper not in _apply_guards:
        _apply_guards.append(wrapper)


def running_step() -> Step | None:
    """The innermost attached model's step running now (``Step``), or None outside one."""
    with _lock:
        return _running[-1] if _running else None


def attached(model: keras.Model) -> bool:
    """Whether ``attach(model)`` was called."""
    return getattr(model, "_tf_jacbp_attached", False)


def attach(model: keras.Model) -> keras.Model:
    """Give ``model`` the behaviours of the module docstring; returns the model.

    Only ``model``'s own attributes change (its ``make_train_function``, ``make_test_function``,
    ``make_predict_function``, and its optimizer's ``apply`` (and on JAX ``stateless_apply``)
    when a train function is made); other models and Keras' classes are untouched. Idempotent.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"tf_jacbp.hooks.attach: model must be a keras.Model, got {type(model).__name__}."
        )
    if attached(model):
        return model
    for kind in ("train", "test", "predict"):
        make = getattr(type(model), f"make_{kind}_function", None)
        if make is not None:
            bound = types.MethodType(_remade_on_switch(make, f"{kind}_function"), model)
            object.__setattr__(model, f"make_{kind}_function", bound)
    object.__setattr__(model, "_tf_jacbp_attached", True)
    return model


def _remade_on_switch(make: Callable, attribute: str) -> Callable:
    """``make`` (e.g. ``keras.Model.make_train_function``) forced to make a new function when the
    cached ``model.<attribute>`` was made in the other mode; a new train or test function runs
    inside ``running_step`` and is followed by the checks of ``after_each_step``."""

    @functools.wraps(make)
    def make_for_this_mode(self, force: bool = False):
        cached = getattr(self, attribute, None)
        mode = in_reference_mode()
        if cached is not None and _made_in.get(cached, mode) != mode:
            force = True
        result = make(self, force)
        made = getattr(self, attribute, None)
        if made is not None and made is not cached:
            if attribute != "predict_function":
                if attribute == "train_function":
                    _guard(getattr(self, "optimizer", None))
                made = _checked(made, self, attribute)
                object.__setattr__(self, attribute, made)
                result = made if result is not None else None
            _made_in[made] = mode
        return result

    return make_for_this_mode


def _guard(optimizer: Any) -> None:
    """Wrap ``optimizer.apply`` (and an inner optimizer's) with the registered guards and, on
    TensorFlow, ``_no_update_after_bad_input``, once; on JAX, where Keras' trainer calls
    ``stateless_apply``, wrap the outer optimizer's with ``_same_state_after_bad_input``."""
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if opt is None or getattr(opt, "_tf_jacbp_guarded", False):
            continue
        apply = type(opt).apply
        for wrapper in [*_apply_guards, *([] if _JAX else [_no_update_after_bad_input])]:
            apply = wrapper(apply)
        object.__setattr__(opt, "apply", types.MethodType(apply, opt))
        if _JAX and opt is optimizer:
            stateless = _same_state_after_bad_input(type(opt).stateless_apply)
            object.__setattr__(opt, "stateless_apply", types.MethodType(stateless, opt))
        object.__setattr__(opt, "_tf_jacbp_guarded", True)


# The parts of the state Keras' JAX trainer passes to and returns from a step function.
_STATE_PARTS = {
    "train_function": (
        "trainable_variables",
        "non_trainable_variables",
        "optimizer_variables",
        "metrics_variables",
    ),
    "test_function": ("trainable_variables", "non_trainable_variables", "metrics_variables"),
}


def _hand_back(model: keras.Model, attribute: str, state: Any) -> None:
    """JAX: put ``state`` (what a step function took or returned) into ``model``'s variables.

    Keras' JAX ``fit`` and ``evaluate`` hold the state outside the variables during a loop
    (emptying them first) and ``*_on_batch`` donate it to the compiled step; a step function
    that raises would leave the model without weights. ``jax_state_sync`` is Keras' own way back.
    """
    parts = _STATE_PARTS[attribute]
    if not isinstance(state, tuple | list) or len(state) != len(parts):
        return
    object.__setattr__(model, "_jax_state", dict(zip(parts, state, strict=True)))
    object.__setattr__(model, "_jax_state_synced", False)
    model.jax_state_sync()


def _checked(function: Callable, model: keras.Model, attribute: str) -> Callable:
    """``function`` run inside ``running_step`` and followed by every check of
    ``after_each_step`` on ``model`` (held weakly: the model holds the function). On JAX, when
    the function or a check raises, the state is handed back to the model first (``_hand_back``):
    the one the step returned, else the one it was given."""
    model_ref = weakref.ref(model)

    @functools.wraps(function)
    def step_then_check(*args, **kwargs):
        owner = model_ref()
        step = Step(owner, bool(getattr(owner, "jit_compile", False)))
        with _lock:
            _running.append(step)
        try:
            result = function(*args, **kwargs)
        except Exception:
            if _JAX and owner is not None and args:
                with contextlib.suppress(Exception):  # the step's own error comes first
                    _hand_back(owner, attribute, args[0])
            raise
        finally:
            with _lock:
                _running.remove(step)
        if owner is not None:
            try:
                for check in _after_step:
                    check(owner)
            except Exception:
                if _JAX and isinstance(result, tuple) and len(result) == 2:
                    _hand_back(owner, attribute, result[1])
                raise
        return result

    return step_then_check


# --- bad input in a compiled step: record, no update, raise after the step -----------------

# The records each traced step wrote (keyed by ``backend.traced_graphs``: a TensorFlow graph,
# a JAX step's ``Step``), and per model the owners (a loss, a layer) whose records its compiled
# steps write, each with its record and message.
_records_of_trace: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_owners_of_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def report_bad_input(
    owner: Any,
    record: Any,
    all_ok: Any,
    first_bad: Any,
    count: Any,
    message: str,
) -> None:
    """In an attached model's step compiled with XLA, record a failed check of ``owner`` (a loss,
    a layer) so that the step updates nothing and the loop stops right after it.

    ``record`` is ``owner``'s, made by ``tf_jacbp.backend.label_record`` outside any trace;
    ``all_ok`` (boolean scalar) is the check, ``first_bad`` the first offending value and
    ``count`` how many there are. The step writes ``[1, first_bad, count]`` (float64; float32 on
    JAX without x64) into ``record`` when ``all_ok`` is false (``backend.record_bad_input``), the
    optimizer's update traced in the same step is skipped, and after the step
    ``_raise_recorded_bad_input`` raises ``backend.label_error`` with ``message`` followed by
    ``" = value"`` (so ``message`` ends like ``"...; found y_true"``). Does nothing outside such
    a step and under a ``tf.distribute`` strategy.
    """
    step = running_step()
    if step is None or not step.xla or backend.has_distribution_strategy():
        return
    dtype = "float64" if backend.float64_enabled() else "float32"  # JAX without x64: float32
    seen = ops.stack([ops.ones((), dtype), ops.cast(first_bad, dtype), ops.cast(count, dtype)])
    written = backend.record_bad_input(record, all_ok, seen)
    _records_of_trace.setdefault(backend.traced_graphs(step)[0], []).append(written)
    owners = _owners_of_model.setdefault(step.model, weakref.WeakKeyDictionary())
    owners[owner] = (record, message)


def _raise_recorded_bad_input(model: keras.Model) -> None:
    """Raise ``backend.label_error`` for a bad input a compiled step of ``model`` recorded in
    one of its owners' records, and reset that record. Other models' records are theirs."""
    for record, message in list(_owners_of_model.get(model, {}).values()):
        flag, value, count = backend.read_record(record)
        if flag:
            record.assign(np.zeros(3))
            raise backend.label_error(
                f"{message} = {value:g} ({count:g} offending value(s)). The batch came in a step "
                "compiled with XLA, which cannot stop itself: that step applied no update "
                "(weights and optimizer state unchanged), and the loop stopped right after it.",
            )


after_each_step(_raise_recorded_bad_input)


def _records_now() -> list | None:
    """The records written by the step being traced now (the innermost graph with any)."""
    graphs = backend.traced_graphs(running_step())
    return next((_records_of_trace[g] for g in graphs if g in _records_of_trace), None)


def _nothing_recorded(records: list) -> Any:
    """A boolean scalar: no record of ``records`` has its flag set."""
    return ops.all(ops.stack([ops.equal(r[0], 0.0) for r in records]))


def _no_update_after_bad_input(apply: Callable) -> Callable:
    """TensorFlow: Keras' ``Optimizer.apply`` made conditional (``ops.cond``), in a step whose
    checks recorded bad input, on no record being set (``report_bad_input``). The records are
    variables: in a loop of several steps in one function, a later step sees an earlier one's."""

    @functools.wraps(apply)
    def apply_unless_input_was_bad(self, grads, trainable_variables=None):
        records = _records_now()
        if not records or len(grads) == 0 or (trainable_variables is None and not self.built):
            return apply(self, grads, trainable_variables)
        if not self.built:  # create the slots outside the condition, as ``apply`` would
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        ops.cond(
            _nothing_recorded(records),
            lambda: apply(self, grads, trainable_variables),
            lambda: None,
        )

    return apply_unless_input_was_bad


def _same_state_after_bad_input(stateless_apply: Callable) -> Callable:
    """JAX: Keras' ``Optimizer.stateless_apply`` returning the variables it was given, selected
    with ``ops.where`` (no branch, no host round trip), in a step whose checks recorded bad
    input (``report_bad_input``; the records are the step's traced values)."""

    @functools.wraps(stateless_apply)
    def same_state_unless_input_was_bad(self, optimizer_variables, grads, trainable_variables):
        new_trainable, new_optimizer = stateless_apply(
            self, optimizer_variables, grads, trainable_variables
        )
        records = _records_now()
        if not records:
            return new_trainable, new_optimizer
        good = _nothing_recorded(records)
        news, olds = [*new_trainable, *new_optimizer], [*trainable_variables, *optimizer_variables]
        kept = [ops.where(good, new, old) for new, old in zip(news, olds, strict=True)]
        return kept[: len(new_trainable)], kept[len(new_trainable) :]

    return same_state_unless_input_was_bad
