"""Check 7 of ``tf_jacbp.testing.check_layer``: every product of the contract against autodiff.

For each map of the layer (``jacobian_ops()``: the layer, then a fused activation), in float64,
on random vectors ``m`` of shape ``(V, batch, *y.shape[1:])`` for ``V = 1`` and ``V = 3``:

* ``vjp_input(m, x, y, *params)`` equals ``sum_j m[v, j] grad_x F_j`` of the map's *reference*
  route, by the backend's autodiff (``tf_jacbp.backend.value_and_gradients``: ``tf.GradientTape``
  or ``jax.value_and_grad``; each input of a map of several inputs);
* ``vjp_params(..., sum_batch=True)`` equals the same for each parameter, and
  ``vjp_params(..., sum_batch=False)`` equals, sample by sample, the reference route's gradient
  on that sample alone (``F`` applied to a batch of one);
* ``squared_norms(m[:1], ...)``, where the map has one, equals the squared norms of those
  per-sample reference gradients (the norms DP-SGD clips with);
* ``jacobian_rows`` (derived) and ``per_example_squared_norms`` agree with the same references.

A convolution on the implicit route is referenced by the witness of
``tf_jacbp.check.conv_witness`` (the materialized ``T(K)``, where it fits the budget): its stock
``reference`` would run the convolution kernels its products call.

The references differentiate ``reference``, never the formulas under test, so a formula that is
wrong in one product only (a sign flipped in the per-sample rows, a quarter of the squared norm,
the batch and input axes swapped in a map of several inputs) fails here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend, tolerances
from tf_jacbp.testing.harness import compiled, conv_witnesses

Tensor = Any

VS = (1, 3)  # the numbers of stacked vectors the products are checked with


def _reference_products(op: Any, several: bool, integer_input: bool = False) -> Any:
    """``(m, x, params) -> (d_x, d_p)``, the gradients of ``sum(m * reference(x, *params))`` by
    the backend's autodiff: ``m`` ``(batch, *y)``, one sum; ``d_x`` is None for integer inputs
    (ids: not differentiated). Compiled on JAX (``tf_jacbp.testing.harness.compiled``)."""

    def products(m, x, params):
        xs = list(x) if several else [x]
        n = 0 if integer_input else len(xs)

        def total(*tensors):
            inputs = list(tensors[:n]) if n else xs
            y = op.reference(inputs if several else inputs[0], *tensors[n:])
            return ops.sum(m * ops.cast(y, m.dtype))

        _, grads = backend.value_and_gradients(total, [*xs[:n], *params])
        return (grads[:n] if n else None), grads[n:]

    return compiled(products)


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
    several = isinstance(x, (list, tuple))
    xs = list(x) if several else [x]
    batch = int(xs[0].shape[0])
    params = list(params)
    y = compiled(op.forward)(x, *params)
    reference = _reference_products(op, several, integer_input)
    vjp_input, jacobian_rows = compiled(op.vjp_input), compiled(op.jacobian_rows)
    summed_products = compiled(functools.partial(op.vjp_params, sum_batch=True))
    per_sample_products = compiled(functools.partial(op.vjp_params, sum_batch=False))
    squared_norms = compiled(op.per_example_squared_norms)
    for v in VS:
        m = ops.convert_to_tensor(rng.normal(size=(v, *y.shape)), y.dtype)
        refs = [reference(m[k], x, params) for k in range(v)]
        if not integer_input:
            dx = vjp_input(m, x, y, *params)
            dxs = list(dx) if isinstance(dx, (list, tuple)) else [dx]
            assert len(dxs) == len(xs), f"{name}.vjp_input: {len(dxs)} products, {len(xs)} inputs"
            for j, d in enumerate(dxs):
                want = np.stack([refs[k][0][j] for k in range(v)])
                _close(d, want, f"{name}.vjp_input (input {j}, V={v})")
            rows, _ = jacobian_rows(
                ops.transpose(m, [1, 0, *range(2, len(m.shape))]), x, y, *params
            )
            rows = list(rows) if isinstance(rows, (list, tuple)) else [rows]
            for j, r in enumerate(rows):
                want = np.stack([refs[k][0][j] for k in range(v)], axis=1)
                _close(r, want, f"{name}.jacobian_rows, input rows (input {j}, V={v})")
        if not params:
            continue
        summed = summed_products(m, x, y, *params)
        assert len(summed) == len(params), (
            f"{name}.vjp_params returned {len(summed)} products for {len(params)} parameters"
        )
        for p, g in enumerate(summed):
            want = np.stack([refs[k][1][p] for k in range(v)])
            _close(g, want, f"{name}.vjp_params(sum_batch=True) (parameter {p}, V={v})")
        per_sample = per_sample_products(m, x, y, *params)
        wants = [[None] * batch for _ in range(v)]
        for k in range(v):
            for i in range(batch):
                mi = m[k, i : i + 1]
                wants[k][i] = reference(mi, _slice(x, i), params)[1]
        for p, g in enumerate(per_sample):
            want = np.stack([np.stack([wants[k][i][p] for i in range(batch)]) for k in range(v)])
            _close(g, want, f"{name}.vjp_params(sum_batch=False) (parameter {p}, V={v})")
        if v == 1:
            norms = squared_norms(m[0], x, y, *params)
            for p, s in enumerate(norms):
                want = [np.sum(np.square(wants[0][i][p])) for i in range(batch)]
                what = "squared_norms" if op.squared_norms is not None else "squared norms"
                _close(s, np.asarray(want), f"{name}.{what} (parameter {p})")


def check_contract(layer: Any, x: Any, seed: int) -> None:
    """Check 7 on every map of ``layer.jacobian_ops()`` in turn, each at the input it receives
    in the forward pass (``x``: float64, the layer's input batch). On JAX it needs x64 enabled
    (``tf_jacbp.backend.require_float64``): it compares at the float64 tolerance."""
    backend.require_float64("tf_jacbp.testing.check_contract")
    integer = bool(getattr(layer, "takes_integer_ids", False))
    a = x
    for j, (op, params) in enumerate(layer.jacobian_ops(False)):
        params = [ops.cast(p, "float64") for p in params]
        name = f"{type(layer).__name__} '{layer.name}'" + (f" map {j}" if j else "")
        if not hasattr(op, "vjp_input"):
            raise AssertionError(
                f"{name}: {type(op).__name__} does not implement the contract "
                "(tf_jacbp.contract: vjp_input, vjp_params, squared_norms)"
            )
        with conv_witnesses([op]):  # an implicit convolution: the materialized T(K)
            check_map(op, a, params, name, seed + j, integer_input=integer and j == 0)
        a = op.forward(a, *params)
