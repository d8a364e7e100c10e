"""How close two gradients must be to count as equal: one tolerance per dtype, written once.

Two gradients ``g`` (Jacobian route) and ``g_ref`` (reference route) agree when

    relative_error(g, g_ref) = ||g - g_ref|| / max(||g_ref||, tiny) <= rtol(dtype)

and both are finite. Where several variables are compared at once (``GradientCheck``), ``tiny``
grows to ``NOISE_FLOOR[dtype] * scale``, ``scale`` the largest reference norm of the check: a
gradient that is zero in exact arithmetic (a bias followed by a train-mode batch normalization,
which removes per-channel constants) is rounding noise in both routes, and its error is then
measured against the noise level of the whole gradient instead of against itself. The norms are Frobenius norms over the whole variable, so the measure does
not blow up on entries that are zero in exact arithmetic. Both routes compute the same sums in
different orders, so the tolerances are a few hundred units in the last place of the dtype:
float64 is the issue's ``<= 1e-12``; float32 and the mixed-precision compute dtypes are set from
measurements on the models in ``tests/`` with a margin of about 10x.
``tf_jacbp.callbacks.GradientCheck`` and the tests both read ``rtol`` from here.
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


# Ten machine epsilons of accumulated rounding, relative to the largest gradient, divided by
# rtol: below NOISE_FLOOR * scale, a norm cannot be told from rounding noise at this tolerance.
_EPS = {"float64": 2.2e-16, "float32": 1.2e-7, "float16": 9.8e-4, "bfloat16": 7.8e-3}
NOISE_FLOOR = {name: 10 * _EPS[name] / RTOL[name] for name in RTOL}


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
