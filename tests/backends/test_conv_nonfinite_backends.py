"""A NaN or an infinity in a convolution's input stays where stock Keras keeps it (issue 23
item 3), on every backend.

Stock convolution adds up only the window of each output, so a non-finite input reaches the
outputs whose receptive field holds it and no others. A dense ``T(K)`` multiplies the input by
its whole column, zeros included, and ``0 * NaN = NaN``: on ``toeplitz="materialize"`` one NaN
(or infinity) makes every output of its sample non-finite, the other samples untouched. This is
stated in ``tf_jacbp.toeplitz_implicit`` and tested here. The default ``toeplitz="auto"``, where
it materializes a small ``T(K)``, first checks that the batch is finite (one pass) and otherwise
applies ``T(K)`` implicitly; so does the input product with a non-finite upstream gradient.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from tf_jacbp import tolerances
from tf_jacbp.layers import Conv1D, Conv2D, Conv2DTranspose, Conv3D

CASES = [
    # causal: a NaN at the last step reaches the last output only, never a past one
    (Conv1D, keras.layers.Conv1D, (9, 2), {"filters": 2, "kernel_size": 3, "padding": "causal"}),
    (Conv2D, keras.layers.Conv2D, (7, 7, 2), {"filters": 3, "kernel_size": 3, "padding": "same"}),
    (Conv2D, keras.layers.Conv2D, (8, 8, 1), {"filters": 2, "kernel_size": 2, "strides": 2}),
    (Conv3D, keras.layers.Conv3D, (4, 5, 5, 1), {"filters": 2, "kernel_size": 2}),
    (
        Conv2DTranspose,
        keras.layers.Conv2DTranspose,
        (4, 4, 2),
        {"filters": 2, "kernel_size": 3, "strides": 2, "padding": "same"},
    ),
]


def _input(input_shape, value):
    """Two samples; sample 0 holds ``value`` at its last spatial position, channel 0."""
    x = np.random.default_rng(0).normal(size=(2, *input_shape)).astype("float32")
    x[(0, *(n - 1 for n in input_shape[:-1]), 0)] = value
    return x


def _layers(cls, stock_cls, input_shape, kwargs):
    stock = stock_cls(**kwargs)
    stock.build((None, *input_shape))
    ours = {}
    for route in ("auto", "materialize", "implicit"):
        layer = cls(toeplitz=route, **kwargs)
        layer.build((None, *input_shape))
        layer.set_weights(stock.get_weights())
        ours[route] = layer
    return stock, ours


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("cls, stock_cls, input_shape, kwargs", CASES)
def test_the_default_keeps_a_non_finite_input_where_stock_keeps_it(
    cls, stock_cls, input_shape, kwargs, value
):
    stock, ours = _layers(cls, stock_cls, input_shape, kwargs)
    x = _input(input_shape, value)
    assert ours["auto"].route_for(ops.convert_to_tensor(x[:, None] if cls is Conv1D else x)) == (
        "materialize"
    ), "a small T(K): the default materializes it, so the finite check is what is tested"
    want = np.asarray(stock(x))
    finite = np.isfinite(want)
    assert not finite[0].all() and finite[0].any() and finite[1].all()
    if cls is Conv1D:  # causal: the past outputs of the poisoned sample stay finite
        assert finite[0, :-1].all() and not finite[0, -1].any()
    for route in ("auto", "implicit"):
        got = np.asarray(ours[route](x))
        np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=route)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=route)
        error = tolerances.relative_error(got[finite], want[finite])
        assert error <= tolerances.rtol("float32"), route


@pytest.mark.parametrize("cls, stock_cls, input_shape, kwargs", CASES)
def test_a_materialized_t_spreads_a_nan_over_its_sample(cls, stock_cls, input_shape, kwargs):
    """What ``toeplitz="materialize"`` does, as documented: every output of the sample with the
    NaN is NaN (``0 * NaN``), the other sample is stock's."""
    stock, ours = _layers(cls, stock_cls, input_shape, kwargs)
    x = _input(input_shape, np.nan)
    got = np.asarray(ours["materialize"](x))
    assert np.isnan(got[0]).all()
    error = tolerances.relative_error(got[1], np.asarray(stock(x))[1])
    assert error <= tolerances.rtol("float32")


@pytest.mark.parametrize("cls, stock_cls, input_shape, kwargs", CASES)
def test_the_input_product_keeps_a_non_finite_upstream_gradient_local(
    cls, stock_cls, input_shape, kwargs
):
    """``(J_x z)^T m`` with a NaN in ``m``: the default gives the implicit route's (the
    transposed convolution's) pattern, a NaN only in the inputs that output reads; the
    materialized product spreads it over the sample."""
    _, ours = _layers(cls, stock_cls, input_shape, kwargs)
    x = ops.convert_to_tensor(_input(input_shape, 0.5))
    y = ours["auto"].forward(x, *ours["auto"].read_parameters())
    m = np.random.default_rng(1).normal(size=(1, *y.shape)).astype("float32")
    m[(0, 0, *(0,) * (len(y.shape) - 1))] = np.nan
    products = {
        route: np.asarray(layer.vjp_input(ops.convert_to_tensor(m), x, y, *layer.read_parameters()))
        for route, layer in ours.items()
    }
    local = np.isnan(products["implicit"])
    assert local[0, 0].any() and not local[0, 0].all() and not local[0, 1].any()
    np.testing.assert_array_equal(np.isnan(products["auto"]), local)
    assert np.isnan(products["materialize"][0, 0]).all()
