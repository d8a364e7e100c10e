"""Import TensorFlow and Keras 3 (TensorFlow backend), or say which extra to install."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

try:
    import tensorflow as tf
except ImportError as err:  # pragma: no cover - exercised only without TensorFlow
    raise ImportError(
        "tf_jacbp needs TensorFlow, which comes through an extra: "
        "`pip install 'tf_jacbp[cpu]'` (tensorflow-cpu) or `pip install 'tf_jacbp[gpu]'` "
        "(tensorflow with CUDA)."
    ) from err

import keras

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"tf_jacbp runs on Keras' TensorFlow backend, but KERAS_BACKEND is "
        f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before importing keras."
    )

__all__ = ["tf", "keras"]
