"""DP-SGD's gradient and batches: the clipped, noisy gradient and Poisson sampling.

``clipped_gradients`` computes DP-SGD's gradient in two passes over one forward pass (see
``tf_jacbp.privacy``'s docstring); ``tf_jacbp.privacy.model.DPModel`` trains on it with ``fit``;
``poisson_batches`` samples the batches the accountant assumes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend
from tf_jacbp._backend import BACKEND, keras
from tf_jacbp.jacobian import output_delta, parameter_variables, squared_gradient_norms
from tf_jacbp.privacy.arguments import check_positive, check_sampling_rate
from tf_jacbp.privacy.noise import gaussian_noise


def _check_model(model: keras.Model) -> list[keras.Variable]:
    """The model's trainable variables, after checking the per-sample formulas cover all of them
    and no layer adds a data-dependent regularization term."""
    covered = {id(v) for v in parameter_variables(model)}  # raises for stock layers
    missing = [v.path for v in model.trainable_variables if id(v) not in covered]
    if missing:
        raise ValueError(
            f"DP-SGD cannot compute per-example gradient norms for the trainable variables "
            f"{missing}: no tf_jacbp layer lists them in jacobian_parameters(). Build the model "
            "from tf_jacbp.layers, or freeze those variables (trainable=False)."
        )
    for layer in model.layers:
        if getattr(layer, "activity_regularizer", None) is not None:
            raise ValueError(
                f"Layer '{layer.name}' has an activity_regularizer: a loss term that depends on "
                "the data but is not a per-sample loss, so DP-SGD cannot clip it. Remove it "
                "(weight regularizers are fine: they do not depend on the data)."
            )
    return model.trainable_variables


def _check_loss(loss: Any) -> Any:
    """The loss object, after checking its reduction is the batch mean DP-SGD replaces."""
    if loss is None:
        raise ValueError("DP-SGD needs a loss: compile the model with loss=... first.")
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            "DP-SGD supports one loss for a model with one output, got several losses."
        )
    loss = keras.losses.get(loss)
    reduction = getattr(loss, "reduction", "sum_over_batch_size")
    if reduction not in ("sum_over_batch_size", "mean"):  # "mean" is the same reduction
        raise ValueError(
            f"DP-SGD averages clipped per-sample gradients over the batch itself, so the loss "
            f"must have reduction='sum_over_batch_size' (Keras' default, or 'mean'), got "
            f"reduction={reduction!r}. Per-sample values l_i come from the loss's call; pass the "
            "loss with its default reduction."
        )
    return loss


def clip_groups(
    model: keras.Model, l2_norm_clip: float | Mapping[Any, float]
) -> tuple[list[tuple[list[str], float]] | None, float]:
    """Per-layer clipping's groups ``[(layer names, C_g)]`` and the total clip ``C``.

    ``l2_norm_clip`` a number: one group of everything (``None``), ``C`` itself. A mapping from
    a layer name, or a tuple of layer names (a group), to ``C_g > 0``: every layer with trainable
    variables must be in exactly one group; ``C = sqrt(sum_g C_g^2)`` bounds the clipped
    gradient's norm and scales the noise (Opacus' per-layer clipping). A list of
    ``[names, C_g]`` pairs (``DPModel.get_config``'s form) is accepted too.
    """
    if not isinstance(l2_norm_clip, (Mapping, list, tuple)):
        return None, check_positive("l2_norm_clip", l2_norm_clip)
    pairs = l2_norm_clip.items() if isinstance(l2_norm_clip, Mapping) else l2_norm_clip
    groups = []
    for key, clip in pairs:
        names = [key] if isinstance(key, str) else list(key)
        groups.append((names, check_positive(f"l2_norm_clip[{key!r}]", clip)))
    if not groups:
        raise ValueError("l2_norm_clip: a per-layer mapping needs at least one group.")
    owners = {v.path: layer.name for layer in model.layers for v in layer.trainable_variables}
    needed = sorted(set(owners.values()))
    listed = [name for names, _ in groups for name in names]
    unknown = sorted(set(listed) - set(needed))
    twice = sorted({n for n in listed if listed.count(n) > 1})
    missing = sorted(set(needed) - set(listed))
    if unknown or twice or missing:
        raise ValueError(
            "l2_norm_clip: per-layer clipping needs each layer with trainable variables in "
            f"exactly one group; layers {needed}; unknown {unknown}, listed twice {twice}, "
            f"missing {missing}. Give a clip norm per layer name (or per tuple of names)."
        )
    return groups, float(np.sqrt(sum(c * c for _, c in groups)))


Tensor = Any  # a tensor of the backend Keras runs on
_HALF = ("float16", "bfloat16")


def _dtype(t: Any) -> str:
    """Keras' name of ``t``'s dtype (``"float32"``, ...), whatever the backend's type."""
    return keras.backend.standardize_dtype(t.dtype)


def _wide(t: Any) -> Any:
    """``t`` (or each of a list's) in float32 if it is a 16-bit floating tensor."""
    if isinstance(t, (list, tuple)):
        return type(t)(_wide(u) for u in t)
    return ops.cast(t, "float32") if t is not None and _dtype(t) in _HALF else t


def _widened(records: Any, delta: Tensor) -> tuple[Any, Tensor]:
    """The records with 16-bit floating tensors in float32 (a 16-bit model): the norms that set
    the clip factors, and the clipped sum, are then float32 computations."""
    if _dtype(delta) not in _HALF:
        return records, delta
    out = copy.copy(records)  # keeps the records' type and attributes
    out[:] = [
        dataclasses.replace(r, params=_wide(r.params), x=_wide(r.x), y=_wide(r.y)) for r in records
    ]
    return out, _wide(delta)


def _sample_weight(sample_weight: Any, values: Tensor) -> Tensor | None:
    """``w`` ``(B,)`` in the loss's dtype; a ValueError for another shape."""
    if sample_weight is None:
        return None
    w = ops.cast(ops.convert_to_tensor(sample_weight), values.dtype)
    if len(w.shape) == 2 and w.shape[1] == 1:
        w = w[:, 0]
    if len(w.shape) != 1:
        raise ValueError(
            f"DP-SGD: sample_weight must have one weight per sample, shape (batch,), got shape "
            f"{tuple(w.shape)}. Weight samples, not positions."
        )
    return w


@backend.do_not_convert  # traced as plain Python: loops over the layers
def clipped_gradients(
    model: keras.Model,
    x: Any,
    y: Any,
    l2_norm_clip: float | Mapping[Any, float],
    noise_multiplier: float = 0.0,
    loss: Any = None,
    expected_batch_size: int | float | None = None,
    seed: Any = None,
    training: bool = True,
    sample_weight: Any = None,
    secure_mode: bool = False,
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """DP-SGD's gradient ``(1/B') [sum_i min(1, C/||g_i||) g_i + N(0, (sigma C)^2 I)]``.

    Args:
        model: a Sequential or functional model of tf_jacbp layers.
        x, y: a batch ``(B, ...)``; ``B = 0`` (an empty Poisson batch) gives the noise alone.
        l2_norm_clip: ``C > 0``, the bound on each sample's gradient norm; or a mapping from
            layer names (or tuples of them) to ``C_g`` for per-layer clipping (``clip_groups``:
            each group's part of ``g_i`` is clipped to ``C_g``, ``C = sqrt(sum_g C_g^2)``).
        noise_multiplier: ``sigma >= 0``; the noise's standard deviation is ``sigma C`` per entry
            of the summed gradient (0: clipping only, no privacy).
        loss: the per-sample loss (default: the compiled one); reduction "sum_over_batch_size"
            (or "mean", the same). A sample's loss over positions is their mean, as Keras'.
        expected_batch_size: ``B'``; None divides by the actual batch size (at least 1).
        seed: for the noise: a ``keras.random.SeedGenerator`` (a new draw each call, DPModel's),
            an int (the same draw for the same int: tests only) or None (the backend's global
            generator: TensorFlow's; on JAX, Keras' and only outside a traced step).
        training: the layers' training-mode maps (Dropout draws masks; a BatchNormalization that
            is not frozen raises: its batch statistics couple the samples).
        sample_weight: ``w`` ``(B,)``: sample ``i``'s loss is ``w_i l_i`` and its gradient
            ``w_i g_i`` is what is clipped (TensorFlow Privacy's order): the bound ``C`` holds
            whatever the weights.
        secure_mode: noise from ``os.urandom`` (``tf_jacbp.privacy.noise``); ``seed`` unused.

    Returns:
        ``(gradients, info)``: one tensor per ``model.trainable_variables`` (same order and
        shapes; regularizers not included), and ``info`` with ``"loss"`` (per sample,
        ``w_i l_i``, ``(B,)``), ``"norms"`` (``||w_i g_i||``, ``(B,)``; per-layer clipping:
        ``(B, groups)``), ``"clip_factors"`` (``c_i``, same shape), ``"y_pred"``.
    """
    groups, total_clip = clip_groups(model, l2_norm_clip)
    noise_multiplier = check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    loss = _check_loss(loss if loss is not None else getattr(model, "loss", None))
    trainable = _check_model(model)
    x, y, batch, keep = backend.pad_empty_batch(x, y)  # B = 0: one dummy sample of weight 0
    records, output_key, out, values, delta = output_delta(
        model, x, y, loss, training, "clipped_gradients"
    )
    w = _sample_weight(sample_weight, values)
    w = keep if w is None else ops.concatenate([w, ops.cast(keep[batch:], w.dtype)], 0)  # dummy
    values = values * ops.cast(w, values.dtype)  # the gradient of w_i l_i is w_i g_i
    delta = delta * ops.cast(ops.reshape(w, [-1] + [1] * (len(delta.shape) - 1)), delta.dtype)
    records, delta = _widened(records, delta)
    # Pass 1: ||g_i||^2 over the trainable variables, from the layers' norm formulas; the walk
    # keeps the delta rows that reach each map.
    trainable_ids = {id(v) for v in trainable}
    deltas: list = []
    squared = {
        id(v): ops.cast(s, "float64" if _dtype(s) == "float64" else "float32")
        for v, s in squared_gradient_norms(model, records, output_key, delta, deltas)
        if id(v) in trainable_ids
    }
    owner = {id(v): layer.name for layer in model.layers for v in layer.trainable_variables}
    group_names = [None] if groups is None else [names for names, _ in groups]
    clips = [total_clip] if groups is None else [c for _, c in groups]
    in_group = [
        [s for i, s in squared.items() if names is None or owner.get(i) in names]
        for names in group_names
    ]
    norms = ops.stack([ops.sqrt(functools.reduce(ops.add, g)) for g in in_group], axis=1)
    tiny = 1e-300 if _dtype(norms) == "float64" else 1e-30  # (B, groups) above
    factors = ops.minimum(
        ops.ones_like(norms), ops.convert_to_tensor(clips, norms.dtype) / ops.maximum(norms, tiny)
    )
    factors = ops.stop_gradient(factors)
    group_of = {
        name: k for k, names in enumerate(group_names) if names is not None for name in names
    }
    # Pass 2: the batch backward pass of sum_i c_i l_i. Every map acts on each sample alone and
    # backward is linear in delta, so scaling delta[L]'s row i by c_i scales row i of the delta
    # reaching every map by c_i: each map's parameter gradient is its batch backward applied to
    # the rows pass 1 saw, scaled (the input-gradient chain need not run again). Per-layer
    # clipping scales each layer's rows by its group's factor.
    sums: dict[int, Tensor] = {}
    for layer, op, rows, a, out_rows, params in deltas:
        rows, a, out_rows, params = _wide([rows, a, out_rows, params])  # 16 bits: in float32
        factor = ops.cast(factors[:, group_of.get(layer.name, 0)], rows.dtype)
        scaled = rows * ops.reshape(factor, [-1] + [1] * (len(rows.shape) - 1))
        _, grads = op.backward(scaled, a, out_rows, *params)
        for v, g in zip(layer.jacobian_parameters(), grads, strict=True):
            sums[id(v)] = sums[id(v)] + g if id(v) in sums else g
    if expected_batch_size is None:  # an empty batch divides its noise by 1, not 0
        divisor = ops.maximum(batch, 1)
    else:
        divisor = check_positive("expected_batch_size", expected_batch_size)
    sums = [sums[id(v)] for v in trainable]
    if noise_multiplier > 0:  # one draw for all entries: one state update of the generator
        sizes = [int(np.prod(v.shape)) for v in trainable]
        wide = any(_dtype(g) == "float64" for g in sums)
        dtype = "float64" if wide else "float32"  # at least float32, cast to each gradient's
        noise = gaussian_noise(sum(sizes), noise_multiplier * total_clip, dtype, seed, secure_mode)
        ends = np.cumsum(sizes).tolist()
        sums = [
            ops.cast(g, dtype) + ops.reshape(noise[end - size : end], v.shape)
            for g, size, end, v in zip(sums, sizes, ends, trainable, strict=True)
        ]
    gradients = [
        ops.cast(g / ops.cast(divisor, g.dtype), v.dtype)
        for g, v in zip(sums, trainable, strict=True)
    ]
    if groups is None:
        norms, factors = norms[:, 0], factors[:, 0]
    info = {"loss": values, "norms": norms, "clip_factors": factors, "y_pred": out}
    info = {k: v[:batch] for k, v in info.items()}  # without an empty batch's dummy sample
    return gradients, info


def poisson_batches(
    x: np.ndarray,
    y: np.ndarray,
    sampling_rate: float,
    steps_per_epoch: int | None = None,
    seed: int = 0,
    pad_multiple: int | None | str = "auto",
) -> Any:
    """Batches that include each sample independently with probability ``q`` (Poisson sampling).

    Each step draws ``u_j ~ U(0, 1)`` for each of the ``N`` samples and takes those with
    ``u_j < q``: batch sizes vary, ``q N`` on average (possibly 0). ``steps_per_epoch`` (default
    ``round(1 / q)``, one pass in expectation) steps make an epoch; every epoch draws anew. Train a
    ``DPModel(expected_batch_size=q * N)`` on it: that is the sampling ``compute_epsilon``
    accounts for. An empty batch (probability ``(1 - q)^N``, about ``exp(-q N)``) is a step of
    noise alone (``clipped_gradients`` gives the losses one dummy sample of weight 0).

    ``pad_multiple``: an int ``m`` pads each batch with rows of zeros to a multiple of ``m`` (at
    least ``m`` rows) and yields ``(x, y, w)``, ``w_i`` 1 for a drawn sample and 0 for a padding
    row: a row of weight 0 adds nothing to the clipped sum (``w_i g_i = 0``) nor to the metrics,
    and the update is the unpadded batch's (the noise is added once, the sum divided by
    ``expected_batch_size``); the logged loss averages over the padded rows, as Keras' loss
    over zero-weight samples. None yields ``(x, y)`` of the drawn size. ``"auto"`` (default):
    None on TensorFlow, which traces one step for batches of any size; on JAX, whose ``jax.jit``
    compiles a step for every batch shape, ``m = max(1, round(sqrt(q N)))`` (about one standard
    deviation of the batch size: a handful of compiled steps).

    Returns a ``tf.data.Dataset`` on TensorFlow, a ``keras.utils.PyDataset`` on JAX; either
    goes to ``fit`` as is.
    """
    q = check_sampling_rate(sampling_rate)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}.")
    steps = int(round(1 / q)) if steps_per_epoch is None else int(steps_per_epoch)
    if steps <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
    if isinstance(pad_multiple, str):
        if pad_multiple != "auto":
            raise ValueError(f'pad_multiple must be an int, None or "auto", got {pad_multiple!r}.')
        pad_multiple = None if BACKEND == "tensorflow" else max(1, round(np.sqrt(q * len(x))))
    elif pad_multiple is not None:
        if isinstance(pad_multiple, bool) or not isinstance(pad_multiple, (int, np.integer)):
            raise TypeError(f"pad_multiple must be an int, got {pad_multiple!r}.")
        if pad_multiple <= 0:
            raise ValueError(f"pad_multiple must be positive, got pad_multiple={pad_multiple}.")
        pad_multiple = int(pad_multiple)
    return backend.poisson_dataset(x, y, q, steps, int(seed), pad_multiple)
