"""Check 7 of ``tf_jacbp.testing.check_layer``: every product of the contract against autodiff.

For each map of the layer (``jacobian_ops()``: the layer, then a fused activation), in float64,
on random vectors ``m`` of shape ``(V, batch, *y.shape[1:])`` for ``V = 1`` and ``V = 3``:

* ``vjp_input(m, x, y, *params)`` equals ``sum_j m[v, j] grad_x F_j`` of the map's *reference*
  route, by ``tf.GradientTape`` (each input of a map of several inputs);
* ``vjp_params(..., sum_batch=True)`` equals the same for each parameter, and
  ``vjp_params(..., sum_batch=False)`` equals, sample by sample, the reference route's gradient
  on that sample alone (``F`` applied to a batch of one);
* ``squared_norms(m[:1], ...)``, where the map has one, equals the squared norms of those
  per-sample reference gradients (the norms DP-SGD clips with);
* ``jacobian_rows`` (derived) and ``per_example_squared_norms`` agree with the same references.

The references differentiate ``reference``, never the formulas under test, so a formula that is
wrong in one product only (a sign flipped in the per-sample rows, a quarter of the squared norm,
the batch and input axes swapped in a map of several inputs) fails here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tf_jacbp import tolerances
from tf_jacbp._backend import tf

VS = (1, 3)  # the numbers of stacked vectors the products are checked with


def _reference_products(op: Any, m: tf.Tensor, x: Any, params: Sequence, constants: Sequence):
    """``(d_x, d_p)`` of ``sum(m * reference(x, *params))``: ``m`` ``(batch, *y)``, one sum."""
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xs)
        tape.watch(list(params))
        y = op.reference(xs if isinstance(x, (list, tuple)) else xs[0], *params, *constants)
        total = tf.reduce_sum(m * tf.cast(y, m.dtype))
    dxs = tape.gradient(total, xs, unconnected_gradients="zero")
    dps = tape.gradient(total, list(params), unconnected_gradients="zero")
    return dxs, dps


def _close(got: Any, want: Any, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    err = tolerances.relative_error(got, want, "float64")
    assert err <= tolerances.rtol("float64"), (
        f"{what}: relative error {err:.3g} against autodiff of the reference route > "
        f"{tolerances.rtol('float64'):.3g} (float64)"
    )


def _slice(x: Any, i: int) -> Any:
    return [t[i : i + 1] for t in x] if isinstance(x, (list, tuple)) else x[i : i + 1]


def check_map(
    op: Any, x: Any, params: Sequence, name: str, seed: int, integer_input: bool = False
) -> None:
    """Check 7 on one map ``y = op.forward(x, *params)`` at the batch ``x`` (module docstring).

    ``x``: a float64 tensor ``(batch, ...)`` or a list of them; ``params``: float64 tensors.
    Raises ``AssertionError`` naming ``name``, the product, ``V`` and the numbers.
    """
    rng = np.random.default_rng(seed)
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    batch = int(xs[0].shape[0])
    y = op.forward(x, *params)
    for v in VS:
        m = tf.constant(rng.normal(size=(v, *y.shape)), y.dtype)
        refs = [_reference_products(op, m[k], x, params, ()) for k in range(v)]
        if not integer_input:
            dx = op.vjp_input(m, x, y, *params)
            dxs = list(dx) if isinstance(dx, (list, tuple)) else [dx]
            assert len(dxs) == len(xs), f"{name}.vjp_input: {len(dxs)} products, {len(xs)} inputs"
            for j, d in enumerate(dxs):
                want = np.stack([refs[k][0][j] for k in range(v)])
                _close(d, want, f"{name}.vjp_input (input {j}, V={v})")
            rows, _ = op.jacobian_rows(
                tf.transpose(m, [1, 0, *range(2, len(m.shape))]), x, y, *params
            )
            rows = list(rows) if isinstance(rows, (list, tuple)) else [rows]
            for j, r in enumerate(rows):
                want = np.stack([refs[k][0][j] for k in range(v)], axis=1)
                _close(r, want, f"{name}.jacobian_rows, input rows (input {j}, V={v})")
        if not params:
            continue
        summed = op.vjp_params(m, x, y, *params, sum_batch=True)
        assert len(summed) == len(params), (
            f"{name}.vjp_params returned {len(summed)} products for {len(params)} parameters"
        )
        for p, g in enumerate(summed):
            want = np.stack([refs[k][1][p] for k in range(v)])
            _close(g, want, f"{name}.vjp_params(sum_batch=True) (parameter {p}, V={v})")
        per_sample = op.vjp_params(m, x, y, *params, sum_batch=False)
        wants = [[None] * batch for _ in range(v)]
        for k in range(v):
            for i in range(batch):
                mi = m[k, i : i + 1]
                wants[k][i] = _reference_products(op, mi, _slice(x, i), params, ())[1]
        for p, g in enumerate(per_sample):
            want = np.stack([np.stack([wants[k][i][p] for i in range(batch)]) for k in range(v)])
            _close(g, want, f"{name}.vjp_params(sum_batch=False) (parameter {p}, V={v})")
        if v == 1:
            norms = op.per_example_squared_norms(m[0], x, y, *params)
            for p, s in enumerate(norms):
                want = [np.sum(np.square(wants[0][i][p])) for i in range(batch)]
                what = "squared_norms" if op.squared_norms is not None else "squared norms"
                _close(s, np.asarray(want), f"{name}.{what} (parameter {p})")


def check_contract(layer: Any, x: Any, seed: int) -> None:
    """Check 7 on every map of ``layer.jacobian_ops()`` in turn, each at the input it receives
    in the forward pass (``x``: float64, the layer's input batch)."""
    integer = bool(getattr(layer, "takes_integer_ids", False))
    a = x
    for j, (op, params) in enumerate(layer.jacobian_ops(False)):
        params = [tf.cast(p, tf.float64) for p in params]
        name = f"{type(layer).__name__} '{layer.name}'" + (f" map {j}" if j else "")
        if not hasattr(op, "vjp_input"):
            raise AssertionError(
                f"{name}: {type(op).__name__} does not implement the contract "
                "(tf_jacbp.contract: vjp_input, vjp_params, squared_norms)"
            )
        check_map(op, a, params, name, seed + j, integer_input=integer and j == 0)
        a = op.forward(a, *params)
