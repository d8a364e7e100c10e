"""A privacy statement for a DP-SGD training run, as TensorFlow Privacy's
``compute_dp_sgd_privacy_statement``: what was trained, the epsilon of every accountant with and
without the Poisson-sampling assumption, the adjacency, and what the guarantee does not cover."""

from __future__ import annotations

import math

from tf_jacbp._backend import BACKEND
from tf_jacbp.privacy.accounting import (
    _check_delta,
    _check_steps,
    _dp_accounting,
    _make_accountant,
    _quiet_absl,
    compute_epsilon,
)
from tf_jacbp.privacy.arguments import check_positive

_GENERATOR = {"tensorflow": "Philox", "jax": "Threefry"}  # the noise's (tf_jacbp.privacy.noise)
_ACCOUNTANTS = (
    ("RDP, classic conversion (TF Privacy's)", "rdp", "classic"),
    ("RDP, improved conversion (dp-accounting's)", "rdp", "improved"),
    ("PLD", "pld", "improved"),
)


def epsilon_once_per_epoch(
    noise_multiplier: float,
    epochs: float,
    delta: float,
    accountant: str = "rdp",
    rdp_conversion: str = "improved",
) -> float:
    """epsilon without the Poisson assumption: each example in exactly one batch per epoch.

    Every epoch then releases each example's clipped gradient (sensitivity ``C``) once, under
    Gaussian noise ``sigma C``: the bound composes the (unsubsampled) Gaussian mechanism
    ``ceil(epochs)`` times, as TensorFlow Privacy's ``compute_dp_sgd_privacy_statement`` does
    for its "each example occurring once per epoch" line. It holds for any order of the batches
    (shuffled or not) and needs no sampling assumption; it is much larger than the Poisson one.
    """
    sigma = check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    epochs = check_positive("epochs", epochs, allow_zero=True)
    delta = _check_delta(delta)
    if epochs == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    dp_accounting = _dp_accounting()
    accountant_ = _make_accountant(dp_accounting, accountant, rdp_conversion)
    accountant_.compose(dp_accounting.GaussianDpEvent(sigma), int(math.ceil(epochs)))
    with _quiet_absl():
        return float(accountant_.get_epsilon(delta))


def privacy_statement(
    num_examples: int,
    batch_size: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    l2_norm_clip: float | None = None,
    poisson: bool = True,
    secure_mode: bool = False,
) -> str:
    """The privacy statement of a DP-SGD run, as text (TF Privacy's statement, extended).

    Args:
        num_examples: ``N``, the training examples.
        batch_size: the (expected) batch size ``B``; the sampling rate is ``q = B / N``.
        noise_multiplier: ``sigma``.
        steps: the DP-SGD steps taken (all of them, over every resume).
        delta: the ``delta`` of ``(epsilon, delta)``.
        l2_norm_clip: ``C`` (only printed).
        poisson: whether the batches were Poisson-sampled (``poisson_batches``); if not, the
            Poisson epsilon is what Poisson sampling would give, not a proven bound.
        secure_mode: whether the noise came from a cryptographically secure source.

    Returns:
        Several lines: the run, the epsilon of three accountants assuming Poisson sampling,
        the same without that assumption (each example once per epoch), and what is covered.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}.")
    batch_size = check_positive("batch_size", batch_size)
    steps = _check_steps(steps)
    delta = _check_delta(delta)
    q = min(batch_size / num_examples, 1.0)
    epochs = steps * q
    clip = "" if l2_norm_clip is None else f", clip norm {l2_norm_clip:g}"
    sampling = "Poisson-sampled" if poisson else "shuffled fixed-size"
    lines = [
        f"DP-SGD over {num_examples} examples, {sampling} batches of {batch_size:g} examples "
        f"(expected; sampling rate q = {q:.6g}), noise multiplier {noise_multiplier:g}{clip}, "
        f"{steps} steps ({epochs:.4g} epochs), one example per microbatch (per-example "
        "clipping), and no bound on the number of examples per user.",
        "",
        "This guarantee protects the release of every intermediate model (all checkpoints and "
        "updates), not only the final one.",
        "",
        f"Example-level DP with add-or-remove-one adjacency at delta = {delta:g}:",
        "  Epsilon assuming Poisson sampling" + (" (the batches were):" if poisson else " (*):"),
    ]
    for name, accountant, conversion in _ACCOUNTANTS:
        eps = compute_epsilon(noise_multiplier, q, steps, delta, accountant, conversion)
        lines.append(f"    {name + ':':<46}{eps:10.3f}")
    lines.append("  Epsilon with each example occurring once per epoch (no sampling assumption):")
    for name, accountant, conversion in _ACCOUNTANTS:
        eps = epsilon_once_per_epoch(noise_multiplier, epochs, delta, accountant, conversion)
        lines.append(f"    {name + ':':<46}{eps:10.3f}")
    lines += [
        "",
        "No user-level privacy guarantee is possible without a bound on the number of examples "
        "per user.",
        "Not covered: hyperparameter tuning or model selection on the same data, data-dependent "
        "preprocessing, and anything computed on the training data outside the noisy update "
        "(the training loss and metrics that fit logs, a GradientCheck probe drawn from the "
        "training set).",
        "Noise: "
        + (
            "from the operating system's cryptographically secure generator (secure_mode)."
            if secure_mode
            else f"from a pseudo-random generator ({_GENERATOR[BACKEND]}), not a "
            "cryptographically secure source; floating-point effects on the Gaussian mechanism "
            "are not accounted for."
        ),
    ]
    if not poisson:
        lines += [
            "",
            "(*) The batches were shuffled, not Poisson-sampled: the Poisson numbers are what "
            "Poisson sampling would give (the usual practice, e.g. TF Privacy's tutorials), not a "
            "proven bound for this run; the once-per-epoch numbers are.",
        ]
    return "\n".join(lines)
