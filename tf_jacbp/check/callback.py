"""``GradientCheck``, the Keras callback: its hooks decide *when* to check; ``Witnesses`` what.

The witnesses and the reports are described in the class docstring and in ``tf_jacbp.check``'s;
the criterion is stated once, in ``tf_jacbp.check.criterion`` (the class docstring includes it).
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
import warnings
from typing import Any

import numpy as np

from tf_jacbp import backend, hooks
from tf_jacbp._backend import keras
from tf_jacbp.check import criterion, report
from tf_jacbp.check.probe import (
    perturbed,
    probe_tensors,
    require_tensorboard,
    require_writable,
    validate_arguments,
    validate_probe_fits,
)
from tf_jacbp.check.records import (
    FINITE_DIFFERENCES,
    GradientCheckCoverageWarning,
    GradientCheckRecord,
    GradientMismatchError,
    GradientMismatchWarning,
)
from tf_jacbp.check.witnesses import Witnesses, rechecked

DEFAULT_EVERY_N_BATCHES = 200
"""Check every 200 training batches by default. Before the float64 twin,
``benchmarks/gradient_check.py`` (LeNet-100-300-10, Fashion-MNIST, batch 32, a 256-sample probe,
2 CPU cores) measured 7-9 ms a check, 1.3-1.6% of an epoch. The twin's two float64 routes make a
check several times dearer: one check, median, on 2 shared cores, 256-sample probe: LeNet-100-
300-10 13-21 ms before, 85-96 ms after; LeNet-5 0.64-1.3 s before, 3.4-4.3 s after. Pass a
larger ``every_n_batches`` (or a smaller probe) where that matters."""


class GradientCheck(keras.callbacks.Callback):
    """Check, during ``fit``, that the gradients training applies equal autodiff's.

    At the start of training, after every ``every_n_batches`` training batches, and at the end of
    every epoch, with the current weights, it computes on the probe batch the gradient of the
    compiled training loss

        ``L(theta) = model.compute_loss(x, y, model(x, training=True), sample_weight)``

    (compiled loss plus regularization losses; unscaled, i.e. without mixed precision's loss
    scale) with respect to every trainable variable, four times:

    * ``g``: the Jacobian route, what training applies (the tf_jacbp layers' ``backward``);
    * ``g_ref``: the reference route, inside ``tf_jacbp.reference_mode()``, by autodiff:
      ``tf.GradientTape`` on TensorFlow, ``jax.value_and_grad`` over the model's variables'
      values (a stateless call, as Keras' JAX ``train_step``) on JAX;
    * ``h`` and ``h64 = h_ref``: the same two routes on the float64 twin, a copy of the model with
      every layer in float64 (rebuilt by ``get_config``/``from_config``), the compiled loss in
      float64, the model's weights (batch-norm statistics and dropout seed states included,
      copied at every check) and the model's dropout masks (drawn in the model's dtype from the
      same seeds, then applied in float64).

    Per variable it records (``GradientCheckRecord``) ``rel_err`` (``g`` against ``g_ref``),
    the reference route's own rounding error ``floor`` and ``float64_rel_err`` (``h`` against
    ``h64``). The criterion, ``tf_jacbp.check.criterion.STATEMENT`` (its numbers are
    ``tf_jacbp.tolerances``'s, where the measurements behind them are given):

    {criterion}

    The float64 bound compares formulas where rounding is negligible: a wrong Jacobian shows at
    full size whatever the training dtype. The training-dtype bound needs no guessed per-dtype
    tolerance: ``floor`` is how far the reference route itself is from float64 in the training
    dtype, on this model, probe and machine, so a correct Jacobian route never alarms on
    rounding, while non-finite values and errors much larger than rounding (a dtype-specific
    bug) still fail. Without a twin (a model that does not round-trip through ``get_config``,
    or a random layer other than dropout, whose noise the twin cannot replay) the fixed bound
    can false-alarm on deep models: a ``GradientCheckCoverageWarning`` says so at the start of
    ``fit``. ``dtype`` is the least precise of the owning layer's compute dtype and the
    compiled loss's dtype.

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

    Each route is one ``tf.function`` (``jax.jit`` on JAX; with ``jit_compile`` as the
    model's), traced once and reused (``tracing_counts``). The forward pass's side effects
    (batch-norm statistics, dropout seeds, loss-tracking metrics) are undone after each route
    (never applied, on JAX), so all routes see the same dropout mask and training is not
    disturbed. The probe is the callback's own batch: Keras does not
    show callbacks the training batches.

    Finite differences (``finite_differences=True``): per variable ``theta_i`` of the float64
    twin, with a random unit direction ``v`` (fixed seed, drawn once), ``fd = (L(theta + eps v)
    - L(theta - eps v)) / (2 eps)`` (``eps = tolerances.FINITE_DIFFERENCE_DELTA``) is compared
    with ``h . v``. This witness differentiates nothing, so it also checks stock layers and
    custom gradients. Needs a compiled loss that is a ``keras.losses.Loss``, a loss name or a
    function ``(y_true, y_pred)``.

    Convolutions on the implicit route (``toeplitz="implicit"``, or ``"auto"`` above the
    crossover: ``layer.route_for(x)``) apply ``T(K)`` by the convolution, transposed-convolution
    and filter-gradient kernels, which stock autodiff of the reference route runs too. For them
    the reference route differentiates the product with the materialized ``T(K)`` (formed from
    ``K`` by its index maps: a matrix product and gathers) where a training step with the dense
    float64 ``T(K)`` on the probe fits the Toeplitz budget, and otherwise adds float64 finite
    differences of every variable (as ``finite_differences=True``; the reference record of that
    convolution then counts as not independent) (``tf_jacbp.check.conv_witness``). Each
    record's ``layer_witness`` and ``summary()`` say which: ``"stock autodiff"``,
    ``"materialized T(K)"`` or ``"finite differences"``.

    Per-example norms (a model that clips per example: one with an ``l2_norm_clip``, as
    ``tf_jacbp.privacy.DPModel``; ``tf_jacbp.check.norms``): DP-SGD clips with the norms of its
    first pass, ``tf_jacbp.jacobian.per_example_gradient_norms`` (the layers' ``squared_norms``
    formulas), which training's gradient never uses. Each check also compares them, per
    variable and on the first probe samples, with the norms of per-sample gradients that
    autodiff (``tf.GradientTape``; ``jax.value_and_grad`` on JAX) takes through the reference
    route, in float64 on the twin (witness
    ``"per_example_norms"``). A plain model runs nothing of it.

    Cost: the twin's two routes run in float64, so a check costs about three to six times the
    two training-dtype routes alone (measured: ``DEFAULT_EVERY_N_BATCHES``).

    Reporting: at every epoch end ``logs`` gets ``grad_check_max_rel_err`` (the largest
    ``rel_err`` of the reference witness over the epoch's checks; NaN if any was not finite),
    ``grad_check_mismatches`` (failed comparisons in the epoch, an int),
    ``grad_check_independent_variables`` (variables checked against an independent witness, an
    int), with a twin ``grad_check_float64_max_rel_err``, with finite differences
    ``grad_check_fd_max_rel_err`` and for a model that clips per example
    ``grad_check_norms_max_rel_err``. The worst variable is named in ``summary()`` (its record has
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
        rtol: a fixed relative tolerance for ``rel_err`` of every variable, instead of the
            bound derived from the rounding floor (``None``); see the criterion above.
        atol: optional bound on ``abs_err``, required in addition.
        on_mismatch: ``"raise"`` (stop training with ``GradientMismatchError``), ``"warn"``
            (``warnings.warn`` a ``GradientMismatchWarning`` and go on) or ``"log"`` (only
            record).
        finite_differences: also compare with directional finite differences in float64.
        log_dir: a writable directory for per-variable ``tf.summary`` scalars, or ``None``
            (on JAX this needs TensorFlow installed, as Keras' ``TensorBoard`` callback does).
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
        validate_arguments(every_n_batches, rtol, atol, on_mismatch, finite_differences, verbose)
        if log_dir is not None:
            require_tensorboard()
            require_writable(os.fspath(log_dir))
        self.probe = probe_tensors(probe)
        self._probe_is_dataset = backend.is_dataset(probe)
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
        self._witnesses: Witnesses | None = None

    def set_model(self, model: keras.Model) -> None:
        """Keras' ``set_model``, and ``tf_jacbp.hooks.attach(model)``: the model's step
        functions follow ``reference_mode()`` and its XLA steps stop on a bad label. Keras sets
        the callbacks' model before it makes the train function, so this ``fit`` has both."""
        super().set_model(model)
        hooks.attach(model)

    @property
    def tracing_counts(self) -> dict[str, int]:
        """How often each compiled function was traced: 1 each, after any number of checks."""
        return {} if self._witnesses is None else self._witnesses.tracing_counts()

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
        validate_probe_fits(model, self.probe, self._probe_is_dataset)
        built = self._built_for
        if built is None or built[0] is not model or not same(built[1], variables):
            self._witnesses = Witnesses(
                model, variables, self.finite_differences, self.rtol, self.atol
            )
            self._built_for = (model, list(variables))
        w = self._witnesses
        notes = report.coverage_notes(
            model.name,
            w.variables,
            w.independent,
            self.finite_differences,
            None if w.twin is not None or w.all_float64 else w.no_twin,
            [] if w.twin is None else w.twin.unreplayed_noise,
        )
        for note in notes:
            warnings.warn(f"GradientCheck: {note}.", GradientCheckCoverageWarning, stacklevel=2)
        if self.log_dir is not None:
            self._summary = backend.summary_module("GradientCheck(log_dir=...)")
            self._writer = self._summary.create_file_writer(self.log_dir)

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
            epoch = self.records[self._epoch_first_record :]
            finite_differences = self.finite_differences or any(
                r.witness == FINITE_DIFFERENCES for r in epoch
            )
            logs.update(report.epoch_logs(epoch, finite_differences))
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
        self._check(None if probe is None else probe_tensors(probe))
        return self.records[first:]

    def summary(self) -> str:
        """A plain-text report: coverage, the worst variable by name, then per variable and
        witness the checks, failures, worst ``rel_err``, its bound and the float64 comparison."""
        return report.summary(self.records)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Save a PNG of ``rel_err`` per layer (worst of its variables) against the step.

        Log scale; dashed lines are the fixed tolerances, dotted grey the derived bounds
        (``FLOOR_RATIO * floor``); non-finite errors are drawn as red crosses at the top. Needs
        matplotlib (``pip install 'tf_jacbp[plot]'``).
        """
        report.plot(self.records, path)

    def _warn_unwitnessed(self, w: Witnesses) -> None:
        """Once: an implicit convolution over the witness's budget in a model without a float64
        model to difference is compared with stock autodiff only (the same kernels)."""
        names = w.conv.needs_finite_differences()
        if not names or w.fd_possible or getattr(self, "_warned_unwitnessed", False):
            return
        self._warned_unwitnessed = True
        warnings.warn(
            f"GradientCheck: the convolutions {report.names(names)} apply T(K) by convolution "
            "kernels that stock autodiff shares, and their dense T(K) on the probe is over the "
            "Toeplitz budget, so their witness would be float64 finite differences, but the "
            f"model has no float64 twin ({w.no_twin}): they are compared with stock autodiff "
            "only. Raise tf_jacbp.toeplitz.set_budget_bytes(...) (the materialized T(K) is "
            "then the witness) or use a model that round-trips through get_config.",
            GradientCheckCoverageWarning,
            stacklevel=3,
        )

    def _check(self, probe: tuple | None = None) -> None:
        """Run the routes (and finite differences) on the probe; record, report, react.

        A comparison that fails with finite values is repeated on a perturbed probe (every
        floating input times ``1 + RECHECK_PERTURBATION * N(0, 1)``, fixed seed) and fails only
        if it fails there too: see ``tolerances.RECHECK_PERTURBATION``.
        """
        probe = self.probe if probe is None else probe
        # Reading the model property makes Keras' JAX fit write its mid-epoch state (kept apart
        # from the variables between steps) back to the variables; a no-op on TensorFlow.
        _ = self.model
        w = self._witnesses
        out = w.run(*probe)
        new = w.records(out, probe)
        if any(not r.passed and r.cause is None for r in new):
            again = w.records(w.run(*perturbed(probe)), probe)
            new = [rechecked(a, b) for a, b in zip(new, again, strict=True)]
        if w.needs_finite_differences() and out.h is not None:
            new += w.finite_difference_records([np.asarray(g) for g in out.h], probe)
        self._warn_unwitnessed(w)
        new = [dataclasses.replace(r, step=self._step, epoch=self._epoch) for r in new]
        self._last_check_step = self._step
        self.records += new
        if self._writer is not None:
            with self._writer.as_default():
                for r in new:
                    self._summary.scalar(f"grad_check/{r.witness}/{r.variable}", r.rel_err, r.step)
        failed = [r for r in new if not r.passed]
        if failed and self.on_mismatch != "log":
            message = report.mismatch_message(failed, len(new))
            if self.on_mismatch == "raise":
                if self._writer is not None:
                    self._writer.flush()
                raise GradientMismatchError(message, failed)
            warnings.warn(message, GradientMismatchWarning, stacklevel=2)


if GradientCheck.__doc__:  # None under python -OO
    GradientCheck.__doc__ = GradientCheck.__doc__.replace(
        "    {criterion}\n", textwrap.indent(criterion.STATEMENT, "    ") + "\n"
    )


def same(a: list, b: list) -> bool:
    """The same objects in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
