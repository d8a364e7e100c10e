"""The witnesses of one model, built once and reused by every check.

``Witnesses(model, ...)`` traces the Jacobian and reference routes of the model and, unless the
model trains in float64 throughout, of its float64 twin; ``run(probe)`` (one ``tf.function`` on
TensorFlow; on JAX, Python calling the routes' ``jax.jit`` functions) returns their statistics
(``Comparison``), and ``records`` turns them into one ``GradientCheckRecord`` per variable by
``tf_jacbp.check.criterion``, then the per-example norm records of a model that clips per
example (``tf_jacbp.check.norms``). ``finite_difference_records`` adds the directional finite
differences on the twin.

A convolution whose ``T(K)`` the training route applies by convolution kernels (the implicit
route) is differentiated on the reference side by ``tf_jacbp.check.conv_witness``'s witness
instead of stock autodiff, which runs the same kernels: autodiff of the materialized ``T(K)``
where it fits the budget, else float64 finite differences (``finite_difference_records``, which
then run even with ``finite_differences=False``). Each record names it (``layer_witness``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np
from keras import ops

from tf_jacbp import backend, tolerances
from tf_jacbp._backend import keras
from tf_jacbp.check.conv_witness import FLOAT64_FINITE_DIFFERENCES, STOCK_AUTODIFF, ConvWitnesses
from tf_jacbp.check.norms import NormStatistics, PerExampleNorms, clips_per_example
from tf_jacbp.check.probe import is_finite
from tf_jacbp.check.records import (
    FINITE_DIFFERENCES,
    FIXED_RTOL,
    REFERENCE,
    ROUNDING_FLOOR,
    GradientCheckRecord,
)
from tf_jacbp.check.routes import (
    GradientStatistics,
    floor_statistics,
    gradient_function,
    independent,
    largest,
    layers_of,
    least_precise,
    loss_dtype,
    loss_function,
    owners,
    state_variables,
    statistics,
)
from tf_jacbp.check.twin import Float64Twin
from tf_jacbp.route import reference_mode

FD_SEED = 0
"""Seed of the finite differences' random directions (drawn once per model)."""


class Comparison(NamedTuple):
    """What one compiled check returns (``Witnesses.run``): tensors, ``None`` where a witness
    does not run."""

    losses: Any
    """The loss of each route, float64: ``[L, L_ref]``, then the twin's ``[L64, L64_ref]``."""
    train: GradientStatistics
    """``g`` (Jacobian route) against ``g_ref`` (reference route), in the training dtype."""
    float64: GradientStatistics | None
    """``h`` against ``h64``, the float64 twin's two routes; ``None`` without a twin."""
    floor: Any | None
    """``||g_ref - h64||`` per variable (``floor_statistics``); ``None`` without a twin."""
    h: list | None
    """The float64 Jacobian-route gradients (the twin's, or the model's own when it trains in
    float64), for finite differences; ``None`` when no finite difference can be asked for."""
    norms: NormStatistics | None
    """The per-example norm witness (``tf_jacbp.check.norms``); ``None`` unless the model
    clips per example."""


class Witnesses:
    """The compiled routes of ``model`` (and of its float64 twin) and the criterion on them.

    Attributes: ``variables``, and per variable ``layer_names``, ``independent`` (a tf_jacbp
    layer's formula differentiates it) and ``tolerance_dtypes``; ``twin`` (``None`` when the
    model trains in float64 throughout, or could not be cloned: ``no_twin`` says why);
    ``replays_noise`` (False if a random layer other than dropout makes the twin's noise differ);
    ``norms``: the per-example norm witness (``tf_jacbp.check.norms``) of a model that clips per
    example, else ``None`` (nothing more is traced or run); ``conv``: the witnesses of the
    model's and its twin's Toeplitz layers (``tf_jacbp.check.conv_witness.ConvWitnesses``),
    active while the reference routes are traced.
    """

    def __init__(
        self,
        model: keras.Model,
        variables: list,
        finite_differences: bool,
        rtol: float | None,
        atol: float | None,
    ):
        """Map variables to layers and tolerances; trace nothing yet (``run`` traces once).
        On JAX, x64 must be enabled: the statistics and the twin are float64."""
        backend.require_float64("GradientCheck (its statistics and its float64 twin)")
        layers = list(layers_of(model))
        owner = owners(layers)
        loss_dtypes = [loss_dtype(loss) for loss in keras.tree.flatten(model.loss)]
        self.model, self.jit = model, model.jit_compile is True
        self.variables = variables
        self.finite_differences = finite_differences
        self.rtol, self.atol = rtol, atol
        self.layer_names = [owner[id(v)].name if id(v) in owner else model.name for v in variables]
        self.independent = [independent(owner.get(id(v)), v) for v in variables]
        self.tolerance_dtypes = [
            least_precise([owner[id(v)].compute_dtype if id(v) in owner else v.dtype, *loss_dtypes])
            for v in variables
        ]
        state = state_variables(model)
        jit = model.jit_compile is True
        self.jacobian_fn = gradient_function(model, variables, state, jit)
        self.reference_fn = gradient_function(model, variables, state, jit)
        dtypes = {keras.backend.standardize_dtype(v.dtype) for v in variables}
        dtypes |= {keras.backend.standardize_dtype(layer.compute_dtype) for layer in layers}
        self.all_float64 = dtypes | set(loss_dtypes) == {"float64"}
        self.twin, self.no_twin, self.replays_noise = None, None, True
        if not self.all_float64 or self.finite_differences:
            try:
                self.twin = Float64Twin(model, variables, jit)
            except ValueError as err:
                if self.finite_differences:
                    raise ValueError(
                        f"GradientCheck(finite_differences=True) needs a float64 twin: {err}. "
                        "Use finite_differences=False otherwise."
                    ) from err
                self.no_twin = str(err)
        if self.twin is not None:
            self.replays_noise = not self.twin.unreplayed_noise
        twin_layers = [] if self.twin is None else list(layers_of(self.twin.model))
        self.conv = ConvWitnesses([*layers, *twin_layers])
        self.fd_possible = self.twin is not None or self.all_float64
        self.fd_loss_fn = None
        if self.finite_differences:
            self.prepare_finite_differences()
        self.norms = None
        if clips_per_example(model):
            fallback = least_precise(self.tolerance_dtypes)
            self.norms = PerExampleNorms(
                model, variables, self.twin, self.all_float64, jit, fallback
            )
        self.run = backend.compile_check(self._comparison)

    def prepare_finite_differences(self) -> bool:
        """Build the finite differences' compiled loss (on the twin, or on the model itself
        when it trains in float64) and their random directions, once; False if there is no
        float64 model to difference."""
        if self.fd_loss_fn is not None:
            return True
        if not self.fd_possible:
            return False
        if self.twin is not None:
            model, self.fd_variables, state = self.twin.model, self.twin.variables, self.twin.state
        else:
            model, self.fd_variables = self.model, list(self.variables)
            state = state_variables(model)
        self.fd_loss_fn = loss_function(model, state, self.jit)
        rng = np.random.default_rng(FD_SEED)
        self.fd_directions = []
        for v in self.variables:
            d = rng.normal(size=tuple(v.shape))
            self.fd_directions.append(d / np.linalg.norm(d))
        return True

    def needs_finite_differences(self) -> bool:
        """Finite differences run at this check: asked for, or the witness of an implicit
        convolution whose ``T(K)`` is over the budget (known once the routes are traced)."""
        return self.finite_differences or bool(self.conv.needs_finite_differences())

    def layer_witness(self, i: int) -> str:
        """What variable ``i``'s owning layer was checked against (``GradientCheckRecord.
        layer_witness``): stock autodiff where no float64 model can be differenced."""
        witness = self.conv.witness_of(self.layer_names[i])
        if witness == FLOAT64_FINITE_DIFFERENCES and not self.fd_possible:
            return STOCK_AUTODIFF
        return witness

    def _comparison(self, x, y, sample_weight) -> Comparison:
        """All routes' gradients reduced to statistics (traced once, as one graph).

        Each route function is traced on its first call here: the Jacobian ones outside
        ``reference_mode()``, the reference ones inside it, with the convolutions' witnesses
        (``self.conv``).
        """
        loss, grads = self.jacobian_fn(x, y, sample_weight)
        with reference_mode(), self.conv:
            loss_ref, refs = self.reference_fn(x, y, sample_weight)
        losses = [loss, loss_ref]
        float64 = floor = h = norms = None
        twin = self.twin
        if twin is not None:
            twin.synchronize()
            loss64, h = twin.jacobian_fn(x, y, sample_weight)
            with reference_mode(), self.conv:
                loss64_ref, h_ref = twin.reference_fn(x, y, sample_weight)
            losses += [loss64, loss64_ref]
            float64 = _statistics(h, h_ref)
            floor = _floor_statistics(refs, h_ref)
        if self.norms is not None:
            norms = self.norms.statistics(x, y)
        if h is None and self.all_float64:
            h = grads  # the model is its own float64 twin
        if not (self.finite_differences or self.conv):
            h = None
        return Comparison(
            losses=_stack64(losses),
            train=_statistics(grads, refs),
            float64=float64,
            floor=floor,
            h=h,
            norms=norms,
        )

    def records(self, out: Comparison, probe: tuple) -> list[GradientCheckRecord]:
        """One reference record per variable from ``_comparison``'s statistics (the criterion
        of ``tf_jacbp.check.criterion``), then the per-example norm records of a DP model."""
        train = out.train.numpy()
        float64 = None if out.float64 is None else out.float64.numpy()
        floor = None if out.floor is None else np.asarray(out.floor)
        scale = largest(train.ref_norm, train.ref_finite)
        scale64 = None if float64 is None else largest(float64.ref_norm)
        probe_finite = is_finite(probe)
        losses_finite = bool(np.all(np.isfinite(np.asarray(out.losses))))
        records = []
        for i in range(len(self.variables)):
            row = train.row(i)
            row64 = None if float64 is None else float64.row(i)
            dtype = self.tolerance_dtypes[i]
            finite = bool(row.finite and row.ref_finite)
            abs_err, rel_err, cosine = math.nan, math.nan, math.nan
            if finite:
                abs_err = row.max_abs
                rel_err = tolerances.relative_error_from_norms(
                    row.diff_norm, row.ref_norm, dtype, scale
                )
                if row.norm * row.ref_norm == 0:
                    cosine = 1.0 if row.norm == row.ref_norm else 0.0
                else:
                    cosine = row.dot / (row.norm * row.ref_norm)
            criterion, rtol = FIXED_RTOL, self.fixed_rtol(dtype)
            floor_i = ratio = float64_rel_err = float64_rtol = None
            ok = finite
            if row64 is not None and not self.all_float64:
                finite64 = bool(row64.finite and row64.ref_finite)
                float64_rtol, float64_rel_err = tolerances.rtol("float64"), math.nan
                if finite64:
                    float64_rel_err = tolerances.relative_error_from_norms(
                        row64.diff_norm, row64.ref_norm, "float64", scale64
                    )
                ok = ok and finite64 and float64_rel_err <= float64_rtol
                if finite and finite64:
                    denominator = tolerances.relative_error_from_norms(
                        1.0, row.ref_norm, dtype, scale
                    )
                    floor_i = max(
                        float(floor[i]) * denominator,
                        tolerances.FLOOR_MIN_ULPS * tolerances.EPS[dtype],
                    )
                    ratio = rel_err / floor_i
                    if self.rtol is None and self.replays_noise:
                        criterion, rtol = ROUNDING_FLOOR, tolerances.FLOOR_RATIO * floor_i
                if not finite64 and finite:
                    finite = False  # reported through ``cause``
            ok = ok and rel_err <= rtol and (self.atol is None or abs_err <= self.atol)
            records.append(
                self._record(
                    i,
                    REFERENCE,
                    abs_err,
                    rel_err,
                    cosine,
                    dtype,
                    keras.backend.standardize_dtype(self.variables[i].dtype),
                    bool(ok),
                    criterion=criterion,
                    rtol=rtol,
                    floor=floor_i,
                    ratio=ratio,
                    float64_rel_err=float64_rel_err,
                    float64_rtol=float64_rtol,
                    cause=None if finite else cause_of(probe_finite, losses_finite, row, row64),
                )
            )
        if self.norms is not None:
            records += self.norms.records(out.norms, probe_finite, self._record, self.rtol)
        return records

    def fixed_rtol(self, dtype: str) -> float:
        """The given ``rtol``, else the per-dtype one (``tolerances.rtol``)."""
        return self.rtol if self.rtol is not None else tolerances.rtol(dtype)

    def finite_difference_records(
        self, grads: list[np.ndarray], probe: tuple
    ) -> list[GradientCheckRecord]:
        """``fd = (L(theta + eps v) - L(theta - eps v)) / 2 eps`` per variable, vs ``h . v``
        (``grads``: ``h``, the float64 Jacobian-route gradients); ``[]`` where no float64 model
        can be differenced."""
        if not self.prepare_finite_differences():
            return []
        x, y, sample_weight = probe
        eps = tolerances.FINITE_DIFFERENCE_DELTA
        norms = [float(np.linalg.norm(g)) for g in grads]
        floor = tolerances.FINITE_DIFFERENCE_FLOOR * max(
            [n for n in norms if math.isfinite(n)] or [0]
        )
        records = []
        for i, (variable, g, v) in enumerate(
            zip(self.fd_variables, grads, self.fd_directions, strict=True)
        ):
            theta = ops.convert_to_numpy(variable.value)
            variable.assign(theta + eps * v)
            plus = float(self.fd_loss_fn(x, y, sample_weight))
            variable.assign(theta - eps * v)
            minus = float(self.fd_loss_fn(x, y, sample_weight))
            variable.assign(theta)
            g = np.asarray(g, dtype=np.float64)
            fd = (plus - minus) / (2 * eps)
            directional = float(np.vdot(g, v))
            finite = bool(np.all(np.isfinite(g)) and math.isfinite(fd))
            abs_err = abs(fd - directional) if finite else float("nan")
            scale = max(float(np.linalg.norm(g)), tolerances.TINY["float64"], floor)
            rel_err = abs_err / scale
            rtol = tolerances.FINITE_DIFFERENCE_RTOL
            passed = finite and rel_err <= rtol
            cause = None
            if not finite:
                cause = "loss" if not math.isfinite(fd) else "backward"
            records.append(
                self._record(
                    i,
                    FINITE_DIFFERENCES,
                    abs_err,
                    rel_err,
                    None,
                    "float64",
                    "float64",
                    passed,
                    rtol=rtol,
                    atol=None,
                    independent=True,
                    cause=cause,
                )
            )
        return records

    def _record(
        self,
        i: int,
        witness: str,
        abs_err: float,
        rel_err: float,
        cosine: float | None,
        tolerance_dtype: str,
        gradient_dtype: str,
        passed: bool,
        **fields: Any,
    ) -> GradientCheckRecord:
        fields.setdefault("atol", self.atol)
        fields.setdefault(
            "layer_witness",
            {
                REFERENCE: self.layer_witness(i),
                FINITE_DIFFERENCES: FLOAT64_FINITE_DIFFERENCES,
            }.get(witness, STOCK_AUTODIFF),  # per-example norms: per-sample stock autodiff
        )
        # an implicit convolution against stock autodiff: the same kernels on both routes
        shared = self.conv.witness_of(self.layer_names[i]) == FLOAT64_FINITE_DIFFERENCES
        fields.setdefault("independent", self.independent[i] and not shared)
        return GradientCheckRecord(
            step=0,
            epoch=0,
            witness=witness,
            variable=self.variables[i].path,
            layer=self.layer_names[i],
            index=i,
            abs_err=abs_err,
            rel_err=rel_err,
            cosine=cosine,
            tolerance_dtype=tolerance_dtype,
            gradient_dtype=gradient_dtype,
            passed=bool(passed),
            **fields,
        )

    def tracing_counts(self) -> dict[str, int]:
        """How often each compiled function was traced."""
        count = backend.tracing_count
        counts = {
            "jacobian": count(self.jacobian_fn),
            "reference": count(self.reference_fn),
            "comparison": count(self.run),
        }
        if self.twin is not None:
            counts["float64_jacobian"] = count(self.twin.jacobian_fn)
            counts["float64_reference"] = count(self.twin.reference_fn)
        if self.fd_loss_fn is not None:
            counts["finite_differences_loss"] = count(self.fd_loss_fn)
        return counts


_statistics = backend.compile_statistics(statistics)
_floor_statistics = backend.compile_statistics(floor_statistics)
_stack64 = backend.compile_statistics(
    lambda values: ops.stack([ops.cast(v, "float64") for v in values])
)


def rechecked(first: GradientCheckRecord, again: GradientCheckRecord) -> GradientCheckRecord:
    """``first`` with the verdict of the re-check on the perturbed probe, if it needed one."""
    if first.passed or first.cause is not None:
        return first
    return dataclasses.replace(first, passed=again.passed, recheck_passed=again.passed)


def cause_of(
    probe_finite: bool,
    losses_finite: bool,
    row: GradientStatistics,
    row64: GradientStatistics | None,
) -> str:
    """Where a non-finite gradient comes from (``GradientCheckRecord.cause``)."""
    if not probe_finite:
        return "probe"
    if not losses_finite:
        return "loss"
    if not row.ref_finite or (row64 is not None and not row64.ref_finite):
        return "reference"
    return "backward"
