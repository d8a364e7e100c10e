"""What must stay specific to Keras' backend, in one place.

The layers, activations and losses write their formulas, forward passes and reference routes in
``keras.ops``; what has no ``keras.ops`` form lives here, one module per backend with the same
functions: ``tensorflow.py`` for Keras' TensorFlow backend (run-time assertions, the sparse
Toeplitz fallback, graphs of sizes unknown at trace time, the checks of sparse and ragged inputs)
and ``jax.py`` for JAX (where a TensorFlow-only piece raises an error naming the alternative).
Import the functions from ``tf_jacbp.backend``: it is the module of the backend Keras runs on.
"""

from tf_jacbp._backend import BACKEND

if BACKEND == "jax":
    from tf_jacbp.backend.jax import *  # noqa: F403
    from tf_jacbp.backend.jax import __all__  # noqa: F401
else:
    from tf_jacbp.backend.tensorflow import *  # noqa: F403
    from tf_jacbp.backend.tensorflow import __all__  # noqa: F401
