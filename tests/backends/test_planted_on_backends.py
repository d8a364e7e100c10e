"""Planted bugs fail ``tf_jacbp.testing.check_layer`` on the backend this run uses (TensorFlow
or JAX), as they do in the TensorFlow suite (``tests/layers/test_planted_bugs.py``,
``tests/test_contract.py``).

* Every layer class of ``layer_cases.py`` with one product of its contract 1% off
  (``planted_layers.one_percent_off``: the first parameter product, or the input product of a
  layer without parameters; BatchNormalization's training map in training): check 1 (float64
  routes) names the variable whose gradient is off.
* A doubled kernel gradient, with and without the modes.
* Wrong in one product only, right in training's batch gradient: sign-flipped per-sample rows,
  a quarter of the squared norms, a map of two inputs with its batch and input axes swapped.
* Also, on JAX: ``check_layer`` refuses to compare "float64" with x64 disabled.
"""

from __future__ import annotations

import pytest
from layer_cases import CASES
from planted_layers import (
    QuarterNormsDense,
    SignFlippedRowsDense,
    SwappedAxesWeightedSum,
    WeightedSum,
    WrongKernelGradient,
    one_percent_off,
)

from tf_jacbp import layers
from tf_jacbp.testing import check_layer


@pytest.mark.parametrize("name", list(CASES))
def test_a_one_percent_error_in_a_product_fails_check_layer(name):
    case = CASES[name]
    planted = one_percent_off(case.cls, *case.planted)
    with pytest.raises(AssertionError, match=r"float64 route: gradient of .* differs"):
        check_layer(case.make(planted), case.input_shape, modes=False, **case.options)


@pytest.mark.parametrize("modes", [True, False])
def test_a_wrong_kernel_gradient_fails_check_layer(modes, tmp_path):
    with pytest.raises(AssertionError, match="kernel differs from the reference"):
        check_layer(
            lambda dtype: WrongKernelGradient(2, dtype=dtype),
            (3,),
            tmp_dir=str(tmp_path),
            modes=modes,
        )


def _dense(cls):
    return lambda dtype: cls(3, activation="tanh", dtype=dtype)


def test_a_correct_dense_passes_the_contract_check():
    check_layer(_dense(layers.Dense), (4,), modes=False)


def test_sign_flipped_per_sample_rows_fail_check_layer():
    with pytest.raises(AssertionError, match=r"vjp_params\(sum_batch=False\)|per-example row"):
        check_layer(_dense(SignFlippedRowsDense), (4,), modes=False)


def test_quarter_norms_fail_check_layer():
    with pytest.raises(AssertionError, match=r"squared_norms"):
        check_layer(_dense(QuarterNormsDense), (4,), modes=False)


def test_a_layer_of_two_inputs_passes_at_a_batch_size_other_than_two():
    check_layer(lambda dtype: WeightedSum(dtype=dtype), [(4,), (4,)], batch_size=3, modes=False)


def test_swapped_axes_in_a_layer_of_two_inputs_fail_check_layer():
    with pytest.raises(AssertionError, match=r"vjp_input \(input 1|float64 route"):
        check_layer(
            lambda dtype: SwappedAxesWeightedSum(dtype=dtype),
            [(4,), (4,)],
            batch_size=3,
            modes=False,
        )


def test_check_layer_refuses_float32_posing_as_float64(monkeypatch, backend):
    """On JAX with x64 disabled a float64 array is float32: ``check_layer`` raises naming how to
    enable x64 instead of comparing at 1e-12 in float32."""
    if backend != "jax":
        pytest.skip("TensorFlow computes float64 in float64 always: nothing to refuse")
    monkeypatch.setattr("tf_jacbp.backend.jax.float64_enabled", lambda: False)
    with pytest.raises(RuntimeError, match=r"check_layer computes in float64.*JAX_ENABLE_X64"):
        check_layer(_dense(layers.Dense), (4,), modes=False)
