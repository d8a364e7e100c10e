"""Import Keras 3 on a backend tf_jacbp supports (TensorFlow, the default, or JAX), or say which
extra to install.

TensorFlow is the default backend: ``KERAS_BACKEND`` unset means ``tensorflow`` (when Keras was
imported first, the backend it runs on counts). With ``KERAS_BACKEND=jax`` nothing imports
TensorFlow, and ``tf`` is None here: what needs TensorFlow lives in
``tf_jacbp.backend.tensorflow`` and is refused on JAX with an error naming the alternative.
PyTorch (and Keras' other backends) are refused here, before Keras imports them
(docs/backends.md says why).
"""

import importlib.util
import os
import sys

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
        "`pip install 'tf_jacbp[jax-cuda]'` (JAX with CUDA 13), then KERAS_BACKEND=jax; "
        "JAX 0.11 needs Python 3.12 or later",
    ),
}
TORCH_REFUSED = (
    "PyTorch is not supported: on Keras' torch backend matmul, tensordot and segment_sum "
    "compute float64 inputs in float32, so the float64 agreement (1e-12) cannot hold, and a "
    "tf_jacbp layer's formula method `forward` collides with torch.nn.Module.forward, which "
    "Keras' torch layers are (docs/backends.md)."
)


def _requested_backend() -> str:
    """The backend Keras runs on or will load: Keras' own choice when ``keras`` is already
    imported, else ``KERAS_BACKEND`` (set to ``tensorflow`` when unset: TensorFlow is the
    default, whatever ``~/.keras/keras.json`` says). Keras reads the name as given, so it is
    not normalized here either."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if not os.environ.get("KERAS_BACKEND"):
        os.environ["KERAS_BACKEND"] = "tensorflow"
    return os.environ["KERAS_BACKEND"]


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (a finder that refuses it counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_backend(name: str) -> None:
    """Raise ImportError naming the fix when tf_jacbp cannot run on Keras' backend ``name``:
    an unsupported backend (the reason for PyTorch), or a supported one whose package is not
    installed (the extras that bring it, and the other backend if that one is installed)."""
    if name not in SUPPORTED:
        raise ImportError(
            f"tf_jacbp runs on Keras' TensorFlow or JAX backend, but KERAS_BACKEND is {name!r}. "
            "Set KERAS_BACKEND=tensorflow (the default) or KERAS_BACKEND=jax before importing "
            "keras." + (" " + TORCH_REFUSED if name == "torch" else "")
        )
    module, how = _EXTRAS[name]
    if _installed(module):
        return
    other = next(b for b in SUPPORTED if b != name)
    other_module, other_how = _EXTRAS[other]
    alternative = (
        f"{other_module} is installed: set KERAS_BACKEND={other} to use it."
        if _installed(other_module)
        else f"For Keras' {other} backend instead: {other_how}."
    )
    raise ImportError(
        f"tf_jacbp on Keras' {name} backend (KERAS_BACKEND={name!r}) needs {module}, which comes "
        f"through an extra: {how}. {alternative}"
    )


_check_backend(_requested_backend())

import keras  # noqa: E402

BACKEND = keras.backend.backend()
_check_backend(BACKEND)

if BACKEND == "tensorflow":
    import tensorflow as tf
else:
    tf = None

__all__ = ["BACKEND", "SUPPORTED", "TORCH_REFUSED", "keras", "tf"]
