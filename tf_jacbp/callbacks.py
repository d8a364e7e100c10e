"""Keras callbacks of tf_jacbp: ``GradientCheck`` (implemented in the package ``tf_jacbp.check``).

``GradientCheck`` compares, while ``fit`` runs, the gradients training applies (the Jacobian
route) with autodiff's (the reference route), in float64 on a float64 twin of the model and in
the training dtype against the reference route's own rounding floor; see its docstring.
"""

from tf_jacbp.check import (
    DEFAULT_EVERY_N_BATCHES,
    FINITE_DIFFERENCES,
    FIXED_RTOL,
    LOG_KEYS,
    ON_MISMATCH,
    REFERENCE,
    ROUNDING_FLOOR,
    GradientCheck,
    GradientCheckCoverageWarning,
    GradientCheckRecord,
    GradientMismatchError,
    GradientMismatchWarning,
)

__all__ = [
    "DEFAULT_EVERY_N_BATCHES",
    "FINITE_DIFFERENCES",
    "FIXED_RTOL",
    "LOG_KEYS",
    "ON_MISMATCH",
    "REFERENCE",
    "ROUNDING_FLOOR",
    "GradientCheck",
    "GradientCheckCoverageWarning",
    "GradientCheckRecord",
    "GradientMismatchError",
    "GradientMismatchWarning",
]
