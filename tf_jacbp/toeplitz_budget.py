"""The memory budget of ``T(K)`` (``tf_jacbp.toeplitz``): its setting, its error, its guard.

A budget in bytes, ``DEFAULT_BUDGET_BYTES``, changed for the whole process by
``set_budget_bytes`` or per layer by ``Conv2D(toeplitz_budget_bytes=...)``.
``tf_jacbp.toeplitz.conv_matrix`` compares the dense ``T`` it returns (``R N`` entries) with it.
A layer compares the peak of a whole training step (``ConvIndex.step_bytes``: ``T``, its index
maps, which a traced graph holds as constants in several copies, one sample's tensors) and, over
budget, falls back to the sparse ``T`` with a warning, or raises (``use_sparse``). The constants
below are the measured costs ``step_bytes`` adds up.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import keras
import numpy as np

from tf_jacbp import backend

DEFAULT_BUDGET_BYTES = 256 * 2**20
"""The default budget, 256 MiB: a larger dense ``T(K)`` is kept sparse instead, and one whose
sparse form is larger still is an error (``set_budget_bytes``,
``Conv2D(toeplitz_budget_bytes)``)."""

SPARSE_INDEX_BYTES = 16
"""Bytes per structural nonzero of the sparse representation beyond its value: the (row, column)
pair of int64 indices a sparse tensor stores."""

GRAPH_CONSTANT_COPIES = 16
"""How many copies of an index map a compiled training step holds at its peak. The maps enter
traced graphs as constants (so that exported SavedModels keep them), and TensorFlow copies a
constant's bytes at each stage: the NumPy array, the graph's node, the function library, the
optimized graph, the executor's kernel. Measured on TensorFlow 2.21 (a traced function gathering
with a 40 MB constant: 15 times its size at the peak of its first call)."""

SPARSE_STEP_BYTES_PER_NONZERO = 480
"""Peak bytes per structural nonzero of a training step on the sparse route, beyond the value
itself: the int64 ``(row, column)`` pairs and int32 positions as graph constants (20 bytes,
``GRAPH_CONSTANT_COPIES`` times), the copies the sparse product and its adjoint make, and the
NumPy build. Measured on TensorFlow 2.21 with ``Model.train_on_batch``, 330 to 470 bytes for
sizes from 64 x 64 to 384 x 384 (the more often a step reads the maps, the more)."""

STEP_OVERHEAD_BYTES = 4 * 2**20
"""What tracing a new layer's training step costs whatever its size (measured: 1.5-2.5 MiB)."""

_budget_bytes: int | None = None


def dtype_size(dtype: Any) -> int:
    """Bytes per entry of ``dtype`` (any form Keras accepts: ``"float32"``, a NumPy or backend
    dtype)."""
    name = keras.backend.standardize_dtype(dtype)
    if name == "bfloat16":
        return 2
    return np.dtype(name).itemsize


def set_budget_bytes(budget: int | None) -> None:
    """Set the process-wide Toeplitz memory budget in bytes; ``None`` restores the default.

    Layers read it when they are built; a ``Conv2D(toeplitz_budget_bytes=...)`` overrides it. The
    guard runs for each input size a layer builds ``T(K)`` for (at build, or at the first call
    with that size for inputs of varying size; as a run-time assertion on the dense ``T`` when a
    traced function does not know the size, ``tf_jacbp.toeplitz_dynamic``).
    """
    global _budget_bytes
    if budget is not None:
        check_budget(budget, "set_budget_bytes")
    _budget_bytes = budget


def get_budget_bytes() -> int:
    """The process-wide Toeplitz memory budget in bytes (``DEFAULT_BUDGET_BYTES`` unless set)."""
    return DEFAULT_BUDGET_BYTES if _budget_bytes is None else _budget_bytes


def check_budget(budget: Any, owner: str) -> int:
    """``budget`` if it is a positive integer number of bytes, else a ValueError naming it."""
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget <= 0:
        raise ValueError(
            f"{owner}: the Toeplitz budget must be a positive integer number of bytes, got "
            f"{budget!r}. For example 256 * 2**20 for 256 MiB."
        )
    return int(budget)


def budget_error(
    owner: str, index: Any, dtype: Any, budget: int, setting: str, step: bool = True
) -> ValueError:
    """The error for a ``T`` over budget: its sizes dense and sparse, with ``step`` (a layer's
    guard) those of a training step with it, the budget and the setting to change. ``index``: a
    ``tf_jacbp.toeplitz.ConvIndex``."""
    dense, sparse = index.dense_bytes(dtype), index.sparse_bytes(dtype)
    needs = ""
    if step:
        dense_step, sparse_step = index.step_bytes(dtype, False), index.step_bytes(dtype, True)
        needs = (
            f"; a training step with it, its index maps and one sample needs about "
            f"{dense_step / 2**20:.1f} MiB dense and {sparse_step / 2**20:.1f} MiB sparse"
        )
    return ValueError(
        f"{owner}: the Toeplitz matrix T(K) of shape {index.shape} "
        f"({keras.backend.standardize_dtype(dtype)}) takes {dense} bytes "
        f"({dense / 2**20:.1f} MiB) dense and {sparse} bytes ({sparse / 2**20:.1f} MiB) sparse "
        f"({index.nnz} nonzeros){needs}, over the budget of {budget} bytes "
        f"({budget / 2**20:.1f} MiB). Raise it with {setting}, or use a smaller input."
    )


def use_sparse(index: Any, dtype: Any, budget: int, owner: str, setting: str) -> bool:
    """The memory guard of a layer that multiplies by ``T(K)``: whether ``T`` must be sparse.

    False when a training step with a dense ``T`` fits ``budget`` (``ConvIndex.step_bytes``);
    True, with a warning, when only the sparse route fits (the backend's sparse product:
    slower, and not XLA-compatible; on JAX, which has none, a NotImplementedError naming
    ``setting``); a ValueError (``budget_error``, naming ``setting``) when
    neither does.
    """
    if index.step_bytes(dtype, sparse=False) <= budget:
        return False
    if index.step_bytes(dtype, sparse=True) > budget:
        raise budget_error(owner, index, dtype, budget, setting)
    backend.require_sparse_product(owner, setting)  # JAX has no sparse product: it raises
    warnings.warn(
        f"{owner}: a training step with a dense T(K) of shape {index.shape} needs about "
        f"{index.step_bytes(dtype, sparse=False) / 2**20:.1f} MiB, over the Toeplitz budget of "
        f"{budget / 2**20:.1f} MiB; using a sparse T instead (about "
        f"{index.step_bytes(dtype, sparse=True) / 2**20:.1f} MiB). The sparse product is slower "
        f"and cannot be compiled with XLA (jit_compile=True is turned off for the model). Raise "
        f"the budget with {setting} to keep T dense.",
        stacklevel=3,
    )
    return True


def step_bytes(index: Any, dtype: Any, sparse: bool) -> int:
    """The peak bytes a training step of one sample (forward and backward pass) adds for a layer
    multiplying by the ``T(K)`` of ``index`` (a ``tf_jacbp.toeplitz.ConvIndex``, ``n`` spatial
    axes), dense or sparse: what the memory guard compares with its budget.

    With ``s`` the bytes of ``dtype``, ``P`` positions, ``M`` entries per filter,
    ``L = k_1 ... k_{n-1}``, ``W = s_n``:

    * ``T``: dense, ``R N s`` plus its int32 index maps ``kernel_rows`` and ``block_rows``
      (``(L C W + 1) o_n + N o_1 ... o_{n-1}`` entries); sparse, ``nnz (s +``
      ``SPARSE_STEP_BYTES_PER_NONZERO)``;
    * the int32 patch maps of the kernel gradient and of ``patches`` (``(2 M + 1) P``);
    * every index map ``GRAPH_CONSTANT_COPIES`` times (graph constants) plus its NumPy array;
    * one sample's ``x``, ``z``, their gradients and patch matrix
      (``(2 (N + R) + (M + 1) P) s``), and ``STEP_OVERHEAD_BYTES``.

    Each further sample of a batch adds about its share of the last item, as for any layer.
    Measured with ``Model.train_on_batch`` (``tests/system/test_memory_guard.py``), the peak
    growth of the process stays below this.
    """
    size = dtype_size(dtype)
    width, channels = index.input_shape[-2:]
    filters = index.kernel_shape[-1]
    rows, columns = index.shape
    positions, entries = rows // filters, math.prod(index.kernel_shape[:-1])
    maps = 4 * (2 * entries + 1) * positions
    if sparse:
        matrix = index.nnz * (size + SPARSE_STEP_BYTES_PER_NONZERO)
    else:
        matrix = rows * columns * size
        lead = math.prod(index.kernel_shape[:-3])
        maps += 4 * ((lead * channels * width + 1) * index.output_shape[-2])
        maps += 4 * columns * math.prod(index.output_shape[:-2])
    one_sample = (2 * (columns + rows) + (entries + 1) * positions) * size
    return matrix + (GRAPH_CONSTANT_COPIES + 1) * maps + one_sample + STEP_OVERHEAD_BYTES
