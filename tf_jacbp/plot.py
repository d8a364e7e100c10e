"""Pictures of the sparsity structure of Algorithm 1's matrices, saved as PNG (``plot`` extra).

* ``plot_parameter_jacobian``: ``J_theta z[L]`` of one sample, one band of columns per layer's
  ``[Vec(W); b]``, the bands labelled.
* ``plot_dense_jacobian``: a Dense layer's ``[I (x) a^T | I]``, the block-diagonal copies of
  ``a^T`` then the identity.
* ``plot_toeplitz``: a conv kernel's Toeplitz matrix ``T(K)`` (Lemmas 2-3).
* ``plot_matrix``: any matrix: nonzeros dark, zeros white.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tf_jacbp._backend import keras


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("tf_jacbp.plot needs matplotlib: pip install 'tf_jacbp[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_matrix(
    matrix: Any,
    path: str,
    title: str = "",
    column_blocks: list[tuple[str, int]] | None = None,
) -> str:
    """Save the nonzero pattern of ``matrix`` (``(rows, cols)``) as a PNG at ``path``.

    ``column_blocks``: ``(label, width)`` bands drawn as vertical lines with labels.
    Returns ``path``.
    """
    plt = _pyplot()
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"plot_matrix takes a 2-D matrix, got shape {matrix.shape}.")
    rows, cols = matrix.shape
    width = float(np.clip(cols / max(rows, 1) * 4, 4, 16))
    fig, ax = plt.subplots(figsize=(width, 4.5))
    ax.imshow(matrix != 0, cmap="Greys", aspect="auto", interpolation="nearest")
    ax.set_xlabel(f"columns ({cols})")
    ax.set_ylabel(f"rows ({rows})")
    ax.set_title(f"{title}  [{np.count_nonzero(matrix)} of {matrix.size} entries nonzero]")
    start = 0
    for label, size in column_blocks or []:
        ax.axvline(start - 0.5, color="tab:red", linewidth=0.8)
        ax.text(
            start + size / 2,
            -0.02 * rows - 0.6,
            label,
            ha="center",
            va="bottom",
            fontsize=7,
            color="tab:red",
        )
        start += size
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_parameter_jacobian(model: keras.Model, x: Any, path: str) -> str:
    """``J_theta z[L]`` of the first sample of ``x``, columns banded per parameter."""
    from tf_jacbp import jacobian

    blocks = jacobian.parameter_jacobian(model, np.asarray(x)[:1], blocks=True)
    matrix = np.concatenate([np.asarray(b[0]) for b in blocks.values()], axis=1)
    bands = [(path_.split("/", 1)[-1], int(b.shape[-1])) for path_, b in blocks.items()]
    return plot_matrix(matrix, path, "J_theta z[L] (one sample)", bands)


def plot_dense_jacobian(layer: keras.layers.Layer, a: Any, path: str) -> str:
    """A Dense layer's ``[I (x) a^T | I]`` at one input ``a`` (``(n,)``)."""
    matrix = np.asarray(layer.parameter_jacobian(np.asarray(a)))
    m = layer.units
    bands = [("Vec(W)", matrix.shape[1] - m * layer.use_bias)] + (
        [("b", m)] if layer.use_bias else []
    )
    return plot_matrix(matrix, path, f"{layer.name}: [I (x) a^T | I]", bands)


def plot_toeplitz(kernel: Any, input_shape: tuple[int, int, int], path: str, **conv: Any) -> str:
    """The Toeplitz matrix ``T(K)`` of ``tf_jacbp.toeplitz.conv_matrix(kernel, input_shape, **conv)``."""
    from tf_jacbp import toeplitz

    matrix = np.asarray(toeplitz.conv_matrix(kernel, input_shape, **conv))
    return plot_matrix(
        matrix, path, f"T(K) for input {tuple(input_shape)}, kernel {np.shape(kernel)}"
    )
