"""Which route a tf_jacbp layer takes: the Jacobian route (default) or the reference route.

The Jacobian route runs the layer's forward pass under a ``tf.custom_gradient`` whose backward
pass is built from the paper's Jacobian formulas. The reference route runs stock TensorFlow ops
only and lets autodiff differentiate them. ``reference_mode()`` switches every tf_jacbp layer and
loss to the reference route while it is open.

The switch is read when a layer is *traced*: a ``tf.function`` traced inside the context keeps the
reference route when called outside it, and the other way round. Trace one function per route
(``callbacks.GradientCheck`` does).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

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
