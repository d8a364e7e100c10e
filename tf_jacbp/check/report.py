"""What ``GradientCheck`` tells its user: the summary, the mismatch message, the coverage
warnings, the epoch logs and the plot, all computed from the records.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

import numpy as np

from tf_jacbp import tolerances
from tf_jacbp._backend import BACKEND
from tf_jacbp.check.conv_witness import (
    FLOAT64_FINITE_DIFFERENCES,
    MATERIALIZED_T,
    STOCK_AUTODIFF,
    UNFOLDED_PATCHES,
)
from tf_jacbp.check.records import (
    FINITE_DIFFERENCES,
    FIXED_RTOL,
    PER_EXAMPLE_NORMS,
    REFERENCE,
    ROUNDING_FLOOR,
    GradientCheckRecord,
)

MAX_NAMES = 8
"""Variables named in a warning before "and N more"."""


def sort_key(error: float) -> float:
    """Order errors with NaN (a non-finite gradient) above everything."""
    return math.inf if math.isnan(error) else error


def badness(r: GradientCheckRecord) -> tuple:
    """Failed before passed, then by how far past its bound (NaN first)."""
    bound = r.rtol if r.rtol > 0 else math.inf
    return (not r.passed, sort_key(r.rel_err / bound))


def worst(errors: Iterator[float] | Sequence[float]) -> float:
    """The largest error, NaN if any is NaN (never hidden by a finite maximum)."""
    errors = list(errors)
    if any(math.isnan(e) for e in errors):
        return float("nan")
    return max(errors, default=0.0)


def names(paths: Sequence[str]) -> str:
    """``'a', 'b', ... and N more``."""
    shown = ", ".join(f"'{p}'" for p in paths[:MAX_NAMES])
    more = len(paths) - MAX_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def independent_count(records: Sequence[GradientCheckRecord]) -> int:
    """Variables with at least one comparison against an independent witness."""
    return len({r.index for r in records if r.independent})


def coverage_line(records: Sequence[GradientCheckRecord]) -> str:
    total = len({r.index for r in records})
    independent = independent_count(records)
    line = f"{independent} of {total} variables checked against an independent witness"
    same = sorted({r.variable for r in records} - {r.variable for r in records if r.independent})
    if same:
        line += (
            f"; not checked (the same code on both routes): {names(same)}; "
            "finite_differences=True checks them"
        )
    return line + "."


def layer_witnesses(records: Sequence[GradientCheckRecord]) -> dict[str, str]:
    """``layer -> witness`` for each layer checked against something else than stock autodiff
    of its reference route (an implicit convolution: ``GradientCheckRecord.layer_witness``)."""
    return {
        r.layer: r.layer_witness
        for r in records
        if r.witness == REFERENCE and r.layer_witness != STOCK_AUTODIFF
    }


def witness_line(records: Sequence[GradientCheckRecord]) -> str | None:
    """Which witness each implicit convolution was checked against, or ``None`` if none."""
    chosen = layer_witnesses(records)
    if not chosen:
        return None
    parts = [
        f"'{layer}' against {'float64 ' if w == FLOAT64_FINITE_DIFFERENCES else 'the '}{w}"
        for layer, w in chosen.items()
    ]
    return (
        "Convolutions on the implicit route (their kernels are stock autodiff's too, so it is "
        "no witness there): " + "; ".join(parts) + "."
    )


def witness_label(r: GradientCheckRecord) -> str:
    """``r.witness``, with the layer's witness when it is not stock autodiff:
    ``reference (materialized T(K))``."""
    if r.witness == REFERENCE and r.layer_witness != STOCK_AUTODIFF:
        return f"{r.witness} ({r.layer_witness})"
    return r.witness


def describe(r: GradientCheckRecord) -> str:
    """``variable 'v' (layer 'l'), rel err ... (bound ...)``: one record in words."""
    text = f"variable '{r.variable}' (layer '{r.layer}')"
    if witness_label(r) != REFERENCE:
        text += f" vs {witness_label(r)}"
    if not math.isfinite(r.rel_err) or r.cause is not None:
        return f"{text}, non-finite ({CAUSES.get(r.cause, 'a gradient is not finite')})"
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


CAUSES = {
    "probe": "the probe batch has NaN or inf values: the data, not a backward pass",
    "loss": "the loss on the probe is NaN or inf (weights or data overflow it): the data or "
    "loss, not a backward pass",
    "reference": "the reference route's gradient is not finite either: it comes from the "
    "data, the weights or the loss, not from a layer's backward pass",
    "backward": "the reference route is finite and the Jacobian route is not: a layer's "
    "backward pass produced it (this layer's, or one after it in the forward order)",
    "norms": "autodiff's per-sample gradients are finite and DP-SGD's per-example norms are "
    "not: a layer's squared_norms formula (this layer's, or a backward pass after it) "
    "produced it",
}

WITNESS_NAMES = {
    REFERENCE: "the reference route ("
    + ("tf.GradientTape" if BACKEND == "tensorflow" else "jax.value_and_grad")
    + " in tf_jacbp.reference_mode())",
    FINITE_DIFFERENCES: "a float64 directional finite difference",
    PER_EXAMPLE_NORMS: "the norms of per-sample autodiff gradients (what DP-SGD's first pass, "
    "per_example_gradient_norms, computes from the layers' squared_norms)",
}
"""How ``mismatch_message`` names each witness."""

PLOT_LABELS = {
    REFERENCE: "{}",
    FINITE_DIFFERENCES: "{} (finite differences)",
    PER_EXAMPLE_NORMS: "{} (per-example norms)",
}
"""``plot``'s legend label of a layer's line, per witness."""


def mismatch_message(failed: Sequence[GradientCheckRecord], total: int) -> str:
    first = failed[0]
    lines = [
        f"GradientCheck at step {first.step} (epoch {first.epoch}): {len(failed)} of {total} "
        "gradient comparisons failed (g: Jacobian route, what training applies):"
    ]
    for r in failed:
        witness = WITNESS_NAMES.get(r.witness, r.witness)
        if r.witness == REFERENCE and r.layer_witness == MATERIALIZED_T:
            witness += ", this convolution differentiated through its materialized T(K)"
        if r.witness == REFERENCE and r.layer_witness == UNFOLDED_PATCHES:
            witness += ", this convolution differentiated through its unfolded patches"
        if r.cause is not None or not math.isfinite(r.rel_err):
            what = "a gradient has non-finite values (NaN or inf): " + CAUSES.get(
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
            if r.witness == REFERENCE:
                what += f"; training-dtype relative error {r.rel_err:.3g}"
            if r.cosine is not None:
                what += f", cosine {r.cosine:.6f}"
        lines.append(f"  layer '{r.layer}', variable '{r.variable}' vs {witness}: {what}")
    lines.append(
        "A wrong parameter Jacobian shows in the layer's own variables; a wrong input Jacobian "
        "or activation derivative shows in the variables of the layers before it."
    )
    if any(r.witness == PER_EXAMPLE_NORMS for r in failed):
        lines.append(
            "A per-example norm mismatch alone (the reference witness passes) is a wrong "
            "squared_norms formula: training's gradient is right, DP-SGD's clipping is not."
        )
    return "\n".join(lines)


def summary(records: Sequence[GradientCheckRecord]) -> str:
    """``GradientCheck.summary()``: a plain-text report of ``records``: coverage, the worst
    variable by name, then per variable and witness the checks, failures, worst ``rel_err``, its
    bound and the float64 comparison."""
    if not records:
        return "GradientCheck: no check has run yet."
    steps = sorted({r.step for r in records})
    failed = sum(not r.passed for r in records)
    lines = [
        f"GradientCheck: {len(steps)} checks (steps {steps[0]}..{steps[-1]}), "
        f"{len(records)} comparisons, {failed} mismatches.",
        coverage_line(records),
    ]
    line = witness_line(records)
    if line is not None:
        lines.append(line)
    reference = [r for r in records if r.witness == REFERENCE]
    candidates = [r for r in records if not r.passed] or reference
    if candidates:
        worst_record = max(candidates, key=badness)
        lines.append(f"Worst: {describe(worst_record)}.")
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
    for r in records:
        groups.setdefault((r.layer, r.variable, witness_label(r)), []).append(r)
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
                f"{worst(r.rel_err for r in group):.3g}",
                bound,
                f"{worst(ratios):.3g}" if ratios else "-",
                f"{worst(float64):.3g}" if float64 else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def plot(records: Sequence[GradientCheckRecord], path: str | os.PathLike[str]) -> None:
    """``GradientCheck.plot(path)``: save a PNG of ``rel_err`` per layer (worst of its variables)
    against the step.

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
    if not records:
        raise ValueError("GradientCheck.plot: no check has run yet; call it after fit.")
    series: dict[tuple[str, str], dict[int, float]] = {}
    for r in records:
        by_step = series.setdefault((r.layer, r.witness), {})
        by_step[r.step] = worst((by_step.get(r.step, 0.0), r.rel_err))
    finite = [e for s in series.values() for e in s.values() if math.isfinite(e) and e > 0]
    top = 10 * max(finite + [r.rtol for r in records if math.isfinite(r.rtol)])
    bottom = min(finite, default=top / 1e6) / 10
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for (layer, witness), by_step in series.items():
        steps = sorted(by_step)
        errors = [max(by_step[s], bottom) for s in steps]
        style = "-" if witness == REFERENCE else ":"
        label = PLOT_LABELS.get(witness, "{} (" + witness + ")").format(layer)
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
    for tol in sorted({r.rtol for r in records if r.criterion == FIXED_RTOL}):
        ax.axhline(tol, color="gray", linestyle="--", linewidth=1)
    derived: dict[int, float] = {}
    for r in records:
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


def epoch_logs(
    records: Sequence[GradientCheckRecord], finite_differences: bool
) -> dict[str, float | int]:
    """The epoch's ``logs`` entries (``LOG_KEYS``) from that epoch's ``records``."""
    reference = [r for r in records if r.witness == REFERENCE]
    logs: dict[str, float | int] = {
        "grad_check_max_rel_err": worst(r.rel_err for r in reference),
        "grad_check_mismatches": sum(not r.passed for r in records),
        "grad_check_independent_variables": independent_count(records),
    }
    float64 = [r.float64_rel_err for r in reference if r.float64_rel_err is not None]
    if float64:
        logs["grad_check_float64_max_rel_err"] = worst(float64)
    if finite_differences:
        fd = [r.rel_err for r in records if r.witness == FINITE_DIFFERENCES]
        logs["grad_check_fd_max_rel_err"] = worst(fd)
    norms = [r.rel_err for r in records if r.witness == PER_EXAMPLE_NORMS]
    if norms:
        logs["grad_check_norms_max_rel_err"] = worst(norms)
    return logs


def coverage_notes(
    model_name: str,
    variables: Sequence,
    independent: Sequence[bool],
    finite_differences: bool,
    no_twin: str | None,
    unreplayed_noise: Sequence[str],
) -> list[str]:
    """What the check cannot see, one sentence each (``GradientCheckCoverageWarning``):
    variables without an independent witness, a missing float64 twin (``no_twin``: why), or
    random layers whose noise the twin cannot replay."""
    notes = []
    if not any(independent):
        notes.append(
            f"model '{model_name}' has no tf_jacbp layer (searched through nested models), "
            "so every gradient comes from autodiff and the check compares autodiff with "
            "itself. Use tf_jacbp.layers to check Jacobian formulas"
        )
    same = [v.path for v, ok in zip(variables, independent, strict=True) if not ok]
    if same and not finite_differences:
        notes.append(
            f"{len(same)} of {len(variables)} trainable variables get their gradient "
            "from the same code on both routes (stock Keras layers or custom gradients, not "
            "a tf_jacbp layer's formula), so the reference route always agrees with them and "
            f"is no witness: {names(same)}. GradientCheck(finite_differences=True) checks "
            "them against float64 finite differences"
        )
    if no_twin is not None:
        notes.append(
            f"no float64 twin of model '{model_name}' ({no_twin}), so the training-dtype "
            "gradients are compared with the fixed tolerances.rtol(dtype), which can report "
            "rounding on deep models as a mismatch; give rtol= to set it"
        )
    elif unreplayed_noise:
        notes.append(
            f"the float64 twin cannot replay the noise of {names(unreplayed_noise)} (only "
            "dropout masks are replayed), so the training-dtype gradients are compared with the "
            "fixed tolerances.rtol(dtype); the float64 formula comparison still runs"
        )
    return notes
