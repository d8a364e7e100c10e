"""tf_jacbp: backpropagation as explicit Jacobians, checked against autodiff while Keras trains.

Every backward pass is a formula of "The Backpropagation Algorithm for a Math Student" (Damadi,
Moharrer, Cham, Shen); ``reference_mode()`` switches to stock TensorFlow ops differentiated by
autodiff, the witness the formulas are compared with.
"""

# _backend comes first: it imports TensorFlow or says which extra to install.
from tf_jacbp import _backend  # noqa: F401, I001
from tf_jacbp import (
    activations,
    callbacks,
    datasets,
    hooks,
    jacobian,
    layers,
    losses,
    models,
    route,
    tolerances,
    toeplitz,
)
from tf_jacbp.route import in_reference_mode, reference_mode

__version__ = "0.1.0"

__all__ = [
    "activations",
    "callbacks",
    "datasets",
    "hooks",
    "jacobian",
    "in_reference_mode",
    "layers",
    "losses",
    "models",
    "reference_mode",
    "route",
    "toeplitz",
    "tolerances",
]
