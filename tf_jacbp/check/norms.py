"""The per-example norm witness: DP-SGD's first pass against autodiff, for DP models only.

DP-SGD (``tf_jacbp.privacy``) clips each sample's gradient ``g_i`` to ``C`` with the norms
``||g_i(v)||`` of its first pass, ``tf_jacbp.jacobian.per_example_gradient_norms`` (the walk's
``"squared_norms"`` product: each map's ``squared_norms`` formula, e.g. Dense's
``||a_i||^2 ||delta_i||^2``, never forming ``g_i``). Training's gradient does not use these
formulas, so the reference witness cannot see a wrong one: a norm formula a quarter of the truth
would clip with half the norm, silently. For a model that clips per example
(``clips_per_example``), each check therefore also compares, on the first ``NORM_SAMPLES``
samples of the probe and per variable ``v``,

    ``n_i(v) = per_example_gradient_norms(model, x, y, per_variable=True)[i, v]``  with
    ``n_ref_i(v) = ||grad_v l(y_i, yhat_i)||``,

``l_i`` sample ``i``'s own loss term (the compiled loss's per-sample value, its mean over
positions; no sample weight, no regularization), differentiated by autodiff (``tf.GradientTape``
on TensorFlow, ``jax.value_and_grad`` on JAX: ``tf_jacbp.backend.variable_gradients``) through
the reference route (``tf_jacbp.reference_mode()``), one sample at a time, in inference mode
(dropout off, batch normalization on its moving statistics: the layers' formulas, not the
noise). Both run on the float64 twin (or on the model when it computes in float64 throughout),
and the record (witness ``PER_EXAMPLE_NORMS``) holds
``rel_err = ||n - n_ref|| / max(||n_ref||, tiny)`` over the samples: the criterion is
``tf_jacbp.check.criterion``'s fixed one. A model that has no float64 twin is checked in its own
dtype, against the fixed tolerance of that dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from keras import ops

from tf_jacbp import backend, tolerances
from tf_jacbp._backend import keras
from tf_jacbp.check.records import FIXED_RTOL, PER_EXAMPLE_NORMS, GradientCheckRecord
from tf_jacbp.check.routes import largest
from tf_jacbp.check.twin import Float64Twin
from tf_jacbp.jacobian import parameter_variables, per_example_gradient_norms
from tf_jacbp.route import reference_mode

CLIP_ATTRIBUTE = "l2_norm_clip"
"""A model with this attribute set (not ``None``) clips per example, as ``DPModel`` does (its
``l2_norm_clip``): ``GradientCheck`` then also checks the norms of DP-SGD's first pass. A model
of your own whose ``train_step`` calls ``tf_jacbp.privacy.clipped_gradients`` can set it too."""

NORM_SAMPLES = 8
"""Probe samples whose per-example norms are checked: each costs one forward and backward pass
of one sample on the reference route, and the walk's norms are one more batch pass."""


def clips_per_example(model: keras.Model) -> bool:
    """``model`` trains on per-example clipped gradients (``CLIP_ATTRIBUTE`` is set)."""
    return getattr(model, CLIP_ATTRIBUTE, None) is not None


class NormStatistics(NamedTuple):
    """The two norms of each checked variable, reduced over the samples in float64: each field
    ``(num_checked,)`` (tensors in the compiled check, arrays after ``numpy()``)."""

    finite: Any
    """1 if every walk norm ``n_i(v)`` is finite, else 0."""
    ref_finite: Any
    """1 if every autodiff norm ``n_ref_i(v)`` is finite, else 0."""
    max_abs: Any
    """``max_i |n_i(v) - n_ref_i(v)|``."""
    diff_norm: Any
    """``||n(v) - n_ref(v)||`` over the samples."""
    ref_norm: Any
    """``||n_ref(v)||`` over the samples."""

    def numpy(self) -> NormStatistics:
        """The same statistics as numpy arrays."""
        return NormStatistics(*(np.asarray(t) for t in self))


class PerExampleNorms:
    """The per-example norm witness of one model (see the module docstring).

    ``indices``: the positions in the check's ``variables`` of the variables it checks (those
    Algorithm 1's walk lists, ``parameter_variables``); ``dtype``: what it computes in
    (``"float64"`` unless the model has no float64 twin).
    """

    def __init__(
        self,
        model: keras.Model,
        variables: Sequence,
        twin: Float64Twin | None,
        all_float64: bool,
        jit_compile: bool,
        fallback_dtype: str,
    ):
        """Pick the model the norms run on: the twin if Algorithm 1's walk accepts it, a twin
        without dropout replay if not, the model itself if it is float64 or has no twin (then
        in ``fallback_dtype``'s tolerance)."""
        self.twin, self.own_twin = twin, False
        if twin is not None and twin.replays_dropout:
            self.twin = Float64Twin(model, variables, jit_compile, replay_dropout=False)
            self.own_twin = True
        if self.twin is not None:
            self.model, self.variables = self.twin.model, list(self.twin.variables)
        else:
            self.model, self.variables = model, list(variables)
        self.dtype = "float64"
        if self.twin is None and not all_float64:
            self.dtype = fallback_dtype
        column = {id(v): j for j, v in enumerate(parameter_variables(self.model))}
        self.indices = [i for i, v in enumerate(self.variables) if id(v) in column]
        self.columns = [column[id(self.variables[i])] for i in self.indices]

    def statistics(self, x: Any, y: Any) -> NormStatistics:
        """The walk's norms and autodiff's on the first ``NORM_SAMPLES`` samples (traced into
        the compiled check; the twin must be synchronized first)."""
        if self.own_twin:
            self.twin.synchronize()
        first = keras.tree.flatten(x)[0]
        count = min(NORM_SAMPLES, int(first.shape[0]))
        x, y = keras.tree.map_structure(lambda t: t[:count], (x, y))
        if self.dtype == "float64":
            x = keras.tree.map_structure(_to_float64, x)
        loss = self.model.loss
        walk = per_example_gradient_norms(self.model, x, y, loss=loss, per_variable=True)
        walk = ops.cast(ops.take(walk, self.columns, axis=1), "float64")
        per_sample = _per_sample_loss(loss)
        checked = [self.variables[i] for i in self.indices]
        rows = []
        for i in range(count):
            xi, yi = keras.tree.map_structure(lambda t, i=i: t[i : i + 1], (x, y))

            def value(xi=xi, yi=yi):
                with reference_mode():
                    terms = per_sample(yi, self.model(xi, training=False))
                # the mean as sum / size (Keras' ops.mean reduces float64 in float32 on JAX)
                return ops.sum(terms) / ops.cast(ops.size(terms), terms.dtype)

            _, grads = backend.variable_gradients(value, checked)
            rows.append(ops.stack([_norm(ops.cast(g, "float64")) for g in grads]))
        ref = ops.stack(rows)  # (count, num_checked)
        diff = walk - ref
        return NormStatistics(
            ops.cast(ops.all(ops.isfinite(walk), axis=0), "float64"),
            ops.cast(ops.all(ops.isfinite(ref), axis=0), "float64"),
            ops.max(ops.abs(diff), axis=0),
            _norm(diff, axis=0),
            _norm(ref, axis=0),
        )

    def records(
        self,
        stats: NormStatistics,
        probe_finite: bool,
        record: Callable[..., GradientCheckRecord],
        tolerance: float | None,
    ) -> list[GradientCheckRecord]:
        """One ``PER_EXAMPLE_NORMS`` record per checked variable. ``record(i, witness, ...)``
        builds a record (``Witnesses._record``); ``tolerance``: the bound when the norms are not
        in float64 (``None``: ``tolerances.rtol(dtype)``)."""
        stats = stats.numpy()
        rtol = tolerances.rtol("float64") if self.dtype == "float64" else tolerance
        rtol = tolerances.rtol(self.dtype) if rtol is None else rtol
        scale = largest(stats.ref_norm, stats.ref_finite)
        out = []
        for k, i in enumerate(self.indices):
            finite = bool(stats.finite[k] and stats.ref_finite[k])
            abs_err, rel_err, cause = math.nan, math.nan, None
            if finite:
                abs_err = float(stats.max_abs[k])
                rel_err = tolerances.relative_error_from_norms(
                    stats.diff_norm[k], stats.ref_norm[k], self.dtype, scale
                )
            elif not probe_finite:
                cause = "probe"
            elif not stats.ref_finite[k]:
                cause = "reference"
            else:
                cause = "norms"
            out.append(
                record(
                    i,
                    PER_EXAMPLE_NORMS,
                    abs_err,
                    rel_err,
                    None,
                    self.dtype,
                    self.dtype,
                    finite and rel_err <= rtol,
                    criterion=FIXED_RTOL,
                    rtol=rtol,
                    atol=None,
                    independent=True,
                    cause=cause,
                )
            )
        return out


def _to_float64(t: Any) -> Any:
    floating = keras.backend.is_float_dtype(keras.backend.standardize_dtype(t.dtype))
    return ops.cast(t, "float64") if floating else t


def _norm(t: Any, axis: int | None = None) -> Any:
    """``sqrt(sum t^2)`` over ``axis`` (all axes when ``None``), in ``t``'s dtype:
    ``keras.ops.norm`` computes float64 in float32 on JAX."""
    return ops.sqrt(ops.sum(ops.square(t), axis=axis))


def _per_sample_loss(loss: Any) -> Any:
    """The compiled loss as ``l(y, yhat)`` before the batch reduction (a Loss's ``call``)."""
    loss = keras.losses.get(loss)
    return loss.call if isinstance(loss, keras.losses.Loss) else loss
