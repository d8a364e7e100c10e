"""Window geometry shared by convolution and pooling: arguments, padding, output sizes, taps.

A convolution or pooling layer slides a window of ``k`` taps, ``d`` apart (dilation), with stride
``s`` along each spatial axis of a channels_last input. Along one axis of ``size`` inputs, output
``o`` reads the inputs

    o s - pad_before + t d,    t = 0, ..., k - 1,

those outside ``[0, size)`` falling in the zero padding. The padding decides ``pad_before`` and
the number of outputs (``output_size``):

* ``"valid"``: none; ``(size - (k - 1) d - 1) // s + 1`` outputs (at least one window must fit,
  ``check_window_fits``);
* ``"same"``: TensorFlow's rule (``same_padding``), ``ceil(size / s)`` outputs;
* ``"causal"`` (1-D convolutions): ``(k - 1) d`` zeros before, none after, ``ceil(size / s)``
  outputs, so that output ``o`` reads no input after position ``o s``.

``axis_taps`` tabulates these reads for one axis; ``tf_jacbp.toeplitz`` builds ``T(K)`` from them
and the pooling layers their selection and averaging matrices. The argument checks here
(``as_tuple``, ``check_padding``, ``check_channels_last``, ``check_data_format``,
``spatial_shape``) raise ValueErrors that name the argument, its value and the fix; the
convolutions, which take both layouts, permute channels_first tensors to channels_last and back
(``channels_last_axes``, ``channels_first_axes``, ``channels_first_order``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tf_jacbp._backend import keras

PADDINGS = ("valid", "same")
"""The paddings of 2-D convolution and pooling."""

PADDINGS_1D = ("valid", "same", "causal")
"""The paddings of 1-D convolution (Keras' ``Conv1D``)."""

_AXES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def _axis_names(rank: int) -> tuple[str, ...]:
    return _AXES.get(rank, tuple(f"axis {i + 1}" for i in range(rank)))


def check_channels_last(data_format: Any, owner: str, rank: int = 2) -> str:
    """``"channels_last"`` for ``data_format`` None (Keras' global setting) or "channels_last";
    else a ValueError naming ``data_format`` and the fix (``rank`` spatial axes: its layout)."""
    resolved = keras.config.image_data_format() if data_format is None else data_format
    if resolved != "channels_last":
        layout = ", ".join(("batch", *_axis_names(rank), "channels"))
        permute = (*range(2, rank + 2), 1)
        raise ValueError(
            f"{owner}: only data_format='channels_last' ({layout}) is supported, got "
            f"data_format={data_format!r} (resolved to {resolved!r}); tf_jacbp's vec and Toeplitz "
            f"layouts are defined for channels_last. Transpose the input with "
            f"keras.layers.Permute({permute}) and use channels_last."
        )
    return resolved


DATA_FORMATS = ("channels_last", "channels_first")
"""The layouts of a convolution's input and output: ``(batch, *spatial, channels)`` or
``(batch, channels, *spatial)``."""


def check_data_format(data_format: Any, owner: str, rank: int = 2) -> str:
    """``"channels_last"`` or ``"channels_first"`` for ``data_format`` None (Keras' global
    ``keras.config.image_data_format()``) or one of ``DATA_FORMATS``; else a ValueError naming
    ``data_format`` and the choices (``rank`` spatial axes: the layouts)."""
    resolved = keras.config.image_data_format() if data_format is None else data_format
    if resolved not in DATA_FORMATS:
        axes = _axis_names(rank)
        last = ", ".join(("batch", *axes, "channels"))
        first = ", ".join(("batch", "channels", *axes))
        raise ValueError(
            f"{owner}: data_format must be 'channels_last' or 'channels_first' (or None: Keras' "
            f"image_data_format()), got data_format={data_format!r}. channels_last: ({last}); "
            f"channels_first: ({first})."
        )
    return resolved


def channels_last_axes(ndim: int, lead: int = 1) -> list[int]:
    """The permutation taking a channels_first tensor to channels_last: ``ndim`` axes of which
    the first ``lead`` (batch; ``V`` and batch for the contract's ``m``) stay, the channel axis
    ``lead`` moves behind the spatial axes. ``ops.transpose(t, channels_last_axes(...))``."""
    return [*range(lead), *range(lead + 1, ndim), lead]


def channels_first_axes(ndim: int, lead: int = 1) -> list[int]:
    """The inverse of ``channels_last_axes``: the last (channel) axis moves to position
    ``lead``."""
    return [*range(lead), ndim - 1, *range(lead, ndim - 1)]


def channels_first_order(shape: Sequence[int]) -> np.ndarray:
    """Where each entry of the row-major ``vec`` of a channels_first sample ``(C, *spatial)``
    sits in the ``vec`` of the same sample channels_last, ``shape = (*spatial, C)``:
    ``vec_first = vec_last[order]``. A matrix over channels_last ``vec``s, ``A`` ``(R, N)``,
    is over channels_first ones ``A[order_out][:, order_in]``."""
    n = len(shape)
    positions = np.arange(int(np.prod(shape))).reshape(tuple(shape))
    return positions.transpose(n - 1, *range(n - 1)).reshape(-1)


def as_tuple(value: Any, n: int, name: str, owner: str) -> tuple[int, ...]:
    """``value`` (an int, or ``n`` ints, all >= 1) as a tuple of ``n`` ints, one per spatial axis.

    Raises a ValueError naming ``name`` and the value otherwise.
    """
    values = (value,) * n if isinstance(value, int | np.integer) else value
    try:
        values = tuple(values)
    except TypeError:
        values = None
    if (
        values is None
        or len(values) != n
        or any(isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1 for v in values)
    ):
        axes = ", ".join(_axis_names(n))
        kinds = {1: "a tuple of one positive integer", 2: "a pair of positive integers"}
        kind = kinds.get(n, f"a tuple of {n} positive integers")
        raise ValueError(
            f"{owner}: {name} must be a positive integer or {kind} ({axes}), got {name}={value!r}."
        )
    return tuple(int(v) for v in values)


def as_pair(value: Any, name: str, owner: str) -> tuple[int, int]:
    """``value`` (an int or a pair of ints, all >= 1) as ``(height, width)`` (``as_tuple``)."""
    return as_tuple(value, 2, name, owner)


def check_padding(padding: Any, owner: str, allowed: Sequence[str] = PADDINGS) -> str:
    """``padding`` lower-cased if it is one of ``allowed`` (any case); else a ValueError naming
    ``padding`` and the choices."""
    if isinstance(padding, str) and padding.lower() in allowed:
        return padding.lower()
    meanings = {
        "valid": "no padding",
        "same": "TensorFlow's zero padding to ceil(size / stride) outputs",
        "causal": "(kernel_size - 1) * dilation_rate zeros before the sequence",
    }
    choices = " or ".join(repr(p) for p in allowed)
    explained = "; ".join(f"{p!r}: {meanings[p]}" for p in allowed)
    raise ValueError(f"{owner}: padding must be {choices}, got padding={padding!r}. ({explained}.)")


def spatial_shape(
    input_shape: Sequence[int | None], rank: int, owner: str, allow_unknown: bool = False
) -> tuple[int | None, ...]:
    """The sizes after the batch axis of a ``(batch, *spatial, channels)`` input shape with
    ``rank`` spatial axes, as ints.

    Raises a ValueError when the rank is wrong, when the channel count is unknown, or (unless
    ``allow_unknown``, then they stay None) when a spatial size is unknown.
    """
    names = _axis_names(rank)
    if len(input_shape) != rank + 2:
        example = (
            "Add a channel axis to images, e.g. x[..., None] or keras.layers.Reshape((28, 28, 1))."
            if rank == 2
            else "Add a channel axis, e.g. x[..., None] or keras.layers.Reshape((steps, 1))."
        )
        if rank == 3:
            example = "Add a channel axis to volumes, e.g. x[..., None]."
        raise ValueError(
            f"{owner} expects inputs of shape (batch, {', '.join(names)}, channels), got input "
            f"shape {tuple(input_shape)} (rank {len(input_shape)}). {example}"
        )
    sizes = tuple(input_shape[1:])
    if sizes[-1] is None or (not allow_unknown and any(n is None for n in sizes)):
        known = "channel count" if allow_unknown else f"{', '.join(names)} and channel count"
        example = "(28, 28, 1)" if rank == 2 else "(100, 8)"
        if rank == 3:
            example = "(16, 16, 16, 1)"
        raise ValueError(
            f"{owner} needs a known {known}, got input shape {tuple(input_shape)}; the index "
            f"maps are built for fixed sizes. Give keras.Input a full shape, e.g. "
            f"keras.Input({example})."
        )
    return tuple(None if n is None else int(n) for n in sizes)


def same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's "same" padding of one axis: ``(pad_before, pad_after)``.

    With ``out = ceil(size / stride)``:
    ``pad_total = max((out - 1) stride + (kernel_size - 1) dilation + 1 - size, 0)``,
    ``pad_before = pad_total // 2``, and the odd one out goes after (even kernels, strides).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def padding_before(
    size: int, kernel_size: int, stride: int, padding: str, dilation: int = 1
) -> int:
    """``pad_before`` of one axis: 0 ("valid"), ``same_padding``'s first value ("same") or
    ``(kernel_size - 1) dilation`` ("causal")."""
    if padding == "same":
        return same_padding(size, kernel_size, stride, dilation)[0]
    if padding == "causal":
        return (kernel_size - 1) * dilation
    return 0


def padding_amounts(
    size: int, kernel_size: int, stride: int, padding: str, dilation: int = 1
) -> tuple[int, int]:
    """``(pad_before, pad_after)`` of one axis: the zeros to add so that a "valid" convolution
    of the padded axis reads what ``axis_taps`` reads. "valid": ``(0, 0)``; "same":
    ``same_padding``; "causal": ``((kernel_size - 1) dilation, 0)``."""
    if padding == "same":
        return same_padding(size, kernel_size, stride, dilation)
    return padding_before(size, kernel_size, stride, padding, dilation), 0


def output_size(size: int, kernel_size: int, stride: int, padding: str, dilation: int = 1) -> int:
    """Outputs along one axis: ``ceil(size / stride)`` for "same" and "causal", else
    ``(size - (k - 1) dilation - 1) // stride + 1`` (at least one window must fit: see
    ``check_window_fits``)."""
    if padding in ("same", "causal"):
        return -(-size // stride)
    return (size - (kernel_size - 1) * dilation - 1) // stride + 1


def check_window_fits(
    input_shape: Sequence[int],
    window: Sequence[int],
    padding: str,
    owner: str,
    name: str = "kernel_size",
    dilation_rate: Sequence[int] | None = None,
) -> None:
    """The one check that a "valid" window fits the input: a ValueError naming ``name``, the
    sizes and the fix when the dilated window ``(k - 1) d + 1`` spans more than the input along
    a spatial axis (then there is no output). ``input_shape`` starts with the spatial sizes
    (``(H, W, ...)`` or ``(T, ...)``); ``window`` is a kernel's or a pool's size per spatial axis,
    ``dilation_rate`` a kernel's (None for a pool: 1)."""
    if padding != "valid":
        return
    dilation = (1,) * len(window) if dilation_rate is None else tuple(dilation_rate)
    for axis, axis_name in enumerate(_axis_names(len(window))):
        extent = (window[axis] - 1) * dilation[axis] + 1
        if input_shape[axis] < extent:
            spans = f"{name} {tuple(window)}"
            if dilation_rate is not None:
                spans += f" with dilation_rate {dilation}"
            raise ValueError(
                f"{owner}: {spans} spans {extent} along the {axis_name}, more than the input's "
                f"{input_shape[axis]} (input_shape={tuple(input_shape)}), so padding='valid' has "
                f"no output. Use padding='same', a smaller {name}, or a larger input."
            )


def axis_taps(
    size: int, kernel_size: int, stride: int, padding: str, dilation: int = 1
) -> np.ndarray:
    """Which input coordinate each kernel tap reads, along one axis: ``(out, kernel_size)`` ints.

    Entry ``[o, t]`` is ``o stride - pad_before + t dilation`` (``padding_before``), or ``-1``
    where that falls in the padding. Raises a ValueError (``check_window_fits``) when a "valid"
    axis is shorter than the dilated kernel.
    """
    check_window_fits((size,), (kernel_size,), padding, "axis_taps", "kernel_size", (dilation,))
    before = padding_before(size, kernel_size, stride, padding, dilation)
    out = output_size(size, kernel_size, stride, padding, dilation)
    taps = np.arange(out)[:, None] * stride - before + np.arange(kernel_size)[None, :] * dilation
    return np.where((taps >= 0) & (taps < size), taps, -1)
