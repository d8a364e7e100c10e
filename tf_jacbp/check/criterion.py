"""``GradientCheck``'s criterion, stated once: ``STATEMENT``.

Its numbers are read from ``tf_jacbp.tolerances`` (where the measurements behind them are
given), never written here. ``GradientCheck``'s docstring includes ``STATEMENT``;
docs/gradient_check.md holds a copy that a test compares with it; every other description
(the package docstring, ``witnesses``, ``records``, ``report``'s messages) names the
constants and points here. ``g``, ``g_ref``: the Jacobian and reference routes' gradients of the
compiled loss on the probe in the training dtype; ``h``, ``h64``: the same on the float64 twin.
"""

from __future__ import annotations

import math
import textwrap

from tf_jacbp import tolerances
from tf_jacbp.check.norms import NORM_SAMPLES

_T = tolerances
_PER_DTYPE = ", ".join(f"{name}: {_T.RTOL[name]:g}" for name in _T.RTOL)
_RTOL64 = f"{_T.rtol('float64'):g}"
_RECHECK = f"2^{math.log2(_T.RECHECK_PERTURBATION):g}"
_PARAGRAPHS = [
    "A variable passes a check when its gradients are finite and",
    "* the formulas agree in float64: on the float64 twin, ``float64_rel_err = ||h - h64|| / "
    f'max(||h64||, tiny) <= {_RTOL64}`` (``tolerances.rtol("float64")``);',
    "* the training dtype is as close to float64 as the reference route is: ``rel_err = "
    f"||g - g_ref|| / max(||g_ref||, tiny) <= {_T.FLOOR_RATIO:g} * floor`` "
    "(``tolerances.FLOOR_RATIO``), with ``floor = max(||g_ref - h64|| / max(||g_ref||, tiny), "
    f"{_T.FLOOR_MIN_ULPS:g} * eps)`` (``tolerances.FLOOR_MIN_ULPS``; ``eps`` the training "
    "dtype's machine epsilon).",
    "``tiny = max(TINY[dtype], NOISE_FLOOR[dtype] * scale)``, ``scale`` the largest reference "
    f"norm of the check. ``rtol=`` given replaces the bound ``{_T.FLOOR_RATIO:g} * floor``; "
    "``atol=`` given also requires ``max |g - g_ref| <= atol``. Without a float64 twin, or "
    "with a random layer whose noise the twin cannot replay, the bound is the fixed "
    f"``tolerances.rtol(dtype)`` ({_PER_DTYPE}); a model that trains in float64 throughout is "
    f"its own twin: ``rel_err <= {_RTOL64}``. Finite differences "
    "(``finite_differences=True``): ``|fd - h . v| / max(||h||, tiny) <= "
    f"{_T.FINITE_DIFFERENCE_RTOL:g}`` (``tolerances.FINITE_DIFFERENCE_RTOL``). Per-example "
    "norms (a model that clips per example, e.g. a ``DPModel``): ``||n - n_ref|| / "
    f"max(||n_ref||, tiny) <= {_RTOL64}`` over the first {NORM_SAMPLES} probe samples "
    "(``norms.NORM_SAMPLES``), in float64 (in the "
    "model's dtype without a twin: ``tolerances.rtol(dtype)``). A comparison that fails with "
    f"finite values is repeated once on the probe times ``1 + {_RECHECK} N(0, 1)`` "
    "(``tolerances.RECHECK_PERTURBATION``) and fails only if it fails again.",
]


def _wrapped(paragraph: str) -> str:
    indent = "  " if paragraph.startswith("* ") else ""
    return textwrap.fill(
        paragraph,
        WIDTH,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


WIDTH = 92
"""The width ``STATEMENT`` is wrapped to (it is indented inside ``GradientCheck``'s docstring)."""

STATEMENT = "\n".join(
    _wrapped(p) + ("\n" if i in (0, 2) else "") for i, p in enumerate(_PARAGRAPHS)
)
"""The criterion in words, with the current numbers of ``tf_jacbp.tolerances``."""


def normalized(text: str) -> str:
    """``text`` with Markdown's and reStructuredText's code marks alike (single backticks) and
    whitespace collapsed: how docs/gradient_check.md's copy is compared with ``STATEMENT``."""
    return " ".join(text.replace("``", "`").split())
