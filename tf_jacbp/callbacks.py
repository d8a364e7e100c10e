"""``GradientCheck``: while Keras trains, compare the gradients training applies with autodiff's.

Training applies the Jacobian route: every tf_jacbp layer's ``backward`` (the paper's
``(J_x F)^T delta`` and ``(J_theta F)^T delta``, MATH.md "Algorithm 1") and every Table 1 loss's
``grad_{z[L]} l``, chained by ``tf.custom_gradient``; stock Keras layers in the same model are
differentiated by autodiff as usual. The witness is the reference route: the same model and loss
in stock TensorFlow ops inside ``tf_jacbp.reference_mode()``, differentiated by
``tf.GradientTape``. Both are gradients of the model's compiled training loss
``L(theta) = model.compute_loss(x, y, model(x, training=True), sample_weight)`` (the compiled
loss plus regularization losses) on one fixed probe batch, so on a correct model they differ only
by rounding. A third, optional witness is a directional central finite difference in float64.
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
from tf_jacbp.mode import reference_mode

ON_MISMATCH = ("raise", "warn", "log")
"""The values of ``GradientCheck(on_mismatch=...)``."""

REFERENCE = "reference"
"""``GradientCheckRecord.witness`` of a comparison with the reference route (autodiff)."""

FINITE_DIFFERENCES = "finite_differences"
"""``GradientCheckRecord.witness`` of a comparison with a directional finite difference."""

LOG_KEYS = (
    "grad_check_max_rel_err",
    "grad_check_worst_variable",
    "grad_check_mismatches",
    "grad_check_fd_max_rel_err",
)
"""The keys ``GradientCheck`` adds to the epoch ``logs`` (the last only with finite differences)."""

DEFAULT_EVERY_N_BATCHES = 200
"""Check every 200 training batches by default. Measured with ``benchmarks/gradient_check.py``
(LeNet-100-300-10, Fashion-MNIST, batch 32, a 256-sample probe, 2 CPU cores): a check costs
about 7-9 ms, about three training steps, so the 10 checks of a 1875-step epoch spend 1.3-1.6% of
it in the callback (100 batches: 2.7%; 50: 4.9%; 25: 9.3%). 200 keeps the 5% target with room
for a larger probe or a slower check."""

_FD_SEED = 0


class GradientMismatchError(RuntimeError):
    """Raised by ``GradientCheck(on_mismatch="raise")``; ``records`` holds the failed comparisons."""

    def __init__(self, message: str, records: Sequence[GradientCheckRecord]):
        super().__init__(message)
        self.records = list(records)


class GradientMismatchWarning(UserWarning):
    """Issued by ``GradientCheck(on_mismatch="warn")`` for each check with a failed comparison."""


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
        index: its position in ``model.trainable_variables`` (the number logged as
            ``grad_check_worst_variable``).
        abs_err: ``max_i |g_i - g_ref_i|`` (reference) or ``|fd - g . v|`` (finite differences);
            NaN if a value is not finite.
        rel_err: ``||g - g_ref|| / max(||g_ref||, tiny)`` (reference) or
            ``|fd - g . v| / max(||g||, tiny)`` (finite differences); NaN if a value is not
            finite.
        cosine: ``<g, g_ref> / (||g|| ||g_ref||)`` (1 when both are zero, 0 when one is);
            ``None`` for finite differences. Reported, not a pass criterion.
        rtol: the relative tolerance applied.
        atol: the absolute tolerance applied to ``abs_err``, or ``None``.
        tolerance_dtype: the dtype whose tolerance applies (e.g. ``"float16"`` under
            ``mixed_float16``).
        gradient_dtype: the dtype the gradients were compared in (the variable's, e.g.
            ``"float32"`` under ``mixed_float16``; ``"float64"`` for finite differences).
        passed: both sides finite, ``rel_err <= rtol``, and ``abs_err <= atol`` if ``atol`` is set.
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


class GradientCheck(keras.callbacks.Callback):
    """Check, during ``fit``, that the gradients training applies equal autodiff's.

    At the start of training, after every ``every_n_batches`` training batches, and at the end of
    every epoch, with the current weights, it computes on the probe batch the gradient of the
    compiled training loss

        ``L(theta) = model.compute_loss(x, y, model(x, training=True), sample_weight)``

    (compiled loss plus regularization losses; unscaled, i.e. without mixed precision's loss
    scale) with respect to every trainable variable, twice:

    * ``g``: the Jacobian route, what training applies (the tf_jacbp layers' ``backward``);
    * ``g_ref``: the reference route, inside ``tf_jacbp.reference_mode()``, by
      ``tf.GradientTape``.

    Each route is one ``tf.function`` (with ``jit_compile`` as the model's), traced once and reused
    (``tracing_counts``). The forward pass's side effects (batch-norm statistics, dropout seeds,
    loss-tracking metrics) are undone after each route, so both routes see the same dropout mask
    and training is not disturbed. Per variable it records (``GradientCheckRecord``)

        ``abs_err = max |g - g_ref|``,
        ``rel_err = ||g - g_ref|| / max(||g_ref||, tiny)``  (``tolerances.relative_error``),
        ``cosine = <g, g_ref> / (||g|| ||g_ref||)``,

    and the variable passes when both gradients are finite, ``rel_err <= rtol`` and, if ``atol``
    is given, also ``abs_err <= atol`` (both must hold). A non-finite value in either gradient is
    always a failure.

    The probe is the callback's own batch: Keras does not show callbacks the training batches.

    Tolerances: ``rtol=None`` takes ``tolerances.rtol(dtype)`` per variable, with ``dtype`` the
    least precise of the owning layer's compute dtype and the compiled loss's dtype: under
    ``mixed_float16`` the gradients are float32 (the variables' dtype) and compared with the
    float16 tolerance; under ``mixed_bfloat16`` with the bfloat16 one; a float64 model with a
    float32 loss gets the float32 tolerance. ``tiny`` is ``tolerances.TINY[dtype]``.

    Finite differences (``finite_differences=True``): the model is cloned with the float64 dtype
    policy (layers rebuilt by ``get_config``/``from_config``, compiled loss in float64, the same
    weights at each check) and, per variable ``theta_i`` with a random unit direction ``v``
    (fixed seed, drawn once),

        ``fd = (L(theta + eps v) - L(theta - eps v)) / (2 eps)`` is compared with ``g . v``,

    ``g`` the clone's Jacobian-route gradient: ``rel_err = |fd - g . v| / max(||g||, tiny)``
    must be at most ``tolerances.FINITE_DIFFERENCE_RTOL``, with
    ``eps = tolerances.FINITE_DIFFERENCE_DELTA``. Needs a Sequential or Functional model whose
    layers round-trip through ``get_config`` and a compiled loss that is a ``keras.losses.Loss``,
    a loss name or a function ``(y_true, y_pred)``.

    Reporting: at every epoch end ``logs`` gets ``grad_check_max_rel_err`` (the largest
    ``rel_err`` of the reference witness over the epoch's checks; NaN if any was not finite),
    ``grad_check_worst_variable`` (that variable's index in ``model.trainable_variables``; its
    name is in ``records`` and ``summary()``), ``grad_check_mismatches`` (failed comparisons in
    the epoch) and, with finite differences, ``grad_check_fd_max_rel_err``. History and the
    progress bar show them; ``keras.callbacks.TensorBoard`` does when it comes *after* this
    callback in the ``callbacks`` list. With ``log_dir``, each check also writes
    ``grad_check/<witness>/<variable path>`` scalars (``rel_err`` at the step) with ``tf.summary``
    (needs ``pip install tensorboard``). At the end of training, ``summary()`` is printed when
    ``verbose >= 1``; ``plot(path)`` draws the relative error per layer over training.

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
        rtol: relative tolerance for every variable; ``None``: per dtype, see above.
        atol: optional bound on ``abs_err``, required in addition to ``rtol``.
        on_mismatch: ``"raise"`` (stop training with ``GradientMismatchError``), ``"warn"``
            (``warnings.warn`` a ``GradientMismatchWarning`` and go on) or ``"log"`` (only
            record).
        finite_differences: also compare with directional finite differences in float64.
        log_dir: directory for per-variable ``tf.summary`` scalars, or ``None``.
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
        self.probe = _probe_tensors(probe)
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
        if self.finite_differences:
            counts["finite_differences_gradient"] = (
                self._fd_gradient_fn.experimental_get_tracing_count()
            )
            counts["finite_differences_loss"] = self._fd_loss_fn.experimental_get_tracing_count()
        return counts

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Validate the probe against the model; build the compiled functions (once per model)."""
        model = self.model
        if getattr(model, "loss", None) is None:
            raise ValueError(
                "GradientCheck needs a compiled loss: call model.compile(loss=...) before fit."
            )
        _validate_probe_fits(model, self.probe)
        variables = model.trainable_variables
        if not variables:
            raise ValueError(
                f"GradientCheck: model '{model.name}' has no trainable variables, so there is no "
                "gradient to check."
            )
        built = self._built_for
        if built is None or built[0] is not model or not _same(built[1], variables):
            self._build(model, variables)
            self._built_for = (model, list(variables))
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

    def summary(self) -> str:
        """A plain-text table: per variable and witness, checks, failures, worst ``rel_err``."""
        if not self.records:
            return "GradientCheck: no check has run yet."
        steps = sorted({r.step for r in self.records})
        failed = sum(not r.passed for r in self.records)
        lines = [
            f"GradientCheck: {len(steps)} checks (steps {steps[0]}..{steps[-1]}), "
            f"{len(self.records)} comparisons, {failed} mismatches."
        ]
        rows = [("layer", "variable", "witness", "checks", "failed", "max rel err", "rtol")]
        groups: dict[tuple[str, str, str], list[GradientCheckRecord]] = {}
        for r in self.records:
            groups.setdefault((r.layer, r.variable, r.witness), []).append(r)
        for (layer, variable, witness), group in groups.items():
            rows.append(
                (
                    layer,
                    variable,
                    witness,
                    str(len(group)),
                    str(sum(not r.passed for r in group)),
                    f"{_worst(r.rel_err for r in group):.3g}",
                    f"{group[-1].rtol:.3g}",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        return "\n".join(line.rstrip() for line in lines)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Save a PNG of ``rel_err`` per layer (worst of its variables) against the step.

        Log scale; dashed lines are the tolerances; non-finite errors are drawn as red crosses at
        the top. Needs matplotlib (``pip install 'tf_jacbp[plot]'``).
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
        top = 10 * max(finite + [r.rtol for r in self.records])
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
        for tol in sorted({r.rtol for r in self.records}):
            ax.axhline(tol, color="gray", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylim(bottom, top * 2)
        ax.set_xlabel("training step (batches)")
        ax.set_ylabel("relative error (rel_err)")
        ax.set_title("GradientCheck: Jacobian route vs witness (dashed: tolerance)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")

    def _build(self, model: keras.Model, variables: list) -> None:
        """Map variables to layers and tolerances; create the compiled route functions."""
        layers = list(_layers(model))
        if not any(isinstance(layer, JacobianLayer) for layer in layers):
            warnings.warn(
                f"GradientCheck: model '{model.name}' has no tf_jacbp layer (searched through "
                "nested models), so every gradient comes from autodiff and the check compares "
                "autodiff with itself. Use tf_jacbp.layers to check Jacobian formulas.",
                UserWarning,
                stacklevel=2,
            )
        owners = _owners(layers)
        loss_dtypes = [_loss_dtype(loss) for loss in keras.tree.flatten(model.loss)]
        self._variables = variables
        self._layer_names = [
            owners[id(v)].name if id(v) in owners else model.name for v in variables
        ]
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
        self._comparison_fn = tf.function(self._comparison)
        if self.finite_differences:
            self._build_finite_differences(model, variables)

    def _build_finite_differences(self, model: keras.Model, variables: list) -> None:
        clone = _float64_clone(model)
        clone_variables = clone.trainable_variables
        shapes = [tuple(v.shape) for v in variables]
        if [tuple(v.shape) for v in clone_variables] != shapes:
            raise ValueError(
                "GradientCheck(finite_differences=True): the float64 clone of the model has "
                "trainable variables of other shapes than the model; the model's layers must "
                "round-trip through get_config/from_config."
            )
        state = _state_variables(clone)
        self._clone = clone
        self._fd_gradient_fn = _gradient_function(clone, clone_variables, state, False)
        self._fd_loss_fn = _loss_function(clone, state)
        rng = np.random.default_rng(_FD_SEED)
        self._fd_directions = []
        for shape in shapes:
            v = rng.normal(size=shape)
            self._fd_directions.append(v / np.linalg.norm(v))

    def _comparison(self, x, y, sample_weight) -> tf.Tensor:
        """Both routes' gradients reduced to ``_statistics`` (traced once, as one graph).

        Each route function is traced on its first call here: the Jacobian one outside
        ``reference_mode()``, the reference one inside it.
        """
        grads = self._jacobian_fn(x, y, sample_weight)
        with reference_mode():
            refs = self._reference_fn(x, y, sample_weight)
        return _statistics(grads, refs)

    def _check(self) -> None:
        """Run both routes (and finite differences) on the probe; record, report, react."""
        statistics = self._comparison_fn(*self.probe).numpy()
        finite_norms = [row[3] for row in statistics if row[0] and math.isfinite(row[3])]
        scale = max(finite_norms, default=0.0)
        new = [self._compare(i, scale, *row) for i, row in enumerate(statistics)]
        if self.finite_differences:
            new += self._finite_difference_records()
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

    def _compare(
        self,
        i: int,
        scale: float,
        finite: float,
        abs_err: float,
        diff_norm: float,
        ref_norm: float,
        norm: float,
        dot: float,
    ) -> GradientCheckRecord:
        """A record from one row of ``_statistics``.

        ``rel_err`` is ``tolerances.relative_error_from_norms``: ``||g - g_ref|| /
        max(||g_ref||, TINY[dtype], NOISE_FLOOR[dtype] * scale)`` with ``scale`` the largest
        reference norm of this check, NaN unless both gradients are finite.
        """
        dtype = self._tolerance_dtypes[i]
        finite, abs_err, diff_norm, ref_norm, norm, dot = (
            bool(finite),
            float(abs_err),
            float(diff_norm),
            float(ref_norm),
            float(norm),
            float(dot),
        )
        if not finite:
            abs_err = rel_err = cosine = float("nan")
        else:
            rel_err = tolerances.relative_error_from_norms(diff_norm, ref_norm, dtype, scale)
            if norm * ref_norm == 0:
                cosine = 1.0 if norm == ref_norm else 0.0
            else:
                cosine = dot / (norm * ref_norm)
        gradient_dtype = keras.backend.standardize_dtype(self._variables[i].dtype)
        return self._record(i, REFERENCE, abs_err, rel_err, cosine, dtype, gradient_dtype, finite)

    def _finite_difference_records(self) -> list[GradientCheckRecord]:
        """``fd = (L(theta + eps v) - L(theta - eps v)) / 2 eps`` per variable, vs ``g . v``."""
        x, y, sample_weight = self.probe
        clone = self._clone
        clone.set_weights(self.model.get_weights())
        grads = self._fd_gradient_fn(x, y, sample_weight)
        eps = tolerances.FINITE_DIFFERENCE_DELTA
        norms = [float(np.linalg.norm(g)) for g in grads]
        floor = tolerances.FINITE_DIFFERENCE_FLOOR * max(
            [n for n in norms if math.isfinite(n)] or [0]
        )
        records = []
        for i, (variable, g, v) in enumerate(
            zip(clone.trainable_variables, grads, self._fd_directions, strict=True)
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
            records.append(
                self._record(
                    i,
                    FINITE_DIFFERENCES,
                    abs_err,
                    rel_err,
                    None,
                    "float64",
                    "float64",
                    finite,
                    rtol=tolerances.FINITE_DIFFERENCE_RTOL,
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
        finite: bool,
        rtol: float | None = None,
    ) -> GradientCheckRecord:
        if rtol is None:
            rtol = self.rtol if self.rtol is not None else tolerances.rtol(tolerance_dtype)
        passed = finite and rel_err <= rtol and (self.atol is None or abs_err <= self.atol)
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
            rtol=rtol,
            atol=self.atol,
            tolerance_dtype=tolerance_dtype,
            gradient_dtype=gradient_dtype,
            passed=bool(passed),
        )

    def _epoch_logs(self) -> dict[str, float]:
        records = self.records[self._epoch_first_record :]
        reference = [r for r in records if r.witness == REFERENCE]
        worst = max(reference, key=lambda r: _sort_key(r.rel_err))
        logs = {
            "grad_check_max_rel_err": worst.rel_err,
            "grad_check_worst_variable": float(worst.index),
            "grad_check_mismatches": float(sum(not r.passed for r in records)),
        }
        if self.finite_differences:
            fd = [r.rel_err for r in records if r.witness == FINITE_DIFFERENCES]
            logs["grad_check_fd_max_rel_err"] = _worst(fd)
        return logs


def _same(a: Sequence, b: Sequence) -> bool:
    """The same objects in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _sort_key(error: float) -> float:
    """Order errors with NaN (a non-finite gradient) above everything."""
    return math.inf if math.isnan(error) else error


def _worst(errors: Iterator[float] | Sequence[float]) -> float:
    """The largest error, NaN if any is NaN (never hidden by a finite maximum)."""
    errors = list(errors)
    if any(math.isnan(e) for e in errors):
        return float("nan")
    return max(errors, default=0.0)


def _mismatch_message(failed: Sequence[GradientCheckRecord], total: int) -> str:
    first = failed[0]
    lines = [
        f"GradientCheck at step {first.step} (epoch {first.epoch}): {len(failed)} of {total} "
        "gradient comparisons failed (g: Jacobian route, what training applies):"
    ]
    for r in failed:
        witness = (
            "the reference route (tf.GradientTape in tf_jacbp.reference_mode())"
            if r.witness == REFERENCE
            else "a float64 directional finite difference"
        )
        if not math.isfinite(r.rel_err):
            what = "a gradient has non-finite values (NaN or inf)"
        else:
            what = f"relative error {r.rel_err:.3g} (rtol {r.rtol:.3g}, {r.tolerance_dtype})"
            if r.atol is not None:
                what += f", max abs error {r.abs_err:.3g} (atol {r.atol:.3g})"
            else:
                what += f", max abs error {r.abs_err:.3g}"
            if r.cosine is not None:
                what += f", cosine {r.cosine:.6f}"
        lines.append(f"  layer '{r.layer}', variable '{r.variable}' vs {witness}: {what}")
    lines.append(
        "A wrong parameter Jacobian shows in the layer's own variables; a wrong input Jacobian "
        "or activation derivative shows in the variables of the layers before it."
    )
    return "\n".join(lines)


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "GradientCheck(log_dir=...) writes tf.summary scalars, which need TensorBoard: "
            "pip install tensorboard (or pass log_dir=None; the metrics still reach logs and "
            "History)."
        ) from err


def _probe_tensors(probe: Any) -> tuple:
    """``(x, y, sample_weight)`` as tensors (``sample_weight`` may be ``None``); validated."""
    if isinstance(probe, tf.data.Dataset):
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
        raise ValueError(
            f"GradientCheck: probe parts must all hold the same number of samples on their first "
            f"axis, got {sizes}. Pass probe=(x[:n], y[:n]) from the training data."
        )
    if counts == {0}:
        raise ValueError(
            f"GradientCheck: probe has zero samples (shapes {_shapes((x, y))}). Pass a few dozen "
            "training samples, e.g. probe=(x_train[:64], y_train[:64])."
        )
    return x, y, sample_weight


def _shapes(structure: Any) -> Any:
    return keras.tree.map_structure(lambda t: tuple(t.shape), structure)


def _validate_probe_fits(model: keras.Model, probe: tuple) -> None:
    """Run the model, then its loss, once on the probe (inference mode, no side effects)."""
    x, y, sample_weight = probe
    try:
        y_pred = model(x, training=False)
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as err:
        try:
            expected = f", but model '{model.name}' expects inputs of shape {model.input_shape}"
        except (AttributeError, ValueError):
            expected = f", which model '{model.name}' does not accept"
        raise ValueError(
            f"GradientCheck: probe does not fit the model: x has shape {_shapes(x)}{expected}. "
            "Pass a probe shaped like one batch of the data given to fit, e.g. "
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


def _statistics(grads: Sequence[tf.Tensor], refs: Sequence[tf.Tensor]) -> tf.Tensor:
    """Per variable, in float64: ``[finite, max |g - g_ref|, ||g - g_ref||, ||g_ref||, ||g||,
    <g, g_ref>]``, a ``(num_variables, 6)`` tensor (``finite`` is 1 when both are finite)."""
    rows = []
    for g, ref in zip(grads, refs, strict=True):
        g = tf.reshape(tf.cast(g, tf.float64), [-1])
        ref = tf.reshape(tf.cast(ref, tf.float64), [-1])
        finite = tf.reduce_all(tf.math.is_finite(g)) & tf.reduce_all(tf.math.is_finite(ref))
        diff = g - ref
        rows.append(
            tf.stack(
                [
                    tf.cast(finite, tf.float64),
                    tf.reduce_max(tf.abs(tf.concat([diff, tf.zeros([1], tf.float64)], 0))),
                    tf.norm(diff),
                    tf.norm(ref),
                    tf.norm(g),
                    tf.reduce_sum(g * ref),
                ]
            )
        )
    return tf.stack(rows)


def _training_loss(model: keras.Model, x, y, sample_weight) -> tf.Tensor:
    """``model.compute_loss`` on ``model(x, training=True)``: what ``train_step`` differentiates."""
    y_pred = model(x, training=True)
    return model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)


def _gradient_function(
    model: keras.Model, variables: Sequence, state: Sequence, jit_compile: bool
) -> tf.types.experimental.PolymorphicFunction:
    """A ``tf.function`` ``(x, y, sample_weight) -> [dL/dv for v in variables]``.

    The route is fixed when it is first traced (inside ``reference_mode()`` or not).
    """

    def gradients(x, y, sample_weight):
        with tf.GradientTape() as tape:
            loss = _training_loss(model, x, y, sample_weight)
        return tape.gradient(
            loss, list(variables), unconnected_gradients=tf.UnconnectedGradients.ZERO
        )

    return tf.function(_restoring(state, gradients), jit_compile=jit_compile)


def _loss_function(
    model: keras.Model, state: Sequence
) -> tf.types.experimental.PolymorphicFunction:
    """A ``tf.function`` ``(x, y, sample_weight) -> L(theta)`` at the current weights."""
    return tf.function(_restoring(state, lambda x, y, sw: _training_loss(model, x, y, sw)))


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
        f"GradientCheck(finite_differences=True) cannot compute the loss {loss!r} in float64; "
        "compile with a keras.losses.Loss (e.g. from tf_jacbp.losses), a loss name or a function."
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


def _float64_clone(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with every layer in float64, its loss compiled in float64."""

    def clone_layer(layer):
        return type(layer).from_config({**layer.get_config(), "dtype": "float64"})

    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    except Exception as err:
        raise ValueError(
            f"GradientCheck(finite_differences=True) could not clone model '{model.name}' in "
            f"float64 ({type(err).__name__}: {err}). The finite-difference witness needs a "
            "Sequential or Functional model whose layers round-trip through get_config/"
            "from_config; use finite_differences=False otherwise."
        ) from err
    clone.set_weights(model.get_weights())
    loss_weights = model.get_compile_config().get("loss_weights")
    with _floatx("float64"):
        clone.compile(
            loss=keras.tree.map_structure(_float64_loss, model.loss), loss_weights=loss_weights
        )
    return clone
