"""How close two gradients must be to count as equal, written once.

Two gradients ``g`` (Jacobian route) and ``g_ref`` (reference route) are compared by

    relative_error(g, g_ref) = ||g - g_ref|| / max(||g_ref||, tiny)

(Frobenius norms over the whole variable, so entries that are zero in exact arithmetic do not
blow it up), and both must be finite. Where several variables are compared at once
(``GradientCheck``), ``tiny`` grows to ``NOISE_FLOOR[dtype] * scale``, ``scale`` the largest
reference norm of the check: a gradient that is zero in exact arithmetic (a bias followed by a
train-mode batch normalization) is rounding noise in both routes, and its error is then measured
against the noise level of the whole gradient instead of against itself.

Fixed tolerances, ``RTOL[dtype]``: float64 is ``<= 1e-12`` (both routes compute the same sums in
other orders; measured on the models in ``tests/``: at most about 1e-14, also on LeNet-5 and the
residual batch-normalized CNN). The float32 and 16-bit entries are guesses of the same kind,
tuned on one machine; the tests of single layers use them, and ``GradientCheck`` falls back to
them only when it cannot build a float64 twin of the model.

``GradientCheck``'s criterion in the training dtype is derived from the check's own numbers
instead; it is stated once, in ``tf_jacbp.check.criterion``. What chose its constants: deep,
batch-normalized networks amplify rounding (and a ReLU kink or a max-pooling argmax can flip
between two correct implementations), so a fixed rtol per dtype false-alarms on another CPU (a
correct residual CNN reached 1.4e-4 in float32 against 1e-4, and 0.28 under ``mixed_bfloat16``
against 0.1). ``FLOOR_RATIO = 10``: over 20 seeds x 2 models (LeNet-5, the residual CNN) x 3
policies (float32, ``mixed_float16``, ``mixed_bfloat16``) with 64-sample Fashion-MNIST probes,
``relative_error / floor`` was at most 2.8 (median 0.03-0.4) apart from one ReLU/max-pool flip
(263, float32); 10 leaves a margin of more than 3x. ``FLOOR_MIN_ULPS = 4``: a reference route
that happens to land within a few units in the last place of float64 must not make the bound
vanish. ``RECHECK_PERTURBATION``: a flip (an input of a ReLU or a max within rounding of the
kink or the tie) moves away under a relative change of 2^-10, far above the rounding of any of
these dtypes, while a wrong formula or a dtype bug stays.

``tf_jacbp.callbacks.GradientCheck`` and the tests both read these constants from here.
"""

from __future__ import annotations

import numpy as np

RTOL = {
    "float64": 1e-12,
    "float32": 1e-4,
    "float16": 2e-2,
    "bfloat16": 1e-1,
}

# Below this reference norm the relative error divides by ``tiny`` instead (an all-zero gradient
# compared with an all-zero gradient is agreement; anything else is measured absolutely).
TINY = {"float64": 1e-30, "float32": 1e-20, "float16": 1e-6, "bfloat16": 1e-6}


EPS = {"float64": 2.2e-16, "float32": 1.2e-7, "float16": 9.8e-4, "bfloat16": 7.8e-3}
"""Machine epsilon per dtype (the spacing of floats just above 1)."""

NOISE_ULPS = {"float64": 100, "float32": 10, "float16": 10, "bfloat16": 10}
"""Accumulated rounding, in ``EPS[dtype]`` of the largest gradient, that a gradient which is zero
in exact arithmetic may carry. float64 needs more than the others: its tolerance (``1e-12``) sits
thousands of ulps above ``EPS``, and a bias before a train-mode batch normalization, behind a
softmax whose probability cross entropy renormalizes its rows as Keras does, measured 17 ulps."""

# Below NOISE_FLOOR * scale, a norm cannot be told from rounding noise at this tolerance.
NOISE_FLOOR = {name: NOISE_ULPS[name] * EPS[name] / RTOL[name] for name in RTOL}

FLOOR_RATIO = 10.0
"""``GradientCheck`` passes ``relative_error(g, g_ref) <= FLOOR_RATIO * floor`` (module doc)."""

FLOOR_MIN_ULPS = 4.0
"""The rounding floor is at least this many ``EPS[dtype]`` (module doc)."""

RECHECK_PERTURBATION = 2.0**-10
"""Relative size of the probe perturbation of ``GradientCheck``'s re-check (module doc)."""


def _name(dtype: object) -> str:
    name = getattr(dtype, "name", None) or np.dtype(dtype).name
    if name not in RTOL:
        raise ValueError(
            f"No gradient tolerance for dtype={name!r}; tf_jacbp knows {sorted(RTOL)}."
        )
    return name


def rtol(dtype: object) -> float:
    """The relative tolerance for gradients computed in ``dtype`` (a name, numpy or TF dtype)."""
    return RTOL[_name(dtype)]


def relative_error(g: object, g_ref: object, dtype: object = "float64") -> float:
    """``||g - g_ref|| / max(||g_ref||, tiny(dtype))``, computed in float64. NaN if not finite."""
    g = np.asarray(g, dtype=np.float64)
    g_ref = np.asarray(g_ref, dtype=np.float64)
    if g.shape != g_ref.shape:
        raise ValueError(f"Gradient shapes differ: {g.shape} vs reference {g_ref.shape}.")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(g_ref))):
        return float("nan")
    return relative_error_from_norms(np.linalg.norm(g - g_ref), np.linalg.norm(g_ref), dtype)


def relative_error_from_norms(
    diff_norm: float, ref_norm: float, dtype: object, scale: float = 0.0
) -> float:
    """``||g - g_ref|| / max(||g_ref||, tiny(dtype), NOISE_FLOOR[dtype] * scale)`` from the norms
    (computed elsewhere); ``scale`` is the largest reference norm compared alongside (0: none)."""
    name = _name(dtype)
    return float(diff_norm) / max(float(ref_norm), TINY[name], NOISE_FLOOR[name] * float(scale))


# Central finite differences in float64 with step ``FINITE_DIFFERENCE_DELTA`` have truncation
# error ``O(delta^2)`` and rounding error ``O(eps / delta)``, about 1e-10 of the gradient's scale
# for the smooth maps tested; the tolerance leaves room for curvature.
FINITE_DIFFERENCE_DELTA = 1e-6
FINITE_DIFFERENCE_RTOL = 1e-6
# GradientCheck's finite-difference witness divides by max(||g||, this * the largest ||g||): the
# difference quotient's own rounding, ~1e-10 absolute, must not count against a zero gradient.
FINITE_DIFFERENCE_FLOOR = 1e-2
