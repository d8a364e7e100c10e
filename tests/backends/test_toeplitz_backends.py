"""The Toeplitz index of any rank on each backend (issue 21 item 2, issue 22): the static index
(``tf_jacbp.toeplitz.ConvIndex``, NumPy maps, ``keras.ops`` products) gives, on TensorFlow and
on JAX alike, the products of ``T(K)`` computed in NumPy from its definition; the run-time index
(``tf_jacbp.toeplitz_dynamic``, sizes known only when a TensorFlow graph runs) is
TensorFlow-only and raises on JAX an error naming the alternative.

The NumPy reference is the definition of docs/math.md (Lemma 2) written out entry by entry, with
the padding of Keras' rule computed here again, not through ``tf_jacbp.geometry``:

    T[(i, f), (i', c)] = K[p_1, ..., p_n, c, f]   if i'_a = i_a st_a - pad_a + p_a d_a for all a.
"""

from __future__ import annotations

import itertools
import math

import keras
import numpy as np
import pytest
from keras import ops

from tf_jacbp import backend as tb
from tf_jacbp import toeplitz, tolerances
from tf_jacbp.layers import Conv2D
from tf_jacbp.toeplitz_dynamic import DynamicConvIndex

RTOL = tolerances.rtol("float64")


def _axis(size: int, k: int, stride: int, padding: str, dilation: int) -> tuple[int, int]:
    """``(out, pad_before)`` along one axis, Keras' rule: "valid" no padding, "same"
    ``ceil(size / stride)`` outputs with the padding split (the smaller half before), "causal"
    ``(k - 1) d`` zeros before."""
    extent = (k - 1) * dilation + 1
    if padding == "valid":
        return (size - extent) // stride + 1, 0
    out = -(-size // stride)
    if padding == "same":
        return out, max((out - 1) * stride + extent - size, 0) // 2
    return out, (k - 1) * dilation


def definition(kernel, input_shape, strides, padding, dilation) -> np.ndarray:
    """``T(K)`` ``(o_1 ... o_n F, s_1 ... s_n C)`` from its definition, one entry at a time."""
    spatial, channels, filters = input_shape[:-1], input_shape[-1], kernel.shape[-1]
    axes = [
        _axis(s, k, st, padding, d)
        for s, k, st, d in zip(spatial, kernel.shape[:-2], strides, dilation, strict=True)
    ]
    outs = tuple(out for out, _ in axes)
    t = np.zeros((math.prod(outs) * filters, math.prod(spatial) * channels))
    for i in itertools.product(*map(range, outs)):
        for p in itertools.product(*map(range, kernel.shape[:-2])):
            read = [
                i_a * st - before + p_a * d
                for i_a, p_a, st, d, (_, before) in zip(i, p, strides, dilation, axes, strict=True)
            ]
            if all(0 <= r < s for r, s in zip(read, spatial, strict=True)):
                row = np.ravel_multi_index(i, outs) * filters
                column = np.ravel_multi_index(read, spatial) * channels
                for c, f in itertools.product(range(channels), range(filters)):
                    t[row + f, column + c] = kernel[(*p, c, f)]
    return t


def kernel_products(kernel_shape, x, m, t_of) -> np.ndarray:
    """``(V, batch, M + 1, F)``: per vector and sample ``d/dK <m[v, b], T(K) vec(x_b)>`` as ``K``'s
    rows (``K`` reshaped to ``(M, F)``) and the tied bias' ``sum_positions m[v, b]``, by the
    linearity of ``T`` in ``K``: entry ``e`` of ``dK`` is ``m^T T(E_e) x`` (``E_e`` the basis
    kernel)."""
    stacks, batch, filters = m.shape[0], m.shape[1], kernel_shape[-1]
    rows = m.reshape(stacks, batch, -1)
    columns = x.reshape(batch, -1)
    out = np.zeros((stacks, batch, math.prod(kernel_shape)))
    for e in range(out.shape[-1]):
        basis = np.zeros(math.prod(kernel_shape))
        basis[e] = 1.0
        product = columns @ t_of(basis.reshape(kernel_shape)).T  # (batch, R)
        out[..., e] = np.einsum("vbr,br->vb", rows, product)
    bias = rows.reshape(stacks, batch, -1, filters).sum(axis=2)
    return np.concatenate([out.reshape(stacks, batch, -1, filters), bias[:, :, None]], axis=2)


CONFIGS = [  # kernel, input, strides, dilation: 1-D, 2-D and 3-D
    ((3, 2, 3), (7, 2), (2,), (1,)),
    ((2, 3, 2, 3), (5, 6, 2), (2, 1), (1, 2)),
    ((2, 2, 2, 2, 2), (4, 5, 3, 2), (1, 2, 1), (2, 1, 1)),
]
CASES = [  # "causal" exists for sequences and images (tf_jacbp.geometry.PADDINGS_1D)
    pytest.param(config, padding, id=f"{len(config[2])}d-{padding}")
    for config in CONFIGS
    for padding in ("valid", "same", "causal")
    if padding != "causal" or len(config[2]) <= 2
]


@pytest.mark.parametrize("config, padding", CASES)
def test_static_index_of_any_rank_gives_the_definitions_products(backend, config, padding):
    """On either backend, in float64: ``T(K)``, ``T(K)^T``, the forward product
    ``X T(K)^T``, the input product ``Delta T(K)`` and the kernel and tied-bias products for
    ``V = 3`` stacked vectors (per sample and summed over the batch) equal the NumPy products of
    ``T(K)`` built from its definition, within float64's tolerance."""
    kernel_shape, input_shape, strides, dilation = config
    tb.require_float64("the Toeplitz index's products")
    rng = np.random.default_rng(len(strides))
    kernel = rng.normal(size=kernel_shape)
    index = toeplitz.conv_index(kernel_shape, input_shape, strides, padding, dilation)
    t = definition(kernel, input_shape, strides, padding, dilation)
    x = rng.normal(size=(4, *input_shape))
    m = rng.normal(size=(3, 4, *index.output_shape))

    def close(got, want, what):
        got = ops.convert_to_numpy(got)
        assert got.dtype == np.float64, f"{what} on {backend}: {got.dtype}"
        assert got.shape == want.shape, f"{what} on {backend}: {got.shape} != {want.shape}"
        error = tolerances.relative_error(got, want)
        assert error <= RTOL, f"{what} on {backend}: relative error {error:.3g} > {RTOL}"

    k = ops.convert_to_tensor(kernel)
    close(index.matrix(k), t, "T(K)")
    t_transposed = index.transpose_matrix(k)
    close(t_transposed, t.T, "T(K)^T")
    rows = ops.convert_to_tensor(x.reshape(4, -1))
    close(toeplitz.toeplitz_product(rows, t_transposed), x.reshape(4, -1) @ t.T, "X T^T")
    delta = m[0].reshape(4, -1)
    close(
        toeplitz.toeplitz_product(ops.convert_to_tensor(delta), t_transposed, transpose=True),
        delta @ t,
        "Delta T",
    )
    want = kernel_products(
        kernel_shape, x, m, lambda k: definition(k, input_shape, strides, padding, dilation)
    )
    x_t, m_t = ops.convert_to_tensor(x), ops.convert_to_tensor(m)
    close(index.kernel_products(x_t, m_t, sum_batch=False), want, "per-sample kernel products")
    close(index.kernel_products(x_t, m_t), want.sum(axis=1), "kernel products")


def test_conv2d_of_unknown_size_predicts_the_definitions_output_at_two_sizes(backend, monkeypatch):
    """A float64 ``Conv2D`` built for ``keras.Input((None, None, 2))`` predicts ``T(K) vec(x) +
    b`` (NumPy, the definition) at two image sizes. On TensorFlow ``predict`` traces again with
    the sizes unknown after the second size (``reduce_retracing``), so the second size runs
    through the run-time index (``tf_jacbp.backend.dynamic_conv_maps``); on JAX ``jax.jit``
    traces each size with its sizes known, and the static index serves both. (The layer asks for
    ``toeplitz="materialize"``: under the default ``"auto"`` a size unknown when traced is
    applied without forming ``T(K)``, tests/backends/test_conv_routes_backends.py.)"""
    tb.require_float64("Conv2D's forward pass")
    dynamic = []  # the run-time indices built
    build = DynamicConvIndex.__init__

    def counted(self, *args, **kwargs):
        dynamic.append(self)
        build(self, *args, **kwargs)

    monkeypatch.setattr(DynamicConvIndex, "__init__", counted)
    layer = Conv2D(
        3, (2, 3), strides=(2, 1), padding="same", dtype="float64", toeplitz="materialize"
    )
    model = keras.Sequential([keras.Input((None, None, 2)), layer])
    rng = np.random.default_rng(7)
    layer.bias.assign(rng.normal(size=3))
    kernel, bias = (ops.convert_to_numpy(w) for w in (layer.kernel, layer.bias))
    for size, route in (
        ((5, 6), "static"),
        ((8, 7), "static" if backend == "jax" else "run-time"),
    ):
        # predict's data adapter casts NumPy floats to floatx (float32); the layer computes
        # in float64 from there, so the reference starts from the same rounded input
        x = rng.normal(size=(3, *size, 2)).astype(np.float32).astype(np.float64)
        t = definition(kernel, (*size, 2), (2, 1), "same", (1, 1))
        want = (x.reshape(3, -1) @ t.T).reshape(3, -(-size[0] // 2), size[1], 3) + bias
        got = model.predict(x, verbose=0)
        error = tolerances.relative_error(got, want)
        assert error <= RTOL, f"size {size} on {backend}: relative error {error:.3g}"
        assert bool(dynamic) == (route == "run-time"), (size, backend, len(dynamic))


def test_dynamic_index_is_tensorflow_only(backend):
    """``DynamicConvIndex`` (the index of sizes known only when a TensorFlow graph runs): on JAX
    an error naming the alternative (every size is known when ``jax.jit`` traces); on
    TensorFlow, given the sizes as tensors, the static index's ``T(K)^T`` and kernel gradient."""
    kernel_shape, input_shape, strides, dilation = CONFIGS[1]
    sizes = [ops.convert_to_tensor(n, "int32") for n in input_shape[:-1]]
    if backend == "jax":
        with pytest.raises(NotImplementedError) as info:
            DynamicConvIndex(sizes, kernel_shape, strides, "same", dilation)
        message = str(info.value)
        assert "TensorFlow-only" in message and "DynamicConvIndex" in message
        assert "every size is known when jax.jit traces; give the Input its spatial sizes" in (
            message
        )
        return
    rng = np.random.default_rng(3)
    kernel = ops.convert_to_tensor(rng.normal(size=kernel_shape))
    x = ops.convert_to_tensor(rng.normal(size=(2, *input_shape)))
    index = toeplitz.conv_index(kernel_shape, input_shape, strides, "same", dilation)
    delta = ops.convert_to_tensor(rng.normal(size=(2, *index.output_shape)))
    dynamic = DynamicConvIndex(sizes, kernel_shape, strides, "same", dilation, budget=10**9)
    for got, want in [
        (dynamic.transpose_matrix(kernel), index.transpose_matrix(kernel)),
        (dynamic.kernel_gradient(x, delta), index.kernel_gradient(x, delta)),
    ]:
        np.testing.assert_array_equal(ops.convert_to_numpy(got), ops.convert_to_numpy(want))
