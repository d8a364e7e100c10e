"""The two routes as compiled gradient functions, and what is known about each variable.

``gradient_function`` traces ``(x, y, sample_weight) -> (L, dL/dtheta)`` of the compiled
training loss once; traced inside ``tf_jacbp.reference_mode()`` it is the reference route, else
the Jacobian route. ``statistics`` reduces two routes' gradients to the norms the criterion needs
(``GradientStatistics``, in float64, inside the same graph), ``floor_statistics`` the reference
route's distance to the float64 twin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from tf_jacbp import tolerances
from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import JacobianLayer


def layers_of(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """Every layer of a model, depth first, looking through nested models (``.layers``)."""
    for sub in getattr(layer, "layers", []):
        yield sub
        yield from layers_of(sub)


def owners(layers: Sequence[keras.layers.Layer]) -> dict[int, keras.layers.Layer]:
    """``id(variable) -> innermost layer owning it`` (inner layers come after their model)."""
    owners = {}
    for layer in layers:
        for v in layer.trainable_variables:
            owners[id(v)] = layer
    return owners


def independent(owner: keras.layers.Layer | None, variable: Any) -> bool:
    """The reference route computes ``variable``'s gradient with other code than training: its
    owner is a tf_jacbp layer whose Jacobian formulas differentiate it."""
    if not isinstance(owner, JacobianLayer):
        return False
    try:
        params = owner.jacobian_parameters()
    except (AttributeError, NotImplementedError):
        return True
    return any(p is variable for p in params) if params else True


def loss_dtype(loss: Any) -> str:
    """The dtype a compiled loss computes in: a Loss's own, else Keras' ``floatx()``."""
    return getattr(loss, "dtype", None) or keras.config.floatx()


def least_precise(dtypes: Sequence[Any]) -> str:
    """The dtype with the largest tolerance (float64 < float32 < float16 < bfloat16)."""
    names = [keras.backend.standardize_dtype(d) for d in dtypes]
    return max((n for n in names if n in tolerances.RTOL), key=tolerances.rtol)


def state_variables(model: keras.Model) -> list:
    """Variables a forward pass may change: batch-norm statistics, seed states, loss metrics."""
    seen, state = set(), []
    for v in [*model.non_trainable_variables, *model.metrics_variables]:
        if id(v) not in seen:
            seen.add(id(v))
            state.append(v)
    return state


def restoring(state: Sequence, fn: Callable) -> Callable:
    """``fn``, with the values of ``state`` read before and assigned back after it."""

    def run(*args):
        saved = [tf.identity(v.value) for v in state]
        out = fn(*args)
        for v, value in zip(state, saved, strict=True):
            v.assign(value)
        return out

    return run


# --- the witnesses -----------------------------------------------------------------------------


class GradientStatistics(NamedTuple):
    """Two routes' gradients reduced per variable, in float64: each field is ``(num_variables,)``
    (a tensor inside the compiled check, an array after ``numpy()``), or one variable's scalar
    after ``row(i)``."""

    finite: Any
    """1 if every entry of ``g`` is finite, else 0."""
    ref_finite: Any
    """1 if every entry of ``g_ref`` is finite, else 0."""
    max_abs: Any
    """``max |g - g_ref|`` (0 for an empty variable)."""
    diff_norm: Any
    """``||g - g_ref||``."""
    ref_norm: Any
    """``||g_ref||``."""
    norm: Any
    """``||g||``."""
    dot: Any
    """``<g, g_ref>``."""

    def numpy(self) -> GradientStatistics:
        """The same statistics as numpy arrays."""
        return GradientStatistics(*(np.asarray(t) for t in self))

    def row(self, i: int) -> GradientStatistics:
        """Variable ``i``'s statistics, as Python floats."""
        return GradientStatistics(*(float(t[i]) for t in self))


def statistics(grads: Sequence[tf.Tensor], refs: Sequence[tf.Tensor]) -> GradientStatistics:
    """``GradientStatistics`` of the gradients ``g = grads`` and ``g_ref = refs`` (one tensor
    per variable each, any dtype), computed in float64 inside the caller's graph."""
    rows = []
    for g, ref in zip(grads, refs, strict=True):
        g = tf.reshape(tf.cast(g, tf.float64), [-1])
        ref = tf.reshape(tf.cast(ref, tf.float64), [-1])
        diff = g - ref
        rows.append(
            (
                tf.cast(tf.reduce_all(tf.math.is_finite(g)), tf.float64),
                tf.cast(tf.reduce_all(tf.math.is_finite(ref)), tf.float64),
                tf.reduce_max(tf.abs(tf.concat([diff, tf.zeros([1], tf.float64)], 0))),
                tf.norm(diff),
                tf.norm(ref),
                tf.norm(g),
                tf.reduce_sum(g * ref),
            )
        )
    return GradientStatistics(*(tf.stack(column) for column in zip(*rows, strict=True)))


def floor_statistics(refs: Sequence[tf.Tensor], refs64: Sequence[tf.Tensor]) -> tf.Tensor:
    """``||g_ref - h64||`` per variable, ``(num_variables,)`` in float64: the reference route's
    rounding error in the training dtype (``h64``: the float64 twin's reference gradient)."""
    return tf.stack(
        [
            tf.norm(
                tf.reshape(tf.cast(ref, tf.float64), [-1])
                - tf.reshape(tf.cast(ref64, tf.float64), [-1])
            )
            for ref, ref64 in zip(refs, refs64, strict=True)
        ]
    )


def largest(norms: np.ndarray, finite: np.ndarray | None = None) -> float:
    """The largest finite norm (0 if none): the scale of the whole gradient."""
    ok = np.isfinite(norms) if finite is None else (finite.astype(bool) & np.isfinite(norms))
    return float(np.max(norms[ok], initial=0.0))


def training_loss(model: keras.Model, x, y, sample_weight) -> tf.Tensor:
    """``model.compute_loss`` on ``model(x, training=True)``: what ``train_step`` differentiates."""
    y_pred = model(x, training=True)
    return model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)


def gradient_function(
    model: keras.Model, variables: Sequence, state: Sequence, jit_compile: bool
) -> tf.types.experimental.PolymorphicFunction:
    """A ``tf.function`` ``(x, y, sample_weight) -> (L, [dL/dv for v in variables])``.

    The route is fixed when it is first traced (inside ``reference_mode()`` or not).
    """

    def gradients(x, y, sample_weight):
        with tf.GradientTape() as tape:
            loss = training_loss(model, x, y, sample_weight)
        grads = tape.gradient(
            loss, list(variables), unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return loss, grads

    # autograph=False: the control flow is Python's, over variables and layers (AutoGraph's
    # source transformation would only add tracing time).
    return tf.function(restoring(state, gradients), jit_compile=jit_compile, autograph=False)


def loss_function(
    model: keras.Model, state: Sequence, jit_compile: bool
) -> tf.types.experimental.PolymorphicFunction:
    """A ``tf.function`` ``(x, y, sample_weight) -> L(theta)`` at the current weights (compiled
    as the gradient functions are, so that dropout draws the same masks)."""
    fn = restoring(state, lambda x, y, sw: training_loss(model, x, y, sw))
    return tf.function(fn, jit_compile=jit_compile, autograph=False)
