"""Pictures of Algorithm 1's matrices as matplotlib figures (``plot`` extra).

* ``plot_parameter_jacobian``: ``J_theta z[L]`` of one sample, one band of columns per layer's
  ``[Vec(W); b]``, the bands labelled.
* ``plot_dense_jacobian``: a Dense layer's ``[I (x) a^T | I]``, the block-diagonal copies of
  ``a^T`` then the identity.
* ``plot_toeplitz``: a conv kernel's Toeplitz matrix ``T(K)`` (Lemmas 2-3).
* ``plot_matrix``: any matrix: its sparsity pattern (nonzeros dark), and beside it its signed
  values on a diverging colormap (red positive, blue negative, white zero).

Each function returns a ``matplotlib.figure.Figure`` built without pyplot, so it never switches
the global matplotlib backend; ``path=`` also saves it (PNG by the file's extension), and ``ax=``
draws into axes of your own figure instead. In a notebook the returned figure shows inline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tf_jacbp._backend import keras

_LABEL_POINTS = 7  # font size of the column-band labels
_DPI = 120


def _matplotlib():
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:
        raise ImportError("tf_jacbp.plot needs matplotlib: pip install 'tf_jacbp[plot]'") from err
    return Figure, MaxNLocator


def label_positions(centers: Sequence[float], gap: float, low: float, high: float) -> np.ndarray:
    """Positions for labels at ``centers`` that keep at least ``gap`` apart inside ``[low, high]``.

    A sweep from the left pushes each label right of its neighbour, a sweep from the right pulls
    back what left the interval; the labels keep their order. (When ``len(centers) * gap`` exceeds
    the interval, they are spread evenly over it.)
    """
    pos = np.asarray(centers, dtype=float).copy()
    if len(pos) * gap > high - low:
        return np.linspace(low, high, len(pos)) if len(pos) > 1 else np.array([(low + high) / 2])
    for i in range(len(pos)):
        pos[i] = max(pos[i], low + gap / 2, pos[i - 1] + gap if i else -np.inf)
    for i in reversed(range(len(pos))):
        pos[i] = min(pos[i], high - gap / 2, pos[i + 1] - gap if i + 1 < len(pos) else np.inf)
    return pos


def _draw(ax, image: np.ndarray, cmap: str, column_blocks, limit: float | None = None):
    rows, cols = image.shape
    kwargs = {} if limit is None else {"vmin": -limit, "vmax": limit}
    handle = ax.imshow(image, cmap=cmap, aspect="auto", interpolation="nearest", **kwargs)
    _, max_n_locator = _matplotlib()
    ax.xaxis.set_major_locator(max_n_locator(integer=True))
    ax.yaxis.set_major_locator(max_n_locator(integer=True))
    ax.set_xlabel(f"column ({cols})")
    ax.set_ylabel(f"row ({rows})")
    if column_blocks:
        _label_bands(ax, column_blocks, cols)
    return handle


def _label_bands(ax, column_blocks: Sequence[tuple[str, int]], cols: int) -> None:
    """Vertical lines between the bands; labels above the axes, pushed apart, with leaders."""
    starts = np.cumsum([0] + [size for _, size in column_blocks])
    for start in starts[1:-1]:
        ax.axvline(start - 0.5, color="tab:red", linewidth=0.8)
    centers = (starts[:-1] + starts[1:]) / 2 - 0.5
    fig = ax.figure
    width_px = ax.get_position().width * fig.get_figwidth() * fig.dpi
    gap = 2.5 * _LABEL_POINTS / 72 * fig.dpi * cols / max(width_px, 1.0)
    positions = label_positions(centers, gap, -0.5, cols - 0.5)
    for (label, _), center, x in zip(column_blocks, centers, positions, strict=True):
        ax.annotate(
            label,
            xy=(center, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(x, 1.02),
            textcoords=("data", "axes fraction"),
            rotation=90,
            ha="center",
            va="bottom",
            fontsize=_LABEL_POINTS,
            color="tab:red",
            arrowprops={"arrowstyle": "-", "color": "tab:red", "linewidth": 0.5},
            annotation_clip=False,
        )


def plot_matrix(
    matrix: Any,
    path: str | os.PathLike[str] | None = None,
    title: str = "",
    column_blocks: Sequence[tuple[str, int]] | None = None,
    *,
    ax: Any = None,
    signed: bool = True,
) -> Any:
    """Draw a matrix (``(rows, cols)``): its nonzero pattern and, if ``signed``, its values.

    Args:
        matrix: a 2-D array.
        path: where to save the figure (``None``: not saved).
        title: the figure's title; the count of nonzero entries is appended.
        column_blocks: ``(label, width)`` bands of columns, in order, drawn as vertical lines
            with labels that never overlap (pushed apart, a leader line to each band).
        ax: draw into these axes instead of a new figure: one ``Axes`` (sparsity only, or
            values only with ``signed=True``) or a pair ``(sparsity_ax, values_ax)``.
        signed: also draw the signed values on a diverging colormap symmetric about 0.

    Returns:
        The ``matplotlib.figure.Figure`` drawn on.
    """
    figure_class, _ = _matplotlib()
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"plot_matrix takes a 2-D matrix, got shape {matrix.shape}.")
    rows, cols = matrix.shape
    if ax is None:
        width = float(np.clip(cols / max(rows, 1) * 4, 4, 12))
        panels = 2 if signed else 1
        fig = figure_class(figsize=(width, panels * 3.6 + 0.8), dpi=_DPI, layout="constrained")
        axes = list(fig.subplots(panels, 1, squeeze=False)[:, 0])
    else:
        axes = list(ax) if isinstance(ax, (list, tuple)) else [ax]
        fig = axes[0].figure
    nonzero = int(np.count_nonzero(matrix))
    fig.suptitle(f"{title}  [{nonzero} of {matrix.size} entries nonzero]", fontsize=9)
    if len(axes) == 2 or not signed:
        _draw(axes[0], matrix != 0, "Greys", column_blocks)
        axes[0].set_title("sparsity: nonzero entries dark", fontsize=8, loc="left")
    if signed:
        values_ax = axes[-1]
        limit = float(np.max(np.abs(matrix))) or 1.0
        handle = _draw(
            values_ax, matrix, "RdBu_r", None if len(axes) == 2 else column_blocks, limit
        )
        values_ax.set_title("values: red > 0, blue < 0", fontsize=8, loc="left")
        fig.colorbar(handle, ax=values_ax, shrink=0.9)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=_DPI)
    return fig


def plot_parameter_jacobian(
    model: keras.Model, x: Any, path: str | os.PathLike[str] | None = None, **kwargs: Any
) -> Any:
    """``J_theta z[L]`` of the first sample of ``x``, columns banded per parameter.

    ``kwargs`` go to ``plot_matrix`` (``ax``, ``signed``). Returns the figure.
    """
    from tf_jacbp import jacobian

    blocks = jacobian.parameter_jacobian(model, np.asarray(x)[:1], blocks=True)
    matrix = np.concatenate([np.asarray(b[0]) for b in blocks.values()], axis=1)
    bands = [(name.split("/", 1)[-1], int(b.shape[-1])) for name, b in blocks.items()]
    return plot_matrix(matrix, path, "J_theta z[L] (one sample)", bands, **kwargs)


def plot_dense_jacobian(
    layer: keras.layers.Layer, a: Any, path: str | os.PathLike[str] | None = None, **kwargs: Any
) -> Any:
    """A Dense layer's ``[I (x) a^T | I]`` at one input ``a`` (``(n,)``). Returns the figure."""
    matrix = np.asarray(layer.parameter_jacobian(np.asarray(a)))
    m = layer.units
    bands = [("Vec(W)", matrix.shape[1] - m * layer.use_bias)] + (
        [("b", m)] if layer.use_bias else []
    )
    return plot_matrix(matrix, path, f"{layer.name}: [I (x) a^T | I]", bands, **kwargs)


def plot_toeplitz(
    kernel: Any,
    input_shape: tuple[int, int, int],
    path: str | os.PathLike[str] | None = None,
    *,
    ax: Any = None,
    signed: bool = True,
    **conv: Any,
) -> Any:
    """``T(K)`` of ``tf_jacbp.toeplitz.conv_matrix(kernel, input_shape, **conv)``; the figure."""
    from tf_jacbp import toeplitz

    matrix = np.asarray(toeplitz.conv_matrix(kernel, input_shape, **conv))
    title = f"T(K) for input {tuple(input_shape)}, kernel {np.shape(kernel)}"
    return plot_matrix(matrix, path, title, ax=ax, signed=signed)
