"""``J_theta z[L]`` (Algorithm 1, step 2) and per-example gradients (step 4), by ``walk``.

* Step 2: the block of ``J_theta z[L]`` that belongs to layer ``l``'s parameters is
  ``W[L]^T D[L-1] W[L-1]^T ... W[l+1]^T D[l] [I (x) a[l-1]^T | I]``. ``parameter_jacobian``
  evaluates this chain from the left: ``M = I`` (``n_out x n_out``) at the output, then for each
  layer, last to first, the block is ``M [I (x) a^T | I]`` and ``M`` becomes ``M W^T`` and
  ``M D``. No autodiff is involved.
* Step 4: ``grad_theta l = (J_theta z[L])^T delta[L]``. ``per_example_gradients`` computes it
  for each sample without forming ``J``: the same walk with ``delta[L]`` in place of ``M``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from tf_jacbp._backend import keras
from tf_jacbp.jacobian.walk import Tensor, dtype_bytes, dtype_name, forward, output_delta, walk

DEFAULT_MAX_BYTES = 2**30
"""``parameter_jacobian`` refuses to allocate more than this many bytes unless given
``max_bytes=...``."""


def parameter_jacobian(
    model: keras.Model,
    x: Any,
    blocks: bool = False,
    max_bytes: int | None = None,
    training: bool = False,
) -> Tensor | dict[str, Tensor]:
    """``J_theta z[L]`` for each sample by the explicit chain of Algorithm 1, step 2.

    Args:
        model: a Sequential or functional model of tf_jacbp layers (skips through ``Add``).
        x: inputs ``(batch, *input_shape)``.
        blocks: return ``{variable path: (batch, n_out, Vec size)}`` in theta order instead.
        max_bytes: refuse (``ValueError``) if the result or the repeated activations would take
            more; default ``DEFAULT_MAX_BYTES`` (1 GiB).
        training: the layers' training-mode maps (``Dropout`` draws a mask). The default, False,
            is the inference map: ``BatchNormalization`` uses its moving statistics (in training
            mode a sample's output depends on the whole batch, and it raises).

    Returns:
        ``(batch, n_out, n_params)``, columns in theta order; ``n_out`` the flattened output size.
    """
    limit = _check_max_bytes(max_bytes)
    records, out, output_key = forward(model, x, training, "parameter_jacobian")
    batch, n_out = int(out.shape[0]), int(np.prod(out.shape[1:]))
    n_params = sum(int(np.prod(v.shape)) for v in records.variables)
    largest = max(int(np.prod(r.y.shape[1:])) for r in records)
    needed = batch * n_out * (n_params + 2 * largest) * dtype_bytes(out.dtype)
    if needed > limit:
        raise ValueError(
            f"parameter_jacobian needs about {needed / 2**20:.1f} MiB ({batch} samples x "
            f"{n_out} outputs x {n_params} parameters, {dtype_name(out.dtype)}), more than "
            f"max_bytes={limit}. Pass fewer samples or a larger max_bytes."
        )
    # M = I at the output: one row per output unit, for every sample.
    eye = ops.reshape(ops.eye(n_out, dtype=out.dtype), (1, n_out, *out.shape[1:]))
    m = ops.tile(eye, [batch] + [1] * (len(out.shape)))
    result = {v.path: block for v, block in walk(records, output_key, m, "rows")}
    return result if blocks else ops.concatenate(list(result.values()), axis=-1)


def _check_max_bytes(max_bytes: Any) -> float:
    """``max_bytes`` (a positive number of bytes, or None for ``DEFAULT_MAX_BYTES``) checked."""
    if max_bytes is None:
        return DEFAULT_MAX_BYTES
    if isinstance(max_bytes, bool) or not isinstance(
        max_bytes, int | float | np.integer | np.floating
    ):
        raise TypeError(
            f"parameter_jacobian: max_bytes must be a number of bytes (e.g. 2**30 for 1 GiB) or "
            f"None for the default, got max_bytes={max_bytes!r} ({type(max_bytes).__name__})."
        )
    if not max_bytes > 0:
        raise ValueError(
            f"parameter_jacobian: max_bytes must be a positive number of bytes (e.g. 2**30 for "
            f"1 GiB), got max_bytes={max_bytes!r}."
        )
    return max_bytes


def per_example_gradients(
    model: keras.Model,
    x: Any,
    y: Any,
    loss: Any = None,
    flatten: bool = True,
    training: bool = False,
) -> Tensor | list[Tensor]:
    """One gradient per sample, ``grad_theta l(y_i, yhat_i)``, by Algorithm 1's step 4.

    ``delta[L]`` for each sample is the loss's gradient with respect to the output (Table 1 for
    the tf_jacbp losses); the layers' ``vjp_params(sum_batch=False)`` then exploit the structure
    (outer products, patch products) instead of forming ``J_theta z[L]``. Regularization terms
    are not per-sample and are left out.

    Args:
        model: a Sequential or functional model of tf_jacbp layers (skips through ``Add``).
        x, y: a batch of inputs and labels.
        loss: a Keras loss (object, name or per-sample function); default the compiled loss.
        flatten: ``(batch, n_params)`` in theta order; ``False``: one ``(batch, *shape)`` tensor
            per variable of ``parameter_variables(model)``.
        training: as for ``parameter_jacobian``. Per-example gradients are not defined for a
            ``BatchNormalization`` layer in training mode (samples are coupled through the batch
            statistics): it raises, and ``training=False`` uses the moving statistics.

    The batch gradient of the compiled loss with ``reduction="sum_over_batch_size"`` is the mean
    of the rows (``"sum"``: their sum, times the number of positions for outputs of several
    positions, whose per-sample loss is the mean over them, as Keras reduces it).
    """
    records, output_key, _, _, delta = output_delta(
        model, x, y, loss, training, "per_example_gradients"
    )
    if flatten:  # one row, delta[L]^T, per sample: the blocks come in Vec order
        rows = walk(records, output_key, delta[:, None], "rows")
        return ops.concatenate([g[:, 0] for _, g in rows], axis=-1)
    return [g for _, g in walk(records, output_key, delta, "gradients")]
