"""The two routes of every tf_jacbp layer and loss, and the switch between them.

A map ``y = F(x; p_1, ..., p_k)`` (a layer, an activation, a fused loss) is an object with

* ``forward(x, *params, *constants) -> y``, its forward computation;
* ``reference(x, *params, *constants) -> y``, the same map in stock ops (the witness);
* ``backward(dy, x, y, *params, *constants) -> (dx, [dp_1, ..., dp_k])``, the Jacobian-transpose
  products ``dx = (J_x F)^T dy`` and ``dp_i = (J_{p_i} F)^T dy``, each shaped like its tensor
  (derived from the contract's ``vjp_input`` and ``vjp_params``, ``tf_jacbp.contract``).

``params`` are differentiated (one gradient each, in order); ``constants`` are not: values the map
depends on but whose gradient nobody needs (Dropout's mask, a loss's labels). ``x`` is one tensor
or, for a map of several inputs (``Add``), a list, and then ``dx`` is a list too.

``route(op, x, params)`` applies the map by its **Jacobian route**: one custom gradient
(``keras.ops.custom_gradient``, TensorFlow's ``tf.custom_gradient`` on that backend) whose
backward pass is ``op.backward``, with what that needs (``x``, ``y``, ``params``,
``constants``, and ``z`` when an activation is fused) held by the custom gradient's closure. Inside
``reference_mode()`` it takes the **reference route**: ``op.reference``, differentiated by
autodiff. ``route(op, x, params, activation=f)`` is ``a = f(F(x))`` on one custom gradient: its
backward pass is ``D^T delta_a`` with ``D = J_z f(z)`` (``f.backward``), then ``op.backward``.

Following the measured behaviour of TensorFlow 2.21, ``params`` must be tensors (weights read from
their variables, not the variables), the custom gradient is called positionally, and every
gradient is cast to the dtype of its tensor (under ``mixed_float16`` the upstream gradient is
float16 while a float32 weight needs a float32 gradient).

When the switch is read: ``route`` reads it when it runs, that is when a ``tf.function`` is traced.
A function traced inside ``reference_mode()`` keeps the reference route when called outside it,
and the other way round; trace one function per route (``GradientCheck`` does). Keras' own
compiled functions (``model.train_function`` and the others) follow the switch on the models
``tf_jacbp.hooks.attach`` was given: see there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from keras import ops

Tensor = Any  # a tensor of Keras' backend

# A process-wide depth counter, not a thread-local: tf.distribute traces each replica's function
# in its own thread, and those threads must see the mode the caller set.
_lock = threading.Lock()
_depth = 0


@contextlib.contextmanager
def reference_mode() -> Iterator[None]:
    """Run tf_jacbp layers and losses through stock TensorFlow ops differentiated by autodiff.

    Example:
        >>> with tf_jacbp.reference_mode():
        ...     with tf.GradientTape() as tape:
        ...         loss = model.compute_loss(x=x, y=y, y_pred=model(x))
        ...     reference_grads = tape.gradient(loss, model.trainable_variables)
    """
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1


def in_reference_mode() -> bool:
    """True inside ``reference_mode()``."""
    return _depth > 0


class JacobianOp(Protocol):
    """A map with its forward pass, its reference route and its Jacobian-transpose products."""

    def forward(self, x: Any, *args: Any) -> Tensor: ...

    def reference(self, x: Any, *args: Any) -> Tensor: ...

    def backward(
        self, dy: Tensor, x: Any, y: Tensor, *args: Any
    ) -> tuple[Any, Sequence[Tensor]]: ...


def route(
    op: JacobianOp,
    x: Tensor | Sequence[Tensor],
    params: Sequence[Tensor] = (),
    constants: Sequence[Any] = (),
    activation: JacobianOp | None = None,
) -> Tensor:
    """``a = f(F(x; params))`` by the Jacobian route, or the reference route in
    ``reference_mode()``.

    Args:
        op: the map ``F`` (module docstring): ``forward``, ``reference``, ``backward``.
        x: one tensor, or a list of tensors for a map of several inputs.
        params: tensors (read from the variables), differentiated: one gradient each.
        constants: passed after ``params`` to ``op``'s three methods, not differentiated.
        activation: ``f`` (``forward(z)``, ``reference(z)``, ``backward(da, z, a)``), or None
            for ``a = z``.

    Returns ``a``. Its gradient with respect to ``x`` and each of ``params`` is
    ``op.backward(D^T delta_a, x, z, *params, *constants)``.
    """
    if in_reference_mode():
        z = op.reference(x, *params, *constants)
        return z if activation is None else activation.reference(z)
    several = isinstance(x, (list, tuple))
    xs = list(x) if several else [x]

    @ops.custom_gradient
    def jacobian_route(*args):
        inputs, values = list(args[: len(xs)]), args[len(xs) :]
        given = inputs if several else inputs[0]
        z = op.forward(given, *values, *constants)
        a = z if activation is None else activation.forward(z)

        def grad(da):
            dz = da if activation is None else activation.backward(da, z, a)[0]
            dx, dparams = op.backward(dz, given, z, *values, *constants)
            dxs = list(dx) if several else [dx]
            if len(dparams) != len(values) or len(dxs) != len(inputs):
                name = getattr(op.backward, "__qualname__", f"{type(op).__name__}.backward")
                raise ValueError(
                    f"{name} returned {len(dxs)} input and "
                    f"{len(dparams)} parameter gradients for {len(inputs)} inputs and "
                    f"{len(values)} parameters; return one per tensor, in order."
                )
            return [ops.cast(g, t.dtype) for g, t in zip([*dxs, *dparams], args, strict=True)]

        return a, grad

    return jacobian_route(*xs, *params)
