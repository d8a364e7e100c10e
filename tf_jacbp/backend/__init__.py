"""What must stay specific to Keras' backend, in one place.

The layers, activations and losses write their formulas, forward passes and reference routes in
``keras.ops``; what has no ``keras.ops`` form lives here, in ``tensorflow.py`` for Keras'
TensorFlow backend (the only one supported today): the custom-gradient call, run-time
assertions, the sparse Toeplitz fallback, graphs of sizes unknown at trace time, the checks of
sparse and ragged inputs. Import the functions from ``tf_jacbp.backend``.
"""

from tf_jacbp.backend.tensorflow import *  # noqa: F403
from tf_jacbp.backend.tensorflow import __all__  # noqa: F401
