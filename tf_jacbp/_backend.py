"""Import Keras 3 on a backend tf_jacbp supports (TensorFlow, the default, or JAX), or say which
extra to install.

TensorFlow is the default backend: ``KERAS_BACKEND`` unset means ``tensorflow``. With
``KERAS_BACKEND=jax`` nothing imports TensorFlow, and ``tf`` is None here: what needs TensorFlow
lives in ``tf_jacbp.backend.tensorflow`` and is refused on JAX with an error naming the
alternative. PyTorch is refused at import (docs/backends.md says why).
"""

import importlib.util
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

SUPPORTED = ("tensorflow", "jax")
_EXTRAS = {
    "tensorflow": (
        "tensorflow",
        "`pip install 'tf_jacbp[cpu]'` (tensorflow-cpu) or `pip install 'tf_jacbp[gpu]'` "
        "(tensorflow with CUDA)",
    ),
    "jax": (
        "jax",
        "`pip install 'tf_jacbp[jax]'` (JAX on the CPU) or "
        "`pip install 'tf_jacbp[jax-cuda]'` (JAX with CUDA)",
    ),
}


def _requested_backend() -> str:
    """The backend Keras will load: ``KERAS_BACKEND`` (set above to ``tensorflow`` when unset)."""
    return os.environ["KERAS_BACKEND"].strip().lower()


_name = _requested_backend()
if _name in _EXTRAS:
    _module, _how = _EXTRAS[_name]
    if importlib.util.find_spec(_module) is None:  # pragma: no cover - without the extra
        _other = next(b for b in SUPPORTED if b != _name)
        raise ImportError(
            f"tf_jacbp on Keras' {_name} backend (KERAS_BACKEND={_name!r}) needs {_module}, "
            f"which comes through an extra: {_how}. Or set KERAS_BACKEND={_other} if "
            f"{_EXTRAS[_other][0]} is installed."
        )

import keras  # noqa: E402

BACKEND = keras.backend.backend()
if BACKEND not in SUPPORTED:
    raise ImportError(
        f"tf_jacbp runs on Keras' TensorFlow or JAX backend, but KERAS_BACKEND is {BACKEND!r}. "
        "Set KERAS_BACKEND=tensorflow (the default) or KERAS_BACKEND=jax before importing keras."
        + (
            " PyTorch is not supported: Keras computes matmul, tensordot and segment_sum in "
            "float32 on float64 inputs there, so the float64 checks cannot hold (docs/backends.md)."
            if BACKEND == "torch"
            else ""
        )
    )

if BACKEND == "tensorflow":
    import tensorflow as tf
else:
    tf = None

__all__ = ["BACKEND", "SUPPORTED", "keras", "tf"]
