"""What ``GradientCheck`` records and raises: one ``GradientCheckRecord`` per comparison, the
mismatch error, the two warnings, and the names of witnesses, criteria and log keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tf_jacbp.check.conv_witness import (
    FLOAT64_FINITE_DIFFERENCES,
    MATERIALIZED_T,
    STOCK_AUTODIFF,
    UNFOLDED_PATCHES,
)

ON_MISMATCH = ("raise", "warn", "log")
"""The values of ``GradientCheck(on_mismatch=...)``."""

REFERENCE = "reference"
"""``GradientCheckRecord.witness`` of a comparison with the reference route (autodiff)."""

FINITE_DIFFERENCES = "finite_differences"
"""``GradientCheckRecord.witness`` of a comparison with a directional finite difference."""

PER_EXAMPLE_NORMS = "per_example_norms"
"""``GradientCheckRecord.witness`` of a comparison of DP-SGD's per-example gradient norms (its
first pass, the layers' ``squared_norms``) with the norms of autodiff's per-sample gradients
(``tf_jacbp.check.norms``; models that clip per example only)."""

WITNESSES = (REFERENCE, FINITE_DIFFERENCES, PER_EXAMPLE_NORMS)
"""Every ``GradientCheckRecord.witness``."""

LAYER_WITNESSES = (STOCK_AUTODIFF, MATERIALIZED_T, UNFOLDED_PATCHES, FLOAT64_FINITE_DIFFERENCES)
"""Every ``GradientCheckRecord.layer_witness`` (``tf_jacbp.check.conv_witness``): what the
owning layer's own map was checked against."""

ROUNDING_FLOOR = "rounding_floor"
"""``GradientCheckRecord.criterion``: the bound on ``rel_err`` is derived from the rounding
``floor`` (``tf_jacbp.check.criterion``)."""

FIXED_RTOL = "rtol"
"""``GradientCheckRecord.criterion``: the bound on ``rel_err`` is a fixed tolerance (given, per
dtype, or float64's: ``tf_jacbp.check.criterion``)."""

LOG_KEYS = (
    "grad_check_max_rel_err",
    "grad_check_mismatches",
    "grad_check_independent_variables",
    "grad_check_float64_max_rel_err",
    "grad_check_fd_max_rel_err",
    "grad_check_norms_max_rel_err",
)
"""The keys ``GradientCheck`` adds to the epoch ``logs``: the second and third are ints; the
fourth only when a float64 twin runs, the fifth only with finite differences (asked for, or the
witness of an implicit convolution over the budget: ``tf_jacbp.check.conv_witness``), the last
only for a model that clips per example (the per-example norm witness)."""


class GradientMismatchError(RuntimeError):
    """Raised by ``GradientCheck(on_mismatch="raise")``; ``records`` holds the failed
    comparisons."""

    def __init__(self, message: str, records: Sequence[GradientCheckRecord]):
        super().__init__(message)
        self.records = list(records)


class GradientMismatchWarning(UserWarning):
    """Issued by ``GradientCheck(on_mismatch="warn")`` for each check with a failed comparison."""


class GradientCheckCoverageWarning(UserWarning):
    """Issued by ``GradientCheck`` at the start of ``fit`` for what it cannot check: variables
    whose gradient the same code computes on both routes (stock Keras layers, layers with their
    own ``tf.custom_gradient``), or a model without a float64 twin (then a fixed tolerance)."""


@dataclasses.dataclass(frozen=True)
class GradientCheckRecord:
    """One comparison of one variable's gradient at one check.

    Attributes:
        step: training batches completed (counted over every ``fit`` of this callback) when the
            check ran; 0 is before the first update.
        epoch: the Keras epoch index (0-based) during or at the end of which the check ran.
        witness: ``"reference"`` (autodiff through the reference route),
            ``"finite_differences"`` or ``"per_example_norms"`` (DP-SGD's per-example gradient
            norms against autodiff's per-sample gradients, ``tf_jacbp.check.norms``).
        variable: the variable's ``path``, e.g. ``"sequential/dense/kernel"``.
        layer: the name of the innermost layer (searched through nested models) owning it.
        index: its position in ``model.trainable_variables``.
        abs_err: ``max_i |g_i - g_ref_i|`` (reference), ``|fd - g . v|`` (finite differences)
            or ``max_i |n_i - n_ref_i|`` over the samples (per-example norms); NaN if a value is
            not finite.
        rel_err: ``||g - g_ref|| / max(||g_ref||, tiny)`` in the training dtype (reference),
            ``|fd - g . v| / max(||g||, tiny)`` (finite differences) or ``||n - n_ref|| /
            max(||n_ref||, tiny)`` over the samples (per-example norms); NaN if not finite.
        cosine: ``<g, g_ref> / (||g|| ||g_ref||)`` (1 when both are zero, 0 when one is);
            ``None`` for the other witnesses. Reported, not a pass criterion.
        rtol: the bound applied to ``rel_err`` (``tf_jacbp.check.criterion``): derived from
            ``floor`` under the ``"rounding_floor"`` criterion, else the fixed tolerance.
        atol: the absolute tolerance applied to ``abs_err``, or ``None``.
        tolerance_dtype: the least precise dtype the gradient passed through (e.g.
            ``"float16"`` under ``mixed_float16``): whose rounding ``floor`` measures.
        gradient_dtype: the dtype the gradients were compared in (the variable's, e.g.
            ``"float32"`` under ``mixed_float16``; ``"float64"`` for finite differences and,
            on a float64 twin, the per-example norms).
        passed: ``tf_jacbp.check.criterion`` holds (both sides finite, ``rel_err <= rtol``,
            ``abs_err <= atol`` if set, ``float64_rel_err <= float64_rtol`` if measured).
        criterion: ``"rounding_floor"`` or ``"rtol"`` (fixed; the other witnesses too).
        floor: the reference route's own rounding error in the training dtype (its distance
            to the float64 twin's reference gradient, ``tf_jacbp.check.criterion``); ``None``
            without a twin.
        ratio: ``rel_err / floor``: how many rounding floors apart the two routes are.
        float64_rel_err: the float64 twin's Jacobian route against its reference route,
            ``||h - h_ref|| / max(||h_ref||, tiny)`` (the formula witness); ``None`` without
            a twin (e.g. the model trains in float64: then ``rel_err`` is that comparison).
        float64_rtol: the bound on ``float64_rel_err``.
        independent: the witness computes this gradient with other code than training: True
            for variables of tf_jacbp layers (their Jacobian formulas against autodiff) and for
            finite differences; False for stock layers (autodiff against itself).
        cause: for a non-finite value, where it comes from: ``"probe"`` (the probe batch),
            ``"loss"`` (the loss value on the probe), ``"reference"`` (the reference route's
            gradient is non-finite too: data, weights or loss), ``"backward"`` (the reference
            route is finite, the Jacobian route is not: a layer's backward pass) or ``"norms"``
            (autodiff's per-sample gradients are finite, the per-example norms are not: a
            layer's ``squared_norms``); else ``None``.
        recheck_passed: ``None`` unless this comparison failed with finite values; then the
            check was repeated on a perturbed probe: ``True`` if it passed there (a rounding
            flip of a ReLU kink or a max-pooling argmax: the record passes, its numbers are the
            first probe's), ``False`` if it failed again (a mismatch).
        layer_witness: what the owning layer's map was differentiated by on the witness side
            (``tf_jacbp.check.conv_witness``): ``"stock autodiff"`` (its reference route, stock
            ops; every layer but an implicit convolution), ``"materialized T(K)"`` (a
            convolution whose ``T(K)`` the training route applies by convolution kernels, which
            stock autodiff shares: autodiff of the product with ``T(K)`` formed from ``K``
            instead) or ``"finite differences"`` (such a convolution whose dense ``T(K)`` on the
            probe is over the budget: its variables get float64 finite-difference records, and
            its reference record, which shares the kernels, counts as not ``independent``).
    """

    step: int
    epoch: int
    witness: str
    variable: str
    layer: str
    index: int
    abs_err: float
    rel_err: float
    cosine: float | None
    rtol: float
    atol: float | None
    tolerance_dtype: str
    gradient_dtype: str
    passed: bool
    criterion: str = FIXED_RTOL
    floor: float | None = None
    ratio: float | None = None
    float64_rel_err: float | None = None
    float64_rtol: float | None = None
    independent: bool = True
    cause: str | None = None
    recheck_passed: bool | None = None
    layer_witness: str = STOCK_AUTODIFF
