"""The two routes as compiled gradient functions, and what is known about each variable.

``gradient_function`` traces ``(x, y, sample_weight) -> (L, dL/dtheta)`` of the compiled
training loss once (``tf.GradientTape`` in a ``tf.function`` on TensorFlow,
``jax.value_and_grad`` under ``jax.jit`` on JAX: ``tf_jacbp.backend.compile_gradients``);
traced inside ``tf_jacbp.reference_mode()`` it is the reference route, else the Jacobian route.
``statistics`` reduces two routes' gradients to the norms the criterion needs
(``GradientStatistics``, in float64; inside the same graph on TensorFlow),
``floor_statistics`` the reference route's distance to the float64 twin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from keras import ops

from tf_jacbp import backend, tolerances
from tf_jacbp._backend import keras
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


def read_variables(model: keras.Model, variables: Sequence) -> list:
    """Every variable of ``model`` (its weights, state and metrics) except ``variables``: what
    a compiled route reads besides the variables it differentiates (on JAX they are passed to
    the compiled function, which would otherwise freeze their values when it traces)."""
    seen, reads = {id(v) for v in variables}, []
    for v in [*model.variables, *model.metrics_variables]:
        if id(v) not in seen:
            seen.add(id(v))
            reads.append(v)
    return reads


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


def _flat64(t: Any) -> Any:
    return ops.reshape(ops.cast(t, "float64"), [-1])


def _norm(t: Any) -> Any:
    """``||t||`` of a flat float64 tensor, ``sqrt(sum t^2)`` (``keras.ops.norm`` computes in
    float32 on JAX)."""
    return ops.sqrt(ops.sum(ops.square(t)))


def statistics(grads: Sequence[Any], refs: Sequence[Any]) -> GradientStatistics:
    """``GradientStatistics`` of the gradients ``g = grads`` and ``g_ref = refs`` (one tensor
    per variable each, any dtype), computed in float64 (inside the caller's graph on
    TensorFlow)."""
    rows = []
    for g, ref in zip(grads, refs, strict=True):
        g, ref = _flat64(g), _flat64(ref)
        diff = g - ref
        rows.append(
            (
                ops.cast(ops.all(ops.isfinite(g)), "float64"),
                ops.cast(ops.all(ops.isfinite(ref)), "float64"),
                ops.max(ops.abs(ops.concatenate([diff, ops.zeros([1], "float64")], 0))),
                _norm(diff),
                _norm(ref),
                _norm(g),
                ops.sum(g * ref),
            )
        )
    return GradientStatistics(*(ops.stack(column) for column in zip(*rows, strict=True)))


def floor_statistics(refs: Sequence[Any], refs64: Sequence[Any]) -> Any:
    """``||g_ref - h64||`` per variable, ``(num_variables,)`` in float64: the reference route's
    rounding error in the training dtype (``h64``: the float64 twin's reference gradient)."""
    return ops.stack(
        [_norm(_flat64(ref) - _flat64(ref64)) for ref, ref64 in zip(refs, refs64, strict=True)]
    )


def largest(norms: np.ndarray, finite: np.ndarray | None = None) -> float:
    """The largest finite norm (0 if none): the scale of the whole gradient."""
    ok = np.isfinite(norms) if finite is None else (finite.astype(bool) & np.isfinite(norms))
    return float(np.max(norms[ok], initial=0.0))


def training_loss(model: keras.Model, x, y, sample_weight) -> Any:
    """``model.compute_loss`` on ``model(x, training=True)``: what ``train_step`` differentiates."""
    y_pred = model(x, training=True)
    return model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)


def gradient_function(
    model: keras.Model, variables: Sequence, state: Sequence, jit_compile: bool
) -> Callable:
    """A compiled ``(x, y, sample_weight) -> (L, [dL/dv for v in variables])``: a
    ``tf.function`` differentiated by ``tf.GradientTape`` on TensorFlow, ``jax.value_and_grad``
    over the variables' values (statelessly, ``jax.jit``) on JAX
    (``tf_jacbp.backend.compile_gradients``). The variables ``state`` are as before after it.

    The route is fixed when it is traced (inside ``reference_mode()`` or not).
    """

    def loss(x, y, sample_weight):
        return training_loss(model, x, y, sample_weight)

    reads = read_variables(model, variables)
    return backend.compile_gradients(loss, list(variables), list(state), reads, jit_compile)


def loss_function(model: keras.Model, state: Sequence, jit_compile: bool) -> Callable:
    """A compiled ``(x, y, sample_weight) -> L(theta)`` at the current weights (compiled as the
    gradient functions are, so that dropout draws the same masks)."""

    def loss(x, y, sample_weight):
        return training_loss(model, x, y, sample_weight)

    reads = read_variables(model, [])
    return backend.compile_loss(loss, list(state), reads, jit_compile)
