"""Keras callbacks of tf_jacbp: ``GradientCheck`` (implemented in the package ``tf_jacbp.check``).

``GradientCheck`` compares, while ``fit`` runs, the gradients training applies (the Jacobian
route) with autodiff's (the reference route), in float64 on a float64 twin of the model and in
the training dtype against the reference route's own rounding floor; see its docstring.
"""

# Every public name of tf_jacbp.check, listed once there.
from tf_jacbp.check import *  # noqa: F403
from tf_jacbp.check import __all__  # noqa: F401
