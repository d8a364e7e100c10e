"""What tf_jacbp hooks into a Keras model: explicitly, and only into the models that use it.

Importing tf_jacbp changes nothing in Keras: ``keras.Model`` and ``keras.optimizers.Optimizer``
keep their own methods. ``attach(model)`` gives one model two behaviours, through attributes of
that model and of its optimizer only:

1. **Keras' cached step functions follow the route switch.** ``fit``, ``evaluate``, ``predict``
   and the ``*_on_batch`` methods cache ``model.train_function`` (``test_function``,
   ``predict_function``), and the route (``tf_jacbp.reference_mode()``) is read when a function
   is traced. On an attached model, a function made in the other mode is made again, so
   ``with reference_mode(): model.fit(...)`` after a normal ``fit`` trains the reference route.
2. **Checks after each step, and guarded updates.** After every call of the train or test
   function, each check registered with ``after_each_step`` runs on the model (it may raise to
   stop the loop right after a step); when the train function is made, the model's optimizer
   (and a ``LossScaleOptimizer``'s inner one) has its ``apply`` wrapped by each wrapper registered
   with ``guard_optimizer_apply``. ``tf_jacbp.losses`` registers both: a bad label in a step
   compiled with XLA, which cannot stop itself, applies nothing and stops ``fit`` after the step.
   While an attached model's step function runs, ``running_step()`` names the model and whether
   Keras compiled it with XLA (``model.jit_compile``), which is how a loss knows it is inside
   one.

``GradientCheck`` (``set_model``), ``tf_jacbp.privacy``'s DP models and the builders of
``tf_jacbp.models`` attach the models they get; any other model of tf_jacbp layers can be
attached by hand, once, before ``fit`` (attaching again does nothing). A model that is not
attached trains exactly as before, with two differences: a cached step function keeps the route
it was traced with, and under XLA a bad label gives a NaN loss and a zero gradient for that
step, with a warning naming ``attach``, instead of stopping ``fit``.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

from tf_jacbp._backend import keras
from tf_jacbp.route import in_reference_mode

__all__ = ["after_each_step", "attach", "attached", "guard_optimizer_apply", "running_step"]

_after_step: list[Callable[[keras.Model], None]] = []
_apply_guards: list[Callable[[Callable], Callable]] = []

# The mode each function Keras made was made in (weak keys: a function dies with its model).
_made_in: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Step:
    """The attached model whose step function is running, and whether it runs under XLA."""

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
    """Give ``model`` the two behaviours of the module docstring; returns the model.

    Only ``model``'s own attributes change (its ``make_train_function``, ``make_test_function``,
    ``make_predict_function``, and its optimizer's ``apply`` when a train function is made);
    other models and Keras' classes are untouched. Idempotent.
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
                made = _checked(made, self)
                object.__setattr__(self, attribute, made)
                result = made if result is not None else None
            _made_in[made] = mode
        return result

    return make_for_this_mode


def _guard(optimizer: Any) -> None:
    """Wrap ``optimizer.apply`` (and an inner optimizer's) with the registered guards, once."""
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if opt is None or getattr(opt, "_tf_jacbp_guarded", False):
            continue
        apply = type(opt).apply
        for wrapper in _apply_guards:
            apply = wrapper(apply)
        object.__setattr__(opt, "apply", types.MethodType(apply, opt))
        object.__setattr__(opt, "_tf_jacbp_guarded", True)


def _checked(function: Callable, model: keras.Model) -> Callable:
    """``function`` run inside ``running_step`` and followed by every check of
    ``after_each_step`` on ``model`` (held weakly: the model holds the function)."""
    model_ref = weakref.ref(model)

    @functools.wraps(function)
    def step_then_check(*args, **kwargs):
        owner = model_ref()
        step = Step(owner, bool(getattr(owner, "jit_compile", False)))
        with _lock:
            _running.append(step)
        try:
            result = function(*args, **kwargs)
        finally:
            with _lock:
                _running.remove(step)
        if owner is not None:
            for check in _after_step:
                check(owner)
        return result

    return step_then_check
