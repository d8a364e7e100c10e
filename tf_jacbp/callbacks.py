"""``GradientCheck``: while Keras trains, compare the gradients training applies with autodiff's.

Training applies the Jacobian route: every tf_jacbp layer's ``backward`` (the paper's
``(J_x F)^T delta`` and ``(J_theta F)^T delta``, docs/math.md "Algorithm 1") and every Table 1
loss's ``grad_{z[L]} l``, chained by ``tf.custom_gradient``; stock Keras layers in the same model
are differentiated by autodiff as usual. The witness is the reference route: the same model and
loss in stock TensorFlow ops inside ``tf_jacbp.reference_mode()``, differentiated by
``tf.GradientTape``. Both are gradients of the model's compiled training loss
``L(theta) = model.compute_loss(x, y, model(x, training=True), sample_weight)`` (the compiled
loss plus regularization losses) on one fixed probe batch. The two routes are compared twice:

* in float64, on a float64 twin of the model (same layers, weights, batch statistics and dropout
  masks), where correct formulas agree to about 1e-12 whatever dtype training uses: this checks
  the formulas;
* in the training dtype, where the Jacobian route must stay within a small multiple of the
  rounding error the reference route itself makes there (measured against the float64 twin):
  this checks what training applies, without a guessed per-dtype tolerance.

A third, optional witness is a directional central finite difference in float64.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from tf_jacbp import tolerances
from tf_jacbp._backend import keras, tf
from tf_jacbp.layers.base import JacobianLayer
from tf_jacbp.layers.dropout import Dropout as JacobianDropout
from tf_jacbp.mode import reference_mode

ON_MISMATCH = ("raise", "warn", "log")
"""The values of ``GradientCheck(on_mismatch=...)``."""

REFERENCE = "reference"
"""``GradientCheckRecord.witness`` of a comparison with the reference route (autodiff)."""

FINITE_DIFFERENCES = "finite_differences"
"""``GradientCheckRecord.witness`` of a comparison with a directional finite difference."""

ROUNDING_FLOOR = "rounding_floor"
"""``GradientCheckRecord.criterion``: ``rel_err <= tolerances.FLOOR_RATIO * floor``."""

FIXED_RTOL = "rtol"
"""``GradientCheckRecord.criterion``: ``rel_err <= rtol``, a fixed tolerance (given, or per
dtype when no float64 twin could be built)."""

LOG_KEYS = (
    "grad_check_max_rel_err",
    "grad_check_mismatches",
    "grad_check_independent_variables",
    "grad_check_float64_max_rel_err",
    "grad_check_fd_max_rel_err",
)
"""The keys ``GradientCheck`` adds to the epoch ``logs``: the second and third are ints; the
fourth only when a float64 twin runs, the last only with finite differences."""

DEFAULT_EVERY_N_BATCHES = 200
"""Check every 200 training batches by default. Measured with ``benchmarks/gradient_check.py``
(LeNet-100-300-10, Fashion-MNIST, batch 32, a 256-sample probe, 2 CPU cores): with the float64
twin a check costs about three times what the two training-dtype routes alone cost (about 25 ms
against 8 ms), so the 10 checks of a 1875-step epoch stay within a few percent of it."""

_FD_SEED = 0
_MAX_NAMES = 8  # variables named in a warning before "and N more"


class GradientMismatchError(RuntimeError):
    """Raised by ``GradientCheck(on_mismatch="raise")``; ``records`` holds the failed comparisons."""

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
        witness: ``"reference"`` (autodiff through the reference route) or
            ``"finite_differences"``.
        variable: the variable's ``path``, e.g. ``"sequential/dense/kernel"``.
        layer: the name of the innermost layer (searched through nested models) owning it.
        index: its position in ``model.trainable_variables``.
        abs_err: ``max_i |g_i - g_ref_i|`` (reference) or ``|fd - g . v|`` (finite differences);
            NaN if a value is not finite.
        rel_err: ``||g - g_ref|| / max(||g_ref||, tiny)`` in the training dtype (reference) or
            ``|fd - g . v| / max(||g||, tiny)`` (finite differences); NaN if not finite.
        cosine: ``<g, g_ref> / (||g|| ||g_ref||)`` (1 when both are zero, 0 when one is);
            ``None`` for finite differences. Reported, not a pass criterion.
        rtol: the bound applied to ``rel_err``: ``FLOOR_RATIO * floor`` under the
            ``"rounding_floor"`` criterion, else the fixed tolerance.
        atol: the absolute tolerance applied to ``abs_err``, or ``None``.
        tolerance_dtype: the least precise dtype the gradient passed through (e.g.
            ``"float16"`` under ``mixed_float16``): whose rounding ``floor`` measures.
        gradient_dtype: the dtype the gradients were compared in (the variable's, e.g.
            ``"float32"`` under ``mixed_float16``; ``"float64"`` for finite differences).
        passed: every criterion below holds (both sides finite, ``rel_err <= rtol``,
            ``abs_err <= atol`` if set, ``float64_rel_err <= float64_rtol`` if measured).
        criterion: ``"rounding_floor"`` or ``"rtol"`` (fixed; finite differences too).
        floor: the reference route's own rounding error in the training dtype,
            ``max(||g_ref - g64|| / max(||g_ref||, tiny), FLOOR_MIN_ULPS * eps(dtype))`` with
            ``g64`` the float64 twin's reference gradient; ``None`` without a twin.
        ratio: ``rel_err / floor``: how many rounding floors apart the two routes are.
        float64_rel_err: the float64 twin's Jacobian route against its reference route,
            ``||h - h_ref|| / max(||h_ref||, tiny)`` (the formula witness); ``None`` without
            a twin (e.g. the model trains in float64: then ``rel_err`` is that comparison).
        float64_rtol: the bound on ``float64_rel_err`` (``tolerances.rtol("float64")``).
        independent: the witness computes this gradient with other code than training: True
            for variables of tf_jacbp layers (their Jacobian formulas against autodiff) and for
            finite differences; False for stock layers (autodiff against itself).
        cause: for a non-finite value, where it comes from: ``"probe"`` (the probe batch),
            ``"loss"`` (the loss value on the probe), ``"reference"`` (the reference route's
            gradient is non-finite too: data, weights or loss) or ``"backward"`` (the reference
            route is finite, the Jacobian route is not: a layer's backward pass); else ``None``.
        recheck_passed: ``None`` unless this comparison failed with finite values; then the
            check was repeated on a perturbed probe: ``True`` if it passed there (a rounding
            flip of a ReLU kink or a max-pooling argmax: the record passes, its numbers are the
            first probe's), ``False`` if it failed again (a mismatch).
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


class GradientCheck(keras.callbacks.Callback):
    """Check, during ``fit``, that the gradients training applies equal autodiff's.

    At the start of training, after every ``every_n_batches`` training batches, and at the end of
    every epoch, with the current weights, it computes on the probe batch the gradient of the
    compiled training loss

        ``L(theta) = model.compute_loss(x, y, model(x, training=True), sample_weight)``

    (compiled loss plus regularization losses; unscaled, i.e. without mixed precision's loss
    scale) with respect to every trainable variable, four times:

    * ``g``: the Jacobian route, what training applies (the tf_jacbp layers' ``backward``);
    * ``g_ref``: the reference route, inside ``tf_jacbp.reference_mode()``, by
      ``tf.GradientTape``;
    * ``h`` and ``h64 = h_ref``: the same two routes on the float64 twin, a copy of the model with
      every layer in float64 (rebuilt by ``get_config``/``from_config``), the compiled loss in
      float64, the model's weights (batch-norm statistics and dropout seed states included,
      copied at every check) and the model's dropout masks (drawn in the model's dtype from the
      same seeds, then applied in float64).

    Per variable it records (``GradientCheckRecord``)

        ``rel_err = ||g - g_ref|| / max(||g_ref||, tiny)``,
        ``floor = max(||g_ref - h64|| / max(||g_ref||, tiny), FLOOR_MIN_ULPS * eps)``,
        ``float64_rel_err = ||h - h64|| / max(||h64||, tiny)``,

    and the variable passes when all gradients are finite and

        ``float64_rel_err <= tolerances.rtol("float64")``  (the formulas, in float64), and
        ``rel_err <= tolerances.FLOOR_RATIO * floor``      (the training dtype).

    The first compares formulas where rounding is negligible: a wrong Jacobian shows at full size
    (a 1% error as 1e-2 against 1e-12) in any training dtype. The second needs no guessed
    per-dtype tolerance: ``floor`` is how far the reference route itself is from float64 in the
    training dtype, on this model, probe and machine, so a correct Jacobian route (as far from
    float64 as the reference route, give or take a small factor) never alarms on rounding, while
    non-finite values and errors much larger than rounding (a dtype-specific bug) still fail.
    ``tiny`` is ``max(TINY[dtype], NOISE_FLOOR[dtype] * scale)``, ``scale`` the largest reference
    norm of the check (gradients that are zero in exact arithmetic are measured against the
    rounding noise of the whole gradient); ``eps`` is the training dtype's machine epsilon.
    A model that trains in float64 throughout is its own twin: then ``rel_err`` must be at most
    ``tolerances.rtol("float64")``.

    Fixed tolerances instead: ``rtol`` given replaces ``FLOOR_RATIO * floor`` by ``rtol`` (the
    float64 formula comparison still runs); ``atol`` given also requires ``abs_err = max |g -
    g_ref| <= atol``. Without a twin (a model that does not round-trip through ``get_config``,
    or a random layer other than dropout, whose noise the twin cannot replay) the training-dtype
    bound is ``tolerances.rtol(dtype)`` per variable, which can false-alarm on deep models; a
    ``GradientCheckCoverageWarning`` says so at the start of ``fit``. ``dtype`` is the least
    precise of the owning layer's compute dtype and the compiled loss's dtype.

    What is checked: the reference route is an independent witness only for variables of
    tf_jacbp layers (their Jacobian formulas against autodiff). A variable of a stock Keras layer
    or of a layer with its own ``tf.custom_gradient`` gets its gradient from the same code on
    both routes, so it always agrees: ``GradientCheckCoverageWarning`` names these variables at
    the start of ``fit``, and ``summary()``, ``records`` (``independent``) and ``logs``
    (``grad_check_independent_variables``) count what was checked against an independent
    witness. ``finite_differences=True`` is the independent witness for them.

    A non-finite value is always a failure; the message says whether it comes from the data or
    loss (the probe, the loss value, or a reference route that is non-finite too) or from a
    layer's backward pass (the reference route is finite, the Jacobian route is not).

    Each route is one ``tf.function`` (with ``jit_compile`` as the model's), traced once and
    reused (``tracing_counts``). The forward pass's side effects (batch-norm statistics, dropout
    seeds, loss-tracking metrics) are undone after each route, so all routes see the same dropout
    mask and training is not disturbed. The probe is the callback's own batch: Keras does not
    show callbacks the training batches.

    Finite differences (``finite_differences=True``): per variable ``theta_i`` of the float64
    twin, with a random unit direction ``v`` (fixed seed, drawn once),

        ``fd = (L(theta + eps v) - L(theta - eps v)) / (2 eps)`` is compared with ``h . v``:

    ``rel_err = |fd - h . v| / max(||h||, tiny)`` must be at most
    ``tolerances.FINITE_DIFFERENCE_RTOL``, with ``eps = tolerances.FINITE_DIFFERENCE_DELTA``.
    This witness differentiates nothing, so it also checks stock layers and custom gradients.
    Needs a compiled loss that is a ``keras.losses.Loss``, a loss name or a function
    ``(y_true, y_pred)``.

    Cost: the twin's two routes run in float64, so a check costs about two to three times the
    two training-dtype routes alone (measured in the benchmarks).

    Reporting: at every epoch end ``logs`` gets ``grad_check_max_rel_err`` (the largest
    ``rel_err`` of the reference witness over the epoch's checks; NaN if any was not finite),
    ``grad_check_mismatches`` (failed comparisons in the epoch, an int),
    ``grad_check_independent_variables`` (variables checked against an independent witness, an
    int), with a twin ``grad_check_float64_max_rel_err`` and, with finite differences,
    ``grad_check_fd_max_rel_err``. The worst variable is named in ``summary()`` (its record has
    its ``variable`` path). History and the progress bar show the logs;
    ``keras.callbacks.TensorBoard`` does when it comes *after* this callback in the
    ``callbacks`` list. With ``log_dir``, each check also writes
    ``grad_check/<witness>/<variable path>`` scalars (``rel_err`` at the step) with ``tf.summary``
    (needs ``pip install tensorboard``). At the end of training, ``summary()`` is printed when
    ``verbose >= 1``; ``plot(path)`` draws the relative error per layer over training.
    ``check_now()`` runs one check outside ``fit``.

    Distribution: under a ``tf.distribute`` strategy (e.g. ``MirroredStrategy``), Keras calls
    callbacks outside the strategy's scope and replica context. The check runs there: on the whole
    probe, on the default device, reading the mirrored variables (equal on every replica after
    each synchronized step); the loss is the single-replica one (not divided by the number of
    replicas). It checks the gradient formulas on the current weights, not the all-reduce.

    Args:
        probe: ``(x, y)`` or ``(x, y, sample_weight)`` arrays, or a batched ``tf.data.Dataset``
            whose first element is taken once as the probe. A few dozen to a few hundred
            samples shaped like one training batch.
        every_n_batches: a positive int: check after this many training batches since the last
            check.
        rtol: a fixed relative tolerance for ``rel_err`` of every variable, instead of
            ``FLOOR_RATIO * floor``; ``None``: derived from the rounding floor, see above.
        atol: optional bound on ``abs_err``, required in addition.
        on_mismatch: ``"raise"`` (stop training with ``GradientMismatchError``), ``"warn"``
            (``warnings.warn`` a ``GradientMismatchWarning`` and go on) or ``"log"`` (only
            record).
        finite_differences: also compare with directional finite differences in float64.
        log_dir: a writable directory for per-variable ``tf.summary`` scalars, or ``None``.
        verbose: 0 is silent; 1 prints ``summary()`` at the end of training.

    Example:
        >>> check = tf_jacbp.callbacks.GradientCheck((x_train[:256], y_train[:256]))
        >>> model.fit(x_train, y_train, epochs=5, callbacks=[check, keras.callbacks.TensorBoard()])
        >>> print(check.summary())
    """

    def __init__(
        self,
        probe: Any,
        every_n_batches: int = DEFAULT_EVERY_N_BATCHES,
        rtol: float | None = None,
        atol: float | None = None,
        on_mismatch: str = "raise",
        finite_differences: bool = False,
        log_dir: str | os.PathLike[str] | None = None,
        verbose: int = 1,
    ):
        super().__init__()
        if isinstance(every_n_batches, bool) or not isinstance(every_n_batches, int):
            raise ValueError(
                f"GradientCheck: every_n_batches must be a positive int, got "
                f"every_n_batches={every_n_batches!r}."
            )
        if every_n_batches <= 0:
            raise ValueError(
                f"GradientCheck: every_n_batches must be a positive int, got "
                f"every_n_batches={every_n_batches}."
            )
        for name, value in (("rtol", rtol), ("atol", atol)):
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            ):
                raise ValueError(
                    f"GradientCheck: {name} must be a positive number or None, got "
                    f"{name}={value!r}."
                )
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(
                f"GradientCheck: on_mismatch must be one of {', '.join(map(repr, ON_MISMATCH))}, "
                f"got on_mismatch={on_mismatch!r}."
            )
        if not isinstance(finite_differences, bool):
            raise ValueError(
                f"GradientCheck: finite_differences must be True or False, got "
                f"finite_differences={finite_differences!r}."
            )
        if isinstance(verbose, bool) or not isinstance(verbose, int) or verbose < 0:
            raise ValueError(
                f"GradientCheck: verbose must be 0 (silent) or 1 (print the summary at the end of "
                f"training), got verbose={verbose!r}."
            )
        if log_dir is not None:
            _require_tensorboard()
            _require_writable(os.fspath(log_dir))
        self.probe = _probe_tensors(probe)
        self._probe_is_dataset = isinstance(probe, tf.data.Dataset)
        self.every_n_batches = every_n_batches
        self.rtol = None if rtol is None else float(rtol)
        self.atol = None if atol is None else float(atol)
        self.on_mismatch = on_mismatch
        self.finite_differences = finite_differences
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.verbose = verbose
        self.records: list[GradientCheckRecord] = []
        self._step = 0
        self._epoch = 0
        self._epoch_start_step = 0
        self._last_check_step: int | None = None
        self._epoch_first_record = 0
        self._built_for: tuple | None = None
        self._writer = None
        self._twin: _Twin | None = None

    @property
    def tracing_counts(self) -> dict[str, int]:
        """How often each compiled function was traced: 1 each, after any number of checks."""
        if self._built_for is None:
            return {}
        counts = {
            "jacobian": self._jacobian_fn.experimental_get_tracing_count(),
            "reference": self._reference_fn.experimental_get_tracing_count(),
            "comparison": self._comparison_fn.experimental_get_tracing_count(),
        }
        if self._twin is not None:
            counts["float64_jacobian"] = self._twin.jacobian_fn.experimental_get_tracing_count()
            counts["float64_reference"] = self._twin.reference_fn.experimental_get_tracing_count()
        if self.finite_differences:
            counts["finite_differences_loss"] = self._fd_loss_fn.experimental_get_tracing_count()
        return counts

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Validate model and probe; build the compiled functions (once per model); warn about
        what the check cannot see."""
        model = self.model
        if getattr(model, "loss", None) is None:
            raise ValueError(
                "GradientCheck needs a compiled loss: call model.compile(loss=...) before fit."
            )
        if not model.layers:
            raise ValueError(
                f"GradientCheck: model '{model.name}' has no layers, so there is no gradient to "
                "check. Add layers (e.g. tf_jacbp.layers.Dense) before fit."
            )
        variables = model.trainable_variables
        if not variables:
            raise ValueError(
                f"GradientCheck: model '{model.name}' has no trainable variables (layers "
                f"{[layer.name for layer in model.layers]}), so there is no gradient to check. "
                "Add a layer with weights, or leave GradientCheck out of this fit."
            )
        _validate_probe_fits(model, self.probe, self._probe_is_dataset)
        built = self._built_for
        if built is None or built[0] is not model or not _same(built[1], variables):
            self._build(model, variables)
            self._built_for = (model, list(variables))
        self._warn_coverage(model)
        if self.log_dir is not None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Check at the start of training (unless these weights were checked already)."""
        self._epoch = epoch
        self._epoch_start_step = self._step
        self._epoch_first_record = len(self.records)
        if self._last_check_step != self._step:
            self._check()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Check when ``every_n_batches`` batches have passed since the last check."""
        self._step = self._epoch_start_step + batch + 1
        if self._step - self._last_check_step >= self.every_n_batches:
            self._check()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Check the epoch's final weights; add the epoch's results to ``logs``."""
        if self._last_check_step != self._step:
            self._check()
        if logs is not None:
            logs.update(self._epoch_logs())
        if self._writer is not None:
            self._writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        """Close the summary writer; print ``summary()`` when ``verbose >= 1``."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.verbose >= 1:
            print(self.summary())

    def check_now(
        self, model: keras.Model | None = None, probe: Any = None
    ) -> list[GradientCheckRecord]:
        """Run one check now, on the current weights, and return its records (also appended to
        ``records``; ``on_mismatch`` applies). ``model``: check this model (compiled) instead of
        the one ``fit`` set; the compiled functions are built on first use and reused.
        ``probe``: this batch instead of the callback's (shaped like it, or it retraces)."""
        if model is not None and model is not getattr(self, "_model", None):
            self.set_model(model)
        if getattr(self, "_model", None) is None:
            raise ValueError(
                "GradientCheck.check_now: no model; pass check_now(model) or call it after fit."
            )
        built = self._built_for
        if built is None or built[0] is not self.model:
            self.on_train_begin()
        first = len(self.records)
        self._check(None if probe is None else _probe_tensors(probe))
        return self.records[first:]

    def summary(self) -> str:
        """A plain-text report: coverage, the worst variable by name, then per variable and
        witness the checks, failures, worst ``rel_err``, its bound and the float64 comparison."""
        if not self.records:
            return "GradientCheck: no check has run yet."
        steps = sorted({r.step for r in self.records})
        failed = sum(not r.passed for r in self.records)
        lines = [
            f"GradientCheck: {len(steps)} checks (steps {steps[0]}..{steps[-1]}), "
            f"{len(self.records)} comparisons, {failed} mismatches.",
            _coverage_line(self.records),
        ]
        reference = [r for r in self.records if r.witness == REFERENCE]
        if reference:
            worst = max(reference, key=_badness)
            lines.append(f"Worst: {_describe(worst)}.")
        rows = [
            (
                "layer",
                "variable",
                "witness",
                "checks",
                "failed",
                "max rel err",
                "bound",
                "max x floor",
                "float64 rel err",
            )
        ]
        groups: dict[tuple[str, str, str], list[GradientCheckRecord]] = {}
        for r in self.records:
            groups.setdefault((r.layer, r.variable, r.witness), []).append(r)
        for (layer, variable, witness), group in groups.items():
            ratios = [r.ratio for r in group if r.ratio is not None]
            float64 = [r.float64_rel_err for r in group if r.float64_rel_err is not None]
            last = group[-1]
            bound = f"{last.rtol:.3g}"
            if last.criterion == ROUNDING_FLOOR:
                bound = f"{tolerances.FLOOR_RATIO:g} x floor"
            rows.append(
                (
                    layer,
                    variable if last.independent else f"{variable} (same code)",
                    witness,
                    str(len(group)),
                    str(sum(not r.passed for r in group)),
                    f"{_worst(r.rel_err for r in group):.3g}",
                    bound,
                    f"{_worst(ratios):.3g}" if ratios else "-",
                    f"{_worst(float64):.3g}" if float64 else "-",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        return "\n".join(line.rstrip() for line in lines)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Save a PNG of ``rel_err`` per layer (worst of its variables) against the step.

        Log scale; dashed lines are the fixed tolerances, dotted grey the derived bounds
        (``FLOOR_RATIO * floor``, worst over the layer's variables per check); non-finite errors
        are drawn as red crosses at the top. Needs matplotlib (``pip install 'tf_jacbp[plot]'``).
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as err:
            raise ImportError(
                "GradientCheck.plot needs matplotlib: pip install 'tf_jacbp[plot]'."
            ) from err
        if not self.records:
            raise ValueError("GradientCheck.plot: no check has run yet; call it after fit.")
        series: dict[tuple[str, str], dict[int, float]] = {}
        for r in self.records:
            by_step = series.setdefault((r.layer, r.witness), {})
            by_step[r.step] = _worst((by_step.get(r.step, 0.0), r.rel_err))
        finite = [e for s in series.values() for e in s.values() if math.isfinite(e) and e > 0]
        top = 10 * max(finite + [r.rtol for r in self.records if math.isfinite(r.rtol)])
        bottom = min(finite, default=top / 1e6) / 10
        fig = Figure(figsize=(8, 4.5))
        ax = fig.add_subplot()
        for (layer, witness), by_step in series.items():
            steps = sorted(by_step)
            errors = [max(by_step[s], bottom) for s in steps]
            style = "-" if witness == REFERENCE else ":"
            label = layer if witness == REFERENCE else f"{layer} (finite differences)"
            ax.plot(
                steps,
                [e if math.isfinite(e) else np.nan for e in errors],
                style,
                marker="o",
                markersize=3,
                label=label,
            )
            bad = [s for s in steps if not math.isfinite(by_step[s])]
            ax.plot(bad, [top] * len(bad), "rx", markersize=8)
        for tol in sorted({r.rtol for r in self.records if r.criterion == FIXED_RTOL}):
            ax.axhline(tol, color="gray", linestyle="--", linewidth=1)
        derived: dict[int, float] = {}
        for r in self.records:
            if r.criterion == ROUNDING_FLOOR and math.isfinite(r.rtol):
                derived[r.step] = min(derived.get(r.step, math.inf), r.rtol)
        if derived:
            steps = sorted(derived)
            ax.plot(steps, [derived[s] for s in steps], color="gray", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylim(bottom, top * 2)
        ax.set_xlabel("training step (batches)")
        ax.set_ylabel("relative error (rel_err)")
        ax.set_title("GradientCheck: Jacobian route vs witness (grey: tolerance)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")

    def _build(self, model: keras.Model, variables: list) -> None:
        """Map variables to layers and tolerances; create the compiled route functions and the
        float64 twin."""
        layers = list(_layers(model))
        owners = _owners(layers)
        loss_dtypes = [_loss_dtype(loss) for loss in keras.tree.flatten(model.loss)]
        self._variables = variables
        self._layer_names = [
            owners[id(v)].name if id(v) in owners else model.name for v in variables
        ]
        self._independent = [_independent(owners.get(id(v)), v) for v in variables]
        self._tolerance_dtypes = [
            _least_precise(
                [owners[id(v)].compute_dtype if id(v) in owners else v.dtype, *loss_dtypes]
            )
            for v in variables
        ]
        state = _state_variables(model)
        jit = model.jit_compile is True
        self._jacobian_fn = _gradient_function(model, variables, state, jit)
        self._reference_fn = _gradient_function(model, variables, state, jit)
        dtypes = {keras.backend.standardize_dtype(v.dtype) for v in variables}
        dtypes |= {keras.backend.standardize_dtype(layer.compute_dtype) for layer in layers}
        self._all_float64 = dtypes | set(loss_dtypes) == {"float64"}
        self._twin, self._twin_problem, self._replays_noise = None, None, True
        if not self._all_float64 or self.finite_differences:
            try:
                self._twin = _Twin(model, variables, jit)
            except ValueError as err:
                if self.finite_differences:
                    raise ValueError(
                        f"GradientCheck(finite_differences=True) needs a float64 twin: {err}. "
                        "Use finite_differences=False otherwise."
                    ) from err
                self._twin_problem = str(err)
        if self._twin is not None:
            self._replays_noise = not self._twin.unreplayed_noise
        if self.finite_differences:
            self._fd_loss_fn = _loss_function(self._twin.model, self._twin.state, jit)
            rng = np.random.default_rng(_FD_SEED)
            self._fd_directions = []
            for v in variables:
                d = rng.normal(size=tuple(v.shape))
                self._fd_directions.append(d / np.linalg.norm(d))
        self._comparison_fn = tf.function(self._comparison)

    def _warn_coverage(self, model: keras.Model) -> None:
        """``GradientCheckCoverageWarning`` for variables without an independent witness and
        for a missing (or noise-blind) float64 twin."""
        notes = []
        if not any(self._independent):
            notes.append(
                f"model '{model.name}' has no tf_jacbp layer (searched through nested models), "
                "so every gradient comes from autodiff and the check compares autodiff with "
                "itself. Use tf_jacbp.layers to check Jacobian formulas"
            )
        same = [v.path for v, ok in zip(self._variables, self._independent, strict=True) if not ok]
        if same and not self.finite_differences:
            notes.append(
                f"{len(same)} of {len(self._variables)} trainable variables get their gradient "
                "from the same code on both routes (stock Keras layers or custom gradients, not "
                "a tf_jacbp layer's formula), so the reference route always agrees with them and "
                f"is no witness: {_names(same)}. GradientCheck(finite_differences=True) checks "
                "them against float64 finite differences"
            )
        if self._twin is None and not self._all_float64:
            notes.append(
                f"no float64 twin of model '{model.name}' ({self._twin_problem}), so the "
                "training-dtype gradients are compared with the fixed tolerances.rtol(dtype), "
                "which can report rounding on deep models as a mismatch; give rtol= to set it"
            )
        elif not self._replays_noise:
            notes.append(
                "the float64 twin cannot replay the noise of "
                f"{_names(self._twin.unreplayed_noise)} (only dropout masks are replayed), so "
                "the training-dtype gradients are compared with the fixed tolerances.rtol(dtype); "
                "the float64 formula comparison still runs"
            )
        for note in notes:
            warnings.warn(f"GradientCheck: {note}.", GradientCheckCoverageWarning, stacklevel=3)

    def _comparison(self, x, y, sample_weight) -> dict[str, Any]:
        """All routes' gradients reduced to statistics (traced once, as one graph).

        Each route function is traced on its first call here: the Jacobian ones outside
        ``reference_mode()``, the reference ones inside it.
        """
        loss, grads = self._jacobian_fn(x, y, sample_weight)
        with reference_mode():
            loss_ref, refs = self._reference_fn(x, y, sample_weight)
        out = {"losses": [loss, loss_ref], "train": _statistics(grads, refs)}
        twin = self._twin
        if twin is not None:
            twin.synchronize()
            loss64, h = twin.jacobian_fn(x, y, sample_weight)
            with reference_mode():
                loss64_ref, h_ref = twin.reference_fn(x, y, sample_weight)
            out["losses"] += [loss64, loss64_ref]
            out["float64"] = _statistics(h, h_ref)
            out["floor"] = _floor_statistics(grads, refs, h_ref)
            if self.finite_differences:
                out["h"] = h
        return out

    def _check(self, probe: tuple | None = None) -> None:
        """Run the routes (and finite differences) on the probe; record, report, react.

        A comparison that fails with finite values is repeated on a perturbed probe (every
        floating input times ``1 + RECHECK_PERTURBATION * N(0, 1)``, fixed seed) and fails only
        if it fails there too: see ``tolerances.RECHECK_PERTURBATION``.
        """
        probe = self.probe if probe is None else probe
        out = self._comparison_fn(*probe)
        new = self._reference_records(out, probe)
        if any(not r.passed and r.cause is None for r in new):
            again = self._reference_records(self._comparison_fn(*_perturbed(probe)), probe)
            new = [_rechecked(a, b) for a, b in zip(new, again, strict=True)]
        if self.finite_differences:
            new += self._finite_difference_records([np.asarray(g) for g in out["h"]], probe)
        self._last_check_step = self._step
        self.records += new
        if self._writer is not None:
            with self._writer.as_default():
                for r in new:
                    tf.summary.scalar(f"grad_check/{r.witness}/{r.variable}", r.rel_err, r.step)
        failed = [r for r in new if not r.passed]
        if failed and self.on_mismatch != "log":
            message = _mismatch_message(failed, len(new))
            if self.on_mismatch == "raise":
                if self._writer is not None:
                    self._writer.flush()
                raise GradientMismatchError(message, failed)
            warnings.warn(message, GradientMismatchWarning, stacklevel=2)

    def _reference_records(self, out: dict[str, Any], probe: tuple) -> list[GradientCheckRecord]:
        """One record per variable from ``_comparison``'s statistics."""
        train = out["train"].numpy()
        float64 = out["float64"].numpy() if "float64" in out else None
        floor = out["floor"].numpy() if "floor" in out else None
        losses = [float(v) for v in out["losses"]]
        col = _COLUMNS
        scale = _largest(train[:, col["ref_norm"]], train[:, col["ref_finite"]])
        scale64 = None if float64 is None else _largest(float64[:, col["ref_norm"]])
        probe_finite = _finite(probe)
        losses_finite = all(math.isfinite(v) for v in losses)
        records = []
        for i, row in enumerate(train):
            dtype = self._tolerance_dtypes[i]
            finite = bool(row[col["finite"]] and row[col["ref_finite"]])
            abs_err, rel_err, cosine = float("nan"), float("nan"), float("nan")
            if finite:
                abs_err = float(row[col["max_abs"]])
                rel_err = tolerances.relative_error_from_norms(
                    row[col["diff_norm"]], row[col["ref_norm"]], dtype, scale
                )
                norm, ref_norm = float(row[col["norm"]]), float(row[col["ref_norm"]])
                if norm * ref_norm == 0:
                    cosine = 1.0 if norm == ref_norm else 0.0
                else:
                    cosine = float(row[col["dot"]]) / (norm * ref_norm)
            fields: dict[str, Any] = {"criterion": FIXED_RTOL, "rtol": self._fixed_rtol(dtype)}
            ok = finite
            if float64 is not None and not self._all_float64:
                f64 = float64[i]
                finite64 = bool(f64[col["finite"]] and f64[col["ref_finite"]])
                fields["float64_rtol"] = tolerances.rtol("float64")
                fields["float64_rel_err"] = float("nan")
                if finite64:
                    fields["float64_rel_err"] = tolerances.relative_error_from_norms(
                        f64[col["diff_norm"]], f64[col["ref_norm"]], "float64", scale64
                    )
                ok = ok and finite64 and fields["float64_rel_err"] <= fields["float64_rtol"]
                if finite and finite64:
                    denominator = tolerances.relative_error_from_norms(
                        1.0, row[col["ref_norm"]], dtype, scale
                    )
                    fields["floor"] = max(
                        float(floor[i, 0]) * denominator,
                        tolerances.FLOOR_MIN_ULPS * tolerances.EPS[dtype],
                    )
                    fields["ratio"] = rel_err / fields["floor"]
                    if self.rtol is None and self._replays_noise:
                        fields["criterion"] = ROUNDING_FLOOR
                        fields["rtol"] = tolerances.FLOOR_RATIO * fields["floor"]
                if not finite64 and finite:
                    finite = False  # reported through ``cause``
            ok = ok and rel_err <= fields["rtol"] and (self.atol is None or abs_err <= self.atol)
            cause = None
            if not finite:
                row64 = None if float64 is None else float64[i]
                cause = _cause(probe_finite, losses_finite, row, row64)
            records.append(
                self._record(
                    i,
                    REFERENCE,
                    abs_err,
                    rel_err,
                    cosine,
                    dtype,
                    keras.backend.standardize_dtype(self._variables[i].dtype),
                    bool(ok),
                    cause=cause,
                    **fields,
                )
            )
        return records

    def _fixed_rtol(self, dtype: str) -> float:
        """The given ``rtol``, else the per-dtype one (``tolerances.rtol``)."""
        return self.rtol if self.rtol is not None else tolerances.rtol(dtype)

    def _finite_difference_records(
        self, grads: list[np.ndarray], probe: tuple
    ) -> list[GradientCheckRecord]:
        """``fd = (L(theta + eps v) - L(theta - eps v)) / 2 eps`` per variable, vs ``h . v``."""
        x, y, sample_weight = probe
        eps = tolerances.FINITE_DIFFERENCE_DELTA
        norms = [float(np.linalg.norm(g)) for g in grads]
        floor = tolerances.FINITE_DIFFERENCE_FLOOR * max(
            [n for n in norms if math.isfinite(n)] or [0]
        )
        records = []
        for i, (variable, g, v) in enumerate(
            zip(self._twin.variables, grads, self._fd_directions, strict=True)
        ):
            theta = variable.numpy()
            variable.assign(theta + eps * v)
            plus = float(self._fd_loss_fn(x, y, sample_weight))
            variable.assign(theta - eps * v)
            minus = float(self._fd_loss_fn(x, y, sample_weight))
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
        fields.setdefault("independent", self._independent[i])
        return GradientCheckRecord(
            step=self._step,
            epoch=self._epoch,
            witness=witness,
            variable=self._variables[i].path,
            layer=self._layer_names[i],
            index=i,
            abs_err=abs_err,
            rel_err=rel_err,
            cosine=cosine,
            tolerance_dtype=tolerance_dtype,
            gradient_dtype=gradient_dtype,
            passed=bool(passed),
            **fields,
        )

    def _epoch_logs(self) -> dict[str, float | int]:
        records = self.records[self._epoch_first_record :]
        reference = [r for r in records if r.witness == REFERENCE]
        logs: dict[str, float | int] = {
            "grad_check_max_rel_err": _worst(r.rel_err for r in reference),
            "grad_check_mismatches": sum(not r.passed for r in records),
            "grad_check_independent_variables": _independent_count(records),
        }
        float64 = [r.float64_rel_err for r in reference if r.float64_rel_err is not None]
        if float64:
            logs["grad_check_float64_max_rel_err"] = _worst(float64)
        if self.finite_differences:
            fd = [r.rel_err for r in records if r.witness == FINITE_DIFFERENCES]
            logs["grad_check_fd_max_rel_err"] = _worst(fd)
        return logs


# --- reports ---------------------------------------------------------------------------------


def _same(a: Sequence, b: Sequence) -> bool:
    """The same objects in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _sort_key(error: float) -> float:
    """Order errors with NaN (a non-finite gradient) above everything."""
    return math.inf if math.isnan(error) else error


def _badness(r: GradientCheckRecord) -> tuple:
    """Failed before passed, then by how far past its bound (NaN first)."""
    bound = r.rtol if r.rtol > 0 else math.inf
    return (not r.passed, _sort_key(r.rel_err / bound))


def _worst(errors: Iterator[float] | Sequence[float]) -> float:
    """The largest error, NaN if any is NaN (never hidden by a finite maximum)."""
    errors = list(errors)
    if any(math.isnan(e) for e in errors):
        return float("nan")
    return max(errors, default=0.0)


def _names(paths: Sequence[str]) -> str:
    """``'a', 'b', ... and N more``."""
    shown = ", ".join(f"'{p}'" for p in paths[:_MAX_NAMES])
    more = len(paths) - _MAX_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _independent_count(records: Sequence[GradientCheckRecord]) -> int:
    """Variables with at least one comparison against an independent witness."""
    return len({r.index for r in records if r.independent})


def _coverage_line(records: Sequence[GradientCheckRecord]) -> str:
    total = len({r.index for r in records})
    independent = _independent_count(records)
    line = f"{independent} of {total} variables checked against an independent witness"
    same = sorted({r.variable for r in records} - {r.variable for r in records if r.independent})
    if same:
        line += (
            f"; not checked (the same code on both routes): {_names(same)}; "
            "finite_differences=True checks them"
        )
    return line + "."


def _describe(r: GradientCheckRecord) -> str:
    """``variable 'v' (layer 'l'), rel err ... (bound ...)``: one record in words."""
    text = f"variable '{r.variable}' (layer '{r.layer}')"
    if not math.isfinite(r.rel_err) or r.cause is not None:
        return f"{text}, non-finite ({_CAUSES.get(r.cause, 'a gradient is not finite')})"
    text += f", rel err {r.rel_err:.3g}"
    if r.criterion == ROUNDING_FLOOR:
        text += (
            f" = {r.ratio:.3g} x the {r.tolerance_dtype} rounding floor {r.floor:.3g} (bound "
            f"{tolerances.FLOOR_RATIO:g} x floor = {r.rtol:.3g})"
        )
    else:
        text += f" (rtol {r.rtol:.3g}, {r.tolerance_dtype})"
        if r.ratio is not None:
            text += f", {r.ratio:.3g} x the rounding floor {r.floor:.3g}"
    if r.float64_rel_err is not None:
        text += f"; float64 rel err {r.float64_rel_err:.3g} (rtol {r.float64_rtol:.3g})"
    return text


_CAUSES = {
    "probe": "the probe batch has NaN or inf values: the data, not a backward pass",
    "loss": "the loss on the probe is NaN or inf (weights or data overflow it): the data or "
    "loss, not a backward pass",
    "reference": "the reference route's gradient is not finite either: it comes from the "
    "data, the weights or the loss, not from a layer's backward pass",
    "backward": "the reference route is finite and the Jacobian route is not: a layer's "
    "backward pass produced it (this layer's, or one after it in the forward order)",
}


def _mismatch_message(failed: Sequence[GradientCheckRecord], total: int) -> str:
    first = failed[0]
    lines = [
        f"GradientCheck at step {first.step} (epoch {first.epoch}): {len(failed)} of {total} "
        "gradient comparisons failed (g: Jacobian route, what training applies):"
    ]
    for r in failed:
        if r.witness == REFERENCE:
            witness = "the reference route (tf.GradientTape in tf_jacbp.reference_mode())"
        else:
            witness = "a float64 directional finite difference"
        if r.cause is not None or not math.isfinite(r.rel_err):
            what = "a gradient has non-finite values (NaN or inf): " + _CAUSES.get(
                r.cause, "see the records"
            )
        else:
            failures = []
            if r.float64_rel_err is not None and not r.float64_rel_err <= r.float64_rtol:
                failures.append(
                    f"in float64 (the formulas) relative error {r.float64_rel_err:.3g} > rtol "
                    f"{r.float64_rtol:.3g}"
                )
            if not r.rel_err <= r.rtol:
                if r.criterion == ROUNDING_FLOOR:
                    failures.append(
                        f"in {r.tolerance_dtype} relative error {r.rel_err:.3g} = {r.ratio:.3g} "
                        f"x the rounding floor {r.floor:.3g} (bound {tolerances.FLOOR_RATIO:g} "
                        "x floor)"
                    )
                else:
                    failures.append(
                        f"relative error {r.rel_err:.3g} (rtol {r.rtol:.3g}, {r.tolerance_dtype})"
                    )
            if r.atol is not None and not r.abs_err <= r.atol:
                failures.append(f"max abs error {r.abs_err:.3g} (atol {r.atol:.3g})")
            what = "; ".join(failures) or f"relative error {r.rel_err:.3g}"
            what += f"; training-dtype relative error {r.rel_err:.3g}"
            if r.cosine is not None:
                what += f", cosine {r.cosine:.6f}"
        lines.append(f"  layer '{r.layer}', variable '{r.variable}' vs {witness}: {what}")
    lines.append(
        "A wrong parameter Jacobian shows in the layer's own variables; a wrong input Jacobian "
        "or activation derivative shows in the variables of the layers before it."
    )
    return "\n".join(lines)


# --- arguments and probe -----------------------------------------------------------------------


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "GradientCheck(log_dir=...) writes tf.summary scalars, which need TensorBoard: "
            "pip install tensorboard (or pass log_dir=None; the metrics still reach logs and "
            "History)."
        ) from err


def _require_writable(log_dir: str) -> None:
    """``log_dir`` is, or can be made, a writable local directory (remote URLs are not tried)."""
    if "://" in log_dir:
        return
    try:
        os.makedirs(log_dir, exist_ok=True)
        probe = os.path.join(log_dir, ".grad_check_write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ValueError(
            f"GradientCheck: log_dir={log_dir!r} is not a writable directory "
            f"({type(err).__name__}: {err.strerror or err}). Pass a directory you can write "
            "to, or log_dir=None (the metrics still reach logs and History)."
        ) from err


def _probe_tensors(probe: Any) -> tuple:
    """``(x, y, sample_weight)`` as tensors (``sample_weight`` may be ``None``); validated."""
    dataset = isinstance(probe, tf.data.Dataset)
    if dataset:
        ranks = [spec.shape.rank for spec in keras.tree.flatten(probe.element_spec)]
        if 0 in ranks:
            raise ValueError(
                "GradientCheck: probe is an unbatched tf.data.Dataset (its elements are single "
                f"samples, shapes {_shapes(probe.element_spec)}); call .batch(n) on it, e.g. "
                "probe=dataset.batch(64)."
            )
        try:
            probe = next(iter(probe.take(1)))
        except StopIteration:
            raise ValueError(
                "GradientCheck: probe is an empty tf.data.Dataset; give a dataset with at least "
                "one batch (x, y), or probe=(x, y) arrays."
            ) from None
    if not isinstance(probe, (tuple, list)) or len(probe) not in (2, 3):
        raise ValueError(
            f"GradientCheck: probe must be (x, y), (x, y, sample_weight) or a tf.data.Dataset "
            f"of such batches, got probe of type {type(probe).__name__}."
        )
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(probe))
    x, y, sample_weight = (
        None if t is None else keras.tree.map_structure(tf.convert_to_tensor, t)
        for t in (x, y, sample_weight)
    )
    sizes = {
        name: [t.shape[0] if t.shape.rank else None for t in keras.tree.flatten(part)]
        for name, part in (("x", x), ("y", y), ("sample_weight", sample_weight))
        if part is not None
    }
    counts = {n for part in sizes.values() for n in part}
    if None in counts or len(counts) != 1:
        hint = (
            " If the dataset is unbatched (one sample per element), call .batch(n) on it."
            if dataset
            else ""
        )
        raise ValueError(
            f"GradientCheck: probe parts must all hold the same number of samples on their first "
            f"axis, got {sizes}. Pass probe=(x[:n], y[:n]) from the training data.{hint}"
        )
    if counts == {0}:
        raise ValueError(
            f"GradientCheck: probe has zero samples (shapes {_shapes((x, y))}). Pass a few dozen "
            "training samples, e.g. probe=(x_train[:64], y_train[:64])."
        )
    return x, y, sample_weight


def _shapes(structure: Any) -> Any:
    return keras.tree.map_structure(lambda t: tuple(t.shape), structure)


def _validate_probe_fits(model: keras.Model, probe: tuple, from_dataset: bool = False) -> None:
    """Run the model, then its loss, once on the probe (inference mode, no side effects)."""
    x, y, sample_weight = probe
    try:
        y_pred = model(x, training=False)
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as err:
        try:
            expected = f", but model '{model.name}' expects inputs of shape {model.input_shape}"
        except (AttributeError, ValueError):
            expected = f", which model '{model.name}' does not accept"
        hint = ""
        if from_dataset and _one_axis_short(model, x):
            hint = (
                " The probe dataset looks unbatched (x lacks the batch axis): call .batch(n) on it."
            )
        raise ValueError(
            f"GradientCheck: probe does not fit the model: x has shape {_shapes(x)}{expected}."
            f"{hint} Pass a probe shaped like one batch of the data given to fit, e.g. "
            f"probe=(x_train[:64], y_train[:64]). ({type(err).__name__}: {err})"
        ) from err
    try:
        model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as err:
        weights = "" if sample_weight is None else f", sample_weight {_shapes(sample_weight)}"
        raise ValueError(
            f"GradientCheck: the compiled loss of model '{model.name}' failed on probe (y has "
            f"shape {_shapes(y)}{weights}, the model's output {_shapes(y_pred)}). If y is not "
            "shaped like the training targets, pass probe=(x_train[:64], y_train[:64]). "
            f"({type(err).__name__}: {err})"
        ) from err


def _one_axis_short(model: keras.Model, x: Any) -> bool:
    """``x`` has one axis fewer than the model's (first) input."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        return False
    shape = shape[0] if isinstance(shape, list) else shape
    first = keras.tree.flatten(x)[0]
    return isinstance(shape, tuple) and first.shape.rank == len(shape) - 1


# --- the model's variables -------------------------------------------------------------------


def _layers(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """Every layer of a model, depth first, looking through nested models (``.layers``)."""
    for sub in getattr(layer, "layers", []):
        yield sub
        yield from _layers(sub)


def _owners(layers: Sequence[keras.layers.Layer]) -> dict[int, keras.layers.Layer]:
    """``id(variable) -> innermost layer owning it`` (inner layers come after their model)."""
    owners = {}
    for layer in layers:
        for v in layer.trainable_variables:
            owners[id(v)] = layer
    return owners


def _independent(owner: keras.layers.Layer | None, variable: Any) -> bool:
    """The reference route computes ``variable``'s gradient with other code than training: its
    owner is a tf_jacbp layer whose Jacobian formulas differentiate it."""
    if not isinstance(owner, JacobianLayer):
        return False
    try:
        params = owner.jacobian_parameters()
    except (AttributeError, NotImplementedError):
        return True
    return any(p is variable for p in params) if params else True


def _loss_dtype(loss: Any) -> str:
    """The dtype a compiled loss computes in: a Loss's own, else Keras' ``floatx()``."""
    return getattr(loss, "dtype", None) or keras.config.floatx()


def _least_precise(dtypes: Sequence[Any]) -> str:
    """The dtype with the largest tolerance (float64 < float32 < float16 < bfloat16)."""
    names = [keras.backend.standardize_dtype(d) for d in dtypes]
    return max((n for n in names if n in tolerances.RTOL), key=tolerances.rtol)


def _state_variables(model: keras.Model) -> list:
    """Variables a forward pass may change: batch-norm statistics, seed states, loss metrics."""
    seen, state = set(), []
    for v in [*model.non_trainable_variables, *model.metrics_variables]:
        if id(v) not in seen:
            seen.add(id(v))
            state.append(v)
    return state


def _restoring(state: Sequence, fn: Callable) -> Callable:
    """``fn``, with the values of ``state`` read before and assigned back after it."""

    def run(*args):
        saved = [tf.identity(v.value) for v in state]
        out = fn(*args)
        for v, value in zip(state, saved, strict=True):
            v.assign(value)
        return out

    return run


# --- the witnesses -----------------------------------------------------------------------------

_COLUMNS = {
    name: i
    for i, name in enumerate(
        ("finite", "ref_finite", "max_abs", "diff_norm", "ref_norm", "norm", "dot")
    )
}


def _statistics(grads: Sequence[tf.Tensor], refs: Sequence[tf.Tensor]) -> tf.Tensor:
    """Per variable, in float64: ``[finite(g), finite(g_ref), max |g - g_ref|, ||g - g_ref||,
    ||g_ref||, ||g||, <g, g_ref>]``, a ``(num_variables, 7)`` tensor (columns ``_COLUMNS``)."""
    rows = []
    for g, ref in zip(grads, refs, strict=True):
        g = tf.reshape(tf.cast(g, tf.float64), [-1])
        ref = tf.reshape(tf.cast(ref, tf.float64), [-1])
        diff = g - ref
        rows.append(
            tf.stack(
                [
                    tf.cast(tf.reduce_all(tf.math.is_finite(g)), tf.float64),
                    tf.cast(tf.reduce_all(tf.math.is_finite(ref)), tf.float64),
                    tf.reduce_max(tf.abs(tf.concat([diff, tf.zeros([1], tf.float64)], 0))),
                    tf.norm(diff),
                    tf.norm(ref),
                    tf.norm(g),
                    tf.reduce_sum(g * ref),
                ]
            )
        )
    return tf.stack(rows)


def _floor_statistics(
    grads: Sequence[tf.Tensor], refs: Sequence[tf.Tensor], refs64: Sequence[tf.Tensor]
) -> tf.Tensor:
    """Per variable, in float64: ``[||g_ref - h64||, ||g - h64||]``, ``(num_variables, 2)``: the
    reference route's rounding error in the training dtype, and the Jacobian route's."""
    rows = []
    for g, ref, ref64 in zip(grads, refs, refs64, strict=True):
        ref64 = tf.reshape(tf.cast(ref64, tf.float64), [-1])
        rows.append(
            tf.stack(
                [
                    tf.norm(tf.reshape(tf.cast(ref, tf.float64), [-1]) - ref64),
                    tf.norm(tf.reshape(tf.cast(g, tf.float64), [-1]) - ref64),
                ]
            )
        )
    return tf.stack(rows)


def _largest(norms: np.ndarray, finite: np.ndarray | None = None) -> float:
    """The largest finite norm (0 if none): the scale of the whole gradient."""
    ok = np.isfinite(norms) if finite is None else (finite.astype(bool) & np.isfinite(norms))
    return float(np.max(norms[ok], initial=0.0))


def _finite(probe: tuple) -> bool:
    """Every floating value of the probe is finite."""
    for t in keras.tree.flatten(probe):
        if t is not None and t.dtype.is_floating and not np.all(np.isfinite(t.numpy())):
            return False
    return True


def _perturbed(probe: tuple) -> tuple:
    """``probe`` with every floating tensor of ``x`` times ``1 + RECHECK_PERTURBATION * N(0, 1)``
    (a fixed seed; zeros stay zero, labels and sample weights are kept)."""
    x, y, sample_weight = probe
    rng = np.random.default_rng(_FD_SEED)

    def perturb(t):
        if not t.dtype.is_floating:
            return t
        noise = 1 + tolerances.RECHECK_PERTURBATION * rng.normal(size=tuple(t.shape))
        return tf.cast(tf.cast(t, tf.float64) * noise, t.dtype)

    return keras.tree.map_structure(perturb, x), y, sample_weight


def _rechecked(first: GradientCheckRecord, again: GradientCheckRecord) -> GradientCheckRecord:
    """``first`` with the verdict of the re-check on the perturbed probe, if it needed one."""
    if first.passed or first.cause is not None:
        return first
    return dataclasses.replace(first, passed=again.passed, recheck_passed=again.passed)


def _cause(
    probe_finite: bool, losses_finite: bool, row: np.ndarray, row64: np.ndarray | None
) -> str:
    """Where a non-finite gradient comes from (``GradientCheckRecord.cause``)."""
    col = _COLUMNS
    if not probe_finite:
        return "probe"
    if not losses_finite:
        return "loss"
    if not row[col["ref_finite"]] or (row64 is not None and not row64[col["ref_finite"]]):
        return "reference"
    return "backward"


def _training_loss(model: keras.Model, x, y, sample_weight) -> tf.Tensor:
    """``model.compute_loss`` on ``model(x, training=True)``: what ``train_step`` differentiates."""
    y_pred = model(x, training=True)
    return model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)


def _gradient_function(
    model: keras.Model, variables: Sequence, state: Sequence, jit_compile: bool
) -> tf.types.experimental.PolymorphicFunction:
    """A ``tf.function`` ``(x, y, sample_weight) -> (L, [dL/dv for v in variables])``.

    The route is fixed when it is first traced (inside ``reference_mode()`` or not).
    """

    def gradients(x, y, sample_weight):
        with tf.GradientTape() as tape:
            loss = _training_loss(model, x, y, sample_weight)
        grads = tape.gradient(
            loss, list(variables), unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return loss, grads

    return tf.function(_restoring(state, gradients), jit_compile=jit_compile)


def _loss_function(
    model: keras.Model, state: Sequence, jit_compile: bool
) -> tf.types.experimental.PolymorphicFunction:
    """A ``tf.function`` ``(x, y, sample_weight) -> L(theta)`` at the current weights (compiled
    as the gradient functions are, so that dropout draws the same masks)."""
    fn = _restoring(state, lambda x, y, sw: _training_loss(model, x, y, sw))
    return tf.function(fn, jit_compile=jit_compile)


class _Float64Loss(keras.losses.Loss):
    """``fn(y_true, y_pred)`` per sample, reduced as the original loss, computed in float64."""

    def __init__(self, fn: Callable, reduction: str, name: str):
        super().__init__(name=name, reduction=reduction, dtype="float64")
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _float64_loss(loss: Any) -> Any:
    """The compiled loss ``loss`` (one leaf of ``model.loss``) computing in float64."""
    if loss is None:
        return None
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return _Float64Loss(loss.call, loss.reduction, loss.name)
    if callable(loss):
        return _Float64Loss(loss, "sum_over_batch_size", getattr(loss, "__name__", "loss"))
    raise ValueError(
        f"the loss {loss!r} cannot be computed in float64; compile with a keras.losses.Loss "
        "(e.g. from tf_jacbp.losses), a loss name or a function"
    )


@contextlib.contextmanager
def _floatx(dtype: str) -> Iterator[None]:
    """Temporarily set Keras' ``floatx`` (read by ``compile`` for the loss's own dtype)."""
    previous = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(previous)


_DROPOUTS = (keras.layers.Dropout, JacobianDropout)


class _ReplayedDropout(keras.layers.Layer):
    """A dropout layer of the float64 twin: ``y = x * k / (1 - r)`` in float64, with the keep
    mask ``k`` that the model's own layer draws. ``source`` is a copy of that layer in the
    model's dtype policy, whose seed state is copied from the model's at every check: it is run
    on ones of its compute dtype, and its nonzero outputs are the kept entries."""

    def __init__(self, source: keras.layers.Layer, rate: float, **kwargs: Any):
        super().__init__(dtype="float64", **kwargs)
        self.source = source
        self.rate = float(rate)

    def build(self, input_shape: tuple) -> None:
        if not self.source.built:
            self.source.build(input_shape)

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if not training or self.rate == 0:
            return inputs
        if self.rate >= 1:
            return inputs * tf.zeros([], inputs.dtype)
        ones = tf.ones(tf.shape(inputs), self.source.compute_dtype)
        kept = tf.cast(tf.not_equal(self.source(ones, training=True), 0), inputs.dtype)
        return inputs * kept * tf.constant(1 / (1 - self.rate), inputs.dtype)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)


class _Twin:
    """The float64 twin of a model: every layer rebuilt in float64 (dropout replayed, see
    ``_ReplayedDropout``), the compiled loss in float64, and its two gradient routes.

    ``synchronize()`` copies every weight of the model (trainable ones, batch-norm statistics,
    seed states) into the twin; call it inside the compiled check, before the twin's routes.
    ``unreplayed_noise`` lists layers with random state other than dropout (their noise differs
    in the twin, so only the twin's own two routes are comparable).
    """

    def __init__(self, model: keras.Model, variables: Sequence, jit_compile: bool):
        layers = list(_layers(model))
        self.unreplayed_noise = [
            layer.name
            for layer in layers
            if getattr(layer, "seed_generator", None) is not None
            and not isinstance(layer, _DROPOUTS)
        ]

        def clone_layer(layer):
            config = layer.get_config()
            if isinstance(layer, _DROPOUTS) and layer.rate > 0:
                source = type(layer).from_config(config)
                return _ReplayedDropout(source, layer.rate, name=layer.name)
            return type(layer).from_config({**config, "dtype": "float64"})

        try:
            clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
        except Exception as err:
            raise ValueError(
                f"could not clone model '{model.name}' in float64 ({type(err).__name__}: "
                f"{err}); the float64 twin needs a Sequential or Functional model whose layers "
                "round-trip through get_config/from_config"
            ) from err
        ours = [*model.trainable_variables, *model.non_trainable_variables]
        theirs = [*clone.trainable_variables, *clone.non_trainable_variables]
        if [(tuple(v.shape), v.path.rsplit("/", 1)[-1]) for v in ours] != [
            (tuple(v.shape), v.path.rsplit("/", 1)[-1]) for v in theirs
        ]:
            raise ValueError(
                f"the float64 clone of model '{model.name}' has other variables than the model; "
                "its layers must round-trip through get_config/from_config"
            )
        loss_weights = model.get_compile_config().get("loss_weights")
        with _floatx("float64"):
            clone.compile(
                loss=keras.tree.map_structure(_float64_loss, model.loss),
                loss_weights=loss_weights,
            )
        by_id = {id(v): i for i, v in enumerate(ours)}
        self.model = clone
        self.pairs = list(zip(ours, theirs, strict=True))
        self.variables = [theirs[by_id[id(v)]] for v in variables]
        self.state = _state_variables(clone)
        self.jacobian_fn = _gradient_function(clone, self.variables, self.state, jit_compile)
        self.reference_fn = _gradient_function(clone, self.variables, self.state, jit_compile)

    def synchronize(self) -> None:
        """Copy the model's weights into the twin (cast to the twin's dtypes)."""
        for source, target in self.pairs:
            target.assign(tf.cast(source.value, target.dtype))
