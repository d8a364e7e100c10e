"""The one Jacobian contract (tf_jacbp.contract) and the check that covers all of it.

Each planted layer is wrong in one product only, the product one consumer uses: the sign of
the per-sample rows (``per_example_gradients``, Algorithm 1's rows), a quarter of the squared
norm (DP-SGD's clip factors), the second input of a layer of several inputs. Training's batch
gradient is right in all of them, so only a check of the whole contract catches them.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from planted_layers import (
    QuarterNormsDense,
    SignFlippedRowsDense,
    WeightedSum,
)

from tf_jacbp import contract, jacobian, layers, losses

F64 = "float64"


def _dense(cls, dtype):
    return cls(3, activation="tanh", dtype=dtype)


# check_layer on the planted layers (sign-flipped rows, quarter norms, two inputs): on every
# backend, tests/backends/test_planted_on_backends.py.


def test_the_planted_errors_reach_the_consumers_unchecked_otherwise():
    """What the checks above prevent: the wrong per-sample rows are what per_example_gradients
    returns, and the quarter norms what the norms (DP-SGD's clip factors) are."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))

    def model(cls):
        return keras.Sequential([keras.Input((4,), dtype=F64), _dense(cls, F64)])

    good, flipped, quarter = (
        model(layers.Dense),
        model(SignFlippedRowsDense),
        model(QuarterNormsDense),
    )
    for other in (flipped, quarter):
        other.set_weights(good.get_weights())
    loss = losses.MeanSquaredError(dtype=F64)
    rows = jacobian.per_example_gradients(good, x, y, loss=loss)
    np.testing.assert_allclose(jacobian.per_example_gradients(flipped, x, y, loss=loss), -rows)
    norms = jacobian.per_example_gradient_norms(good, x, y, loss=loss)
    np.testing.assert_allclose(
        jacobian.per_example_gradient_norms(quarter, x, y, loss=loss), norms / 2
    )


def test_derived_rows_of_a_layer_of_two_inputs_at_batch_three():
    """``jacobian_rows`` for several inputs is derived from ``vjp_input``: right at any batch."""
    layer = WeightedSum(dtype=F64)
    rng = np.random.default_rng(1)
    xs = [tf.constant(rng.normal(size=(3, 4))) for _ in range(2)]
    layer(xs)
    c = tf.constant(rng.normal(size=(4,)))
    m = tf.constant(rng.normal(size=(3, 2, 4)))  # 2 rows per sample
    dx, (dc,) = layer.jacobian_rows(m, xs, layer.forward(xs, c), c)
    np.testing.assert_allclose(dx[0], m)
    np.testing.assert_allclose(dx[1], m * c)
    np.testing.assert_allclose(dc, m * xs[1][:, None, :])


def test_a_wrong_shape_names_the_layer_and_the_method():
    class WrongShape(layers.Dense):
        def vjp_input(self, m, a, z, kernel, bias=None):
            return m[0]  # the V axis dropped

    layer = WrongShape(3, dtype=F64, name="wrong")
    x = tf.ones((2, 4), F64)
    layer(x)
    params = layer.read_parameters()
    with pytest.raises(ValueError, match=r"WrongShape 'wrong'\.vjp_input returned its product"):
        layer.backward(tf.ones((2, 3), F64), x, layer.forward(x, *params), *params)


def test_defining_a_derived_method_is_refused():
    with pytest.raises(TypeError, match=r"jacobian_rows: these are derived from the contract"):

        class Overriding(layers.Dense):
            def jacobian_rows(self, m, a, z, kernel, bias=None):
                return None

    assert set(contract.DERIVED) == {
        "backward",
        "per_example_backward",
        "input_backward",
        "per_example_squared_norms",
        "jacobian_rows",
    }


def test_the_contract_check_alone_names_the_wrong_product():
    from tf_jacbp.testing import check_contract

    layer = _dense(SignFlippedRowsDense, F64)
    x = tf.constant(np.random.default_rng(2).normal(size=(3, 4)))
    layer(x)
    with pytest.raises(AssertionError, match=r"vjp_params\(sum_batch=False\) \(parameter 0, V=1\)"):
        check_contract(layer, x, seed=0)
