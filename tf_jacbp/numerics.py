"""The few ``keras.ops`` that lose float64 on Keras' JAX backend, written once in float64.

Keras 3.15.1 computes some ops in float32 on JAX even with x64 enabled (measured on float64
inputs, relative error against NumPy's float64):

* ``ops.tanh`` (also ``sin``, ``cos``, ``tan``, ``arctan``, ``sinh``, ``cosh``, ``arcsinh``,
  ``logaddexp``) casts to float32 and *returns* float32 (``result_type(x.dtype, float)``): about
  1e-7;
* ``ops.mean`` returns float64 but sums in float32 (``result_type(x.dtype, "float32")``): about
  1e-7; so do ``ops.layer_normalization`` and a ``batch_normalization`` fed by ``ops.mean``;
* ``ops.var`` and ``ops.norm`` compute and return float32: about 1e-7.

``exp``, ``log``, ``log1p``, ``expm1``, ``sqrt``, ``rsqrt``, ``erf``, ``erfc``, ``sigmoid``,
``softplus``, ``softmax``, ``log_softmax``, ``logsumexp``, ``moments``, ``sum``, ``matmul``,
``einsum`` and ``batch_normalization`` itself keep float64 there (within a few ulps).

tf_jacbp's forward passes, formulas and reference routes use the functions of this module where
they would use one of the ops above: for a float64 tensor each is the backend's float64 form
(``tf_jacbp.backend.float64_<name>``: TensorFlow's own float64 kernel, the one ``keras.ops``
runs there, or ``jax.numpy`` on JAX), for any other dtype the ``keras.ops`` function itself, so
nothing changes for float32 and the 16-bit policies. On JAX the float64 *reference* route is
therefore ``jax.numpy``'s float64 computation, not stock Keras' (which is not float64 there).
Only the ops tf_jacbp uses are here; add another in the same way (both backend modules, then a
function here) when a formula needs it.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from tf_jacbp import backend

Tensor = Any


def _is_float64(x: Tensor) -> bool:
    return keras.backend.standardize_dtype(x.dtype) == "float64"


def tanh(x: Any) -> Tensor:
    """``tanh(x)`` elementwise, any shape, in the dtype of ``x`` (float64 stays float64)."""
    x = ops.convert_to_tensor(x)
    return backend.float64_tanh(x) if _is_float64(x) else ops.tanh(x)


def mean(x: Any, axis: Any = None, keepdims: bool = False) -> Tensor:
    """``(1/n) sum_i x_i`` over ``axis`` (an int, a tuple, or None for all axes), ``keepdims``
    as ``keras.ops.mean``; a float64 ``x`` is summed in float64."""
    x = ops.convert_to_tensor(x)
    if _is_float64(x):
        return backend.float64_mean(x, axis=_axes(axis), keepdims=keepdims)
    return ops.mean(x, axis=axis, keepdims=keepdims)


def var(x: Any, axis: Any = None, keepdims: bool = False) -> Tensor:
    """``mean((x - mean(x))^2)`` over ``axis`` (the biased variance), ``keepdims`` as
    ``keras.ops.var``; a float64 ``x`` gives float64."""
    x = ops.convert_to_tensor(x)
    if _is_float64(x):
        return backend.float64_var(x, axis=_axes(axis), keepdims=keepdims)
    return ops.var(x, axis=axis, keepdims=keepdims)


def _axes(axis: Any) -> Any:
    """``axis`` as the backends' reductions take it: an int, a tuple of ints, or None."""
    return tuple(axis) if isinstance(axis, list) else axis


def result_type(*dtypes: Any) -> str:
    """``keras.backend.result_type(*dtypes)``, except that float64 among ``dtypes`` gives
    float64: Keras maps every 64-bit result to 32 bits on backends other than TensorFlow
    (``BIT64_TO_BIT32_DTYPE``), so ``result_type("float64", "float32")`` is float32 on JAX."""
    names = [keras.backend.standardize_dtype(d) for d in dtypes]
    return "float64" if "float64" in names else keras.backend.result_type(*names)
